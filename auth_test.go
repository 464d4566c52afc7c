package caddychat

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func bearer(token string) *websocket.DialOptions {
	return &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer " + token}}}
}

func jwtNode(t *testing.T, cfg *JWTConfig) *testNode {
	t.Helper()
	return startNode(t, &Handler{JWT: cfg, ChannelPrefix: ptr(uniquePrefix())})
}

// refusal is an upgrade the server answered with a plain HTTP status.
type refusal struct {
	status int
	body   string
	header http.Header
}

// dialRefused dials url and expects the upgrade to be refused.
func dialRefused(t *testing.T, url string, opts *websocket.DialOptions) refusal {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, resp, err := websocket.Dial(ctx, url, opts)
	if err == nil {
		_ = ws.CloseNow()
		t.Fatalf("dial %s succeeded, want it refused", url)
	}
	if resp == nil {
		t.Fatalf("dial %s: no HTTP response: %v", url, err)
	}
	var body []byte
	if resp.Body != nil {
		body, _ = io.ReadAll(resp.Body)
	}
	return refusal{status: resp.StatusCode, body: string(body), header: resp.Header}
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
// 1. Refusals before the upgrade.

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
// 2. Where the token may come from.

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

// ---------------------------------------------------------------------------
// 3. Public keys.

func TestJWTPublicKeyRSA(t *testing.T) {
	key := rsaKey(t)
	path, _ := writePEM(t, &key.PublicKey)
	n := jwtNode(t, &JWTConfig{PublicKey: path})
	for _, method := range []jwt.SigningMethod{jwt.SigningMethodRS256, jwt.SigningMethodPS256} {
		c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").signedWith(method, key, "").sign()))
		if w := c.next("welcome"); w["user"] != "alice" {
			t.Fatalf("%s: welcome = %v", method.Alg(), w)
		}
	}
	other := rsaKey(t)
	tok := newToken(t, "alice").signedWith(jwt.SigningMethodRS256, other, "").sign()
	expect401(t, dialRefused(t, n.url("/ws"), bearer(tok)), "invalid token signature", tok)
}

func TestJWTPublicKeyECDSA(t *testing.T) {
	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	path, _ := writePEM(t, &p256.PublicKey)
	n := jwtNode(t, &JWTConfig{PublicKey: path})
	c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").signedWith(jwt.SigningMethodES256, p256, "").sign()))
	if w := c.next("welcome"); w["user"] != "alice" {
		t.Fatalf("welcome = %v", w)
	}

	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tok := newToken(t, "alice").signedWith(jwt.SigningMethodES384, p384, "").sign()
	expect401(t, dialRefused(t, n.url("/ws"), bearer(tok)), "invalid token signature", tok)

	otherP256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tok = newToken(t, "alice").signedWith(jwt.SigningMethodES256, otherP256, "").sign()
	expect401(t, dialRefused(t, n.url("/ws"), bearer(tok)), "invalid token signature", tok)
}

func TestJWTPublicKeyEd25519(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	path, _ := writePEM(t, pub)
	n := jwtNode(t, &JWTConfig{PublicKey: path})
	c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").signedWith(jwt.SigningMethodEdDSA, priv, "").sign()))
	if w := c.next("welcome"); w["user"] != "alice" {
		t.Fatalf("welcome = %v", w)
	}
	_, otherPriv, _ := ed25519.GenerateKey(rand.Reader)
	tok := newToken(t, "alice").signedWith(jwt.SigningMethodEdDSA, otherPriv, "").sign()
	expect401(t, dialRefused(t, n.url("/ws"), bearer(tok)), "invalid token signature", tok)
}

// ---------------------------------------------------------------------------
// 4. JWKS.

// jwksServer serves a JWK Set that the test can replace, counting fetches.
type jwksServer struct {
	srv     *httptest.Server
	mu      sync.Mutex
	body    []byte
	fetches atomic.Int64
}

func newJWKSServer(t *testing.T, keys ...map[string]string) *jwksServer {
	t.Helper()
	s := &jwksServer{}
	s.set(t, keys...)
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		s.fetches.Add(1)
		s.mu.Lock()
		body := s.body
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	}))
	t.Cleanup(s.srv.Close)
	return s
}

func (s *jwksServer) set(t *testing.T, keys ...map[string]string) {
	t.Helper()
	b, err := json.Marshal(map[string]any{"keys": keys})
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.body = b
	s.mu.Unlock()
}

// rsaJWK is the public JWK of key, written by hand.
func rsaJWK(key *rsa.PrivateKey, kid string) map[string]string {
	return map[string]string{
		"kty": "RSA",
		"kid": kid,
		"alg": "RS256",
		"use": "sig",
		"n":   base64.RawURLEncoding.EncodeToString(key.PublicKey.N.Bytes()),
		"e":   base64.RawURLEncoding.EncodeToString(big.NewInt(int64(key.PublicKey.E)).Bytes()),
	}
}

func TestJWKSKeyRotation(t *testing.T) {
	key1, key2, key3 := rsaKey(t), rsaKey(t), rsaKey(t)
	js := newJWKSServer(t, rsaJWK(key1, "kid1"))
	n := jwtNode(t, &JWTConfig{JWKS: js.srv.URL + "/jwks.json"})
	if got := js.fetches.Load(); got != 1 {
		t.Fatalf("JWKS fetched %d times at start, want 1", got)
	}

	c1 := dial(t, n.url("/ws"), bearer(newToken(t, "alice").signedWith(jwt.SigningMethodRS256, key1, "kid1").sign()))
	if w := c1.next("welcome"); w["user"] != "alice" {
		t.Fatalf("kid1: welcome = %v", w)
	}

	// Rotation: the issuer now publishes key2 only. A token naming kid2 makes
	// the node refetch the set (the one unknown-kid refresh of this test).
	js.set(t, rsaJWK(key2, "kid2"))
	start := time.Now()
	c2 := dial(t, n.url("/ws"), bearer(newToken(t, "bob").signedWith(jwt.SigningMethodRS256, key2, "kid2").sign()))
	if w := c2.next("welcome"); w["user"] != "bob" {
		t.Fatalf("kid2: welcome = %v", w)
	}
	if got := js.fetches.Load(); got != 2 {
		t.Fatalf("JWKS fetched %d times after rotation, want 2", got)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("rotated-key connection took %v", d)
	}

	// A known kid with a signature by another key is refused without a refetch.
	forged := newToken(t, "bob").signedWith(jwt.SigningMethodRS256, key3, "kid2").sign()
	expect401(t, dialRefused(t, n.url("/ws"), bearer(forged)), "invalid token signature", forged)
	// So is an HMAC token, even naming a known kid.
	hs := newToken(t, "bob").signedWith(jwt.SigningMethodHS256, []byte(testSecret), "kid2").sign()
	expect401(t, dialRefused(t, n.url("/ws"), bearer(hs)), "invalid token signature", hs)
	if got := js.fetches.Load(); got != 2 {
		t.Fatalf("JWKS fetched %d times, want still 2", got)
	}
}

func TestJWKSUnknownKeyRefused(t *testing.T) {
	key1, stranger := rsaKey(t), rsaKey(t)
	js := newJWKSServer(t, rsaJWK(key1, "kid1"))
	// A node of its own: its unknown-kid limiter still has its one token.
	n := jwtNode(t, &JWTConfig{JWKS: js.srv.URL})

	tok := newToken(t, "mallory").signedWith(jwt.SigningMethodRS256, stranger, "kid-unknown").sign()
	start := time.Now()
	expect401(t, dialRefused(t, n.url("/ws"), bearer(tok)), "token signing method or key not accepted", tok)
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("refusal took %v", d)
	}
	if got := js.fetches.Load(); got != 2 {
		t.Fatalf("JWKS fetched %d times, want 2 (start + one unknown-kid refresh)", got)
	}
	// More made-up kids within the refresh interval are refused at once: they
	// neither refetch the set nor wait for the refresh limiter.
	for i := range 3 {
		tok := newToken(t, "mallory").signedWith(jwt.SigningMethodRS256, stranger, fmt.Sprintf("kid-made-up-%d", i)).sign()
		start := time.Now()
		expect401(t, dialRefused(t, n.url("/ws"), bearer(tok)), "token signing method or key not accepted", tok)
		if d := time.Since(start); d > time.Second {
			t.Fatalf("refusing made-up kid %d took %v: it waited for the refresh limiter", i, d)
		}
	}
	if got := js.fetches.Load(); got != 2 {
		t.Fatalf("JWKS fetched %d times after more unknown kids, want still 2", got)
	}
	// The set's own key still works.
	c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").signedWith(jwt.SigningMethodRS256, key1, "kid1").sign()))
	if w := c.next("welcome"); w["user"] != "alice" {
		t.Fatalf("welcome = %v", w)
	}
}

func TestJWKSOctKeyNeverEnablesHMAC(t *testing.T) {
	key1 := rsaKey(t)
	secret := []byte(testSecret)
	oct := map[string]string{"kty": "oct", "kid": "hmac", "k": base64.RawURLEncoding.EncodeToString(secret)}
	js := newJWKSServer(t, rsaJWK(key1, "kid1"), oct)
	n := jwtNode(t, &JWTConfig{JWKS: js.srv.URL})
	tok := newToken(t, "mallory").signedWith(jwt.SigningMethodHS256, secret, "hmac").sign()
	expect401(t, dialRefused(t, n.url("/ws"), bearer(tok)), "invalid token signature", tok)
}

// ---------------------------------------------------------------------------
// 5. Authorization.

var aclClaims = jwt.MapClaims{"chat": map[string]any{
	"subscribe": []string{"room:*", "user:{user}"},
	"publish":   []string{"room:eng"},
}}

func expectError(t *testing.T, c *testClient, id float64, code, channel string) {
	t.Helper()
	r := c.reply(id)
	if r["type"] != "error" || r["code"] != code {
		t.Fatalf("reply %v = %v, want error %s", id, r, code)
	}
	if msg, _ := r["message"].(string); channel != "" && !strings.Contains(msg, channel) {
		t.Fatalf("reply %v message %q does not name %s", id, msg, channel)
	}
}

func expectOK(t *testing.T, c *testClient, id float64) map[string]any {
	t.Helper()
	r := c.reply(id)
	if r["type"] != "ok" {
		t.Fatalf("reply %v = %v, want ok", id, r)
	}
	return r
}

// publishOK publishes data on channel and waits for the ok reply. A publisher
// subscribed to the channel may get the delivery before the reply (reply()
// would skip it): the first delivery seen is returned, or nil.
func publishOK(t *testing.T, c *testClient, channel string, data any, id float64) (ok, first map[string]any) {
	t.Helper()
	c.send(map[string]any{"op": "publish", "channel": channel, "data": data, "id": id})
	return awaitOK(t, c, id)
}

// awaitOK waits for the ok reply to id, keeping the first delivery seen.
func awaitOK(t *testing.T, c *testClient, id float64) (ok, first map[string]any) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m, open := <-c.frames:
			if !open {
				t.Fatalf("connection closed while waiting for reply %v: %v", id, <-c.closed)
			}
			switch {
			case m["type"] == "message" && first == nil:
				first = m
			case (m["type"] == "ok" || m["type"] == "error") && m["id"] == id:
				if m["type"] != "ok" {
					t.Fatalf("reply %v = %v, want ok", id, m)
				}
				return m, first
			}
		case <-deadline:
			t.Fatalf("no reply to id %v within 5s", id)
		}
	}
}

// ownDelivery publishes on a channel c is subscribed to and returns the
// first delivery c gets after the publish.
func ownDelivery(t *testing.T, c *testClient, channel string, data any, id float64) (ok, delivery map[string]any) {
	t.Helper()
	ok, first := publishOK(t, c, channel, data, id)
	if first == nil {
		first = c.next("message")
	}
	return ok, first
}

func TestACLClaimsEnforced(t *testing.T) {
	n := jwtNode(t, &JWTConfig{Secret: testSecret})
	alice := dial(t, n.url("/ws"), bearer(newToken(t, "alice").with(aclClaims).sign()))
	alice.next("welcome")
	bob := dial(t, n.url("/ws"), bearer(newToken(t, "bob").with(jwt.MapClaims{"chat": map[string]any{
		"subscribe": []string{"room:*"}, "publish": []string{"room:**"},
	}}).sign()))
	bob.next("welcome")

	alice.subscribe("room:x", 1)
	alice.send(map[string]any{"op": "subscribe", "channel": "secret:x", "id": 2})
	expectError(t, alice, 2, "forbidden", "secret:x")
	alice.send(map[string]any{"op": "subscribe", "channel": "room:x:y", "id": 3}) // * is one segment
	expectError(t, alice, 3, "forbidden", "room:x:y")

	alice.subscribe("user:alice", 4)
	alice.send(map[string]any{"op": "subscribe", "channel": "user:bob", "id": 5})
	expectError(t, alice, 5, "forbidden", "user:bob")

	// Publishing where not allowed: refused, and nothing reaches subscribers.
	bob.subscribe("room:other", 1)
	alice.send(map[string]any{"op": "publish", "channel": "room:other", "data": "sneaky", "id": 6})
	expectError(t, alice, 6, "forbidden", "room:other")
	if _, m := ownDelivery(t, bob, "room:other", "sentinel", 2); m["data"] != "sentinel" || m["from"] != "bob" {
		t.Fatalf("first delivery on room:other = %v, want bob's sentinel", m)
	}

	// Where allowed, the server sets "from" whatever the client wrote.
	bob.subscribe("room:eng", 3)
	alice.send(map[string]any{"op": "publish", "channel": "room:eng", "data": map[string]any{"text": "hi"}, "from": "mallory", "id": 7})
	ok := expectOK(t, alice, 7)
	m := bob.next("message")
	if m["from"] != "alice" || m["id"] != ok["message_id"] || m["channel"] != "room:eng" {
		t.Fatalf("delivery = %v, want from alice with id %v", m, ok["message_id"])
	}
	// Claims grant nothing beyond their lists: no publish on room:x.
	alice.send(map[string]any{"op": "publish", "channel": "room:x", "data": 1, "id": 8})
	expectError(t, alice, 8, "forbidden", "room:x")
	// An invalid channel is a bad request, not a permission question.
	alice.send(map[string]any{"op": "subscribe", "channel": "room:*", "id": 9})
	expectError(t, alice, 9, "bad_request", "")
}

func TestACLClaimNamesAndShapes(t *testing.T) {
	n := jwtNode(t, &JWTConfig{Secret: testSecret, SubscribeClaim: "subs", PublishClaim: "perms.pub"})
	c := dial(t, n.url("/ws"), bearer(newToken(t, "alice").with(jwt.MapClaims{
		"subs":  "room:*",                                    // a single pattern as a string
		"perms": map[string]any{"pub": []any{"room:a", 7}},   // non-strings grant nothing
		"chat":  map[string]any{"subscribe": []string{"**"}}, // the default claim is not read
	}).sign()))
	c.next("welcome")
	c.subscribe("room:a", 1)
	c.send(map[string]any{"op": "subscribe", "channel": "other:a", "id": 2})
	expectError(t, c, 2, "forbidden", "other:a")
	c.send(map[string]any{"op": "publish", "channel": "room:a", "data": 1, "id": 3})
	expectOK(t, c, 3)
	c.send(map[string]any{"op": "publish", "channel": "room:b", "data": 1, "id": 4})
	expectError(t, c, 4, "forbidden", "room:b")
}

func TestACLHandlerRulesAddToClaims(t *testing.T) {
	n := startNode(t, &Handler{
		JWT:           &JWTConfig{Secret: testSecret},
		ChannelPrefix: ptr(uniquePrefix()),
		Subscribe:     []string{"lobby", "notice:{user}"},
		Publish:       []string{"lobby"},
	})
	alice := dial(t, n.url("/ws"), bearer(newToken(t, "alice").with(aclClaims).sign()))
	alice.next("welcome")
	// Claims still apply...
	alice.subscribe("room:x", 1)
	// ...and the route's rules add to them.
	alice.subscribe("lobby", 2)
	alice.subscribe("notice:alice", 3)
	alice.send(map[string]any{"op": "subscribe", "channel": "notice:bob", "id": 4})
	expectError(t, alice, 4, "forbidden", "notice:bob")
	if _, m := ownDelivery(t, alice, "lobby", "hello", 5); m["channel"] != "lobby" || m["from"] != "alice" {
		t.Fatalf("delivery = %v", m)
	}

	// A token without chat claims gets exactly the route's rules.
	carol := dial(t, n.url("/ws"), bearer(newToken(t, "carol").sign()))
	carol.next("welcome")
	carol.subscribe("lobby", 1)
	carol.send(map[string]any{"op": "subscribe", "channel": "room:x", "id": 2})
	expectError(t, carol, 2, "forbidden", "room:x")
	carol.send(map[string]any{"op": "publish", "channel": "room:eng", "data": 1, "id": 3})
	expectError(t, carol, 3, "forbidden", "room:eng")
}

func TestPatternMatching(t *testing.T) {
	cases := []struct {
		pattern, user string
		match, miss   []string
	}{
		{"room:*", "", []string{"room:x", "room:eng-1"}, []string{"room", "room:", "room:x:y", "rooms:x", "x:room:y"}},
		{"*", "", []string{"a", "room"}, []string{"a:b", ":a"}},
		{"*:eng", "", []string{"room:eng", "x:eng"}, []string{"eng", "room:eng:x", "room:engx"}},
		{"room:**", "", []string{"room:x", "room:x:y", "room:x:y:z"}, []string{"room", "room:", "roomx:y"}},
		{"**", "", []string{"a", "a:b:c"}, nil},
		{"room:eng", "", []string{"room:eng"}, []string{"room:en", "room:eng2", "room:eng:x", "room", "xroom:eng"}},
		{"a:**:b", "", []string{"a:**:b"}, []string{"a:x:b", "a:x:y:b"}}, // ** not last: a literal
		{"user:{user}", "alice", []string{"user:alice"}, []string{"user:bob", "user:alice:x", "user:alic", "user:alicex", "user:*"}},
		{"user:{user}:*", "alice", []string{"user:alice:inbox"}, []string{"user:alice", "user:alice:a:b"}},
		{"dm:{user}-*", "alice", []string{"dm:alice-*"}, []string{"dm:alice-bob"}},
		// A user id with ':' or '*' is matched only literally.
		{"user:{user}", "a:b", []string{"user:a:b"}, []string{"user:a", "user:a:c", "user:x:b"}},
		{"user:{user}", "*", []string{"user:*"}, []string{"user:bob", "user:alice"}},
		{"user:{user}", "**", []string{"user:**"}, []string{"user:bob", "user:a:b"}},
		{"user:{user}", "a:*", []string{"user:a:*"}, []string{"user:a:b"}},
		{"{user}:**", "team:*", []string{"team:*:x"}, []string{"team:a:x", "team:*"}},
		// Anonymous users never match {user} patterns.
		{"user:{user}", "", nil, []string{"user:", "user:x", "user:{user}"}},
		{"{user}", "", nil, []string{"", "x"}},
		{"**:{user}", "", nil, []string{"a:b", "a:"}},
	}
	for _, tc := range cases {
		acl := compileACL([]string{tc.pattern}, tc.user)
		for _, ch := range tc.match {
			if !acl.allows(ch) {
				t.Errorf("pattern %q (user %q) does not match %q", tc.pattern, tc.user, ch)
			}
		}
		for _, ch := range tc.miss {
			if acl.allows(ch) {
				t.Errorf("pattern %q (user %q) matches %q", tc.pattern, tc.user, ch)
			}
		}
	}

	if acl := compileACL([]string{"user:{user}", "room:*"}, ""); len(acl) != 1 || !acl.allows("room:x") || acl.allows("user:") {
		t.Errorf("anonymous ACL = %+v", acl)
	}
	var empty channelACL
	if empty.allows("room:x") || compileACL(nil, "alice").allows("room:x") {
		t.Error("an empty ACL allows something")
	}
	if acl := compileACL([]string{"a:*", "b:**", "c"}, "u"); !acl.allows("a:1") || !acl.allows("b:1:2") || !acl.allows("c") || acl.allows("d") {
		t.Error("a list of patterns allows a channel when one of them matches")
	}
}

func TestPatternValidation(t *testing.T) {
	for _, p := range []string{"room:*", "room:**", "**", "*", "*:*", "user:{user}", "{user}", "dm:{user}:*", "a-b.c@d/e:f_g"} {
		if err := validatePattern(p); err != nil {
			t.Errorf("validatePattern(%q) = %v, want nil", p, err)
		}
	}
	bad := map[string]string{
		"":                                     "empty pattern",
		"room::x":                              "empty segment",
		"room:":                                "empty segment",
		":room":                                "empty segment",
		"room:a*":                              "a wildcard is a whole segment",
		"room:**:x":                            "a wildcard is a whole segment",
		"room:***":                             "a wildcard is a whole segment",
		"room x":                               "a wildcard is a whole segment",
		"room:[ab]":                            "a wildcard is a whole segment",
		"room:?":                               "a wildcard is a whole segment",
		"{users}":                              "a wildcard is a whole segment",
		strings.Repeat("a", 129):               "longer than 128",
		"room:" + strings.Repeat("{user}", 30): "", // fine: length is checked per segment after replacement
	}
	for p, want := range bad {
		err := validatePattern(p)
		if want == "" {
			if err != nil {
				t.Errorf("validatePattern(%q) = %v, want nil", p, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("validatePattern(%q) = %v, want an error with %q", p, err, want)
		}
	}

	// Validate names the option holding a bad pattern.
	h := &Handler{JWT: &JWTConfig{Secret: testSecret}, Subscribe: []string{"room:a*"}, Publish: []string{"x::y"}, Anonymous: &Permissions{Subscribe: []string{""}}}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	defer h.Cleanup()
	err := h.Validate()
	for _, want := range []string{"chat: subscribe: pattern \"room:a*\"", "chat: publish: pattern \"x::y\"", "chat: anonymous subscribe: empty pattern"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v, want it to contain %q", err, want)
		}
	}
}

// ---------------------------------------------------------------------------
// 6. Anonymous access.

func TestAnonymousRefusedByDefaultWithJWT(t *testing.T) {
	n := jwtNode(t, &JWTConfig{Secret: testSecret})
	expect401(t, dialRefused(t, n.url("/ws"), nil), "missing token", "")
}

func TestAnonymousPermissions(t *testing.T) {
	n := startNode(t, &Handler{
		JWT:           &JWTConfig{Secret: testSecret},
		ChannelPrefix: ptr(uniquePrefix()),
		Anonymous:     &Permissions{Subscribe: []string{"public:*", "user:{user}"}},
	})
	anon := dial(t, n.url("/ws"), nil)
	if w := anon.next("welcome"); w["user"] != "" {
		t.Fatalf("anonymous welcome = %v, want user \"\"", w)
	}
	anon.subscribe("public:x", 1)
	anon.send(map[string]any{"op": "subscribe", "channel": "room:x", "id": 2})
	expectError(t, anon, 2, "forbidden", "room:x")
	anon.send(map[string]any{"op": "subscribe", "channel": "user:x", "id": 3})
	expectError(t, anon, 3, "forbidden", "user:x")
	for i, ch := range []string{"public:x", "room:x", "anything"} {
		id := float64(10 + i)
		anon.send(map[string]any{"op": "publish", "channel": ch, "data": "hi", "id": id})
		expectError(t, anon, id, "forbidden", ch)
	}
	// An anonymous connection cannot turn into a user with a refresh.
	anon.send(map[string]any{"op": "refresh", "token": newToken(t, "alice").sign(), "id": 20})
	expectError(t, anon, 20, "forbidden", "")

	// A token that fails is refused, not downgraded to anonymous.
	bad := newToken(t, "alice").secret("another-secret-another-secret-0123456789").sign()
	expect401(t, dialRefused(t, n.url("/ws"), bearer(bad)), "invalid token signature", bad)

	// A user with a token gets the token's permissions, not the anonymous ones.
	alice := dial(t, n.url("/ws"), bearer(newToken(t, "alice").with(aclClaims).sign()))
	if w := alice.next("welcome"); w["user"] != "alice" {
		t.Fatalf("welcome = %v", w)
	}
	alice.send(map[string]any{"op": "subscribe", "channel": "public:x", "id": 1})
	expectError(t, alice, 1, "forbidden", "public:x")
	alice.subscribe("room:x", 2)
}

func TestAnonymousWithoutJWTMayDoAnything(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix())})
	c := dial(t, n.url("/ws"), nil)
	if w := c.next("welcome"); w["user"] != "" {
		t.Fatalf("welcome = %v", w)
	}
	c.subscribe("secret:x:y", 1)
	c.subscribe("user:bob", 2)
	c.send(map[string]any{"op": "publish", "channel": "secret:x:y", "data": "hi", "from": "bob", "id": 3})
	_, m := awaitOK(t, c, 3)
	if m == nil {
		m = c.next("message")
	}
	if m["data"] != "hi" || m["from"] != "" {
		t.Fatalf("delivery = %v", m)
	}
	// A route without tokens has nothing to refresh.
	c.send(map[string]any{"op": "refresh", "token": "x", "id": 4})
	expectError(t, c, 4, "bad_request", "")
}

// ---------------------------------------------------------------------------
// 7. Expiry and refresh.

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

// ---------------------------------------------------------------------------
// 8. Access-log redaction.

const redactedLogMsg = "websocket request (token redacted; left out of the access log)"

// checkLogs expects exactly one info line for the request, with uri and
// status, and the token nowhere in any log entry.
func checkLogs(t *testing.T, logs *observer.ObservedLogs, token, wantURI string, wantStatus int) {
	t.Helper()
	all := logs.TakeAll()
	var infos []observer.LoggedEntry
	for _, e := range all {
		if strings.Contains(e.Message, token) || strings.Contains(fmt.Sprint(e.ContextMap()), token) {
			t.Errorf("log entry %q %v contains the token", e.Message, e.ContextMap())
		}
		if e.Level >= zapcore.InfoLevel {
			infos = append(infos, e)
		}
	}
	if wantURI == "" {
		if len(infos) != 0 {
			t.Fatalf("info log lines = %v, want none", infos)
		}
		return
	}
	if len(infos) != 1 || infos[0].Message != redactedLogMsg {
		t.Fatalf("info log lines = %+v, want one %q", infos, redactedLogMsg)
	}
	f := infos[0].ContextMap()
	if f["uri"] != wantURI || f["status"] != int64(wantStatus) || f["method"] != "GET" {
		t.Fatalf("log fields = %v, want uri %q status %d", f, wantURI, wantStatus)
	}
}

func TestRedactQueryTokenInLogs(t *testing.T) {
	n := startNode(t, &Handler{JWT: &JWTConfig{Secret: testSecret, QueryParam: "token"}, ChannelPrefix: ptr(uniquePrefix())}, observeLogs())
	logs := n.logs

	t.Run("accepted query token", func(t *testing.T) {
		tok := newToken(t, "alice").sign()
		c := dial(t, n.url("/ws?room=1&token="+tok), nil)
		if w := c.next("welcome"); w["user"] != "alice" {
			t.Fatalf("welcome = %v", w)
		}
		_ = c.ws.Close(websocket.StatusNormalClosure, "")
		if skip := n.waitDone(t); skip != true {
			t.Fatalf("log_skip = %v, want true", skip)
		}
		checkLogs(t, logs, tok, "/ws?room=1&token=REDACTED", http.StatusSwitchingProtocols)
	})
	t.Run("refused query token", func(t *testing.T) {
		tok := newToken(t, "alice").secret("another-secret-another-secret-0123456789").sign()
		r := dialRefused(t, n.url("/ws?token="+tok), nil)
		expect401(t, r, "invalid token signature", tok)
		if skip := n.waitDone(t); skip != true {
			t.Fatalf("log_skip = %v, want true", skip)
		}
		checkLogs(t, logs, tok, "/ws?token=REDACTED", http.StatusUnauthorized)
	})
	t.Run("token in subprotocol", func(t *testing.T) {
		tok := newToken(t, "alice").sign()
		c := dial(t, n.url("/ws"), &websocket.DialOptions{Subprotocols: []string{"caddychat", "bearer." + tok}})
		c.next("welcome")
		_ = c.ws.Close(websocket.StatusNormalClosure, "")
		if skip := n.waitDone(t); skip != true {
			t.Fatalf("log_skip = %v, want true", skip)
		}
		checkLogs(t, logs, tok, "/ws", http.StatusSwitchingProtocols)
	})
	t.Run("bearer subprotocol without caddychat", func(t *testing.T) {
		tok := newToken(t, "alice").sign()
		r := dialRefused(t, n.url("/ws"), &websocket.DialOptions{Subprotocols: []string{"bearer." + tok}})
		if r.status != http.StatusBadRequest {
			t.Fatalf("status = %d, want 400", r.status)
		}
		if skip := n.waitDone(t); skip != true {
			t.Fatalf("log_skip = %v, want true", skip)
		}
		checkLogs(t, logs, tok, "/ws", http.StatusBadRequest)
	})
	t.Run("header token stays in the access log", func(t *testing.T) {
		tok := newToken(t, "alice").sign()
		c := dial(t, n.url("/ws?room=1"), bearer(tok))
		c.next("welcome")
		_ = c.ws.Close(websocket.StatusNormalClosure, "")
		if skip := n.waitDone(t); skip != nil {
			t.Fatalf("log_skip = %v, want unset (Caddy redacts Authorization itself)", skip)
		}
		checkLogs(t, logs, tok, "", 0)
	})
}

func TestRedactQuery(t *testing.T) {
	h := &Handler{JWT: &JWTConfig{QueryParam: "t"}}
	for _, tc := range []struct{ in, want string }{
		{"/ws?token=abc", "/ws?token=REDACTED"},
		{"/ws?b=2&token=abc&a=1", "/ws?b=2&token=REDACTED&a=1"},
		{"/ws?token=abc&token=def", "/ws?token=REDACTED&token=REDACTED"},
		{"/ws?room=1", "/ws?room=1"},
		{"/ws", "/ws"},
		{"/ws?t=abc&x=1", "/ws?t=REDACTED&x=1"},
		{"/ws?ACCESS_TOKEN=abc;jwt=def&id%5Ftoken=ghi&token", "/ws?ACCESS_TOKEN=REDACTED;jwt=REDACTED&id%5Ftoken=REDACTED&token=REDACTED"},
		{"/ws?tokens=1&mytoken=2", "/ws?tokens=1&mytoken=2"},
	} {
		r := httptest.NewRequest(http.MethodGet, tc.in, nil)
		if got := h.redactTokenQuery(r.URL); got != tc.want {
			t.Errorf("redactTokenQuery(%q) = %q, want %q", tc.in, got, tc.want)
		}
		if carries := h.queryCarriesToken(r.URL.RawQuery); carries != strings.Contains(tc.want, "REDACTED") {
			t.Errorf("queryCarriesToken(%q) = %v", tc.in, carries)
		}
	}
}

// TestOpenRouteIgnoresForeignCredentials: a route without jwt lets in a
// request that carries credentials meant for something else.
func TestOpenRouteIgnoresForeignCredentials(t *testing.T) {
	n := startNode(t, &Handler{})
	for _, v := range []string{"Basic dXNlcjpwYXNz", "Bearer not-a-token", "Bearer "} {
		c := dial(t, n.url("/ws"), &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {v}}})
		if w := c.next("welcome"); w["user"] != "" {
			t.Fatalf("Authorization %q: welcome %v, want an anonymous user", v, w)
		}
	}
}
