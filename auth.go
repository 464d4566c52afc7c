package caddychat

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/MicahParks/keyfunc/v3"
	"github.com/caddyserver/caddy/v2"
	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap"
	"golang.org/x/time/rate"
)

// JWTConfig authenticates connections with a JSON Web Token checked before
// the WebSocket upgrade. Exactly one of Secret, PublicKey and JWKS is set; it
// alone decides which signing algorithms are accepted (the token's own "alg"
// header never widens that set).
type JWTConfig struct {
	// HMAC secret: tokens signed with HS256, HS384 or HS512.
	Secret string `json:"secret,omitempty"`

	// Path of a PEM file holding an RSA, ECDSA or Ed25519 public key: tokens
	// signed with RS*/PS*, the ES* of the key's curve, or EdDSA.
	PublicKey string `json:"public_key,omitempty"`

	// URL of a JSON Web Key Set. It is fetched at start, refreshed hourly and
	// again (at most every 10s) when a token names an unknown "kid".
	JWKS string `json:"jwks,omitempty"`

	// Required "iss" claim, if set.
	Issuer string `json:"issuer,omitempty"`

	// Required "aud" claim (one of the token's audiences), if set.
	Audience string `json:"audience,omitempty"`

	// Claim holding the user's id. Default: "sub".
	UserClaim string `json:"user_claim,omitempty"`

	// Claims listing the channel patterns the user may subscribe to and
	// publish on; a dotted name looks into nested objects. Defaults:
	// "chat.subscribe" and "chat.publish".
	SubscribeClaim string `json:"subscribe_claim,omitempty"`
	PublishClaim   string `json:"publish_claim,omitempty"`

	// Clock skew tolerated on "exp", "nbf" and "iat". Default: 5s.
	Leeway caddy.Duration `json:"leeway,omitempty"`

	// Cookie that may carry the token. Default: "chat_token".
	Cookie string `json:"cookie,omitempty"`

	// Query parameter that may carry the token, e.g. "token". Off unless set:
	// URLs end up in logs and proxies. Requests using it are left out of
	// Caddy's access log and logged by this module with the value redacted.
	// Named query_token in JSON as in the Caddyfile; the older JSON name
	// query_param is deprecated and still read (see UnmarshalJSON).
	QueryParam string `json:"query_token,omitempty"`

	// Tokens longer than this many bytes are refused unparsed. Default: 8192.
	MaxTokenSize int `json:"max_token_size,omitempty"`

	// Claims of the token that form the user's info (e.g. "name",
	// "picture"), which travels on the user's messages, presence entries
	// and join and leave events: at most 1 KiB of JSON (a larger one
	// refuses the token). The connect hook's info wins over it.
	UserInfoClaims []string `json:"user_info_claim,omitempty"`
}

// UnmarshalJSON decodes a jwt object as the default decoding would (unknown
// fields are errors, as Caddy's strict decoding makes them), and reads the
// deprecated name query_param of query_token. Both may be given only with
// the same value.
func (j *JWTConfig) UnmarshalJSON(data []byte) error {
	type jwtConfig JWTConfig // the fields, without this method
	var v struct {
		jwtConfig
		DeprecatedQueryParam string `json:"query_param,omitempty"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		return err
	}
	if old := v.DeprecatedQueryParam; old != "" {
		if v.QueryParam != "" && v.QueryParam != old {
			return fmt.Errorf("jwt: query_param %q and query_token %q: query_param is the deprecated name of query_token; set query_token only", old, v.QueryParam)
		}
		v.QueryParam = old
	}
	*j = JWTConfig(v.jwtConfig)
	return nil
}

// Permissions are the channels a class of users may use, as patterns: "*"
// stands for one ':'-separated segment, a final "**" for one or more, and
// "{user}" for the user's own id (never matches for anonymous users).
type Permissions struct {
	Subscribe []string `json:"subscribe,omitempty"`
	Publish   []string `json:"publish,omitempty"`
}

// RateLimit bounds the frames one connection may send: a token bucket of
// Burst frames refilled at PerSecond. A negative PerSecond turns it off.
type RateLimit struct {
	PerSecond float64 `json:"per_second,omitempty"`
	Burst     int     `json:"burst,omitempty"`
}

const (
	defaultUserClaim      = "sub"
	defaultSubscribeClaim = "chat.subscribe"
	defaultPublishClaim   = "chat.publish"
	defaultLeeway         = 5 * time.Second
	defaultTokenCookie    = "chat_token"
	defaultMaxTokenSize   = 8 << 10

	// appSubprotocol is the WebSocket subprotocol a browser offers next to
	// "bearer.<token>"; the server answers with it, never with the token.
	appSubprotocol      = "caddychat"
	bearerSubprotoLabel = "bearer."

	// jwksUnknownKIDInterval bounds how often an unknown "kid" refetches the set.
	jwksUnknownKIDInterval = 10 * time.Second
)

// identity is who a connection (or an HTTP publish) acts as.
type identity struct {
	user      string // empty when anonymous
	anonymous bool
	// guest, name: an anonymous connection's guest id and chosen name on a
	// route with guest_names (guest.go); never set for users.
	guest, name string
	// server: a backend holding the publish key; what it publishes is the
	// server's own message.
	server    bool
	subscribe channelACL
	publish   channelACL
	expires   time.Time // zero: never
	// info: the connect hook's object about the user (name, avatar...),
	// at most maxHookInfo bytes; nil without one.
	info json.RawMessage
	// hooked: the connect hook admitted the connection (its answer, not a
	// token alone, made this identity).
	hooked bool
	// channels: the connect hook's channels to subscribe to at once.
	channels []string
	// token: the id and issue time of the token that made this identity,
	// which revocations match (revoke.go); nil without a token.
	token *credential
}

// authError is a refused authentication, with a reason short enough for an
// HTTP 401 body and a metrics label. It never contains the token.
type authError struct{ reason string }

func (e *authError) Error() string { return e.reason }

func authErr(reason string) error { return &authError{reason: reason} }

// authenticator checks tokens for one handler.
type authenticator struct {
	cfg       *JWTConfig
	parser    *jwt.Parser
	keyfunc   jwt.Keyfunc
	stopJWKS  context.CancelFunc
	anonymous *identity // nil: a token is required; shared, never modified

	// Caddyfile rules granted to every authenticated user.
	rules Permissions
	// revocations refuse revoked tokens (revoke.go); set once the hub is
	// known, nil before (and a nil set revokes nothing).
	revocations *revocations
}

// newAuthenticator resolves the key material once. jwtCfg nil means the route
// has no authentication: everyone is anonymous with anon's permissions.
func newAuthenticator(jwtCfg *JWTConfig, anon *Permissions, rules Permissions, log *zap.Logger) (*authenticator, error) {
	a := &authenticator{cfg: jwtCfg, rules: rules}
	if anon != nil {
		a.anonymous = &identity{
			anonymous: true,
			subscribe: compileACL(anon.Subscribe, ""),
			publish:   compileACL(anon.Publish, ""),
		}
	}
	if jwtCfg == nil {
		return a, nil
	}
	if err := jwtSourcesError(jwtCfg); err != nil {
		return nil, err
	}
	var methods []string
	if jwtCfg.Secret != "" {
		secret := []byte(jwtCfg.Secret)
		methods = []string{"HS256", "HS384", "HS512"}
		a.keyfunc = func(*jwt.Token) (any, error) { return secret, nil }
	}
	if jwtCfg.PublicKey != "" {
		key, algs, err := loadPublicKey(jwtCfg.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("jwt public_key: %w", err)
		}
		methods = algs
		a.keyfunc = func(*jwt.Token) (any, error) { return key, nil }
	}
	if jwtCfg.JWKS != "" {
		if err := checkJWKSURL(jwtCfg.JWKS); err != nil {
			return nil, err
		}
		ctx, cancel := context.WithCancel(context.Background())
		kf, err := keyfunc.NewDefaultOverrideCtx(ctx, []string{jwtCfg.JWKS}, keyfunc.Override{
			HTTPTimeout: 5 * time.Second,
			// Bounds both the wait for the unknown-kid limiter and the
			// refetch it allows. rate.Limiter.Wait fails at once when the
			// next refresh is further away than this, so tokens with made-up
			// kids are refused without holding requests open.
			RateLimitWaitMax:  3 * time.Second,
			RefreshUnknownKID: rate.NewLimiter(rate.Every(jwksUnknownKIDInterval), 1),
			RefreshErrorHandlerFunc: func(u string) func(context.Context, error) {
				return func(_ context.Context, err error) {
					log.Warn("fetching the JWKS failed", zap.String("url", u), zap.Error(err))
				}
			},
		})
		if err != nil {
			cancel()
			return nil, fmt.Errorf("jwt jwks %q: %w", jwtCfg.JWKS, err)
		}
		a.stopJWKS = cancel
		a.keyfunc = kf.Keyfunc
		// Asymmetric only: a JWKS "oct" key must never make HMAC acceptable.
		methods = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
	}
	opts := []jwt.ParserOption{
		jwt.WithValidMethods(methods),
		jwt.WithLeeway(time.Duration(jwtCfg.Leeway)),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
	}
	if jwtCfg.Issuer != "" {
		opts = append(opts, jwt.WithIssuer(jwtCfg.Issuer))
	}
	if jwtCfg.Audience != "" {
		opts = append(opts, jwt.WithAudience(jwtCfg.Audience))
	}
	a.parser = jwt.NewParser(opts...)
	return a, nil
}

func (a *authenticator) close() {
	if a.stopJWKS != nil {
		a.stopJWKS()
	}
}

// readPEMBlock reads the first PEM block of the file at path.
func readPEMBlock(path string) (*pem.Block, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%s holds no PEM block", path)
	}
	return block, nil
}

// loadPublicKey reads a PEM public key (or certificate) and returns it with
// the algorithms its type allows.
func loadPublicKey(path string) (any, []string, error) {
	block, err := readPEMBlock(path)
	if err != nil {
		return nil, nil, err
	}
	var key any
	switch block.Type {
	case "CERTIFICATE":
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", path, err)
		}
		key = cert.PublicKey
	case "RSA PUBLIC KEY":
		key, err = x509.ParsePKCS1PublicKey(block.Bytes)
	default:
		key, err = x509.ParsePKIXPublicKey(block.Bytes)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	switch k := key.(type) {
	case *rsa.PublicKey:
		return k, []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}, nil
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return k, []string{"ES256"}, nil
		case elliptic.P384():
			return k, []string{"ES384"}, nil
		case elliptic.P521():
			return k, []string{"ES512"}, nil
		}
		return nil, nil, fmt.Errorf("%s: unsupported ECDSA curve", path)
	case ed25519.PublicKey:
		return k, []string{"EdDSA"}, nil
	}
	return nil, nil, fmt.Errorf("%s: unsupported key type %T (want RSA, ECDSA or Ed25519)", path, key)
}

// tokenSource says where a request's token was found.
type tokenSource int

const (
	tokenNone tokenSource = iota
	tokenHeader
	tokenSubprotocol
	tokenCookie
	tokenQuery
)

// requestToken finds the token of r: the Authorization header, then a
// "bearer.<token>" WebSocket subprotocol, then the cookie, then (only when
// enabled) the query parameter.
func (a *authenticator) requestToken(r *http.Request) (string, tokenSource, error) {
	if v := r.Header.Get("Authorization"); v != "" {
		scheme, token, ok := strings.Cut(v, " ")
		token = strings.TrimSpace(token)
		if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
			return "", tokenHeader, authErr("authorization header must be Bearer <token>")
		}
		return token, tokenHeader, nil
	}
	if token, ok := subprotocolToken(r.Header); ok {
		return token, tokenSubprotocol, nil
	}
	if a.cfg != nil {
		if c, err := r.Cookie(a.cfg.Cookie); err == nil && c.Value != "" {
			return c.Value, tokenCookie, nil
		}
		if a.cfg.QueryParam != "" {
			if token := r.URL.Query().Get(a.cfg.QueryParam); token != "" {
				return token, tokenQuery, nil
			}
		}
	}
	return "", tokenNone, nil
}

// subprotocolToken finds a "bearer.<token>" entry of Sec-WebSocket-Protocol.
func subprotocolToken(h http.Header) (string, bool) {
	for _, v := range h.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(v, ",") {
			p = strings.TrimSpace(p)
			if len(p) > len(bearerSubprotoLabel) && strings.EqualFold(p[:len(bearerSubprotoLabel)], bearerSubprotoLabel) {
				return p[len(bearerSubprotoLabel):], true
			}
		}
	}
	return "", false
}

// offersAppSubprotocol reports whether the client offered "caddychat".
func offersAppSubprotocol(h http.Header) bool {
	for _, v := range h.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(p), appSubprotocol) {
				return true
			}
		}
	}
	return false
}

// authenticate turns a request into an identity, or an *authError.
func (a *authenticator) authenticate(r *http.Request) (*identity, error) {
	if a.cfg == nil {
		// A route without tokens ignores credentials meant for others (e.g.
		// Basic auth of a proxy in front).
		return a.anonymousIdentity(), nil
	}
	token, _, err := a.requestToken(r)
	if err != nil {
		return nil, err
	}
	if token == "" {
		if a.anonymous == nil {
			return nil, authErr("missing token")
		}
		return a.anonymousIdentity(), nil
	}
	return a.verify(token)
}

// anonymousIdentity is the identity of connections without a token; it does
// not depend on the request, so it is compiled once and shared.
func (a *authenticator) anonymousIdentity() *identity {
	if a.anonymous == nil {
		return &identity{anonymous: true}
	}
	return a.anonymous
}

// verify checks a token and derives the user and the channels it may use.
func (a *authenticator) verify(token string) (*identity, error) {
	id, _, err := a.verifyClaims(token)
	return id, err
}

// verifyClaims is verify, also returning the token's claims (for the
// connect hook).
func (a *authenticator) verifyClaims(token string) (*identity, jwt.MapClaims, error) {
	if a.cfg == nil {
		return nil, nil, authErr("this route does not take tokens")
	}
	if len(token) > a.cfg.MaxTokenSize {
		return nil, nil, authErr("token too large")
	}
	claims := jwt.MapClaims{}
	if _, err := a.parser.ParseWithClaims(token, claims, a.keyfunc); err != nil {
		return nil, nil, authErr(jwtFailureReason(err))
	}
	user, _ := lookupClaim(claims, a.cfg.UserClaim).(string)
	if user == "" {
		return nil, nil, authErr("token has no " + a.cfg.UserClaim + " claim")
	}
	if len(user) > 256 {
		return nil, nil, authErr("user id too long")
	}
	id := &identity{user: user, token: tokenCredential(claims)}
	if exp, err := claims.GetExpirationTime(); err == nil && exp != nil {
		id.expires = exp.Time
	}
	if a.revocations.revoked(user, *id.token, time.Now()) {
		return nil, nil, authErr("token revoked")
	}
	subscribe := append(claimPatterns(claims, a.cfg.SubscribeClaim), a.rules.Subscribe...)
	publish := append(claimPatterns(claims, a.cfg.PublishClaim), a.rules.Publish...)
	id.subscribe = compileACL(subscribe, user)
	id.publish = compileACL(publish, user)
	info, err := userInfo(claims, a.cfg.UserInfoClaims)
	if err != nil {
		return nil, nil, err
	}
	id.info = info
	return id, claims, nil
}

// jwtFailureReason names why golang-jwt refused a token, without its content.
func jwtFailureReason(err error) string {
	switch {
	case errors.Is(err, jwt.ErrTokenMalformed):
		return "malformed token"
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return "invalid token signature"
	case errors.Is(err, jwt.ErrTokenExpired):
		return "token expired"
	case errors.Is(err, jwt.ErrTokenNotValidYet), errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return "token not valid yet"
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return "wrong token issuer"
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return "wrong token audience"
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		// exp is always required, iss and aud when configured. golang-jwt's
		// message names the claim ("iss claim is required"); only these fixed
		// names are echoed, never the token's content.
		for _, claim := range []string{"exp", "iss", "aud"} {
			if strings.Contains(err.Error(), claim+" claim is required") {
				return "token lacks a required claim (" + claim + ")"
			}
		}
		return "token lacks a required claim"
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		return "token signing method or key not accepted"
	}
	return "invalid token"
}

// lookupClaim finds name in claims, first as a literal key, then as a dotted
// path into nested objects.
func lookupClaim(claims map[string]any, name string) any {
	if v, ok := claims[name]; ok {
		return v
	}
	var cur any = claims
	for _, part := range strings.Split(name, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		if cur, ok = m[part]; !ok {
			return nil
		}
	}
	return cur
}

// claimPatterns reads a list of patterns (or a single one) from a claim;
// anything else in it grants nothing.
func claimPatterns(claims map[string]any, name string) []string {
	switch v := lookupClaim(claims, name).(type) {
	case string:
		return []string{v}
	case []any:
		out := make([]string, 0, len(v))
		for _, e := range v {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}
