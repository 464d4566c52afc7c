package caddychat

import (
	"context"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/golang-jwt/jwt/v5"
)

// Authorization: the chat claims and the route's rules, channel patterns,
// anonymous access.

var aclClaims = jwt.MapClaims{"chat": map[string]any{
	"subscribe": []string{"room:*", "user:{user}"},
	"publish":   []string{"room:eng"},
}}

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
