// Command chattoken mints a JSON Web Token for testing a caddychat route.
//
//	CHAT_JWT_SECRET=... chattoken -sub alice -subscribe 'room:*,user:{user}' -publish 'room:*'
//
// It signs with HS256 from -secret (or $CHAT_JWT_SECRET), or with the PEM
// private key of -key (RSA: RS256, ECDSA: ES256/384/512 by curve, Ed25519:
// EdDSA), and prints the token on standard output.
package main

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "chattoken:", err)
		os.Exit(2)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("chattoken", flag.ContinueOnError)
	secret := fs.String("secret", os.Getenv("CHAT_JWT_SECRET"), "HMAC secret (default $CHAT_JWT_SECRET)")
	keyFile := fs.String("key", "", "PEM private key file (RSA, ECDSA or Ed25519) instead of -secret")
	sub := fs.String("sub", "", "user id (the sub claim); required")
	ttl := fs.Duration("ttl", time.Hour, "lifetime of the token")
	issuer := fs.String("iss", "", "issuer claim")
	audience := fs.String("aud", "", "audience claim")
	kid := fs.String("kid", "", "key id header")
	subscribe := fs.String("subscribe", "", "comma-separated channel patterns for the chat.subscribe claim")
	publish := fs.String("publish", "", "comma-separated channel patterns for the chat.publish claim")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *sub == "" {
		return errors.New("-sub is required")
	}
	token, err := mint(*secret, *keyFile, *kid, claims(*sub, *issuer, *audience, *subscribe, *publish, time.Now(), *ttl))
	if err != nil {
		return err
	}
	fmt.Println(token)
	return nil
}

func claims(sub, iss, aud, subscribe, publish string, now time.Time, ttl time.Duration) jwt.MapClaims {
	c := jwt.MapClaims{"sub": sub, "iat": now.Unix(), "exp": now.Add(ttl).Unix()}
	if iss != "" {
		c["iss"] = iss
	}
	if aud != "" {
		c["aud"] = aud
	}
	chat := map[string]any{}
	if p := splitList(subscribe); len(p) > 0 {
		chat["subscribe"] = p
	}
	if p := splitList(publish); len(p) > 0 {
		chat["publish"] = p
	}
	if len(chat) > 0 {
		c["chat"] = chat
	}
	return c
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// mint signs claims with the HMAC secret or the private key in keyFile.
func mint(secret, keyFile, kid string, claims jwt.MapClaims) (string, error) {
	var method jwt.SigningMethod
	var key any
	switch {
	case keyFile != "":
		k, m, err := loadPrivateKey(keyFile)
		if err != nil {
			return "", err
		}
		key, method = k, m
	case secret != "":
		key, method = []byte(secret), jwt.SigningMethodHS256
	default:
		return "", errors.New("give -secret (or set CHAT_JWT_SECRET) or -key")
	}
	t := jwt.NewWithClaims(method, claims)
	if kid != "" {
		t.Header["kid"] = kid
	}
	return t.SignedString(key)
}

func loadPrivateKey(path string) (any, jwt.SigningMethod, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, nil, fmt.Errorf("%s holds no PEM block", path)
	}
	var key any
	switch block.Type {
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	switch k := key.(type) {
	case *rsa.PrivateKey:
		return k, jwt.SigningMethodRS256, nil
	case *ecdsa.PrivateKey:
		switch k.Curve.Params().BitSize {
		case 256:
			return k, jwt.SigningMethodES256, nil
		case 384:
			return k, jwt.SigningMethodES384, nil
		case 521:
			return k, jwt.SigningMethodES512, nil
		}
		return nil, nil, fmt.Errorf("%s: unsupported ECDSA curve", path)
	case ed25519.PrivateKey:
		return k, jwt.SigningMethodEdDSA, nil
	}
	return nil, nil, fmt.Errorf("%s: unsupported key type %T", path, key)
}
