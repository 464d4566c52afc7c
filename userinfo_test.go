package caddychat

// user_info_claim (userinfo.go): the token's named claims are the user's
// info, in the welcome and on what the user publishes, on every node.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/caddychat/caddychat/internal/redistest"
)

func infoJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestUserInfoFromClaims(t *testing.T) {
	forEachBroker(t, func(t *testing.T, _ func() *Handler, rs *redistest.Server) {
		a, b := ephemeralNodes(t, rs, func(h *Handler) { h.JWT.UserInfoClaims = []string{"name", "profile.picture"} })
		tok := newToken(t, "alice").with(jwt.MapClaims{"name": "Alice A.", "email": "not shared",
			"profile": map[string]any{"picture": "https://x/a.png"}}).sign()
		alice := dial(t, a.url("/"), bearer(tok))
		w := alice.next("welcome")
		const want = `{"name":"Alice A.","profile.picture":"https://x/a.png"}`
		if got := infoJSON(t, w["info"]); got != want {
			t.Fatalf("welcome info %s, want %s", got, want)
		}
		bob := dialUserOn(t, b, "bob") // a token without the claims: no info
		bob.subscribe("room:1", 1)
		// A client-sent info beside data is ignored: the token's is stamped.
		alice.send(map[string]any{"op": "publish", "channel": "room:1", "data": "hi", "info": map[string]any{"name": "Mallory"}, "id": 2})
		m := bob.nextMessage("room:1")
		if got := infoJSON(t, m["info"]); got != want || m["from"] != "alice" {
			t.Fatalf("message %v: info %s, want %s", m, got, want)
		}
		alice.publishEphemeral(map[string]any{"channel": "room:1"}, 3)
		if m := bob.nextMessage("room:1"); m["ephemeral"] != true || infoJSON(t, m["info"]) != want {
			t.Fatalf("ephemeral message %v: want alice's info", m)
		}
		h := bob.request(map[string]any{"op": "history", "channel": "room:1", "id": 4})
		if msgs, _ := h["messages"].([]any); len(msgs) != 1 || !strings.Contains(infoJSON(t, msgs[0]), `"info":`+want) {
			t.Fatalf("history %v: want the message with alice's info", h)
		}
		alice.subscribe("room:1", 6)
		bob.publishOK("room:1", "no info", 5)
		if m := alice.nextMatching("bob's message", func(m map[string]any) bool { return m["data"] == "no info" }); m["info"] != nil || m["from"] != "bob" {
			t.Fatalf("a user without the claims has info: %v", m)
		}
	})
}

func TestUserInfoTooLarge(t *testing.T) {
	a, _ := ephemeralNodes(t, nil, func(h *Handler) { h.JWT.UserInfoClaims = []string{"name", "bio"} })
	for _, bio := range []any{strings.Repeat("x", 1100), []any{strings.Repeat("y", 600), strings.Repeat("z", 600)}} {
		tok := newToken(t, "alice").with(jwt.MapClaims{"name": "Alice", "bio": bio}).sign()
		r := dialRefused(t, a.url("/"), bearer(tok))
		if r.status != http.StatusUnauthorized || !strings.Contains(r.body, "user info too large") {
			t.Fatalf("oversized info: %d %q, want 401 user info too large", r.status, r.body)
		}
	}
	// Just under the bound is accepted.
	tok := newToken(t, "alice").with(jwt.MapClaims{"name": "Alice", "bio": strings.Repeat("x", 980)}).sign()
	c := dial(t, a.url("/"), bearer(tok))
	if w := c.next("welcome"); w["info"] == nil {
		t.Fatalf("welcome without info: %v", w)
	}
}

// TestUserInfoPresence: a user's info is in join and leave events and in
// presence entries (its latest connection's), on both presence stores.
func TestUserInfoPresence(t *testing.T) {
	forEachBroker(t, func(t *testing.T, _ func() *Handler, rs *redistest.Server) {
		a, b := ephemeralNodes(t, rs, func(h *Handler) { h.JWT.UserInfoClaims = []string{"name"} })
		bob := dialUserOn(t, b, "bob") // no name claim: no info
		bob.subscribe("room:1", 1)
		named := func(name string) *testClient {
			c := dial(t, a.url("/"), bearer(newToken(t, "alice").with(jwt.MapClaims{"name": name}).sign()))
			c.next("welcome")
			return c
		}
		event := func(typ string) map[string]any {
			return bob.nextMatching(typ+" of alice", func(m map[string]any) bool { return m["type"] == typ && m["user"] == "alice" })
		}
		alice1 := named("Alice")
		alice1.subscribe("room:1", 1)
		if e := event("join"); infoJSON(t, e["info"]) != `{"name":"Alice"}` || e["channel"] != "room:1" {
			t.Fatalf("join %v: want alice's info", e)
		}
		presence := func() map[string]string {
			r := bob.request(map[string]any{"op": "presence", "channel": "room:1", "id": 50})
			out := map[string]string{}
			for _, u := range r["users"].([]any) {
				u := u.(map[string]any)
				out[u["user"].(string)] = fmt.Sprintf("%v %s", u["connections"], infoJSON(t, u["info"]))
			}
			return out
		}
		if got := presence(); got["alice"] != `1 {"name":"Alice"}` || got["bob"] != "1 null" {
			t.Fatalf("presence %v", got)
		}
		// A second connection with another name: the latest is listed.
		alice2 := named("Alice (phone)")
		alice2.subscribe("room:1", 1)
		if got := presence(); got["alice"] != `2 {"name":"Alice (phone)"}` {
			t.Fatalf("presence after a second connection %v", got)
		}
		alice1.send(map[string]any{"op": "unsubscribe", "channel": "room:1", "id": 2})
		alice1.reply(2)
		alice2.send(map[string]any{"op": "unsubscribe", "channel": "room:1", "id": 2})
		alice2.reply(2)
		if e := event("leave"); infoJSON(t, e["info"]) != `{"name":"Alice (phone)"}` {
			t.Fatalf("leave %v: want alice's info", e)
		}
		if got := presence(); len(got) != 1 {
			t.Fatalf("presence after alice left %v", got)
		}
		if rs != nil {
			// Redis keeps no info of users who left.
			n, err := rs.Client().Exists(t.Context(), "{"+*a.h.ChannelPrefix+"room:1}:info").Result()
			if err != nil || n != 0 {
				t.Fatalf("info key after everyone with info left: %d %v", n, err)
			}
		}
	})
}

// TestUserInfoPresenceBoundInRedis: the join script keeps no info over the
// bound or that is not an object, whatever a caller sends it.
func TestUserInfoPresenceBoundInRedis(t *testing.T) {
	rs := redistest.Start(t)
	s := newRedisPresence(rs.Client(), uniquePrefix(), false)
	for i, info := range []string{`{"name":"` + strings.Repeat("x", maxPresenceInfo) + `"}`, `"a string"`, `[1]`} {
		e := &presenceEntry{channel: "room:1", user: "u", member: fmt.Sprintf("u\x00n\x00c%d", i), ttl: time.Minute, info: json.RawMessage(info)}
		if err := s.join(t.Context(), e); err != nil {
			t.Fatal(err)
		}
		users, err := s.list(t.Context(), "room:1")
		if err != nil || len(users) != 1 || users[0].Info != nil {
			t.Fatalf("info %.40q: listed %v %v, want no info", info, users, err)
		}
	}
	n, err := rs.Client().HLen(t.Context(), s.keys("room:1")[2]).Result()
	if err != nil || n != 0 {
		t.Fatalf("the info hash holds %d entries (%v), want none", n, err)
	}
}

// TestUserInfoConnectHookWins: the connect hook's info replaces the
// token's; a hook answer without info keeps the token's, for the same user.
func TestUserInfoConnectHookWins(t *testing.T) {
	var answer atomic.Value
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(answer.Load().(string)))
	}))
	t.Cleanup(backend.Close)
	a, _ := ephemeralNodes(t, nil, func(h *Handler) {
		h.JWT.UserInfoClaims = []string{"name"}
		h.ConnectHook = &HookConfig{URL: backend.URL}
	})
	tok := newToken(t, "alice").with(jwt.MapClaims{"name": "From Token"}).sign()
	for _, tc := range []struct{ answer, want string }{
		{`{"result":"allow","info":{"name":"From Hook"}}`, `{"name":"From Hook"}`},
		{`{"result":"allow"}`, `{"name":"From Token"}`},
		{`{"result":"allow","user":"bob"}`, `null`},
	} {
		answer.Store(tc.answer)
		c := dial(t, a.url("/"), bearer(tok))
		if w := c.next("welcome"); infoJSON(t, w["info"]) != tc.want {
			t.Fatalf("hook answer %s: welcome %v, want info %s", tc.answer, w, tc.want)
		}
	}
}
