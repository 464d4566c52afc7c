package caddychat

// user_info_claim (userinfo.go): the token's named claims are the user's
// info, in the welcome and on what the user publishes, on every node.

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

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
