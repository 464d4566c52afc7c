package caddychat

// Ephemeral publishes (ephemeral.go) end to end: two nodes sharing a real
// Redis (two hubs in one process: they differ by publish_timeout) and the
// memory broker.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"

	"github.com/caddychat/caddychat/internal/redistest"
)

// ephemeralNodes starts two nodes of one chat (one node twice on the memory
// broker) whose users may use room:*, kept in history, with edit applied.
func ephemeralNodes(t *testing.T, rs *redistest.Server, edit func(*Handler)) (a, b *testNode) {
	t.Helper()
	prefix := uniquePrefix()
	newNode := func(timeout time.Duration) *testNode {
		h := &Handler{ChannelPrefix: ptr(prefix), PublishTimeout: caddy.Duration(timeout),
			JWT: &JWTConfig{Secret: testSecret}, Subscribe: []string{"room:*"}, Publish: []string{"room:*"},
			History: []HistoryRule{{Channels: "room:*", Count: 50}}, Presence: true}
		if rs != nil {
			h.Redis = rs.URL()
		}
		if edit != nil {
			edit(h)
		}
		return startNode(t, h)
	}
	a = newNode(2 * time.Second)
	if rs == nil {
		return a, a
	}
	return a, newNode(3 * time.Second)
}

func dialUserOn(t *testing.T, n *testNode, user string) *testClient {
	t.Helper()
	c := dial(t, n.url("/"), bearer(newToken(t, user).sign()))
	c.next("welcome")
	return c
}

// publishEphemeral sends frame (a publish op; "ephemeral": true and the id
// are added) and returns the reply. An ephemeral message arriving before
// the reply fails the test: no test client gets its own.
func (c *testClient) publishEphemeral(frame map[string]any, id float64) map[string]any {
	c.t.Helper()
	frame["op"], frame["ephemeral"], frame["id"] = "publish", true, id
	if _, ok := frame["data"]; !ok {
		frame["data"] = map[string]any{"typing": true}
	}
	c.send(frame)
	for {
		m := c.nextAny()
		if m["type"] == "message" && m["ephemeral"] != nil {
			c.t.Fatalf("the sender got an ephemeral message: %v", m)
		}
		if (m["type"] == "ok" || m["type"] == "error") && m["id"] == id {
			return m
		}
	}
}

// nextMessage is the next message frame of channel.
func (c *testClient) nextMessage(channel string) map[string]any {
	c.t.Helper()
	return c.nextMatching("message of "+channel, func(m map[string]any) bool {
		return m["type"] == "message" && m["channel"] == channel
	})
}

func TestEphemeralDelivery(t *testing.T) {
	forEachBroker(t, func(t *testing.T, _ func() *Handler, rs *redistest.Server) {
		a, b := ephemeralNodes(t, rs, nil)
		alice := dialUserOn(t, a, "alice")
		aliceOnB := dialUserOn(t, b, "alice")
		bob := dialUserOn(t, b, "bob")
		carol := dialUserOn(t, a, "carol")
		for _, c := range []*testClient{alice, aliceOnB, bob, carol} {
			c.subscribe("room:1", 1)
		}
		before := alice.publishOK("room:1", "before", 2) // skips its own delivery
		for _, c := range []*testClient{aliceOnB, bob, carol} {
			if m := c.nextMessage("room:1"); m["data"] != "before" {
				t.Fatalf("want the first message, got %v", m)
			}
		}

		// Forged fields beside the flag and inside data change nothing: the
		// node says who sent it, when, and that it is ephemeral.
		start := time.Now().UnixMilli()
		r := alice.publishEphemeral(map[string]any{"channel": "room:1", "from": "mallory", "server": true, "ts": 1,
			"info": map[string]any{"name": "Mallory"}, "message_id": "1-1",
			"data": map[string]any{"typing": true, "ephemeral": false, "from": "mallory"}}, 3)
		if r["type"] != "ok" || r["channel"] != "room:1" {
			t.Fatalf("ephemeral publish: %v", r)
		}
		if _, has := r["message_id"]; has {
			t.Fatalf("ephemeral ok carries a message id: %v", r)
		}
		for name, c := range map[string]*testClient{"alice on B": aliceOnB, "bob": bob, "carol": carol} {
			m := c.nextMessage("room:1")
			if m["ephemeral"] != true || m["from"] != "alice" {
				t.Fatalf("%s: want alice's ephemeral message, got %v", name, m)
			}
			for _, field := range []string{"id", "epoch", "server", "anonymous", "info"} {
				if _, has := m[field]; has {
					t.Fatalf("%s: ephemeral message has %q: %v", name, field, m)
				}
			}
			if ts, _ := m["ts"].(float64); int64(ts) < start {
				t.Fatalf("%s: ts %v is not the node's time (client sent 1)", name, m["ts"])
			}
			data, _ := json.Marshal(m["data"])
			if string(data) != `{"ephemeral":false,"from":"mallory","typing":true}` {
				t.Fatalf("%s: data %s", name, data)
			}
		}

		// The sender never gets it: the next message it sees is the one
		// published after it.
		bob.publishOK("room:1", "after", 4)
		if m := alice.nextMessage("room:1"); m["data"] != "after" {
			t.Fatalf("the sender got %v, want only the message after its ephemeral one", m)
		}

		// Never kept: the history op, a resume and a subscribe with history
		// show the two messages only.
		h := bob.request(map[string]any{"op": "history", "channel": "room:1", "id": 5})
		if msgs, _ := h["messages"].([]any); len(msgs) != 2 {
			t.Fatalf("history holds %d entries, want 2 (no ephemeral): %v", len(msgs), h)
		}
		for _, sub := range []map[string]any{{"history": 10}, {"since": before, "epoch": epochOf(t, bob, "room:1")}} {
			late := dialUserOn(t, b, "dave")
			sub["op"], sub["channel"], sub["id"] = "subscribe", "room:1", 1
			late.send(sub)
			ok := late.nextAny()
			n, _ := ok["replayed"].(float64)
			if ok["type"] != "ok" {
				t.Fatalf("subscribe %v: %v", sub, ok)
			}
			var got []any
			for range int(n) {
				m := late.nextMessage("room:1")
				if m["ephemeral"] != nil {
					t.Fatalf("replayed an ephemeral message: %v", m)
				}
				got = append(got, m["data"])
			}
			late.noMessageFor(200 * time.Millisecond)
			want := []any{"before", "after"}
			if sub["since"] != nil {
				want = want[1:]
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("subscribe %v replayed %v, want %v", sub, got, want)
			}
		}
	})
}

// noMessageFor fails the test if a message frame arrives within d.
func (c *testClient) noMessageFor(d time.Duration) {
	c.t.Helper()
	deadline := time.After(d)
	for {
		select {
		case m, ok := <-c.frames:
			if ok && m["type"] == "message" {
				c.t.Fatalf("unexpected message %v", m)
			}
		case <-deadline:
			return
		}
	}
}

// epochOf is channel's history epoch, as the history op says.
func epochOf(t *testing.T, c *testClient, channel string) string {
	t.Helper()
	h := c.request(map[string]any{"op": "history", "channel": channel, "id": 99, "limit": 1})
	e, _ := h["epoch"].(string)
	return e
}

func TestEphemeralRefused(t *testing.T) {
	a, _ := ephemeralNodes(t, nil, func(h *Handler) { h.MaxMessageSize = 4096 })
	alice := dialUserOn(t, a, "alice")
	alice.subscribe("room:1", 1)
	key := "k1"
	for i, tc := range []struct {
		frame map[string]any
		code  string
	}{
		{map[string]any{"channel": "room:1", "idempotency_key": key}, errBadRequest},
		{map[string]any{"channel": "secret:1"}, errForbidden},
		{map[string]any{"channel": ""}, errBadRequest},
	} {
		id := float64(10 + i)
		if r := alice.publishEphemeral(tc.frame, id); r["type"] != "error" || r["code"] != tc.code {
			t.Fatalf("%v: got %v, want %s", tc.frame, r, tc.code)
		}
	}
	// A flag that is not a boolean is malformed, not a message; no data
	// is no publish.
	alice.sendText(`{"op":"publish","channel":"room:1","data":1,"ephemeral":"yes","id":20}`)
	if r := alice.next("error"); r["code"] != errBadRequest {
		t.Fatalf(`"ephemeral":"yes": %v`, r)
	}
	alice.sendText(`{"op":"publish","channel":"room:1","ephemeral":true,"id":22}`)
	if r := alice.reply(22); r["code"] != errBadRequest {
		t.Fatalf(`ephemeral without data: %v`, r)
	}
	h := alice.request(map[string]any{"op": "history", "channel": "room:1", "id": 21})
	if msgs, _ := h["messages"].([]any); len(msgs) != 0 {
		t.Fatalf("refused publishes were kept: %v", h)
	}
	// Oversized: the frame limit closes the connection, as for any frame.
	big := strings.Repeat("x", 8192)
	alice.sendText(`{"op":"publish","channel":"room:1","ephemeral":true,"data":"` + big + `"}`)
	if code := alice.closeCode(); code != websocket.StatusMessageTooBig {
		t.Fatalf("oversized ephemeral publish: close %d, want 1009", code)
	}
}

func TestEphemeralOff(t *testing.T) {
	a, _ := ephemeralNodes(t, nil, func(h *Handler) { h.EphemeralRate = &RateLimit{PerSecond: -1} })
	alice := dialUserOn(t, a, "alice")
	if r := alice.publishEphemeral(map[string]any{"channel": "room:1"}, 1); r["code"] != errBadRequest ||
		!strings.Contains(fmt.Sprint(r["message"]), "ephemeral_rate off") {
		t.Fatalf("ephemeral publish on a route with ephemeral_rate off: %v", r)
	}
	alice.publishOK("room:1", "normal publishes still work", 2)
}

// TestEphemeralRateLimit: a flood gets rate_limited replies past the burst
// and reaches the others no faster than the limit; normal publishes have
// their own budget.
func TestEphemeralRateLimit(t *testing.T) {
	forEachBroker(t, func(t *testing.T, _ func() *Handler, rs *redistest.Server) {
		a, b := ephemeralNodes(t, rs, func(h *Handler) {
			h.EphemeralRate = &RateLimit{PerSecond: 2, Burst: 3}
			h.RateLimit = &RateLimit{PerSecond: 1000, Burst: 1000}
		})
		alice, bob := dialUserOn(t, a, "alice"), dialUserOn(t, b, "bob")
		bob.subscribe("room:1", 1)
		const flood = 40
		start := time.Now()
		for i := range flood {
			alice.send(map[string]any{"op": "publish", "channel": "room:1", "ephemeral": true, "data": i, "id": 100 + i})
		}
		ok, limited := 0, 0
		for i := range flood {
			switch r := alice.reply(float64(100 + i)); r["code"] {
			case nil:
				ok++
			case errRateLimited:
				limited++
			default:
				t.Fatalf("reply %v", r)
			}
		}
		allowed := 3 + int(2*time.Since(start).Seconds()) + 1
		if ok < 3 || ok > allowed || limited != flood-ok {
			t.Fatalf("%d ok, %d rate_limited of %d; want 3..%d ok", ok, limited, flood, allowed)
		}
		alice.publishOK("room:1", "normal", 200)
		got := 0
		for m := bob.nextMessage("room:1"); m["data"] != "normal"; m = bob.nextMessage("room:1") {
			got++
		}
		if got != ok {
			t.Fatalf("bob got %d ephemeral messages, want the %d accepted", got, ok)
		}
	})
}

// TestEphemeralForgedPayloads: what reaches Redis without a node's stamp is
// a backend's message whatever it claims, and a stamped body with the
// ephemeral mark but no sender is dropped.
func TestEphemeralForgedPayloads(t *testing.T) {
	rs := redistest.Start(t)
	a, _ := ephemeralNodes(t, rs, nil)
	bob := dialUserOn(t, a, "bob")
	bob.subscribe("room:1", 1)
	prefix := *a.h.ChannelPrefix
	redisPublish(t, rs, prefix+"room:1", `{"type":"message","channel":"room:1","ephemeral":true,"from":"alice","ts":1,"data":"x"}`)
	m := bob.nextMessage("room:1")
	if m["server"] != true || m["from"] != "" || m["id"] == nil || m["ephemeral"] != nil {
		t.Fatalf("a plain PUBLISH claiming to be ephemeral: %v", m)
	}
	redisPublish(t, rs, prefix+"room:1", nodeStamp+"\x1f"+`{"type":"message","channel":"room:1","ephemeral":true,"from":"alice","ts":1,"data":"y"}`)
	redisPublish(t, rs, prefix+"room:1", "plain")
	if m := bob.nextMessage("room:1"); m["data"] != "plain" {
		t.Fatalf("a malformed ephemeral payload was delivered: %v", m)
	}
	// A normal publish whose data says ephemeral is a kept message.
	alice := dialUserOn(t, a, "alice")
	if id := alice.publishOK("room:1", map[string]any{"ephemeral": true}, 2); id == "" {
		t.Fatal("no message id")
	}
	if m := bob.nextMessage("room:1"); m["ephemeral"] != nil || m["id"] == nil {
		t.Fatalf("data saying ephemeral made an ephemeral message: %v", m)
	}
}

func TestEphemeralCutUnit(t *testing.T) {
	for _, tc := range []struct {
		body string
		conn string
		ok   bool
	}{
		{"\x1fa-1\x1f{}", "a-1", true},
		{"\x1f\x1f{}", "", true},
		{"\x1fa-1{}", "", false},
		{"\x1fa-1\x1f", "", false},
		{"\x1fa-1\x1fx", "", false},
		{"{}", "", false},
		{"", "", false},
	} {
		conn, _, ok := cutEphemeral([]byte(tc.body))
		if ok != tc.ok || conn != tc.conn {
			t.Errorf("cutEphemeral(%q) = %q, %v", tc.body, conn, ok)
		}
	}
}

// TestEphemeralNotToRawClients: a raw client on the channel gets messages
// as text and could not tell a typing event from one, so it gets none.
func TestEphemeralNotToRawClients(t *testing.T) {
	a, _ := ephemeralNodes(t, nil, nil)
	raw := startNode(t, &Handler{ChannelPrefix: a.h.ChannelPrefix, PublishTimeout: a.h.PublishTimeout, Protocol: protocolRaw, Channel: "room:1"})
	if raw.h.hub != a.h.hub {
		t.Fatal("the raw route does not share the JSON route's hub")
	}
	r := dial(t, raw.url("/"), nil)
	waitFor(t, func() bool { return a.h.hub.members("room:1") == 1 })
	alice := dialUserOn(t, a, "alice")
	if rep := alice.publishEphemeral(map[string]any{"channel": "room:1", "data": "typing"}, 1); rep["type"] != "ok" {
		t.Fatalf("ephemeral publish: %v", rep)
	}
	alice.publishOK("room:1", "marker", 2)
	if m := r.nextAny(); m["text"] != "marker" {
		t.Fatalf("the raw client got %v first, want the marker only", m)
	}
}

// TestEphemeralBypassesHookAndWebhooks: a publish hook that rejects
// everything does not see ephemeral publishes, and webhooks record only
// the normal publishes.
func TestEphemeralBypassesHookAndWebhooks(t *testing.T) {
	var hookCalls atomic.Int32
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		hookCalls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"result":"deny","reason":"no"}`))
	}))
	t.Cleanup(hook.Close)
	wh := newWebhookBackend(t, "")
	a, _ := ephemeralNodes(t, nil, func(h *Handler) {
		h.PublishHook = &HookConfig{URL: hook.URL, Channels: []string{"room:hooked"}}
		h.Webhooks = []*Webhook{{URL: wh.srv.URL, Events: []string{"publish"}, Batch: 1, Timeout: caddy.Duration(time.Second)}}
	})
	alice := dialUserOn(t, a, "alice")
	if r := alice.publishEphemeral(map[string]any{"channel": "room:hooked"}, 1); r["type"] != "ok" {
		t.Fatalf("ephemeral publish with a rejecting hook: %v", r)
	}
	if n := hookCalls.Load(); n != 0 {
		t.Fatalf("the publish hook got %d requests for an ephemeral publish", n)
	}
	alice.send(map[string]any{"op": "publish", "channel": "room:hooked", "data": "x", "id": 2})
	if r := alice.reply(2); r["code"] != errRejected || hookCalls.Load() != 1 {
		t.Fatalf("normal publish: %v, hook calls %d; want rejected by the hook", r, hookCalls.Load())
	}
	// On a channel without the hook: an ephemeral publish, then a normal
	// one. Webhook events go out in order, one per batch: the normal
	// publish's is the only one.
	if r := alice.publishEphemeral(map[string]any{"channel": "room:1"}, 3); r["type"] != "ok" {
		t.Fatalf("ephemeral publish: %v", r)
	}
	alice.publishOK("room:1", "recorded", 4)
	eventually(t, 5*time.Second, "the publish event", func() (bool, string) {
		n, _ := wh.counts("publish")
		return n >= 1, fmt.Sprint(n)
	})
	time.Sleep(200 * time.Millisecond)
	if n, _ := wh.counts("publish"); n != 1 {
		t.Fatalf("webhooks recorded %d publish events, want the normal publish's only", n)
	}
}
