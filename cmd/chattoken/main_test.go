package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

func TestMintHS256WithPermissions(t *testing.T) {
	secret := "0123456789abcdef0123456789abcdef"
	now := time.Now()
	token, err := mint(secret, "", "k1", claims("alice", "https://idp", "chat", "room:*, user:{user}", "room:eng", now, time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	got := jwt.MapClaims{}
	parsed, err := jwt.NewParser(jwt.WithValidMethods([]string{"HS256"}), jwt.WithIssuer("https://idp"), jwt.WithAudience("chat")).
		ParseWithClaims(token, got, func(*jwt.Token) (any, error) { return []byte(secret), nil })
	if err != nil {
		t.Fatalf("the minted token does not verify: %v", err)
	}
	if parsed.Header["kid"] != "k1" || got["sub"] != "alice" {
		t.Errorf("header %v, claims %v", parsed.Header, got)
	}
	chat := got["chat"].(map[string]any)
	if sub := chat["subscribe"].([]any); len(sub) != 2 || sub[0] != "room:*" || sub[1] != "user:{user}" {
		t.Errorf("chat.subscribe = %v", chat["subscribe"])
	}
	if exp, _ := got.GetExpirationTime(); exp == nil || exp.Unix() != now.Add(time.Hour).Unix() {
		t.Errorf("exp = %v", exp)
	}
}

func TestMintWithECDSAKeyFile(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	token, err := mint("", path, "", claims("bob", "", "", "", "", time.Now(), time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwt.Parse(token, func(*jwt.Token) (any, error) { return &key.PublicKey, nil }, jwt.WithValidMethods([]string{"ES256"})); err != nil {
		t.Fatalf("ES256 token does not verify with the public key: %v", err)
	}
}

func TestMintNeedsAKey(t *testing.T) {
	if err := run([]string{"-sub", "x", "-secret", ""}); err == nil {
		t.Fatal("minting without a secret or key succeeded")
	}
	if err := run([]string{"-secret", "s"}); err == nil {
		t.Fatal("minting without -sub succeeded")
	}
}
