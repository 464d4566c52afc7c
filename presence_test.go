package caddychat

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/coder/websocket"

	"github.com/caddychat/caddychat/internal/redistest"
)

// presenceRoute is a JSON route with presence on: every authenticated user
// may use room:*, anonymous connections may subscribe to room:* too.
func presenceRoute(redisURL string, prefix *string, ttl time.Duration) *Handler {
	return &Handler{
		Redis:         redisURL,
		ChannelPrefix: prefix,
		JWT:           &JWTConfig{Secret: testSecret},
		Subscribe:     []string{"room:*"},
		Publish:       []string{"room:*"},
		Anonymous:     &Permissions{Subscribe: []string{"room:*"}},
		RateLimit:     &RateLimit{PerSecond: -1},
		Presence:      true,
		PresenceTTL:   caddy.Duration(ttl),
	}
}

// presenceNodes are two nodes of one deployment. With Redis they are two hubs
// (two node ids) sharing the server, as two processes would; the in-process
// broker serves one node, so both routes share its hub.
type presenceNodes struct {
	a, b     *testNode
	rs       *redistest.Server // nil for the in-process broker
	redisURL string
	prefix   *string
}

// forEachPresenceBroker runs test against the in-process broker and a real Redis.
func forEachPresenceBroker(t *testing.T, ttl time.Duration, test func(t *testing.T, n presenceNodes)) {
	t.Run("memory", func(t *testing.T) {
		prefix := ptr(uniquePrefix())
		a := startNode(t, presenceRoute("", prefix, ttl))
		b := startNode(t, presenceRoute("", prefix, ttl))
		test(t, presenceNodes{a: a, b: b, prefix: prefix})
	})
	t.Run("redis", func(t *testing.T) {
		rs := redistest.Start(t)
		prefix := ptr(uniquePrefix())
		// Two spellings of one server: two hub keys, so two hubs.
		a := startNode(t, presenceRoute(rs.URL(), prefix, ttl))
		b := startNode(t, presenceRoute("redis://"+rs.Addr(), prefix, ttl))
		if a.h.hub == b.h.hub {
			t.Fatal("the two redis nodes share a hub")
		}
		test(t, presenceNodes{a: a, b: b, rs: rs, redisURL: rs.URL(), prefix: prefix})
	})
}

// pclient is a JSON client that keeps the frames it reads while waiting for
// a reply, so that no join or leave event goes unseen.
type pclient struct {
	*testClient
	name    string
	backlog []map[string]any
	lastID  float64
}

func presenceDial(t *testing.T, n *testNode, path, user string) *pclient {
	t.Helper()
	var opts *websocket.DialOptions
	if user != "" {
		opts = bearer(newToken(t, user).sign())
	}
	c := &pclient{testClient: dial(t, n.url(path), opts), name: user}
	if w := c.nextFrame(); w["type"] != "welcome" {
		t.Fatalf("%s: first frame %v, want welcome", user, w)
	}
	return c
}

func (c *pclient) nextFrame() map[string]any {
	c.t.Helper()
	if len(c.backlog) > 0 {
		m := c.backlog[0]
		c.backlog = c.backlog[1:]
		return m
	}
	return c.nextAny()
}

// do sends frame with a fresh id and returns the reply with that id (ok,
// error or presence); other frames stay in the backlog.
func (c *pclient) do(frame map[string]any) map[string]any {
	c.t.Helper()
	c.lastID++
	id := c.lastID
	frame["id"] = id
	c.send(frame)
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m, ok := <-c.frames:
			if !ok {
				c.t.Fatalf("%s: connection closed waiting for reply to %v: %v", c.name, frame, <-c.closed)
			}
			if m["id"] == id {
				return m
			}
			c.backlog = append(c.backlog, m)
		case <-deadline:
			c.t.Fatalf("%s: no reply to %v within 5s", c.name, frame)
		}
	}
}

func (c *pclient) join(channel string) {
	c.t.Helper()
	if r := c.do(map[string]any{"op": "subscribe", "channel": channel}); r["type"] != "ok" {
		c.t.Fatalf("%s: subscribe %s: %v", c.name, channel, r)
	}
}

// presence asks who is on channel: "alice:2 bob:1", in the reply's order.
func (c *pclient) presence(channel string) string {
	c.t.Helper()
	r := c.do(map[string]any{"op": "presence", "channel": channel})
	if r["type"] != "presence" || r["channel"] != channel {
		c.t.Fatalf("%s: presence %s: got %v", c.name, channel, r)
	}
	users, ok := r["users"].([]any)
	if !ok {
		c.t.Fatalf("%s: presence %s: users is not a list: %v", c.name, channel, r)
	}
	var list []string
	for _, u := range users {
		m, _ := u.(map[string]any)
		list = append(list, fmt.Sprintf("%v:%v", m["user"], m["connections"]))
	}
	return strings.Join(list, " ")
}

// events publishes a sentinel on channel (c is subscribed to it) and returns
// the join and leave events c gets before the sentinel comes back: "join
// alice, leave bob". Everything published before the sentinel arrives first.
func (c *pclient) events(channel string) string {
	c.t.Helper()
	c.lastID++
	sentinel := fmt.Sprintf("sentinel-%v", c.lastID)
	c.send(map[string]any{"op": "publish", "channel": channel, "data": sentinel, "id": c.lastID})
	var seen []string
	for {
		m := c.nextFrame()
		switch m["type"] {
		case "join", "leave":
			if m["channel"] != channel {
				c.t.Fatalf("%s: event for another channel: %v", c.name, m)
			}
			seen = append(seen, fmt.Sprintf("%v %v", m["type"], m["user"]))
		case "message":
			if m["data"] == sentinel {
				return strings.Join(seen, ", ")
			}
		case "error":
			c.t.Fatalf("%s: %v", c.name, m)
		}
	}
}

func wantEvents(t *testing.T, c *pclient, channel, want, when string) {
	t.Helper()
	if got := c.events(channel); got != want {
		t.Fatalf("%s: events on %s %s: got %q, want %q", c.name, channel, when, got, want)
	}
}

func waitPresence(t *testing.T, c *pclient, channel, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := c.presence(channel)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("presence of %s: %q, want %q within 5s", channel, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPresenceJoinLeaveOncePerUser: a user with two connections joins once
// and leaves once, when the last one goes.
func TestPresenceJoinLeaveOncePerUser(t *testing.T) {
	forEachPresenceBroker(t, 15*time.Second, func(t *testing.T, n presenceNodes) {
		const ch = "room:p"
		bob := presenceDial(t, n.a, "/ws", "bob")
		bob.join(ch)
		wantEvents(t, bob, ch, "join bob", "after bob subscribed")

		tab1 := presenceDial(t, n.a, "/ws", "alice")
		tab1.join(ch)
		tab2 := presenceDial(t, n.b, "/ws", "alice")
		tab2.join(ch)
		wantEvents(t, bob, ch, "join alice", "after alice subscribed from two tabs")
		if got := bob.presence(ch); got != "alice:2 bob:1" {
			t.Fatalf("presence: %q, want alice:2 bob:1", got)
		}
		// The second tab got the first tab's join, not one of its own.
		wantEvents(t, tab2, ch, "", "on alice's second tab")

		_ = tab1.ws.Close(websocket.StatusNormalClosure, "")
		waitPresence(t, bob, ch, "alice:1 bob:1")
		wantEvents(t, bob, ch, "", "after alice's first tab closed")

		// An explicit unsubscribe of the last tab is the leave.
		if r := tab2.do(map[string]any{"op": "unsubscribe", "channel": ch}); r["type"] != "ok" {
			t.Fatalf("unsubscribe: %v", r)
		}
		wantEvents(t, bob, ch, "leave alice", "after alice's last tab unsubscribed")
		if got := bob.presence(ch); got != "bob:1" {
			t.Fatalf("presence: %q, want bob:1", got)
		}
	})
}

// TestPresenceQuery: users and connection counts from both nodes, sorted;
// anonymous connections are not listed; an empty channel is an empty list.
func TestPresenceQuery(t *testing.T) {
	forEachPresenceBroker(t, 15*time.Second, func(t *testing.T, n presenceNodes) {
		const ch = "room:q"
		for _, c := range []*pclient{
			presenceDial(t, n.a, "/ws", "zoe"),
			presenceDial(t, n.a, "/ws", "alice"),
			presenceDial(t, n.b, "/ws", "alice"),
			presenceDial(t, n.b, "/ws", "\"odd\"\x00user/é"), // any character, even NUL
			presenceDial(t, n.b, "/ws", ""),
		} {
			c.join(ch)
		}
		anon := presenceDial(t, n.a, "/ws", "")
		if got, want := anon.presence(ch), "\"odd\"\x00user/é:1 alice:2 zoe:1"; got != want {
			t.Fatalf("presence: %q, want %q", got, want)
		}
		r := anon.do(map[string]any{"op": "presence", "channel": "room:empty"})
		if users, ok := r["users"].([]any); r["type"] != "presence" || !ok || len(users) != 0 {
			t.Fatalf("presence of an empty channel: %v, want users []", r)
		}
	})
}

// TestPresenceNeedsSubscribePermission: the presence op obeys the channel
// permissions of subscribe.
func TestPresenceNeedsSubscribePermission(t *testing.T) {
	forEachPresenceBroker(t, 15*time.Second, func(t *testing.T, n presenceNodes) {
		c := presenceDial(t, n.a, "/ws", "alice")
		r := c.do(map[string]any{"op": "presence", "channel": "secret:x"})
		if r["type"] != "error" || r["code"] != errForbidden || !strings.Contains(fmt.Sprint(r["message"]), "secret:x") {
			t.Fatalf("presence of a channel alice may not subscribe to: %v, want forbidden naming it", r)
		}
		r = c.do(map[string]any{"op": "presence", "channel": "room:*"})
		if r["type"] != "error" || r["code"] != errBadRequest {
			t.Fatalf("presence of an invalid channel: %v, want bad_request", r)
		}
		c.join("room:ok")
		if got := c.presence("room:ok"); got != "alice:1" {
			t.Fatalf("presence: %q, want alice:1", got)
		}
	})
}

// TestPresenceOff: a route without presence refuses the op, and its clients
// get no join or leave events even when they share a hub (and channels) with
// a presence route.
func TestPresenceOff(t *testing.T) {
	prefix := ptr(uniquePrefix())
	on := startNode(t, presenceRoute("", prefix, 15*time.Second))
	offRoute := presenceRoute("", prefix, 15*time.Second)
	offRoute.Presence = false
	off := startNode(t, offRoute)
	if on.h.hub != off.h.hub {
		t.Fatal("the two routes do not share a hub")
	}
	const ch = "room:off"
	quiet := presenceDial(t, off, "/ws", "carol")
	quiet.join(ch)
	r := quiet.do(map[string]any{"op": "presence", "channel": ch})
	if r["type"] != "error" || r["code"] != errBadRequest || r["message"] != "presence is off on this route" {
		t.Fatalf("presence op on a route without presence: %v", r)
	}
	watcher := presenceDial(t, on, "/ws", "bob")
	watcher.join(ch)
	alice := presenceDial(t, on, "/ws", "alice")
	alice.join(ch)
	wantEvents(t, watcher, ch, "join bob, join alice", "on the presence route")
	wantEvents(t, quiet, ch, "", "on the route without presence")
	// carol's connection is not on a presence route: not listed.
	if got := watcher.presence(ch); got != "alice:1 bob:1" {
		t.Fatalf("presence: %q, want alice:1 bob:1", got)
	}
}

// TestPresenceRawClients: a raw connection of a user is present on its
// bridged channel, and gets message text only, never a join or leave event.
func TestPresenceRawClients(t *testing.T) {
	forEachPresenceBroker(t, 15*time.Second, func(t *testing.T, n presenceNodes) {
		raw := presenceRoute(n.redisURL, n.prefix, 15*time.Second)
		raw.Protocol, raw.Channel = protocolRaw, "room:raw"
		rawNode := startNode(t, raw)

		watcher := presenceDial(t, n.a, "/ws", "bob")
		watcher.join("room:raw")
		alice := dial(t, rawNode.url("/raw"), bearer(newToken(t, "alice").sign()))
		waitPresence(t, watcher, "room:raw", "alice:1 bob:1")

		eve := dial(t, rawNode.url("/raw"), bearer(newToken(t, "eve").sign()))
		waitPresence(t, watcher, "room:raw", "alice:1 bob:1 eve:1")
		wantEvents(t, watcher, "room:raw", "join bob, join alice, join eve", "with raw clients")
		// alice saw eve join and bob's sentinel: only the sentinel may reach her.
		if m := alice.nextAny(); m["type"] != "<raw>" || !strings.HasPrefix(fmt.Sprint(m["text"]), "sentinel-") {
			// The sentinel is a JSON string, delivered to raw clients as its text.
			t.Fatalf("raw client's first frame: %v, want the sentinel text", m)
		}
		_ = eve.ws.Close(websocket.StatusNormalClosure, "")
		waitPresence(t, watcher, "room:raw", "alice:1 bob:1")
		wantEvents(t, watcher, "room:raw", "leave eve", "after eve's raw connection closed")
	})
}

// redisTime is the Redis server's clock in Unix ms, the clock of the scores.
func redisTime(t *testing.T, rs *redistest.Server) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	now, err := rs.Client().Time(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	return now.UnixMilli()
}

// addGhost writes the entry of a node that died: expired, still counted.
func addGhost(t *testing.T, rs *redistest.Server, prefix, channel, user string) {
	t.Helper()
	tag := "{" + prefix + channel + "}"
	member := user + "\x00deadbeef\x00deadbeef-1"
	rs.Do("ZADD", tag+":presence", redisTime(t, rs)-1000, member)
	rs.Do("HINCRBY", tag+":users", user, 1)
}

// TestPresenceDeadNodeSwept: entries whose node stopped heartbeating are
// swept by the nodes watching the channel, which publishes their leave, and
// a query never lists them.
func TestPresenceDeadNodeSwept(t *testing.T) {
	rs := redistest.Start(t)
	prefix := ptr(uniquePrefix())
	const ttl, ch = 3 * time.Second, "room:dead"
	n := startNode(t, presenceRoute(rs.URL(), prefix, ttl))
	bob := presenceDial(t, n, "/ws", "bob")
	bob.join(ch)
	wantEvents(t, bob, ch, "join bob", "after bob subscribed")

	// A user id with characters JSON escapes: the script's event must
	// still be recognised as one.
	const ghost = `gh"o\st/é` + "\x01"
	addGhost(t, rs, *prefix, ch, ghost)
	start := time.Now()
	var m map[string]any
	for m = bob.nextFrame(); m["type"] != "leave"; m = bob.nextFrame() {
	}
	if m["user"] != ghost || m["channel"] != ch {
		t.Fatalf("leave event %v, want the ghost's", m)
	}
	// One heartbeat (ttl/3) at most, plus slack.
	if waited := time.Since(start); waited > ttl/3+time.Second {
		t.Errorf("the ghost's leave came after %v, want within ttl/3 (%v)", waited, ttl/3)
	}
	t.Logf("ghost swept after %v", time.Since(start).Round(time.Millisecond))

	// The query sweeps first: a ghost added just now is never listed.
	addGhost(t, rs, *prefix, ch, "ghost2")
	if got := bob.presence(ch); got != "bob:1" {
		t.Fatalf("presence with an expired entry: %q, want bob:1", got)
	}
	wantEvents(t, bob, ch, "leave ghost2", "after the query swept")

	// The keys expire with the channel: a few TTLs, not forever.
	tag := "{" + *prefix + ch + "}"
	for _, key := range []string{tag + ":presence", tag + ":users"} {
		pttl, _ := rs.Do("PTTL", key).(int64)
		if pttl <= 0 || pttl > int64(presenceKeep*ttl/time.Millisecond) {
			t.Errorf("PTTL %s = %d, want in (0, %d]", key, pttl, presenceKeep*ttl/time.Millisecond)
		}
	}
}

// TestPresenceRestoredAfterRedisLoss: entries Redis lost (a restart without
// persistence, a flush) come back with the next heartbeat.
func TestPresenceRestoredAfterRedisLoss(t *testing.T) {
	rs := redistest.Start(t)
	n := startNode(t, presenceRoute(rs.URL(), ptr(uniquePrefix()), 3*time.Second))
	alice := presenceDial(t, n, "/ws", "alice")
	alice.join("room:r")
	bob := presenceDial(t, n, "/ws", "bob")
	bob.join("room:r")
	rs.Do("FLUSHALL")
	if got := bob.presence("room:r"); got != "" {
		t.Fatalf("presence right after FLUSHALL: %q, want nobody", got)
	}
	waitPresence(t, bob, "room:r", "alice:1 bob:1")
}

// TestPresenceHubCloseLeaves: a node whose hub closes (shutdown, or a reload
// with other broker settings) removes its entries at once, long before they
// would expire, and its heartbeat goroutine ends.
func TestPresenceHubCloseLeaves(t *testing.T) {
	rs := redistest.Start(t)
	prefix := ptr(uniquePrefix())
	const ttl = 30 * time.Second
	a := startNode(t, presenceRoute(rs.URL(), prefix, ttl))
	b := startNode(t, presenceRoute("redis://"+rs.Addr(), prefix, ttl))
	bob := presenceDial(t, a, "/ws", "bob")
	bob.join("room:c")
	for range 2 {
		presenceDial(t, b, "/ws", "alice").join("room:c")
	}
	presenceDial(t, b, "/ws", "carol").join("room:c")
	wantEvents(t, bob, "room:c", "join bob, join alice, join carol", "before the hub closed")

	p := b.h.hub.presence
	start := time.Now()
	if err := b.h.Cleanup(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		t.Fatal("the heartbeat goroutine still runs after the hub closed")
	}
	var left []string
	for len(left) < 2 {
		if m := bob.nextFrame(); m["type"] == "leave" {
			left = append(left, fmt.Sprint(m["user"]))
		}
	}
	if strings.Join(left, " ") != "alice carol" && strings.Join(left, " ") != "carol alice" {
		t.Fatalf("leave events %v, want alice and carol", left)
	}
	if waited := time.Since(start); waited > 5*time.Second {
		t.Errorf("leave events %v after the hub closed, want promptly (ttl is %v)", waited, ttl)
	}
	if got := bob.presence("room:c"); got != "bob:1" {
		t.Fatalf("presence after the hub closed: %q, want bob:1", got)
	}
}

// TestPresenceUnavailable: with Redis down the query answers unavailable,
// and a subscribe still succeeds; presence catches up when Redis is back.
func TestPresenceUnavailable(t *testing.T) {
	rs := redistest.Start(t)
	h := presenceRoute(rs.URL(), ptr(uniquePrefix()), 3*time.Second)
	h.PublishTimeout = caddy.Duration(300 * time.Millisecond)
	n := startNode(t, h)
	bob := presenceDial(t, n, "/ws", "bob")
	bob.join("room:u")
	alice := presenceDial(t, n, "/ws", "alice")
	alice.join("room:u")
	alice.join("room:u2")

	rs.Kill()
	r := bob.do(map[string]any{"op": "presence", "channel": "room:u"})
	if r["type"] != "error" || r["code"] != errUnavailable {
		t.Fatalf("presence with Redis down: %v, want unavailable", r)
	}
	rs.Restart()
	waitPresence(t, bob, "room:u", "alice:1 bob:1")
}

func TestPresenceConfigErrors(t *testing.T) {
	for _, tc := range []struct{ input, want string }{
		{"chat {\n presence maybe\n}", `presence "maybe": want on or off`},
		{"chat {\n presence\n}", "presence takes on or off, e.g. presence on; got none"},
		{"chat {\n presence_ttl soon\n}", `presence_ttl "soon"`},
		{"chat {\n presence_ttl -3s\n}", "presence_ttl"},
	} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want one containing %q", tc.input, err, tc.want)
		}
	}
	for _, tc := range []struct {
		h    Handler
		want string
	}{
		{Handler{Presence: true, PresenceTTL: caddy.Duration(time.Second)}, "presence_ttl 1s: must be between 3s and 1h"},
		{Handler{PresenceTTL: caddy.Duration(2 * time.Hour)}, "presence_ttl 2h: must be between 3s and 1h"},
		{Handler{Presence: true, ChannelPrefix: ptr("{chat}:")}, `channel_prefix "{chat}:": no { or } with presence on`},
	} {
		h := tc.h
		ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
		if err := h.Provision(ctx); err != nil {
			t.Fatalf("Provision: %v", err)
		}
		err := h.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: Validate error %v, want one containing %q", tc.h, err, tc.want)
		}
		if err := h.Cleanup(); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
		cancel()
	}
	// The defaults are valid, with presence on or off.
	for _, on := range []bool{false, true} {
		h := Handler{Presence: on, ChannelPrefix: ptr(uniquePrefix())}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
		if err := h.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		if err := h.Validate(); err != nil || time.Duration(h.PresenceTTL) != defaultPresenceTTL {
			t.Errorf("presence %v: Validate %v, presence_ttl %v; want valid with the default 15s", on, err, time.Duration(h.PresenceTTL))
		}
		_ = h.Cleanup()
		cancel()
	}
}

// TestPresenceCloseRemovesEntries: entries still registered when the hub
// closes (their connections did not finish in time) are removed by close,
// and the heartbeat stops.
func TestPresenceCloseRemovesEntries(t *testing.T) {
	rs := redistest.Start(t)
	h, err := newHub(hubConfig{redisURL: rs.URL(), channelPrefix: "closetest:", brokerTimeouts: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Destruct()
	rt := &route{presence: true, presenceTTL: 30 * time.Second, publishTimeout: time.Second}
	for i, user := range []string{"alice", "bob", ""} {
		c := &conn{route: rt, hub: h, id: fmt.Sprintf("%s-%d", h.node, i), identity: &identity{user: user}}
		h.presence.join(context.Background(), c, "room:x")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	users, err := h.presence.list(ctx, "room:x")
	if err != nil || fmt.Sprint(users) != "[{alice false   1 []} {bob false   1 []}]" {
		t.Fatalf("presence before close: %v %v, want alice and bob", users, err)
	}
	h.presence.close()
	select {
	case <-h.presence.done:
	default:
		t.Error("the heartbeat goroutine still runs after close")
	}
	if users, err := h.presence.list(ctx, "room:x"); err != nil || len(users) != 0 {
		t.Fatalf("presence after close: %v %v, want nobody", users, err)
	}
}
