package caddychat

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// Tests of the per-connection rate limit and the connection and subscription
// limits. Every node gets a channel prefix of its own, hence a hub of its own:
// the admission counters are per hub.

// adopt wraps an already dialled connection as a testClient.
func adopt(t *testing.T, ws *websocket.Conn) *testClient {
	t.Helper()
	ws.SetReadLimit(-1)
	c := &testClient{t: t, ws: ws, frames: make(chan map[string]any, 100000), closed: make(chan error, 1)}
	go c.readAll()
	t.Cleanup(func() { _ = ws.CloseNow() })
	return c
}

// tryDial dials once; a refused handshake returns the HTTP response.
func tryDial(url string, opts *websocket.DialOptions) (*websocket.Conn, *http.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return websocket.Dial(ctx, url, opts)
}

// expectRefused dials and requires the upgrade to be refused with status,
// carrying a Retry-After header.
func expectRefused(t *testing.T, url string, opts *websocket.DialOptions, status int) {
	t.Helper()
	ws, resp, err := tryDial(url, opts)
	if err == nil {
		_ = ws.CloseNow()
		t.Fatalf("dial succeeded, want HTTP %d", status)
	}
	if resp == nil {
		t.Fatalf("dial failed without an HTTP response (%v), want HTTP %d", err, status)
	}
	if resp.StatusCode != status {
		t.Fatalf("dial refused with HTTP %d, want %d", resp.StatusCode, status)
	}
	if got := resp.Header.Get("Retry-After"); got != "5" {
		t.Fatalf("Retry-After = %q, want \"5\"", got)
	}
}

// dialWhenAdmitted retries a dial refused with status until it is admitted:
// the slot of a closed connection is given back once its handler returns.
func dialWhenAdmitted(t *testing.T, url string, opts *websocket.DialOptions, status int) *testClient {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		ws, resp, err := tryDial(url, opts)
		if err == nil {
			return adopt(t, ws)
		}
		if resp == nil || resp.StatusCode != status {
			t.Fatalf("dial: %v (response %v), want success or HTTP %d", err, resp, status)
		}
		if time.Now().After(deadline) {
			t.Fatalf("still refused with HTTP %d 5s after a connection closed", status)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func publishFrame(channel string, id any, data any) []byte {
	b, err := json.Marshal(map[string]any{"op": "publish", "channel": channel, "id": id, "data": data})
	if err != nil {
		panic(err)
	}
	return b
}

// drain reads every remaining frame until the connection ends and returns
// them with the close code the server sent.
func (c *testClient) drain() ([]map[string]any, websocket.StatusCode) {
	c.t.Helper()
	var frames []map[string]any
	deadline := time.After(15 * time.Second)
	for {
		select {
		case m, ok := <-c.frames:
			if !ok {
				return frames, websocket.CloseStatus(<-c.closed)
			}
			frames = append(frames, m)
		case <-deadline:
			c.t.Fatal("connection not closed within 15s")
		}
	}
}

// assertOpen fails if the connection has ended (its frames are left unread).
func (c *testClient) assertOpen() {
	c.t.Helper()
	select {
	case err := <-c.closed:
		c.t.Fatalf("connection closed: %v (close code %v)", err, websocket.CloseStatus(err))
	default:
	}
}

// TestRateLimitFloodIsRefusedThenClosedOthersUnaffected: a client sending
// about ten times its limit gets rate_limited replies carrying each frame's id
// and is then closed with 4003, while a client publishing within its own
// limit on the same node has every publish acknowledged and delivered, in
// order.
func TestRateLimitFloodIsRefusedThenClosedOthersUnaffected(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr("rl-flood:"), RateLimit: &RateLimit{PerSecond: 20, Burst: 20}})
	sub := dial(t, n.url("/ws"), nil)
	sub.next("welcome")
	sub.subscribe("room:calm", 1)
	calm := dial(t, n.url("/ws"), nil)
	calm.next("welcome")
	abuser := dial(t, n.url("/ws"), nil)
	abuser.next("welcome")

	// Phase 1: 30 frames at once, not enough refusals (at most 10) to be closed.
	// The bucket starts full, so the first 20 always pass; every frame gets
	// exactly one reply, in order.
	const phase1 = 30
	for i := 1; i <= phase1; i++ {
		abuser.sendText(string(publishFrame("room:flood", i, i)))
	}
	limited := 0
	for i := 1; i <= phase1; i++ {
		r := abuser.nextAny()
		if r["id"] != float64(i) {
			t.Fatalf("phase 1: reply %d = %v, want the reply to id %d", i, r, i)
		}
		switch {
		case r["type"] == "ok":
		case r["type"] == "error" && r["code"] == errRateLimited:
			limited++
			if i <= 20 {
				t.Fatalf("frame %d, within the burst of 20, was rate limited: %v", i, r)
			}
		default:
			t.Fatalf("phase 1: reply to %d = %v, want ok or rate_limited", i, r)
		}
	}
	if limited == 0 {
		t.Fatalf("%d frames sent at once with a burst of 20 drew no rate_limited reply", phase1)
	}
	abuser.assertOpen()

	// Phase 2: the calm client publishes at under 20/s; a few messages in, the
	// abuser floods at ~200 frames/s (10x the limit) until it is closed.
	const floodBase, floodMax = 1000, 1000
	floodSent := make(chan int, 1)
	flood := func() {
		sent := 0
		for i := 0; i < floodMax; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			err := abuser.ws.Write(ctx, websocket.MessageText, publishFrame("room:flood", floodBase+i, i))
			cancel()
			if err != nil {
				break
			}
			sent++
			time.Sleep(5 * time.Millisecond)
		}
		floodSent <- sent
	}
	const calmMessages = 25
	for i := range calmMessages {
		if i == 5 {
			go flood()
		}
		id := float64(100 + i)
		calm.send(map[string]any{"op": "publish", "channel": "room:calm", "id": id, "data": map[string]any{"n": i}})
		if r := calm.reply(id); r["type"] != "ok" || r["message_id"] == nil || r["message_id"] == "" {
			t.Fatalf("calm publish %d: %v", i, r)
		}
		// At most one frame per 50ms: 20/s, never above the limit.
		time.Sleep(50 * time.Millisecond)
	}

	sent := <-floodSent
	frames, code := abuser.drain()
	if code != closeRateLimited {
		t.Fatalf("abuser close code = %v, want %v", code, closeRateLimited)
	}
	if sent == floodMax {
		t.Fatalf("all %d flood frames were written: the connection was never closed", sent)
	}
	last, limited2 := float64(floodBase-1), 0
	for _, r := range frames {
		id, _ := r["id"].(float64)
		if id <= last || id > float64(floodBase+sent) {
			t.Fatalf("flood reply %v: id out of order or never sent (previous %v, sent %d)", r, last, sent)
		}
		last = id
		switch {
		case r["type"] == "ok":
		case r["type"] == "error" && r["code"] == errRateLimited:
			limited2++
		default:
			t.Fatalf("flood reply = %v, want ok or rate_limited", r)
		}
	}
	if limited2 == 0 {
		t.Fatalf("no rate_limited reply among %d flood replies", len(frames))
	}
	t.Logf("phase 1: %d of %d rate limited; flood: %d frames written before the close, %d replies (%d rate_limited)",
		limited, phase1, sent, len(frames), limited2)

	// The subscriber has every calm message, in order, and nothing else.
	sub.send(map[string]any{"op": "unsubscribe", "channel": "room:sync", "id": "sync"})
	var got []float64
	for {
		m := sub.nextAny()
		if m["type"] == "ok" && m["id"] == "sync" {
			break
		}
		if m["type"] != "message" || m["channel"] != "room:calm" {
			t.Fatalf("subscriber got %v", m)
		}
		got = append(got, m["data"].(map[string]any)["n"].(float64))
	}
	if len(got) != calmMessages {
		t.Fatalf("subscriber got %d calm messages, want %d: %v", len(got), calmMessages, got)
	}
	for i, v := range got {
		if v != float64(i) {
			t.Fatalf("calm messages out of order: %v", got)
		}
	}
	calm.assertOpen()
	sub.assertOpen()
}

// TestRateLimitBurstThenSlowStaysOpen: a burst within the bucket followed by
// a slow pace is never refused nor closed.
func TestRateLimitBurstThenSlowStaysOpen(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr("rl-burst:"), RateLimit: &RateLimit{PerSecond: 20, Burst: 20}})
	c := dial(t, n.url("/ws"), nil)
	c.next("welcome")
	for i := 1; i <= 20; i++ {
		c.sendText(string(publishFrame("room:b", i, i)))
	}
	for i := 1; i <= 20; i++ {
		if r := c.nextAny(); r["type"] != "ok" || r["id"] != float64(i) {
			t.Fatalf("burst frame %d: reply %v, want ok", i, r)
		}
	}
	// The bucket is empty now. Slow: one frame per 100ms (10/s, half the rate).
	for i := 21; i <= 30; i++ {
		time.Sleep(100 * time.Millisecond)
		c.sendText(string(publishFrame("room:b", i, i)))
		if r := c.nextAny(); r["type"] != "ok" || r["id"] != float64(i) {
			t.Fatalf("slow frame %d: reply %v, want ok", i, r)
		}
	}
	c.subscribe("room:b", 31)
	c.assertOpen()
}

// TestRateLimitCountsEveryFrameKindExactly uses a bucket that does not refill
// during the test (one token per 100s) to check exact counts: the first Burst
// frames pass whatever they are (malformed ones included), the next 2*Burst
// are refused with rate_limited (echoing the id when there is a valid one) and
// have no effect, and the one after that closes the connection with 4003.
func TestRateLimitCountsEveryFrameKindExactly(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr("rl-kinds:"), RateLimit: &RateLimit{PerSecond: 0.01, Burst: 5}})
	c := dial(t, n.url("/ws"), nil)
	c.next("welcome")

	type want struct {
		typ, code string
		id        any // nil: no id
	}
	steps := []struct {
		frame string
		want  []want // the frames the server answers with, in order
	}{
		// Within the burst of 5.
		{`{"op":"subscribe","channel":"room:a","id":1}`, []want{{"ok", "", 1.0}}},
		{`not json`, []want{{"error", errBadRequest, nil}}},
		{`{"op":"explode","id":3}`, []want{{"error", errBadRequest, 3.0}}},
		{`{"op":"subscribe","channel":"bad channel","id":4}`, []want{{"error", errBadRequest, 4.0}}},
		{`{"op":"publish","channel":"room:a","data":1,"id":5}`, []want{{"message", "", nil}, {"ok", "", 5.0}}},
		// Over it: refused, whatever the kind, and without effect.
		{`{"op":"subscribe","channel":"room:b","id":6}`, []want{{"error", errRateLimited, 6.0}}},
		{`garbage`, []want{{"error", errRateLimited, nil}}},
		{`{"op":"publish","channel":"room:a","data":2,"id":8}`, []want{{"error", errRateLimited, 8.0}}},
		{`{"op":"whatever","id":"str-9"}`, []want{{"error", errRateLimited, "str-9"}}},
		{`{"id":10,`, []want{{"error", errRateLimited, nil}}},
		{`{"op":"subscribe","channel":"room:c","id":{"bad":"id"}}`, []want{{"error", errRateLimited, nil}}},
		{`{"op":"unsubscribe","channel":"room:a","id":12}`, []want{{"error", errRateLimited, 12.0}}},
		{`{"op":"unsubscribe","channel":"room:a","id":13}`, []want{{"error", errRateLimited, 13.0}}},
		{`{"op":"refresh","token":"x","id":14}`, []want{{"error", errRateLimited, 14.0}}},
		{`[]`, []want{{"error", errRateLimited, nil}}},
	}
	for i, s := range steps {
		c.sendText(s.frame)
		for _, w := range s.want {
			r := c.nextAny()
			if r["type"] != w.typ || r["code"] != w.code && w.code != "" || w.typ != "message" && r["id"] != w.id {
				t.Fatalf("frame %d %s: got %v, want type %s code %q id %v", i+1, s.frame, r, w.typ, w.code, w.id)
			}
			if w.typ == "message" && (r["channel"] != "room:a" || r["data"] != 1.0) {
				t.Fatalf("frame %d: delivery %v", i+1, r)
			}
		}
	}
	c.assertOpen()
	// The refused frames had no effect: still subscribed to room:a only.
	if a, b := n.h.hub.members("room:a"), n.h.hub.members("room:b"); a != 1 || b != 0 {
		t.Fatalf("members: room:a %d, room:b %d; want 1 and 0", a, b)
	}

	// The 11th refused frame closes the connection; it is not executed.
	c.sendText(`{"op":"subscribe","channel":"room:c","id":16}`)
	frames, code := c.drain()
	if code != closeRateLimited {
		t.Fatalf("close code = %v, want %v", code, closeRateLimited)
	}
	if len(frames) != 0 {
		t.Fatalf("frames after the closing one: %v", frames)
	}
	if m := n.h.hub.members("room:c"); m != 0 {
		t.Fatalf("room:c has %d members", m)
	}
}

// TestRateLimitRawProtocol: on a raw route an over-limit frame is dropped
// (nobody receives it, there is no reply) and sustained abuse closes with 4003.
func TestRateLimitRawProtocol(t *testing.T) {
	t.Run("exact", func(t *testing.T) {
		n := startNode(t, &Handler{ChannelPrefix: ptr("rl-raw1:"), Protocol: protocolRaw, Channel: "room:x",
			RateLimit: &RateLimit{PerSecond: 0.01, Burst: 5}})
		listener := dial(t, n.url("/raw"), nil)
		abuser := dial(t, n.url("/raw"), nil)
		waitFor(t, func() bool { return n.h.hub.members("room:x") == 2 })

		// 5 pass, 10 are dropped, the 16th closes.
		for i := 1; i <= 16; i++ {
			abuser.sendText(fmt.Sprintf("m%d", i))
		}
		frames, code := abuser.drain()
		if code != closeRateLimited {
			t.Fatalf("close code = %v, want %v", code, closeRateLimited)
		}
		for _, f := range frames {
			if f["type"] != "<raw>" {
				t.Fatalf("raw client got a non-raw frame %v", f)
			}
		}
		if len(frames) > 5 {
			t.Fatalf("abuser got %d echoes, want at most 5: %v", len(frames), frames)
		}
		// Deliveries are queued before the publish returns, so everything the
		// abuser got through is already queued for the listener.
		listener.sendText("marker")
		var got []string
		for {
			m := listener.nextAny()
			text, _ := m["text"].(string)
			if text == "marker" {
				break
			}
			got = append(got, text)
		}
		if fmt.Sprint(got) != "[m1 m2 m3 m4 m5]" {
			t.Fatalf("listener got %v, want [m1 m2 m3 m4 m5]", got)
		}
		listener.assertOpen()
	})

	t.Run("flood", func(t *testing.T) {
		n := startNode(t, &Handler{ChannelPrefix: ptr("rl-raw2:"), Protocol: protocolRaw, Channel: "room:x",
			RateLimit: &RateLimit{PerSecond: 20, Burst: 20}})
		listener := dial(t, n.url("/raw"), nil)
		abuser := dial(t, n.url("/raw"), nil)
		waitFor(t, func() bool { return n.h.hub.members("room:x") == 2 })

		const floodMax = 2000
		floodSent := make(chan int, 1)
		go func() {
			sent := 0
			for i := 0; i < floodMax; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				err := abuser.ws.Write(ctx, websocket.MessageText, fmt.Appendf(nil, "f%d", i))
				cancel()
				if err != nil {
					break
				}
				sent++
			}
			floodSent <- sent
		}()
		_, code := abuser.drain()
		sent := <-floodSent
		if code != closeRateLimited {
			t.Fatalf("close code = %v, want %v", code, closeRateLimited)
		}

		listener.sendText("marker")
		var got []int
		for {
			m := listener.nextAny()
			text, _ := m["text"].(string)
			if text == "marker" {
				break
			}
			var k int
			if _, err := fmt.Sscanf(text, "f%d", &k); err != nil {
				t.Fatalf("listener got %v", m)
			}
			got = append(got, k)
		}
		// The first 20 (the full bucket) always pass; then some are dropped.
		if len(got) < 20 {
			t.Fatalf("listener got %d frames, want at least the burst of 20: %v", len(got), got)
		}
		for i := range 20 {
			if got[i] != i {
				t.Fatalf("the first 20 frames did not all pass in order: %v", got)
			}
		}
		for i := 1; i < len(got); i++ {
			if got[i] <= got[i-1] {
				t.Fatalf("listener got frames out of order: %v", got)
			}
		}
		// Closing takes more than 2*burst refusals: at least 41 frames dropped.
		if len(got)+41 > sent {
			t.Fatalf("listener got %d of %d frames: fewer than 41 were dropped", len(got), sent)
		}
		listener.assertOpen()
	})
}

// TestMaxConnectionsPerUser: a user's third connection is refused with 429;
// other users are not affected; closing one gives the slot back.
func TestMaxConnectionsPerUser(t *testing.T) {
	n := startNode(t, &Handler{
		ChannelPrefix:         ptr("maxconn-user:"),
		JWT:                   &JWTConfig{Secret: testSecret},
		Subscribe:             []string{"**"},
		Publish:               []string{"**"},
		MaxConnectionsPerUser: 2,
	})
	alice, bob := bearer(newToken(t, "alice").sign()), bearer(newToken(t, "bob").sign())

	a1 := dial(t, n.url("/ws"), alice)
	a2 := dial(t, n.url("/ws"), alice)
	for _, c := range []*testClient{a1, a2} {
		if w := c.next("welcome"); w["user"] != "alice" {
			t.Fatalf("welcome = %v", w)
		}
	}
	expectRefused(t, n.url("/ws"), alice, http.StatusTooManyRequests)
	// A token minted later for the same user counts towards the same limit.
	expectRefused(t, n.url("/ws"), bearer(newToken(t, "alice").sign()), http.StatusTooManyRequests)

	b1 := dial(t, n.url("/ws"), bob)
	if w := b1.next("welcome"); w["user"] != "bob" {
		t.Fatalf("welcome = %v", w)
	}
	b1.subscribe("room:bob", 1)

	// The refused attempts held nothing: once a1 is gone alice gets in again,
	// and the limit still holds afterwards.
	if err := a1.ws.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Fatalf("closing a1: %v", err)
	}
	a3 := dialWhenAdmitted(t, n.url("/ws"), alice, http.StatusTooManyRequests)
	if w := a3.next("welcome"); w["user"] != "alice" {
		t.Fatalf("welcome = %v", w)
	}
	expectRefused(t, n.url("/ws"), alice, http.StatusTooManyRequests)
	a2.subscribe("room:a", 1)
	a3.subscribe("room:a", 1)
	b1.assertOpen()
}

// TestMaxConnectionsPerNode: with max_connections 3 the fourth upgrade gets
// 503 with Retry-After; closing one lets a new one in.
func TestMaxConnectionsPerNode(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr("maxconn-node:"), MaxConnections: 3})
	var cs []*testClient
	for range 3 {
		c := dial(t, n.url("/ws"), nil)
		c.next("welcome")
		cs = append(cs, c)
	}
	expectRefused(t, n.url("/ws"), nil, http.StatusServiceUnavailable)
	expectRefused(t, n.url("/ws"), nil, http.StatusServiceUnavailable)

	if err := cs[0].ws.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Fatalf("closing: %v", err)
	}
	c := dialWhenAdmitted(t, n.url("/ws"), nil, http.StatusServiceUnavailable)
	c.next("welcome")
	c.subscribe("room:x", 1)
	expectRefused(t, n.url("/ws"), nil, http.StatusServiceUnavailable)
	cs[1].assertOpen()
	cs[2].assertOpen()
}

// TestMaxSubscriptionsPerConnection: the fourth distinct channel is refused
// with limit_exceeded; re-subscribing is free; unsubscribing frees a slot
// (unsubscribing a channel one is not subscribed to does not).
func TestMaxSubscriptionsPerConnection(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr("maxsub:"), MaxSubscriptions: 3})
	c := dial(t, n.url("/ws"), nil)
	c.next("welcome")
	c.subscribe("room:a", 1)
	c.subscribe("room:b", 2)
	c.subscribe("room:c", 3)

	refused := func(channel string, id float64) {
		t.Helper()
		c.send(map[string]any{"op": "subscribe", "channel": channel, "id": id})
		r := c.reply(id)
		if r["type"] != "error" || r["code"] != errLimitExceeded {
			t.Fatalf("subscribe %s with 3 subscriptions: %v, want limit_exceeded", channel, r)
		}
		if m := n.h.hub.members(channel); m != 0 {
			t.Fatalf("refused channel %s has %d members", channel, m)
		}
	}
	refused("room:d", 4)
	c.subscribe("room:a", 5) // already subscribed: no new slot needed
	if m := n.h.hub.members("room:a"); m != 1 {
		t.Fatalf("room:a has %d members after re-subscribing, want 1", m)
	}

	c.send(map[string]any{"op": "unsubscribe", "channel": "room:zzz", "id": 6})
	if r := c.reply(6); r["type"] != "ok" {
		t.Fatalf("unsubscribe of a channel not subscribed: %v", r)
	}
	refused("room:d", 7)

	c.send(map[string]any{"op": "unsubscribe", "channel": "room:b", "id": 8})
	if r := c.reply(8); r["type"] != "ok" {
		t.Fatalf("unsubscribe: %v", r)
	}
	c.subscribe("room:d", 9)
	refused("room:e", 10)

	// Deliveries still work on every subscribed channel, exactly once each.
	for i, ch := range []string{"room:a", "room:c", "room:d"} {
		c.send(map[string]any{"op": "publish", "channel": ch, "id": 20 + i, "data": ch})
	}
	var got []any
	for len(got) < 3 {
		if m := c.nextAny(); m["type"] == "message" {
			got = append(got, m["data"])
		}
	}
	if fmt.Sprint(got) != "[room:a room:c room:d]" {
		t.Fatalf("deliveries = %v", got)
	}
}
