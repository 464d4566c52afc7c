package caddychat

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"
)

func jwtNode(t *testing.T, cfg *JWTConfig) *testNode {
	t.Helper()
	return startNode(t, &Handler{JWT: cfg, ChannelPrefix: ptr(uniquePrefix())})
}

// expect401 checks a refused upgrade: 401, the reason in the body, the
// WWW-Authenticate challenge, and never the token.
func expect401(t *testing.T, r refusal, reason, token string) {
	t.Helper()
	if r.status != http.StatusUnauthorized {
		t.Fatalf("status = %d (body %q), want 401", r.status, r.body)
	}
	if want := "unauthorized: " + reason + "\n"; r.body != want {
		t.Errorf("body = %q, want %q", r.body, want)
	}
	if got := r.header.Get("WWW-Authenticate"); !strings.HasPrefix(got, "Bearer ") {
		t.Errorf("WWW-Authenticate = %q, want a Bearer challenge", got)
	}
	if token != "" && (strings.Contains(r.body, token) || strings.Contains(fmt.Sprint(r.header), token)) {
		t.Errorf("the 401 response contains the token")
	}
}

func writePEM(t *testing.T, pub any) (path string, pemBytes []byte) {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	pemBytes = pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	path = filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(path, pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, pemBytes
}

func rsaKey(t *testing.T) *rsa.PrivateKey {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// ---------------------------------------------------------------------------
// Refusals before the upgrade.

func TestAuthRefusalsBeforeUpgrade(t *testing.T) {
	n := jwtNode(t, &JWTConfig{Secret: testSecret, Issuer: "https://issuer.example", Audience: "chat"})
	good := jwt.MapClaims{"iss": "https://issuer.example", "aud": "chat"}
	now := time.Now()
	extra := func(more jwt.MapClaims) jwt.MapClaims {
		c := jwt.MapClaims{}
		for k, v := range good {
			c[k] = v
		}
		for k, v := range more {
			c[k] = v
		}
		return c
	}

	// The baseline token is accepted: each case below differs in one thing.
	ok := dial(t, n.url("/ws"), bearer(newToken(t, "alice").with(good).sign()))
	if w := ok.next("welcome"); w["user"] != "alice" {
		t.Fatalf("welcome = %v", w)
	}

	noneToken := newToken(t, "alice").with(good).signedWith(jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, "").sign()
	cases := []struct {
		name, token, reason string
	}{
		{"forged signature", newToken(t, "alice").with(good).secret("another-secret-another-secret-0123456789").sign(), "invalid token signature"},
		{"alg none", noneToken, "invalid token signature"},
		{"expired", newToken(t, "alice").with(extra(jwt.MapClaims{"exp": now.Add(-time.Minute).Unix()})).sign(), "token expired"},
		{"not yet valid", newToken(t, "alice").with(extra(jwt.MapClaims{"nbf": now.Add(time.Minute).Unix()})).sign(), "token not valid yet"},
		{"issued in the future", newToken(t, "alice").with(extra(jwt.MapClaims{"iat": now.Add(time.Minute).Unix()})).sign(), "token not valid yet"},
		{"wrong issuer", newToken(t, "alice").with(extra(jwt.MapClaims{"iss": "https://evil.example"})).sign(), "wrong token issuer"},
		{"no issuer", newToken(t, "alice").with(jwt.MapClaims{"aud": "chat"}).sign(), "token lacks a required claim (iss)"},
		{"no audience", newToken(t, "alice").with(jwt.MapClaims{"iss": "https://issuer.example"}).sign(), "token lacks a required claim (aud)"},
		{"wrong audience", newToken(t, "alice").with(extra(jwt.MapClaims{"aud": []string{"billing", "admin"}})).sign(), "wrong token audience"},
		{"no exp", newToken(t, "alice").with(extra(jwt.MapClaims{"exp": nil})).sign(), "token lacks a required claim (exp)"},
		{"no sub", newToken(t, "").with(extra(jwt.MapClaims{"sub": nil})).sign(), "token has no sub claim"},
		{"numeric sub", newToken(t, "").with(extra(jwt.MapClaims{"sub": 42})).sign(), "token has no sub claim"},
		{"malformed", "not.a.jwt", "malformed token"},
		{"oversized", newToken(t, "alice").with(extra(jwt.MapClaims{"pad": strings.Repeat("x", 8192)})).sign(), "token too large"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			expect401(t, dialRefused(t, n.url("/ws"), bearer(tc.token)), tc.reason, tc.token)
		})
	}

	t.Run("missing token", func(t *testing.T) {
		expect401(t, dialRefused(t, n.url("/ws"), nil), "missing token", "")
	})
	t.Run("not a bearer header", func(t *testing.T) {
		r := dialRefused(t, n.url("/ws"), &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Basic YWxpY2U6cHc="}}})
		expect401(t, r, "authorization header must be Bearer <token>", "")
	})
	t.Run("token just under max_token_size", func(t *testing.T) {
		// The limit is on the token's length, not an accident of parsing.
		base := newToken(t, "alice").with(extra(jwt.MapClaims{"pad": ""})).sign()
		pad := (defaultMaxTokenSize - len(base)) * 3 / 4
		var tok string
		for ; ; pad-- {
			tok = newToken(t, "alice").with(extra(jwt.MapClaims{"pad": strings.Repeat("x", pad)})).sign()
			if len(tok) <= defaultMaxTokenSize {
				break
			}
		}
		c := dial(t, n.url("/ws"), bearer(tok))
		if w := c.next("welcome"); w["user"] != "alice" {
			t.Fatalf("welcome = %v", w)
		}
		big := newToken(t, "alice").with(extra(jwt.MapClaims{"pad": strings.Repeat("x", pad+3)})).sign()
		if len(big) <= defaultMaxTokenSize {
			t.Fatalf("test setup: %d-byte token is not over the limit", len(big))
		}
		expect401(t, dialRefused(t, n.url("/ws"), bearer(big)), "token too large", big)
	})
}

func TestAuthLeewayToleratesSmallSkew(t *testing.T) {
	n := jwtNode(t, &JWTConfig{Secret: testSecret})
	// nbf 2s ahead is within the default 5s leeway.
	tok := newToken(t, "alice").with(jwt.MapClaims{"nbf": time.Now().Add(2 * time.Second).Unix()}).sign()
	c := dial(t, n.url("/ws"), bearer(tok))
	if w := c.next("welcome"); w["user"] != "alice" {
		t.Fatalf("welcome = %v", w)
	}
}

func TestAuthHMACWithPublicKeyPEMRefused(t *testing.T) {
	key := rsaKey(t)
	path, pemBytes := writePEM(t, &key.PublicKey)
	n := jwtNode(t, &JWTConfig{PublicKey: path})

	// Algorithm confusion: an HS256 token whose HMAC key is the public PEM.
	for _, method := range []jwt.SigningMethod{jwt.SigningMethodHS256, jwt.SigningMethodHS384, jwt.SigningMethodHS512} {
		tok := newToken(t, "alice").signedWith(method, pemBytes, "").sign()
		expect401(t, dialRefused(t, n.url("/ws"), bearer(tok)), "invalid token signature", tok)
	}
	// The route does accept the key's own tokens.
	c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").signedWith(jwt.SigningMethodRS256, key, "").sign()))
	if w := c.next("welcome"); w["user"] != "alice" {
		t.Fatalf("welcome = %v", w)
	}
}

// ---------------------------------------------------------------------------
// Where the token may come from.

func TestTokenFromAuthorizationHeader(t *testing.T) {
	n := jwtNode(t, &JWTConfig{Secret: testSecret})
	c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").sign()))
	if w := c.next("welcome"); w["user"] != "alice" {
		t.Fatalf("welcome = %v", w)
	}
	// The scheme is case-insensitive.
	c2 := dial(t, n.url("/ws"), &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"bearer " + newToken(t, "bob").sign()}}})
	if w := c2.next("welcome"); w["user"] != "bob" {
		t.Fatalf("welcome = %v", w)
	}
}

func TestTokenFromCookie(t *testing.T) {
	tok := newToken(t, "alice").sign()
	cookie := func(name string) *websocket.DialOptions {
		return &websocket.DialOptions{HTTPHeader: http.Header{"Cookie": {"other=1; " + name + "=" + tok}}}
	}

	t.Run("default name", func(t *testing.T) {
		n := jwtNode(t, &JWTConfig{Secret: testSecret})
		c := dial(t, n.url("/ws"), cookie("chat_token"))
		if w := c.next("welcome"); w["user"] != "alice" {
			t.Fatalf("welcome = %v", w)
		}
		expect401(t, dialRefused(t, n.url("/ws"), cookie("session")), "missing token", tok)
	})
	t.Run("configured name", func(t *testing.T) {
		n := jwtNode(t, &JWTConfig{Secret: testSecret, Cookie: "session"})
		c := dial(t, n.url("/ws"), cookie("session"))
		if w := c.next("welcome"); w["user"] != "alice" {
			t.Fatalf("welcome = %v", w)
		}
		expect401(t, dialRefused(t, n.url("/ws"), cookie("chat_token")), "missing token", tok)
	})
}

func TestTokenFromSubprotocol(t *testing.T) {
	n := jwtNode(t, &JWTConfig{Secret: testSecret})
	tok := newToken(t, "alice").sign()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, resp, err := websocket.Dial(ctx, n.url("/ws"), &websocket.DialOptions{Subprotocols: []string{"caddychat", "bearer." + tok}})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer ws.CloseNow()
	if got := ws.Subprotocol(); got != "caddychat" {
		t.Fatalf("negotiated subprotocol = %q, want caddychat", got)
	}
	if got := resp.Header.Values("Sec-WebSocket-Protocol"); len(got) != 1 || got[0] != "caddychat" {
		t.Fatalf("Sec-WebSocket-Protocol response header = %q", got)
	}
	_, b, err := ws.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var w map[string]any
	if err := json.Unmarshal(b, &w); err != nil || w["type"] != "welcome" || w["user"] != "alice" {
		t.Fatalf("welcome = %s (%v)", b, err)
	}

	// The token offered in the other order works too.
	c := dial(t, n.url("/ws"), &websocket.DialOptions{Subprotocols: []string{"bearer." + tok, "caddychat"}})
	if c.ws.Subprotocol() != "caddychat" {
		t.Fatalf("negotiated subprotocol = %q", c.ws.Subprotocol())
	}
	c.next("welcome")

	t.Run("bearer without caddychat", func(t *testing.T) {
		r := dialRefused(t, n.url("/ws"), &websocket.DialOptions{Subprotocols: []string{"bearer." + tok}})
		if r.status != http.StatusBadRequest {
			t.Fatalf("status = %d (%q), want 400", r.status, r.body)
		}
		if strings.Contains(r.body, tok) || !strings.Contains(r.body, "caddychat") {
			t.Fatalf("body = %q", r.body)
		}
	})
	t.Run("invalid token in subprotocol", func(t *testing.T) {
		bad := newToken(t, "alice").secret("another-secret-another-secret-0123456789").sign()
		r := dialRefused(t, n.url("/ws"), &websocket.DialOptions{Subprotocols: []string{"caddychat", "bearer." + bad}})
		expect401(t, r, "invalid token signature", bad)
	})
}

func TestQueryParamToken(t *testing.T) {
	tok := newToken(t, "alice").sign()
	t.Run("off by default", func(t *testing.T) {
		n := jwtNode(t, &JWTConfig{Secret: testSecret})
		expect401(t, dialRefused(t, n.url("/ws?token="+tok), nil), "missing token", tok)
	})
	t.Run("enabled", func(t *testing.T) {
		n := jwtNode(t, &JWTConfig{Secret: testSecret, QueryParam: "token"})
		c := dial(t, n.url("/ws?token="+tok), nil)
		if w := c.next("welcome"); w["user"] != "alice" {
			t.Fatalf("welcome = %v", w)
		}
		// Another parameter name is not looked at.
		expect401(t, dialRefused(t, n.url("/ws?access_token="+tok), nil), "missing token", tok)
	})
}

func TestTokenUserClaim(t *testing.T) {
	n := jwtNode(t, &JWTConfig{Secret: testSecret, UserClaim: "email"})
	c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").with(jwt.MapClaims{"email": "alice@example.com"}).sign()))
	if w := c.next("welcome"); w["user"] != "alice@example.com" {
		t.Fatalf("welcome = %v, want user alice@example.com", w)
	}
	tok := newToken(t, "alice").sign()
	expect401(t, dialRefused(t, n.url("/ws"), bearer(tok)), "token has no email claim", tok)

	nested := jwtNode(t, &JWTConfig{Secret: testSecret, UserClaim: "profile.id"})
	c2 := dial(t, nested.url("/ws"), bearer(newToken(t, "alice").with(jwt.MapClaims{"profile": map[string]any{"id": "u-17"}}).sign()))
	if w := c2.next("welcome"); w["user"] != "u-17" {
		t.Fatalf("welcome = %v, want user u-17", w)
	}
}
