package caddychat

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// Seed corpora live in testdata/fuzz/<FuzzName>/ and run with every go test;
// the f.Add seeds below run too.

// channelNameRE is an independent statement of PROTOCOL.md's channel names.
var channelNameRE = regexp.MustCompile(`^[A-Za-z0-9_\-.:@/]{1,128}$`)

func checkChannelName(t *testing.T, name string) {
	t.Helper()
	err := validateChannel(name)
	if ok := channelNameRE.MatchString(name); ok != (err == nil) {
		t.Fatalf("validateChannel(%q) = %v, but the documented charset says valid=%v", name, err, ok)
	}
	if err == nil && (len(name) == 0 || len(name) > maxChannelLen || strings.ContainsAny(name, "*?[] \t\r\n\x00")) {
		t.Fatalf("validateChannel accepted %q", name)
	}
	// The ACL matcher must cope with any name the client can send.
	acl := compileACL([]string{"room:*", "a:**", "user:{user}:**", "**", "*"}, "u:*")
	_ = acl.allows(name)
}

func FuzzDecodeClientFrame(f *testing.F) {
	for _, s := range []string{
		`{"op":"subscribe","channel":"room:eng","id":1}`,
		`{"op":"publish","channel":"room:eng","data":{"text":"hi"},"id":"p-2"}`,
		`{"op":"unsubscribe","channel":"room:eng"}`,
		`{"op":"refresh","token":"a.b.c","id":-1.5e3}`,
		`  {"OP":"publish","Channel":"x","data":null,"id":null}`,
		`{"op":"subscribe","id":"` + strings.Repeat("x", 64) + `"}`,
		`{"op":"subscribe","id":"` + strings.Repeat("x", 65) + `"}`,
		`{"op":"subscribe","id":` + strings.Repeat("9", 67) + `}`,
		`{"op":"x","id":true}`,
		`{"op":"x","id":{"a":[1]}}`,
		`{"op":"x","id":"\u00e9\ud800"}`,
		`{"op":"x"} trailing`,
		"{\"op\":\"\xff\xfe\",\"id\":\"\xff\"}",
		`[1,2]`,
		`"subscribe"`,
		``,
		`{`,
		`{"data":` + strings.Repeat("[", 200) + strings.Repeat("]", 200) + `}`,
		`{"op":"subscribe","channel":"room:*","id":1}`,
		`{"op":"subscribe","channel":"` + strings.Repeat("a", 128) + `"}`,
		`{"op":"subscribe","channel":"` + strings.Repeat("b", 129) + `"}`,
		`room:eng/a@b.c_d-e`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		validUTF8 := utf8.Valid(frame)
		fr, err := decodeClientFrame(frame)

		// Whatever the outcome, an id that is returned is echoed in the reply:
		// it must be a valid correlation id and the reply must encode.
		if len(fr.ID) > 0 && (!validCorrelationID(fr.ID) || !json.Valid(fr.ID)) {
			t.Fatalf("decodeClientFrame(%q) returned id %q (err %v)", frame, fr.ID, err)
		}
		code, msg := "", ""
		if err != nil {
			code, msg = errBadRequest, err.Error()
		} else if fr.Op != "subscribe" && fr.Op != "unsubscribe" && fr.Op != "publish" && fr.Op != "refresh" {
			code, msg = errBadRequest, fmt.Sprintf("unknown op %q", truncate(fr.Op, 32))
		}
		out, merr := json.Marshal(reply{Type: "error", ID: fr.ID, Code: code, Message: msg, Channel: fr.Channel})
		if merr != nil {
			t.Fatalf("the reply to %q does not encode: %v", frame, merr)
		}
		if validUTF8 && !utf8.Valid(out) {
			t.Fatalf("the reply to valid UTF-8 %q is not UTF-8: %q", frame, out)
		}

		if err != nil {
			// Only a valid frame's id is echoed (PROTOCOL.md: a bad id or
			// malformed JSON gets a reply without one).
			if len(fr.ID) != 0 {
				t.Fatalf("decodeClientFrame(%q) failed (%v) but returned id %q", frame, err, fr.ID)
			}
		} else {
			trimmed := bytes.TrimLeft(frame, " \t\r\n")
			if len(trimmed) == 0 || trimmed[0] != '{' || !json.Valid(frame) {
				t.Fatalf("decodeClientFrame accepted %q, which is not a JSON object", frame)
			}
			for _, s := range []string{fr.Op, fr.Channel, fr.Token} {
				if !utf8.ValidString(s) {
					t.Fatalf("decoded string field %q is not UTF-8", s)
				}
			}
			if len(fr.Data) > 0 && !json.Valid(fr.Data) {
				t.Fatalf("data %q is not JSON", fr.Data)
			}
			if len(fr.ID) > 0 {
				if fr.ID[0] == '"' {
					var s string
					if err := json.Unmarshal(fr.ID, &s); err != nil {
						t.Fatalf("string id %q: %v", fr.ID, err)
					}
					if validUTF8 && len(s) > 64 {
						t.Fatalf("accepted a string id of %d bytes: %q", len(s), fr.ID)
					}
				} else {
					var n json.Number
					if err := json.Unmarshal(fr.ID, &n); err != nil {
						t.Fatalf("id %q is neither a string nor a number: %v", fr.ID, err)
					}
				}
			}
			// Re-encoding what was decoded yields the same frame.
			b, err := json.Marshal(fr)
			if err != nil {
				t.Fatalf("re-encoding %+v: %v", fr, err)
			}
			again, err := decodeClientFrame(b)
			if err != nil {
				t.Fatalf("re-encoded frame %q refused: %v", b, err)
			}
			if again.Op != fr.Op || again.Channel != fr.Channel || again.Token != fr.Token ||
				!jsonEqual(again.ID, fr.ID) || !jsonEqual(again.Data, fr.Data) {
				t.Fatalf("round trip of %q changed it: %+v then %+v", frame, fr, again)
			}
		}

		checkChannelName(t, fr.Channel)
		checkChannelName(t, fr.Op)
		checkChannelName(t, string(frame))
	})
}

// jsonEqual compares two JSON values by meaning (json.Marshal escapes <, >
// and & in a RawMessage, so the bytes may differ).
func jsonEqual(a, b json.RawMessage) bool {
	if len(a) == 0 || len(b) == 0 {
		return len(a) == len(b)
	}
	decode := func(m json.RawMessage) (any, error) {
		d := json.NewDecoder(bytes.NewReader(m))
		d.UseNumber()
		var v any
		err := d.Decode(&v)
		return v, err
	}
	va, erra := decode(a)
	vb, errb := decode(b)
	return erra == nil && errb == nil && reflect.DeepEqual(va, vb)
}

const fuzzJWTSecret = "fuzz-secret-0123456789abcdef0123456789"

func fuzzAuthenticators(t testing.TB) (withJWT, anonymousOnly *authenticator) {
	cfg := &JWTConfig{
		Secret:         fuzzJWTSecret,
		UserClaim:      defaultUserClaim,
		SubscribeClaim: defaultSubscribeClaim,
		PublishClaim:   defaultPublishClaim,
		Leeway:         caddy.Duration(defaultLeeway),
		Cookie:         defaultTokenCookie,
		QueryParam:     "token",
		MaxTokenSize:   defaultMaxTokenSize,
	}
	withJWT, err := newAuthenticator(cfg, nil, Permissions{Subscribe: []string{"**"}, Publish: []string{"**"}}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	anonymousOnly, err = newAuthenticator(nil, &Permissions{Subscribe: []string{"**"}, Publish: []string{"**"}}, Permissions{}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	return withJWT, anonymousOnly
}

func FuzzRequestToken(f *testing.F) {
	for _, s := range [][4]string{
		{"Bearer abc.def.ghi", "", "", ""},
		{"bearer   spaced  ", "", "", ""},
		{"Basic dXNlcjpwYXNz", "", "", ""},
		{"Bearer", "", "", ""},
		{"", "caddychat, bearer.eyJhbGciOiJIUzI1NiJ9.e30.sig", "", ""},
		{"", "BEARER.x,bearer.y", "", ""},
		{"", "bearer.", "chat_token=abc; other=1", "token=q"},
		{"", "", `chat_token="quoted"; chat_token=second`, ""},
		{"", "", "", "token=%41%42&token=second"},
		{"", "", "", "token=%zz;token=x"},
		// A well-formed token with alg none, and one signed with another secret.
		{"Bearer eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.", "", "", ""},
		{"Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.CXpvIW1kM1YKVOlXv8j2R8l0gNn4e5x1QQe4oVwG6Fs", "", "", ""},
	} {
		f.Add(s[0], s[1], s[2], s[3])
	}
	withJWT, anonymousOnly := fuzzAuthenticators(f)

	f.Fuzz(func(t *testing.T, authorization, subprotocol, cookie, query string) {
		r := &http.Request{Method: http.MethodGet, URL: &url.URL{Path: "/ws", RawQuery: query}, Header: http.Header{}, Host: "example.com"}
		if authorization != "" {
			r.Header.Set("Authorization", authorization)
		}
		if subprotocol != "" {
			r.Header.Set("Sec-WebSocket-Protocol", subprotocol)
		}
		if cookie != "" {
			r.Header.Set("Cookie", cookie)
		}

		for _, a := range []*authenticator{withJWT, anonymousOnly} {
			token, src, err := a.requestToken(r)
			if err != nil {
				var ae *authError
				if !errors.As(err, &ae) || token != "" || src != tokenHeader || authorization == "" {
					t.Fatalf("requestToken: token %q source %v error %v", token, src, err)
				}
			}
			if authorization != "" && src != tokenHeader {
				t.Fatalf("an Authorization header was present but the token came from source %v", src)
			}
			switch src {
			case tokenNone:
				if token != "" {
					t.Fatalf("token %q without a source", token)
				}
			case tokenHeader:
				if err == nil && (len(token) >= len(authorization) || !strings.HasSuffix(strings.TrimSpace(authorization), token)) {
					t.Fatalf("token %q is not part of the Authorization header %q", token, authorization)
				}
			case tokenSubprotocol:
				if token == "" || len(token) >= len(subprotocol) || !followsBearerLabel(subprotocol, token) {
					t.Fatalf("token %q is not part of the subprotocol header %q", token, subprotocol)
				}
			case tokenCookie:
				if a.cfg == nil || token == "" || len(token) > len(cookie) {
					t.Fatalf("cookie token %q from %q", token, cookie)
				}
			case tokenQuery:
				if a.cfg == nil || token == "" || len(token) > len(query) {
					t.Fatalf("query token %q from %q", token, query)
				}
			default:
				t.Fatalf("unknown token source %v", src)
			}

			id, aerr := a.authenticate(r)
			if a == withJWT {
				// No secret, no identity: random input never authenticates.
				if aerr == nil || id != nil {
					t.Fatalf("authenticated %+v from Authorization %q, subprotocol %q, cookie %q, query %q",
						id, authorization, subprotocol, cookie, query)
				}
				var ae *authError
				if !errors.As(aerr, &ae) {
					t.Fatalf("authenticate error %T %v is not an authError", aerr, aerr)
				}
				if len(token) >= 64 && strings.Contains(aerr.Error(), token) {
					t.Fatalf("the error %q reveals the token", aerr)
				}
			} else {
				// A route without tokens ignores whatever credentials come.
				if aerr != nil {
					t.Fatalf("route without tokens: authenticate error %v", aerr)
				}
				if aerr == nil && (id == nil || !id.anonymous || id.user != "" || !id.expires.IsZero()) {
					t.Fatalf("anonymous route gave identity %+v", id)
				}
			}
		}

		// The token verifier on its own, as a refresh frame's token reaches it.
		for _, s := range []string{authorization, subprotocol, cookie, query} {
			if id, err := withJWT.verify(s); err == nil {
				t.Fatalf("verify(%q) = %+v", s, id)
			}
		}
		_ = offersAppSubprotocol(r.Header)
		redact := &Handler{JWT: &JWTConfig{QueryParam: "token"}}
		_ = redact.redactTokenQuery(r.URL)
		_ = redact.queryCarriesToken(r.URL.RawQuery)
	})
}

// followsBearerLabel reports whether token appears in h right after a
// "bearer." label (any case).
func followsBearerLabel(h, token string) bool {
	label := bearerSubprotoLabel
	for i := 0; i+len(label)+len(token) <= len(h); i++ {
		if strings.EqualFold(h[i:i+len(label)], label) && strings.HasPrefix(h[i+len(label):], token) {
			return true
		}
	}
	return false
}

// TestFuzzAuthenticatorAcceptsValidToken keeps FuzzRequestToken honest: the
// same authenticator does accept a correctly signed token from each source,
// so its "never authenticates" property is not vacuous.
func TestFuzzAuthenticatorAcceptsValidToken(t *testing.T) {
	withJWT, _ := fuzzAuthenticators(t)
	tok := newToken(t, "alice").secret(fuzzJWTSecret).sign()
	for name, r := range map[string]*http.Request{
		"header":      {Header: http.Header{"Authorization": {"Bearer " + tok}}, URL: &url.URL{}},
		"subprotocol": {Header: http.Header{"Sec-Websocket-Protocol": {"caddychat, bearer." + tok}}, URL: &url.URL{}},
		"cookie":      {Header: http.Header{"Cookie": {"chat_token=" + tok}}, URL: &url.URL{}},
		"query":       {Header: http.Header{}, URL: &url.URL{RawQuery: "token=" + tok}},
	} {
		id, err := withJWT.authenticate(r)
		if err != nil || id.user != "alice" {
			t.Errorf("%s: authenticate = %+v, %v", name, id, err)
		}
	}
}
