package caddychat

// End-to-end: idempotent publish (idempotency.go) on two nodes sharing a
// real Redis, and on the memory broker.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
)

const idemPublishKey = "test-publish-key-idem-0123456789"

func idemRoutes(redis string, window string) string {
	if redis != "" {
		redis = "redis " + redis + "\n\t\t"
	}
	return fmt.Sprintf(`	chat /ws {
		%sjwt {
			secret %s
			query_token
		}
		subscribe room:* hist:*
		publish room:* hist:*
		history hist:* 10
		rate_limit off
		idempotency_window %s
		publish_endpoint /chat/publish
		publish_key %s
	}`, redis, testSecret, window, idemPublishKey)
}

// publishKeyed publishes with an idempotency key and returns the reply.
func (c *wsClient) publishKeyed(channel string, data any, key string) *serverMsg {
	c.t.Helper()
	m, err := c.request(map[string]any{"op": "publish", "channel": channel, "data": data, "idempotency_key": key}, 10*time.Second)
	if err != nil {
		c.t.Fatal(err)
	}
	return m
}

func isDuplicate(m *serverMsg) bool { return strings.Contains(m.raw, `"duplicate":true`) }

// deliveredOnce checks that each subscriber's next message is id, and that
// the one after it is the marker a key-less publish by marker sends now:
// nothing else was delivered in between.
func deliveredOnce(t *testing.T, channel, id string, marker *wsClient, subs ...*wsClient) {
	t.Helper()
	for _, s := range subs {
		m := s.expectMessage(channel, 5*time.Second)
		if got := msgID(t, m); got != id {
			t.Fatalf("%s: delivered %s, want message %s", s.name, m, id)
		}
	}
	mark := marker.mustPublish(channel, "marker")
	for _, s := range subs {
		m := s.expectMessage(channel, 5*time.Second)
		if got := msgID(t, m); got != mark.MessageID {
			t.Fatalf("%s: after %s, got %s, want only the marker %s: a repeat was delivered", s.name, id, m, mark.MessageID)
		}
	}
}

func msgID(t *testing.T, m *serverMsg) string {
	t.Helper()
	var id string
	if err := json.Unmarshal(m.ID, &id); err != nil {
		t.Fatalf("message without a string id: %s", m)
	}
	return id
}

// sameIDs checks that replies are ok with one message id, the first not a
// duplicate and the others duplicates, and returns the id.
func sameIDs(t *testing.T, replies []*serverMsg) string {
	t.Helper()
	id := replies[0].MessageID
	for i, r := range replies {
		if r.Type != "ok" || r.MessageID == "" || r.MessageID != id {
			t.Fatalf("reply %d: %s, want ok with message_id %s", i, r, id)
		}
		if isDuplicate(r) != (i > 0) {
			t.Fatalf("reply %d: %s: duplicate should be %v", i, r, i > 0)
		}
	}
	return id
}

func TestIdempotentPublishTwoNodes(t *testing.T) {
	rs := redistest.Start(t)
	routes := idemRoutes(rs.URL(), "3s")
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)
	testIdempotentPublish(t, []*caddyNode{a, b})
}

func TestIdempotentPublishMemory(t *testing.T) {
	a := startCaddy(t, "A", idemRoutes("", "3s"))
	testIdempotentPublish(t, []*caddyNode{a})
}

func testIdempotentPublish(t *testing.T, nodes []*caddyNode) {
	tok := func(user string) string { return newToken(t, user).sign() }
	node := func(i int) *caddyNode { return nodes[i%len(nodes)] }
	var subs []*wsClient
	var alice []*wsClient
	for i, n := range nodes {
		s := dialJSON(t, fmt.Sprintf("sub@%d", i), n.wsURL("/ws?token="+tok("watcher")))
		s.subscribe("room:idem")
		s.subscribe("hist:idem")
		subs = append(subs, s)
		alice = append(alice, dialJSON(t, fmt.Sprintf("alice@%d", i), n.wsURL("/ws?token="+tok("alice"))))
	}
	marker := dialJSON(t, "marker", nodes[0].wsURL("/ws?token="+tok("marker")))

	for _, channel := range []string{"room:idem", "hist:idem"} {
		// The same publish 5 times, over every node, then once more on a
		// new connection (a reconnect).
		var replies []*serverMsg
		for i := range 5 {
			replies = append(replies, alice[i%len(alice)].publishKeyed(channel, map[string]int{"try": i}, "key-1"))
		}
		again := dialJSON(t, "alice again", node(1).wsURL("/ws?token="+tok("alice")))
		replies = append(replies, again.publishKeyed(channel, "retry", "key-1"))
		id := sameIDs(t, replies)
		deliveredOnce(t, channel, id, marker, subs...)

		// Another user's equal key is its own.
		bob := dialJSON(t, "bob", node(1).wsURL("/ws?token="+tok("bob")))
		r := bob.publishKeyed(channel, "bob", "key-1")
		if r.Type != "ok" || r.MessageID == id || isDuplicate(r) {
			t.Fatalf("bob's publish with alice's key: %s, want a new message", r)
		}
		deliveredOnce(t, channel, r.MessageID, marker, subs...)
	}

	// Bad keys.
	for _, key := range []string{"", strings.Repeat("k", 129), "a\nb", "a b", "a\x00b", "é"} {
		r := alice[0].publishKeyed("room:idem", "bad", key)
		if r.Type != "error" || r.Code != "bad_request" || !strings.Contains(r.Message, "idempotency_key") {
			t.Errorf("key %q: got %s, want bad_request about idempotency_key", key, r)
		}
	}
	if r := alice[0].publishKeyed("room:idem", "max", strings.Repeat("k", 128)); r.Type != "ok" {
		t.Errorf("a 128-byte key: got %s, want ok", r)
	}
	deliveredOnce(t, "room:idem", alice[0].publishKeyed("room:idem", "max", strings.Repeat("k", 128)).MessageID, marker, subs...)

	// The HTTP endpoint: the publish key's keys are the backend's.
	var httpIDs []string
	for i := range 4 {
		status, body := httpPublish(t, node(i).httpURL("/chat/publish"), idemPublishKey, `{"channel":"room:idem","data":"backend","idempotency_key":"key-1"}`)
		var res struct {
			ID        string `json:"id"`
			Duplicate bool   `json:"duplicate"`
		}
		if err := json.Unmarshal([]byte(body), &res); status != http.StatusOK || err != nil || res.ID == "" || res.Duplicate != (i > 0) {
			t.Fatalf("HTTP publish %d: HTTP %d %s", i, status, body)
		}
		httpIDs = append(httpIDs, res.ID)
	}
	for _, id := range httpIDs[1:] {
		if id != httpIDs[0] {
			t.Fatalf("HTTP publishes with one key got ids %v", httpIDs)
		}
	}
	deliveredOnce(t, "room:idem", httpIDs[0], marker, subs...)
	// In a batch too, and a bad key is a 400.
	status, body := httpPublish(t, node(1).httpURL("/chat/publish"), idemPublishKey, `{"messages":[{"channel":"room:idem","data":1,"idempotency_key":"key-1"}]}`)
	if status != http.StatusOK || !strings.Contains(body, `"id":"`+httpIDs[0]+`","duplicate":true`) {
		t.Fatalf("batch repeat: HTTP %d %s", status, body)
	}
	if status, body := httpPublish(t, node(0).httpURL("/chat/publish"), idemPublishKey, `{"channel":"room:idem","data":1,"idempotency_key":"a b"}`); status != http.StatusBadRequest || !strings.Contains(body, "bad_request") {
		t.Fatalf("bad key over HTTP: HTTP %d %s", status, body)
	}
	// A user's token over HTTP shares the user's keys: alice's key-1 on
	// room:idem is already used.
	status, body = httpPublish(t, node(1).httpURL("/chat/publish"), tok("alice"), `{"channel":"room:idem","data":"alice over http","idempotency_key":"key-1"}`)
	if status != http.StatusOK || !strings.Contains(body, `"duplicate":true`) {
		t.Fatalf("alice's key over HTTP: HTTP %d %s, want a duplicate", status, body)
	}

	// After the window (3s) the key is new again.
	time.Sleep(3500 * time.Millisecond)
	r := alice[0].publishKeyed("room:idem", "later", "key-1")
	if r.Type != "ok" || isDuplicate(r) {
		t.Fatalf("key-1 after the window: %s, want a new message", r)
	}
	deliveredOnce(t, "room:idem", r.MessageID, marker, subs...)
}

// TestIdempotentPublishAnonymous: an anonymous client's keys are its
// connection's: another anonymous connection's equal key is a new message.
func TestIdempotentPublishAnonymous(t *testing.T) {
	n := startCaddy(t, "A", `	chat /ws {
		rate_limit off
	}`)
	sub := dialJSON(t, "sub", n.wsURL("/ws"))
	sub.subscribe("room:anon")
	one := dialJSON(t, "one", n.wsURL("/ws"))
	two := dialJSON(t, "two", n.wsURL("/ws"))
	first := sameIDs(t, []*serverMsg{one.publishKeyed("room:anon", 1, "k"), one.publishKeyed("room:anon", 2, "k")})
	deliveredOnce(t, "room:anon", first, one, sub)
	r := two.publishKeyed("room:anon", 3, "k")
	if r.Type != "ok" || r.MessageID == first || isDuplicate(r) {
		t.Fatalf("another anonymous connection's key: %s", r)
	}
	deliveredOnce(t, "room:anon", r.MessageID, one, sub)
}

// TestIdempotencyWindowOff: with idempotency_window off keys are ignored.
func TestIdempotencyWindowOff(t *testing.T) {
	n := startCaddy(t, "A", `	chat /ws {
		rate_limit off
		idempotency_window off
	}`)
	c := dialJSON(t, "c", n.wsURL("/ws"))
	a, b := c.publishKeyed("room:off", 1, "k"), c.publishKeyed("room:off", 2, "k")
	if a.Type != "ok" || b.Type != "ok" || a.MessageID == b.MessageID || isDuplicate(b) {
		t.Fatalf("window off: %s, %s: want two messages", a, b)
	}
}
