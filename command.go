package caddychat

// `caddy chat …`: the module's own subcommands, registered in Caddy's command
// registry (as caddyauth registers `caddy hash-password`), so that every
// Caddy built with this module has them and ops need no second binary:
//
//	caddy chat token   mints a JWT for testing a route (this file)
//	caddy chat ping    the smoke test of a running route (command_ping.go)
//	caddy chat stats, channels, presence, history, history-remove, publish,
//	  broadcast, disconnect, unsubscribe, subscribe, revoke, revocations:
//	  clients of the server API on Caddy's admin endpoint (command_admin.go)

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/golang-jwt/jwt/v5"
	"github.com/spf13/cobra"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "chat",
		Usage: "<token|ping|stats|channels|presence|history|history-remove|publish|broadcast|disconnect|unsubscribe|subscribe|revoke|revocations> [flags]",
		Short: "Mints test tokens, smoke-tests a chat route and runs the chat's server API (stats, disconnect, revoke…)",
		Long: `
Commands of the caddychat module (http.handlers.chat):

  caddy chat token --sub <user> [--subscribe <patterns>] [--publish <patterns>] ...
      mints a JSON Web Token for testing a route with a jwt block

  caddy chat ping [--token <jwt>] <ws-or-http-url>
      connects to a chat route, subscribes, publishes and receives, printing
      each step's latency: the smoke test after a deployment

  The server API, through Caddy's admin endpoint (--admin, default
  $CADDY_ADMIN, else localhost:2019; --prefix <channel prefix> when the node
  runs several chats) or a site's publish endpoint (--url <publish endpoint>
  --key <publish key>); --json prints the server's answer as it is:

  caddy chat stats                        connections, users, channels per node
  caddy chat channels [--pattern p]       channels with subscribers
  caddy chat presence <channel>           who is on a channel
  caddy chat history <channel> [--limit n] [--before id]
  caddy chat history-remove <channel>     deletes a channel's history
  caddy chat publish <channel> <json>     publishes as the server
  caddy chat broadcast <json> <channel>...
  caddy chat disconnect <user> [--code n --reason s]   (or --conn <id>)
  caddy chat unsubscribe <user> <channel>
  caddy chat subscribe <user> <channel>
  caddy chat revoke --jti <id> | --user <user> [--issued-before t] [--until t]
  caddy chat revocations                  the revocations in force

Run 'caddy chat <command> --help' for the flags of each.
`,
		CobraFunc: chatCommand,
	})
}

// chatCommand configures cmd, the `chat` command, with its subcommands.
func chatCommand(cmd *cobra.Command) {
	cmd.Args = cobra.NoArgs
	cmd.AddCommand(tokenCommand(), pingCommand())
	for _, c := range adminCommands() {
		cmd.AddCommand(newAdminCommand(c))
	}
}

// tokenCommand is `caddy chat token`.
func tokenCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token --sub <user> [--secret <secret> | --key <private.pem>] [--subscribe <patterns>] [--publish <patterns>] [--ttl <duration>] [--iss <issuer>] [--aud <audience>] [--kid <key id>]",
		Short: "Mints a JSON Web Token for testing a chat route",
		Long: `
Mints a JSON Web Token for a route with a jwt block and prints it on
standard output, e.g.

  export CHAT_JWT_SECRET=...   # the route's jwt secret
  TOKEN=$(caddy chat token --sub alice --subscribe 'room:*,user:{user}' --publish 'room:*')

It signs with HS256 from --secret (default: the environment variable
CHAT_JWT_SECRET, which keeps the secret out of the process list), or with the
PEM private key of --key: RSA signs RS256, ECDSA ES256/ES384/ES512 by its
curve, Ed25519 EdDSA (PKCS#1, SEC 1 or PKCS#8 PEM).

The claims: sub (--sub, required), iat (now), exp (now + --ttl), iss and aud
when given, and chat.subscribe / chat.publish, the lists of channel patterns
of --subscribe and --publish (comma-separated; see PROTOCOL.md, Channel
permissions). --kid sets the key id header, which a route with several keys
or a JWKS uses to pick the key.

Tokens are for testing: a production backend mints its users' tokens itself.
`,
		Args:                  cobra.NoArgs,
		DisableFlagsInUseLine: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f := cmd.Flags()
			var o tokenOptions
			o.secret, _ = f.GetString("secret")
			o.keyFile, _ = f.GetString("key")
			o.sub, _ = f.GetString("sub")
			o.ttl, _ = f.GetDuration("ttl")
			o.iss, _ = f.GetString("iss")
			o.aud, _ = f.GetString("aud")
			o.kid, _ = f.GetString("kid")
			o.subscribe, _ = f.GetString("subscribe")
			o.publish, _ = f.GetString("publish")
			if !f.Changed("secret") {
				o.secret = os.Getenv("CHAT_JWT_SECRET")
			}
			token, err := o.mint(time.Now())
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), token)
			return err
		},
	}
	f := cmd.Flags()
	f.String("secret", "", "HMAC secret, signs HS256 (default $CHAT_JWT_SECRET)")
	f.String("key", "", "PEM private key file (RSA, ECDSA or Ed25519) to sign with instead of a secret")
	f.String("sub", "", "the user id (the sub claim); required")
	f.Duration("ttl", time.Hour, "lifetime of the token (the exp claim is now + ttl)")
	f.String("iss", "", "issuer claim")
	f.String("aud", "", "audience claim")
	f.String("kid", "", "key id header")
	f.String("subscribe", "", "comma-separated channel patterns for the chat.subscribe claim")
	f.String("publish", "", "comma-separated channel patterns for the chat.publish claim")
	return cmd
}

// tokenOptions are the flags of `caddy chat token`.
type tokenOptions struct {
	secret, keyFile, kid string
	sub, iss, aud        string
	subscribe, publish   string
	ttl                  time.Duration
}

// mint signs the token's claims, issued at now, with the secret or the key.
func (o tokenOptions) mint(now time.Time) (string, error) {
	if o.sub == "" {
		return "", errors.New("--sub is required (the user id of the token)")
	}
	if o.ttl <= 0 {
		return "", fmt.Errorf("--ttl %v: the token would be expired already", o.ttl)
	}
	var method jwt.SigningMethod
	var key any
	switch {
	case o.keyFile != "":
		k, m, err := loadSigningKey(o.keyFile)
		if err != nil {
			return "", err
		}
		key, method = k, m
	case o.secret != "":
		key, method = []byte(o.secret), jwt.SigningMethodHS256
	default:
		return "", errors.New("give --secret (or set CHAT_JWT_SECRET) or --key")
	}
	t := jwt.NewWithClaims(method, o.claims(now))
	if o.kid != "" {
		t.Header["kid"] = o.kid
	}
	return t.SignedString(key)
}

// claims are the token's claims, issued at now.
func (o tokenOptions) claims(now time.Time) jwt.MapClaims {
	c := jwt.MapClaims{"sub": o.sub, "iat": now.Unix(), "exp": now.Add(o.ttl).Unix()}
	if o.iss != "" {
		c["iss"] = o.iss
	}
	if o.aud != "" {
		c["aud"] = o.aud
	}
	chat := map[string]any{}
	if p := splitPatternList(o.subscribe); len(p) > 0 {
		chat["subscribe"] = p
	}
	if p := splitPatternList(o.publish); len(p) > 0 {
		chat["publish"] = p
	}
	if len(chat) > 0 {
		c["chat"] = chat
	}
	return c
}

// splitPatternList splits a comma-separated list, dropping empty items.
func splitPatternList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// loadSigningKey reads a PEM private key and the signing method its type
// (and, for ECDSA, its curve) implies.
func loadSigningKey(path string) (any, jwt.SigningMethod, error) {
	block, err := readPEMBlock(path)
	if err != nil {
		return nil, nil, err
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
