package caddychat

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// JWT verification keys: PEM public keys (RSA, ECDSA, Ed25519) and JWKS
// (rotation, unknown kids, oct keys).

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
