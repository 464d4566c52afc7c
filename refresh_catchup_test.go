package caddychat

import (
	"testing"

	"github.com/golang-jwt/jwt/v5"
)

// connOf finds the node's connection of user.
func connOf(t *testing.T, n *testNode, user string) *conn {
	t.Helper()
	n.h.hub.mu.RLock()
	defer n.h.hub.mu.RUnlock()
	for s := range n.h.hub.subscribers {
		if c := s.(*conn); c.identity.user == user {
			return c
		}
	}
	t.Fatalf("no connection of %s", user)
	return nil
}

// catchUpState reports whether c holds catch-up state for channel, and the
// number of channels catching up.
func catchUpState(c *conn, channel string) (bool, int32) {
	c.catchMu.Lock()
	defer c.catchMu.Unlock()
	_, ok := c.catchUps[channel]
	return ok, c.catchingUp.Load()
}

// TestRefreshCancelsCatchUp: a refresh that drops a channel the connection
// is catching up on (here draining: the replay is queued, live copies up to
// its last id are still being dropped) ends that catch-up as leave does: no
// message of the channel reaches the connection afterwards, and the state
// is gone.
func TestRefreshCancelsCatchUp(t *testing.T) {
	n := startNode(t, &Handler{
		JWT:           &JWTConfig{Secret: testSecret},
		ChannelPrefix: ptr(uniquePrefix()),
		History:       []HistoryRule{{Count: 100}},
	})
	both := jwt.MapClaims{"chat": map[string]any{"subscribe": []string{"room:*", "news:*"}, "publish": []string{"room:*", "news:*"}}}
	pub := dial(t, n.url("/ws"), bearer(newToken(t, "publisher").with(both).sign()))
	pub.next("welcome")
	pub.publishOK("news:x", "old 1", 1)
	pub.publishOK("news:x", "old 2", 2)

	alice := dial(t, n.url("/ws"), bearer(newToken(t, "alice").with(both).sign()))
	alice.next("welcome")
	alice.subscribe("room:x", 1)
	r := alice.request(map[string]any{"op": "subscribe", "channel": "news:x", "history": 10, "id": 2})
	if r["type"] != "ok" || r["replayed"] != 2.0 {
		t.Fatalf("subscribe with history: %v", r)
	}
	for _, want := range []string{"old 1", "old 2"} {
		if m := alice.next("message"); m["data"] != want {
			t.Fatalf("replay: got %v, want %q", m, want)
		}
	}
	c := connOf(t, n, "alice")
	if held, count := catchUpState(c, "news:x"); !held || count != 1 {
		t.Fatalf("before the refresh: catch-up on news:x %v, channels catching up %d; want the draining catch-up", held, count)
	}

	narrow := jwt.MapClaims{"chat": map[string]any{"subscribe": []string{"room:*"}, "publish": []string{"room:*"}}}
	alice.send(map[string]any{"op": "refresh", "token": newToken(t, "alice").with(narrow).sign(), "id": 3})
	expectOK(t, alice, 3)
	if held, count := catchUpState(c, "news:x"); held || count != 0 {
		t.Errorf("after the refresh: catch-up on news:x %v, channels catching up %d; want none", held, count)
	}
	if got := n.h.hub.members("news:x"); got != 0 {
		t.Errorf("news:x has %d members after the refresh, want 0", got)
	}

	// Nothing of news:x arrives any more: the next message is room:x's.
	pub.publishOK("news:x", "new", 4)
	pub.publishOK("room:x", "marker", 5)
	if m := alice.next("message"); m["channel"] != "room:x" || m["data"] != "marker" {
		t.Fatalf("after the refresh alice got %v, want the room:x marker", m)
	}
}
