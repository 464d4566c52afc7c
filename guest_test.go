package caddychat

import (
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddychat/caddychat/internal/redistest"
)

func TestValidateGuestName(t *testing.T) {
	good := []string{"alice", "Bob", "o'Brien", "anne-marie", "j.r_2", "Zoë", "李雷", "Renée Dupont", "e\u0301clair", "123", strings.Repeat("x", 24), strings.Repeat("é", 24)}
	for _, name := range good {
		if err := validateGuestName(name); err != nil {
			t.Errorf("validateGuestName(%q) = %v, want nil", name, err)
		}
	}
	bad := []string{
		"",
		strings.Repeat("x", 25), // over 24 characters
		strings.Repeat("李", 22), // 22 characters, but 66 bytes
		" alice", "alice ", "al  ice", "\talice",
		"ali\x00ce", "ali\x07ce", "alice\n", "ali\x1bce", "ali\u0085ce", // control characters
		"ali\u202ece", "\u2066alice", "al\u200bice", "al\u200dice", "\ufeffalice", // bidi, zero-width, BOM
		"\u0301alice",                    // a combining mark first
		"<b>alice</b>", "alice\"", "a&b", // markup
		"alice:bob", "a/b", "a@b", "a,b", "a;b", "{alice}",
		"...", "-", "'", "_ _",
		"\xff\xfe", "ali\xc3ce", // not UTF-8
		"a\u3000b", "a\u00a0b", // other spaces
	}
	for _, name := range bad {
		if err := validateGuestName(name); err == nil {
			t.Errorf("validateGuestName(%q) = nil, want an error", name)
		}
	}
}

func TestGuestPresenceKeys(t *testing.T) {
	id := &identity{anonymous: true, guest: "0123456789abcdef", name: "alice"}
	key := id.presenceKey()
	guest, name, ok := parseGuestKey(key)
	if !ok || guest != id.guest || name != "alice" {
		t.Fatalf("parseGuestKey(%q) = %q, %q, %v", key, guest, name, ok)
	}
	// A user id is never read as a guest's key: user ids are valid UTF-8
	// (JSON strings), and no UTF-8 text holds the byte 0xff.
	for _, user := range []string{"alice", "\u00ff0123456789abcdefalice", "\uffff0123456789abcdef"} {
		if _, _, ok := parseGuestKey((&identity{user: user}).presenceKey()); ok {
			t.Errorf("user %q read as a guest", user)
		}
	}
	if got := (&identity{anonymous: true}).presenceKey(); got != "" {
		t.Errorf("a plain anonymous identity has presence key %q, want none", got)
	}
}

func TestIsPresenceEventGuests(t *testing.T) {
	const ch = "room:a"
	cases := []struct {
		payload string
		want    bool
	}{
		{string(presenceEvent("join", ch, "\xff0123456789abcdefalice", nil)), true},
		{string(presenceEvent("leave", ch, "\xff0123456789abcdef", nil)), true},
		{`{"type":"join","channel":"room:a","user":"","anonymous":true,"guest":"0123456789abcdef","name":"al\/ice"}`, true}, // cjson escapes /
		{`{"type":"join","channel":"room:a","user":"","anonymous":true,"guest":"0123456789ABCDEF","name":"a"}`, false},
		{`{"type":"join","channel":"room:a","user":"","anonymous":true,"guest":"0123456789abcde","name":"a"}`, false},
		{`{"type":"join","channel":"room:a","user":"","anonymous":true,"guest":"0123456789abcdef","name":5}`, false},
		{`{"type":"join","channel":"room:a","user":"","anonymous":true,"guest":"0123456789abcdef"}`, false},
		{`{"type":"join","channel":"room:a","user":"","anonymous":true,"guest":"0123456789abcdef","name":"a","x":1}`, false},
	}
	for _, tc := range cases {
		if got := isPresenceEvent(ch, []byte(tc.payload)); got != tc.want {
			t.Errorf("isPresenceEvent(%q) = %v, want %v", tc.payload, got, tc.want)
		}
	}
	want := `{"type":"join","channel":"room:a","user":"","anonymous":true,"guest":"0123456789abcdef","name":"alice"}`
	if got := string(presenceEvent("join", ch, "\xff0123456789abcdefalice", nil)); got != want {
		t.Errorf("guest event %s, want %s", got, want)
	}
}

// guestRoute: a JWT route whose anonymous connections may use room:* under
// guest names, with presence.
func guestRoute(redisURL string, prefix *string, guests bool) *Handler {
	h := presenceRoute(redisURL, prefix, 15*time.Second)
	h.Anonymous = &Permissions{Subscribe: []string{"room:*"}, Publish: []string{"room:*"}}
	h.GuestNames = guests
	return h
}

// guestDial connects anonymously with ?name=name (none when empty).
func guestDial(t *testing.T, n *testNode, name string) (*pclient, map[string]any) {
	t.Helper()
	u := n.url("/ws")
	if name != "" {
		u += "?name=" + url.QueryEscape(name)
	}
	c := &pclient{testClient: dial(t, u, nil), name: "guest " + name}
	w := c.nextFrame()
	if w["type"] != "welcome" {
		t.Fatalf("%s: first frame %v, want welcome", name, w)
	}
	return c, w
}

var guestIDPattern = regexp.MustCompile(`^[0-9a-f]{16}$`)

// presenceLines is a presence reply as "alice:1 ~alice:1 ~bob:1 ~:1":
// guests with a ~ before their name.
func presenceLines(t *testing.T, c *pclient, channel string) (string, []map[string]any) {
	t.Helper()
	r := c.do(map[string]any{"op": "presence", "channel": channel})
	users, _ := r["users"].([]any)
	var list []string
	var raw []map[string]any
	for _, u := range users {
		m, _ := u.(map[string]any)
		raw = append(raw, m)
		if m["anonymous"] == true {
			name, _ := m["name"].(string) // left out when empty
			list = append(list, fmt.Sprintf("~%s:%v", name, m["connections"]))
		} else {
			list = append(list, fmt.Sprintf("%v:%v", m["user"], m["connections"]))
		}
	}
	return strings.Join(list, " "), raw
}

// TestGuestNames: guests get a node-made id and keep the name they picked,
// marked anonymous wherever they appear; nothing a client sends can change
// who a message is from, and a guest named like a user is still a guest.
func TestGuestNames(t *testing.T) {
	for _, broker := range []string{"memory", "redis"} {
		t.Run(broker, func(t *testing.T) {
			redisURL := ""
			if broker == "redis" {
				redisURL = redistest.Start(t).URL()
			}
			n := startNode(t, guestRoute(redisURL, ptr(uniquePrefix()), true))
			const ch = "room:g"

			alice := presenceDial(t, n, "/ws", "alice")
			alice.join(ch)
			fake, fw := guestDial(t, n, "alice") // a guest posing as alice
			bob, bw := guestDial(t, n, "bob")
			plain, pw := guestDial(t, n, "")
			for _, w := range []map[string]any{fw, bw, pw} {
				if w["user"] != "" || !guestIDPattern.MatchString(fmt.Sprint(w["guest"])) {
					t.Fatalf("guest welcome %v: want user \"\" and a 16-hex guest id", w)
				}
			}
			if fw["name"] != "alice" || bw["name"] != "bob" || pw["name"] != nil {
				t.Fatalf("welcome names: %v %v %v", fw["name"], bw["name"], pw["name"])
			}
			if fw["guest"] == bw["guest"] || fw["guest"] == pw["guest"] {
				t.Fatal("two guests got the same guest id")
			}

			fake.join(ch)
			bob.join(ch)
			plain.join(ch)
			wantEventsOf(t, alice, ch, []string{"join alice", "join guest alice " + fw["guest"].(string), "join guest bob " + bw["guest"].(string), "join guest  " + pw["guest"].(string)})

			got, raw := presenceLines(t, alice, ch)
			if got != "alice:1 ~:1 ~alice:1 ~bob:1" {
				t.Fatalf("presence %q, want the user alice, then the guests by name", got)
			}
			for _, m := range raw[1:] {
				if m["user"] != "" || !guestIDPattern.MatchString(fmt.Sprint(m["guest"])) {
					t.Errorf("guest presence line %v: want user \"\" and a guest id", m)
				}
			}

			// A guest's publish that tries every sender field: the node
			// writes the sender, from the connection.
			fake.send(map[string]any{"op": "publish", "channel": ch, "id": 99,
				"from": "alice", "server": true, "anonymous": false, "guest": bw["guest"], "name": "bob", "user": "alice",
				"data": map[string]any{"text": "hi, it is alice", "from": "alice"}})
			m := alice.nextOf("message")
			if m["from"] != "" || m["anonymous"] != true || m["server"] != nil || m["guest"] != fw["guest"] || m["name"] != "alice" {
				t.Fatalf("a guest's message reads %v: want from \"\", anonymous, its own guest id and name", m)
			}
			// A user's message names the user only.
			alice.send(map[string]any{"op": "publish", "channel": ch, "id": 98, "data": "real alice", "name": "mallory", "guest": fw["guest"]})
			m = bob.nextOf("message")
			m = bob.nextOf("message")
			if m["data"] != "real alice" || m["from"] != "alice" || m["anonymous"] != nil || m["guest"] != nil || m["name"] != nil {
				t.Fatalf("a user's message reads %v: want from alice and no guest fields", m)
			}

			// A guest's token-less refresh cannot make it a user.
			if r := fake.do(map[string]any{"op": "refresh", "token": newToken(t, "alice").sign()}); r["type"] != "error" || r["code"] != "forbidden" {
				t.Fatalf("guest refresh: %v, want forbidden", r)
			}

			_ = fake.ws.CloseNow()
			wantEventsOf(t, alice, ch, []string{"leave guest alice " + fw["guest"].(string)})
			if got, _ := presenceLines(t, bob, ch); got != "alice:1 ~:1 ~bob:1" {
				t.Fatalf("presence after the guest left: %q", got)
			}
		})
	}
}

// nextOf returns the next frame of type typ, keeping the others.
func (c *pclient) nextOf(typ string) map[string]any {
	c.t.Helper()
	for i, m := range c.backlog {
		if m["type"] == typ {
			c.backlog = append(c.backlog[:i:i], c.backlog[i+1:]...)
			return m
		}
	}
	for {
		m := c.nextAny()
		if m["type"] == typ {
			return m
		}
		c.backlog = append(c.backlog, m)
	}
}

// wantEventsOf reads join and leave events on channel until it has len(want)
// of them: "join alice" for users, "join guest <name> <guest id>" for guests.
func wantEventsOf(t *testing.T, c *pclient, channel string, want []string) {
	t.Helper()
	var got []string
	deadline := time.Now().Add(5 * time.Second)
	for len(got) < len(want) && time.Now().Before(deadline) {
		m := c.nextFrame()
		if m["type"] != "join" && m["type"] != "leave" || m["channel"] != channel {
			continue
		}
		if m["anonymous"] == true {
			if m["user"] != "" {
				t.Fatalf("guest event with a user: %v", m)
			}
			got = append(got, fmt.Sprintf("%v guest %v %v", m["type"], m["name"], m["guest"]))
		} else {
			got = append(got, fmt.Sprintf("%v %v", m["type"], m["user"]))
		}
	}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("events %q, want %q", got, want)
	}
}

// TestGuestNamesRefused: a bad name is refused before the upgrade; a token
// wins over a name; a route without guest_names ignores names.
func TestGuestNamesRefused(t *testing.T) {
	n := startNode(t, guestRoute("", ptr(uniquePrefix()), true))
	for _, q := range []string{
		"name=" + strings.Repeat("a", 25),
		"name=" + url.QueryEscape("ali\x07ce"),
		"name=" + url.QueryEscape("ali\u202ece"),
		"name=" + url.QueryEscape("al\u200bice"),
		"name=" + url.QueryEscape("<script>"),
		"name=%FF",
		"name=",
		"name=%20alice",
		"name=alice&name=bob",
	} {
		r := dialRefused(t, n.url("/ws?"+q), nil)
		if r.status != http.StatusBadRequest || !strings.Contains(r.body, "bad name") {
			t.Errorf("?%s: %d %q, want 400 bad name", q, r.status, r.body)
		}
	}

	// With a token the user is who the token says; the name is not used.
	c := dial(t, n.url("/ws?name=mallory"), bearer(newToken(t, "alice").sign()))
	if w := c.next("welcome"); w["user"] != "alice" || w["guest"] != nil || w["name"] != nil {
		t.Errorf("token and name: welcome %v, want user alice and no guest fields", w)
	}

	// guest_names off (the default): names are ignored, anonymous stays nameless.
	off := startNode(t, guestRoute("", ptr(uniquePrefix()), false))
	c = dial(t, off.url("/ws?name=alice"), nil)
	if w := c.next("welcome"); w["user"] != "" || w["guest"] != nil || w["name"] != nil {
		t.Errorf("guest_names off: welcome %v, want no guest fields", w)
	}
	c.subscribe("room:x", 1)
	c.send(map[string]any{"op": "publish", "channel": "room:x", "data": 1, "id": 2})
	if m := c.next("message"); m["from"] != "" || m["anonymous"] != true || m["guest"] != nil || m["name"] != nil {
		t.Errorf("guest_names off: message %v, want plain anonymous", m)
	}
	// A bad name is not even read there.
	c = dial(t, off.url("/ws?name=%FF"), nil)
	c.next("welcome")
}

// TestGuestNamesKeptInHistory: a replayed message says who sent it as the
// live one did.
func TestGuestNamesKeptInHistory(t *testing.T) {
	h := guestRoute("", ptr(uniquePrefix()), true)
	h.History = []HistoryRule{{Channels: "room:*", Count: 10, MaxAge: caddy.Duration(time.Hour)}}
	n := startNode(t, h)
	g, w := guestDial(t, n, "bob")
	if r := g.do(map[string]any{"op": "publish", "channel": "room:h", "data": "kept"}); r["type"] != "ok" {
		t.Fatalf("publish: %v", r)
	}
	later, _ := guestDial(t, n, "carol")
	if r := later.do(map[string]any{"op": "subscribe", "channel": "room:h", "history": 5}); r["type"] != "ok" {
		t.Fatalf("subscribe: %v", r)
	}
	m := later.nextOf("message")
	if m["data"] != "kept" || m["guest"] != w["guest"] || m["name"] != "bob" || m["anonymous"] != true || m["from"] != "" {
		t.Fatalf("replayed message %v", m)
	}
}
