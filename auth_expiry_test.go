package caddychat

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/golang-jwt/jwt/v5"
)

// Token expiry and the refresh op.

// shortExp is a whole-second expiry between 2 and 3 seconds ahead (JWT times
// have a one-second resolution).
func shortExp() time.Time {
	return time.Unix(time.Now().Unix()+3, 0)
}

// expiryLeeway is the leeway of the expiry tests: a connection closes when
// exp plus the leeway has passed.
const expiryLeeway = time.Second

func expiryNode(t *testing.T) *testNode {
	return jwtNode(t, &JWTConfig{Secret: testSecret, Leeway: caddy.Duration(expiryLeeway)})
}

func TestTokenExpiryCloses4002(t *testing.T) {
	t.Parallel()
	n := expiryNode(t)
	exp := shortExp()
	c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").with(jwt.MapClaims{"exp": exp.Unix(), "chat": map[string]any{"subscribe": []string{"room:*"}}}).sign()))
	c.next("welcome")
	c.subscribe("room:x", 1)
	code := c.closeCode()
	closedAt := time.Now()
	if code != closeTokenExpired {
		t.Fatalf("close code = %v, want %d", code, closeTokenExpired)
	}
	deadline := exp.Add(expiryLeeway)
	if early := deadline.Sub(closedAt); early > 50*time.Millisecond {
		t.Fatalf("closed %v before the token's exp plus leeway", early)
	}
	if late := closedAt.Sub(deadline); late > 2*time.Second {
		t.Fatalf("closed %v after the token's exp plus leeway", late)
	}
}

func TestRefreshExtendsConnection(t *testing.T) {
	t.Parallel()
	n := expiryNode(t)
	perms := jwt.MapClaims{"chat": map[string]any{"subscribe": []string{"room:*"}, "publish": []string{"room:*"}}}
	exp := shortExp()
	c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").with(perms).with(jwt.MapClaims{"exp": exp.Unix()}).sign()))
	c.next("welcome")
	c.subscribe("room:x", 1)

	c.send(map[string]any{"op": "refresh", "token": newToken(t, "alice").with(perms).sign(), "id": 2})
	if r := expectOK(t, c, 2); len(r) != 2 {
		t.Fatalf("refresh reply = %v, want just type and id", r)
	}

	// Past the old token's exp plus leeway, the connection stays and works.
	time.Sleep(time.Until(exp.Add(expiryLeeway)) + 300*time.Millisecond)
	if _, m := ownDelivery(t, c, "room:x", "still here", 3); m["data"] != "still here" || m["from"] != "alice" {
		t.Fatalf("delivery = %v", m)
	}
	c.subscribe("room:y", 4)
	select {
	case err := <-c.closed:
		t.Fatalf("connection closed: %v", err)
	default:
	}
}

func TestRefreshNarrowsPermissions(t *testing.T) {
	n := jwtNode(t, &JWTConfig{Secret: testSecret})
	c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").with(jwt.MapClaims{"chat": map[string]any{"subscribe": []string{"room:*", "news:*"}, "publish": []string{"room:*", "news:*"}}}).sign()))
	c.next("welcome")
	c.subscribe("room:x", 1)
	c.subscribe("news:x", 2)
	c.send(map[string]any{"op": "refresh", "token": newToken(t, "alice").with(jwt.MapClaims{"chat": map[string]any{"subscribe": []string{"room:*"}, "publish": []string{"room:*"}}}).sign(), "id": 3})
	expectOK(t, c, 3)
	c.send(map[string]any{"op": "subscribe", "channel": "news:y", "id": 4})
	expectError(t, c, 4, "forbidden", "news:y")
	c.send(map[string]any{"op": "publish", "channel": "news:x", "data": 1, "id": 5})
	expectError(t, c, 5, "forbidden", "news:x")
	if got := n.h.hub.members("news:x"); got != 0 {
		t.Fatalf("news:x still has %d members after the refresh dropped it", got)
	}
	if _, m := ownDelivery(t, c, "room:x", "ok", 6); m["channel"] != "room:x" {
		t.Fatalf("delivery = %v", m)
	}
}

func TestRefreshRefused(t *testing.T) {
	t.Parallel()
	n := expiryNode(t)
	exp := shortExp()
	c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").with(jwt.MapClaims{"exp": exp.Unix()}).sign()))
	c.next("welcome")

	c.send(map[string]any{"op": "refresh", "token": newToken(t, "bob").sign(), "id": 1})
	expectError(t, c, 1, "forbidden", "")
	c.send(map[string]any{"op": "refresh", "token": newToken(t, "alice").secret("another-secret-another-secret-0123456789").sign(), "id": 2})
	expectError(t, c, 2, "unauthorized", "")
	expired := newToken(t, "alice").with(jwt.MapClaims{"exp": time.Now().Add(-time.Minute).Unix()}).sign()
	c.send(map[string]any{"op": "refresh", "token": expired, "id": 3})
	expectError(t, c, 3, "unauthorized", "")
	c.send(map[string]any{"op": "refresh", "token": "garbage", "id": 4})
	expectError(t, c, 4, "unauthorized", "")
	c.send(map[string]any{"op": "refresh", "id": 5})
	expectError(t, c, 5, "bad_request", "")

	// None of that changed the connection's expiry.
	code := c.closeCode()
	closedAt := time.Now()
	if code != closeTokenExpired {
		t.Fatalf("close code = %v, want %d", code, closeTokenExpired)
	}
	if early := exp.Add(expiryLeeway).Sub(closedAt); early > 50*time.Millisecond {
		t.Fatalf("closed %v before the token's exp plus leeway", early)
	}
}
