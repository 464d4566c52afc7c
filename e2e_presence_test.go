package caddychat

// End-to-end tests of presence: real Caddy nodes sharing a real redis-server,
// clients authenticated with JWTs.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/caddychat/caddychat/internal/redistest"
)

// presenceRoutes is a JSON route with presence on: authenticated users may
// use room:*, anonymous connections may subscribe to it.
func presenceRoutes(redisURL string, ttl time.Duration) string {
	return fmt.Sprintf(`	chat /ws {
		redis %s
		rate_limit off
		jwt {
			secret %s
		}
		subscribe room:*
		publish room:*
		anonymous {
			subscribe room:*
		}
		presence on
		presence_ttl %s
	}`, redisURL, testSecret, ttl)
}

// dialUser connects to a JSON route as user (anonymous when empty) and reads
// the welcome frame.
func dialUser(t testing.TB, name, url, user string) *wsClient {
	t.Helper()
	header := http.Header{"Origin": {"http://" + strings.Split(strings.TrimPrefix(url, "ws://"), "/")[0]}}
	if user != "" {
		header.Set("Authorization", "Bearer "+newToken(t, user).sign())
	}
	c, err := dialWSWith(t, name, url, &websocket.DialOptions{HTTPHeader: header})
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.readMsg(10 * time.Second)
	if err != nil || m.Type != "welcome" || m.User == nil || *m.User != user {
		t.Fatalf("%s: want a welcome for user %q, got %v %v", name, user, m, err)
	}
	c.welcome = m
	return c
}

// presenceOf sends the presence op and returns the users as "alice:2 bob:1",
// in the reply's order.
func presenceOf(t testing.TB, c *wsClient, channel string) string {
	t.Helper()
	c.nextID++
	id := strconv.Itoa(c.nextID)
	c.sendText(fmt.Sprintf(`{"op":"presence","channel":%q,"id":%s}`, channel, id))
	deadline := time.After(10 * time.Second)
	for {
		select {
		case f, ok := <-c.frames:
			if !ok {
				t.Fatalf("%s: connection closed waiting for presence: %v", c.name, c.readErr)
			}
			var reply struct {
				Type  string          `json:"type"`
				ID    json.RawMessage `json:"id"`
				Users []struct {
					User        string `json:"user"`
					Connections int    `json:"connections"`
				} `json:"users"`
			}
			if json.Unmarshal(f.data, &reply) != nil || string(reply.ID) != id {
				c.pending = append(c.pending, f)
				continue
			}
			if reply.Type != "presence" {
				t.Fatalf("%s: presence %s: got %s", c.name, channel, f.data)
			}
			var users []string
			for _, u := range reply.Users {
				users = append(users, fmt.Sprintf("%s:%d", u.User, u.Connections))
			}
			return strings.Join(users, " ")
		case <-deadline:
			t.Fatalf("%s: no presence reply within 10s", c.name)
		}
	}
}

// presenceEvents publishes a sentinel on channel (c is subscribed) and returns
// the join and leave events c gets before it: "join alice, leave bob".
// Everything Redis published before the sentinel arrives before it.
func presenceEvents(t testing.TB, c *wsClient, channel string) string {
	t.Helper()
	sentinel := fmt.Sprintf("sentinel-%d", c.nextID+1)
	c.mustPublish(channel, sentinel)
	var events []string
	for {
		m, err := c.readMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("%s: waiting for the sentinel (events so far: %v): %v", c.name, events, err)
		}
		switch {
		case m.Type == "join" || m.Type == "leave":
			if m.Channel != channel || m.User == nil {
				t.Fatalf("%s: malformed event %s", c.name, m)
			}
			events = append(events, m.Type+" "+*m.User)
		case m.Type == "message" && string(m.Data) == strconv.Quote(sentinel):
			return strings.Join(events, ", ")
		}
	}
}

// nextEvent returns the next join or leave event, skipping other frames.
func nextEvent(t testing.TB, c *wsClient, timeout time.Duration) *serverMsg {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m, err := c.readMsg(time.Until(deadline))
		if err != nil {
			t.Fatalf("%s: waiting for a join or leave event: %v", c.name, err)
		}
		if m.Type == "join" || m.Type == "leave" {
			return m
		}
	}
}

// TestPresenceTwoTabsTwoNodes: a user with a tab on each node is one join
// for the others, and one leave, after the last tab closed.
func TestPresenceTwoTabsTwoNodes(t *testing.T) {
	rs := redistest.Start(t)
	a := startCaddy(t, "A", presenceRoutes(rs.URL(), 15*time.Second))
	b := startCaddy(t, "B", presenceRoutes(rs.URL(), 15*time.Second))
	const ch = "room:tabs"
	carol := dialUser(t, "carol@A", a.wsURL("/ws"), "carol")
	carol.subscribe(ch)
	if got := presenceEvents(t, carol, ch); got != "join carol" {
		t.Fatalf("carol's events after subscribing: %q, want her own join", got)
	}
	dave := dialUser(t, "dave@B", b.wsURL("/ws"), "dave")
	dave.subscribe(ch)

	tabA := dialUser(t, "alice-tab@A", a.wsURL("/ws"), "alice")
	tabA.subscribe(ch)
	tabB := dialUser(t, "alice-tab@B", b.wsURL("/ws"), "alice")
	tabB.subscribe(ch)
	if got := presenceEvents(t, carol, ch); got != "join dave, join alice" {
		t.Fatalf("carol@A: events after alice opened two tabs: %q, want one join each for dave and alice", got)
	}
	if got := presenceEvents(t, dave, ch); got != "join dave, join alice" {
		t.Fatalf("dave@B: events after alice opened two tabs: %q, want one join each for dave and alice", got)
	}

	tabA.closeNormal()
	eventually(t, 5*time.Second, "alice down to one connection", func() (bool, string) {
		got := presenceOf(t, carol, ch)
		return got == "alice:1 carol:1 dave:1", got
	})
	if got := presenceEvents(t, carol, ch); got != "" {
		t.Fatalf("carol@A: events after alice closed one of two tabs: %q, want none", got)
	}

	closed := time.Now()
	tabB.closeNormal()
	for _, c := range []*wsClient{carol, dave} {
		m := nextEvent(t, c, 5*time.Second)
		if m.Type != "leave" || *m.User != "alice" {
			t.Fatalf("%s: after alice's last tab closed: %s, want alice's leave", c.name, m)
		}
		if got := presenceEvents(t, c, ch); got != "" {
			t.Fatalf("%s: events after alice's leave: %q, want no more", c.name, got)
		}
	}
	t.Logf("alice's leave reached both nodes %v after her last tab closed", time.Since(closed).Round(time.Millisecond))
	if got := presenceOf(t, dave, ch); got != "carol:1 dave:1" {
		t.Fatalf("presence after alice left: %q", got)
	}
}

// TestPresenceNodeKilled: the users of a node killed with SIGKILL get their
// leave on the other node within presence_ttl + presence_ttl/3, and the
// presence op lists no ghost.
func TestPresenceNodeKilled(t *testing.T) {
	rs := redistest.Start(t)
	const ttl = 3 * time.Second
	a := startCaddy(t, "A", presenceRoutes(rs.URL(), ttl))
	b := startCaddy(t, "B", presenceRoutes(rs.URL(), ttl))
	const ch = "room:crash"
	carol := dialUser(t, "carol@A", a.wsURL("/ws"), "carol")
	carol.subscribe(ch)
	for _, user := range []string{"alice", "alice", "bob"} {
		dialUser(t, user+"@B", b.wsURL("/ws"), user).subscribe(ch)
	}
	if got := presenceEvents(t, carol, ch); got != "join carol, join alice, join bob" {
		t.Fatalf("carol@A: events before the crash: %q", got)
	}
	if got := presenceOf(t, carol, ch); got != "alice:2 bob:1 carol:1" {
		t.Fatalf("presence before the crash: %q", got)
	}

	b.kill()
	killed := time.Now()
	bound := ttl + ttl/3
	left := map[string]bool{}
	for len(left) < 2 {
		m := nextEvent(t, carol, bound+5*time.Second)
		if m.Type != "leave" || left[*m.User] || (*m.User != "alice" && *m.User != "bob") {
			t.Fatalf("carol@A: after B was killed: %s, want one leave each for alice and bob", m)
		}
		left[*m.User] = true
	}
	waited := time.Since(killed)
	t.Logf("leave for B's users %v after SIGKILL (bound: presence_ttl + presence_ttl/3 = %v)", waited.Round(time.Millisecond), bound)
	// Slack for scheduling on a loaded machine and the race detector.
	if waited > bound+time.Second {
		t.Errorf("leave events came %v after the kill, want within presence_ttl + presence_ttl/3 = %v", waited.Round(time.Millisecond), bound)
	}
	if got := presenceOf(t, carol, ch); got != "carol:1" {
		t.Fatalf("presence after B was killed: %q, want carol:1 (no ghost)", got)
	}
	if got := presenceEvents(t, carol, ch); got != "" {
		t.Fatalf("carol@A: events after the leaves: %q, want none", got)
	}
}

// TestPresenceQueryAcrossNodes: the presence op on either node lists the
// users of both, with their connection counts; anonymous connections are not
// listed.
func TestPresenceQueryAcrossNodes(t *testing.T) {
	rs := redistest.Start(t)
	a := startCaddy(t, "A", presenceRoutes(rs.URL(), 15*time.Second))
	b := startCaddy(t, "B", presenceRoutes(rs.URL(), 15*time.Second))
	const ch = "room:who"
	for _, s := range []struct {
		n    *caddyNode
		user string
	}{{a, "alice"}, {a, "alice"}, {b, "alice"}, {b, "bob"}, {a, ""}, {b, ""}, {b, "zed"}} {
		dialUser(t, s.user+"@"+s.n.name, s.n.wsURL("/ws"), s.user).subscribe(ch)
	}
	dialUser(t, "zed-elsewhere@A", a.wsURL("/ws"), "zed").subscribe("room:other")
	for _, n := range []*caddyNode{a, b} {
		c := dialUser(t, "asker@"+n.name, n.wsURL("/ws"), "")
		if got := presenceOf(t, c, ch); got != "alice:3 bob:1 zed:1" {
			t.Errorf("presence on %s: %q, want alice:3 bob:1 zed:1", n.name, got)
		}
		m, err := c.request(map[string]any{"op": "presence", "channel": "private:x"}, 10*time.Second)
		if err != nil || m.Type != "error" || m.Code != "forbidden" {
			t.Errorf("presence of a channel the client may not subscribe to on %s: %v %v, want forbidden", n.name, m, err)
		}
	}
}
