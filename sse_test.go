package caddychat

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/caddychat/caddychat/internal/redistest"
)

// TestSSEStreamAndOps: a stream opened with channels gets its welcome and
// the ok of each subscribe (without ids), the headers that stop buffering,
// and POSTed ops answered on the stream; a WebSocket client and the SSE
// client hear each other.
func TestSSEStreamAndOps(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		n := startNode(t, newHandler())
		c, status, body := tryOpenSSE(t, n.httpURL("/ws?channel=room:1&channel=room:2&channel=room:1"), nil)
		if c == nil {
			t.Fatalf("GET: %d %s", status, body)
		}
		if h := c.resp.Header; h.Get("Cache-Control") != "no-store" || h.Get("X-Accel-Buffering") != "no" {
			t.Fatalf("headers = %v", h)
		}
		w := c.next("welcome")
		if w["transport"] != "sse" || !strings.HasPrefix(w["session"].(string), n.h.hub.node+".") {
			t.Fatalf("welcome = %v", w)
		}
		c.session = w["session"].(string)
		for _, ch := range []string{"room:1", "room:2"} {
			ok := c.nextEvent(5 * time.Second).data
			if ok["type"] != "ok" || ok["channel"] != ch || ok["id"] != nil {
				t.Fatalf("subscribe answer = %v, want ok for %s", ok, ch)
			}
		}
		ws := dial(t, n.url("/ws"), nil)
		ws.subscribe("room:1", 1)

		c.mustPost(map[string]any{"op": "publish", "channel": "room:1", "id": 7, "data": map[string]any{"from": "sse"}})
		if r := c.reply(7); r["type"] != "ok" || r["message_id"] == nil {
			t.Fatalf("publish reply = %v", r)
		}
		if m := ws.next("message"); m["data"].(map[string]any)["from"] != "sse" {
			t.Fatalf("websocket got %v", m)
		}
		ws.send(map[string]any{"op": "publish", "channel": "room:1", "id": 2, "data": "from ws\nwith a line break"})
		if m := c.next("message"); m["data"] != "from ws\nwith a line break" || m["channel"] != "room:1" {
			t.Fatalf("sse got %v", m)
		}
		// Every op works over POST: presence (off here: an error reply),
		// unsubscribe, and a bad frame answered on the stream.
		c.mustPost(map[string]any{"op": "unsubscribe", "channel": "room:1", "id": 8})
		if r := c.reply(8); r["type"] != "ok" {
			t.Fatalf("unsubscribe reply = %v", r)
		}
		c.mustPost(map[string]any{"op": "dance", "id": 9})
		if r := c.reply(9); r["type"] != "error" || r["code"] != errBadRequest {
			t.Fatalf("unknown op reply = %v", r)
		}
		ws.send(map[string]any{"op": "publish", "channel": "room:1", "id": 3, "data": "after unsubscribe"})
		ws.reply(3)
		c.mustPost(map[string]any{"op": "subscribe", "channel": "room:9", "id": 10})
		c.reply(10)
		ws.send(map[string]any{"op": "publish", "channel": "room:9", "id": 4, "data": "on 9"})
		if m := c.next("message"); m["data"] != "on 9" {
			t.Fatalf("after unsubscribing room:1 the stream got %v", m)
		}
	})
}

// TestSSECrossNodeWithWebSocket: on two Caddy nodes with Redis, an SSE
// client on A (POSTing to B, which hands its frames to A) and a WebSocket
// client on B exchange messages both ways.
func TestSSECrossNodeWithWebSocket(t *testing.T) {
	rs := redistest.Start(t)
	a := startCaddy(t, "A", chatRoutes(rs.URL()))
	b := startCaddy(t, "B", chatRoutes(rs.URL()))

	s := openSSE(t, a.httpURL("/ws?channel=room:x"), nil)
	if ok := s.next("ok"); ok["channel"] != "room:x" {
		t.Fatalf("subscribe answer = %v", ok)
	}
	s.postURL = b.httpURL("/ws")
	ws := dial(t, b.wsURL("/ws"), nil)
	ws.next("welcome")
	ws.subscribe("room:x", 1)
	eventually(t, 10*time.Second, "room:x on both nodes", func() (bool, string) {
		n := numSub(t, rs, "chat:room:x")
		return n >= 2, fmt.Sprint(n)
	})

	for i := range 5 {
		s.mustPost(map[string]any{"op": "publish", "channel": "room:x", "id": 100 + i, "data": map[string]any{"sse": i}})
		ws.send(map[string]any{"op": "publish", "channel": "room:x", "id": 200 + i, "data": map[string]any{"ws": i}})
	}
	// The WebSocket side first: its publishes were all taken (their oks),
	// and it hears the stream's, in order.
	var wsGotSSE []float64
	wsOKs := 0
	for wsOKs < 5 || len(wsGotSSE) < 5 {
		m := ws.nextMatching(fmt.Sprintf("ws frames (oks %d, sse %v)", wsOKs, wsGotSSE), func(map[string]any) bool { return true })
		switch m["type"] {
		case "ok":
			wsOKs++
		case "message":
			if v, ok := m["data"].(map[string]any)["sse"]; ok {
				wsGotSSE = append(wsGotSSE, v.(float64))
			}
		default:
			t.Fatalf("ws got %v", m)
		}
	}
	// Each side gets both sides' messages, each side's in order.
	var fromWS, fromSSE []float64
	replies := 0
	for len(fromWS) < 5 || len(fromSSE) < 5 || replies < 5 {
		m := s.nextMatching(fmt.Sprintf("events (so far from ws %v, own %v, replies %d)", fromWS, fromSSE, replies), func(map[string]any) bool { return true })
		switch m["type"] {
		case "ok":
			// The POSTs' replies come back on A's stream, though B took them.
			if m["id"] != float64(100+replies) {
				t.Fatalf("reply %d = %v", replies, m)
			}
			replies++
		case "message":
			d := m["data"].(map[string]any)
			if v, ok := d["ws"]; ok {
				fromWS = append(fromWS, v.(float64))
			} else {
				fromSSE = append(fromSSE, d["sse"].(float64))
			}
		default:
			t.Fatalf("stream got %v", m)
		}
	}
	for i := range 5 {
		if fromWS[i] != float64(i) || fromSSE[i] != float64(i) || wsGotSSE[i] != float64(i) {
			t.Fatalf("out of order: sse got ws %v, own %v; ws got sse %v", fromWS, fromSSE, wsGotSSE)
		}
	}
	// A forged session naming A, POSTed to B: 404 from A's answer.
	if status, _ := postFrame(t, b.httpURL("/ws"), sessionNode(s.session)+".00000000000000000000000000000000", map[string]any{"op": "publish"}); status != http.StatusNotFound {
		t.Fatalf("forged session via B: %d, want 404", status)
	}
}

// TestSSEResumeWithLastEventID: a stream that drops and comes back with
// Last-Event-ID gets what was published meanwhile, in order, then live
// messages; the id names every history channel's position.
func TestSSEResumeWithLastEventID(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Channels: "room:**", Count: 100}}
		n := startNode(t, h)
		pub := dial(t, n.url("/ws"), nil)
		pub.next("welcome")
		publish := func(ch string, i int) {
			t.Helper()
			pub.send(map[string]any{"op": "publish", "channel": ch, "id": i, "data": map[string]any{"n": i}})
			if r := pub.reply(float64(i)); r["type"] != "ok" {
				t.Fatalf("publish %d: %v", i, r)
			}
		}
		const q = "/ws?channel=room:a&channel=room:b&channel=live"
		s := openSSE(t, n.httpURL(q), nil)
		for range 3 {
			s.next("ok")
		}
		publish("room:a", 1)
		publish("room:b", 2)
		publish("live", 3) // no history: no id
		var ids []string
		for range 3 {
			ev := s.nextEvent(5 * time.Second)
			ids = append(ids, ev.id)
		}
		if ids[0] == "" || !strings.HasPrefix(ids[1], ids[0]+",room:b=") || ids[2] != "" {
			t.Fatalf("event ids = %q", ids)
		}
		if _, err := parsePositions(ids[1]); err != nil {
			t.Fatalf("id %q does not parse: %v", ids[1], err)
		}
		last := s.lastID
		s.close()
		waitFor(t, func() bool { return n.h.hub.members("room:a") == 0 })

		for i := 4; i <= 9; i++ {
			publish([]string{"room:a", "room:b"}[i%2], i)
		}
		r := openSSE(t, n.httpURL(q), http.Header{"Last-Event-ID": {last}})
		// Each channel's ok comes first, then what it missed, in order.
		got := map[string][]float64{}
		oks := map[string]map[string]any{}
		for len(oks) < 3 {
			m := r.nextEvent(5 * time.Second).data
			ch, _ := m["channel"].(string)
			switch m["type"] {
			case "ok":
				oks[ch] = m
			case "message":
				if oks[ch] == nil {
					t.Fatalf("a message of %s before its ok: %v", ch, m)
				}
				got[ch] = append(got[ch], m["data"].(map[string]any)["n"].(float64))
			default:
				t.Fatalf("unexpected %v", m)
			}
		}
		for ch, ok := range oks {
			if ch != "live" && (ok["recovered"] != true || ok["replayed"] != float64(3)) {
				t.Fatalf("resume of %s: %v", ch, ok)
			}
			if ch == "live" && ok["recovered"] != nil {
				t.Fatalf("live was not resumed, yet: %v", ok)
			}
		}
		publish("room:a", 10)
		for len(got["room:a"])+len(got["room:b"]) < 7 {
			m := r.next("message")
			got[m["channel"].(string)] = append(got[m["channel"].(string)], m["data"].(map[string]any)["n"].(float64))
		}
		if fmt.Sprint(got["room:a"]) != "[4 6 8 10]" || fmt.Sprint(got["room:b"]) != "[5 7 9]" {
			t.Fatalf("after resume got %v", got)
		}
		// The positions carried on: a second drop resumes from the last one.
		last = r.lastID
		if ps, _ := parsePositions(last); len(ps) != 2 {
			t.Fatalf("last id %q", last)
		}
		r.close()
		publish("room:b", 11)
		r2 := openSSE(t, n.httpURL(q), http.Header{"Last-Event-ID": {last}})
		if m := r2.next("message"); m["data"].(map[string]any)["n"] != float64(11) {
			t.Fatalf("second resume got %v", m)
		}
	})
}

// TestSSESlowConsumer: a stream that stops reading is closed with 4000 and
// counted as a slow consumer; the WebSocket clients get everything.
func TestSSESlowConsumer(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix()), SendQueue: 128 << 10, WriteTimeout: caddy.Duration(time.Minute), RateLimit: &RateLimit{PerSecond: -1}}, smallSendBuffers())
	m := moduleMetrics()
	slowBefore := testutil.ToFloat64(m.slowConsumers)
	const channel, messages = "room:firehose", 600
	// A client that reads the welcome and the ok, then nothing.
	conn, br := openRawSSE(t, n.srv.Listener.Addr().String(), "/ws?channel="+channel)
	for range 2 {
		readRawEvent(t, br)
	}
	fast := dial(t, n.url("/ws"), nil)
	fast.subscribe(channel, 1)
	waitFor(t, func() bool { return n.h.hub.members(channel) == 2 })
	pub := dial(t, n.url("/ws"), nil)
	payload := strings.Repeat("x", 16<<10)
	for i := range messages {
		pub.send(map[string]any{"op": "publish", "channel": channel, "id": i, "data": map[string]any{"n": i, "pad": payload}})
		if r := pub.reply(float64(i)); r["type"] != "ok" {
			t.Fatalf("publish %d: %v", i, r)
		}
		// The fast client keeps up.
		if got := fast.next("message")["data"].(map[string]any)["n"]; got != float64(i) {
			t.Fatalf("fast client got %v, want %d", got, i)
		}
	}
	// Reading at last, the client finds the stream's close event: 4000
	// (the close waited behind a write the client did not read).
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	var last string
	for {
		ev, err := readRawEventErr(br)
		if err != nil {
			break
		}
		last = ev
	}
	if !strings.Contains(last, `"type":"close","code":4000`) {
		t.Fatalf("last event = %.200q, want a close with 4000", last)
	}
	waitFor(t, func() bool { return testutil.ToFloat64(m.slowConsumers) >= slowBefore+1 })
	if n.h.hub.dropped.Load() == 0 {
		t.Fatal("no delivery was counted as dropped")
	}
	fast.assertOpen()
}

// openRawSSE opens a stream over a bare TCP connection, so that the test
// decides when (and whether) its events are read.
func openRawSSE(t *testing.T, addr, target string) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	// A small receive buffer: what the client does not read waits in the
	// node's send queue, not in the kernel.
	_ = conn.(*net.TCPConn).SetReadBuffer(4096)
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", target, addr)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("raw SSE GET: %v %v", resp, err)
	}
	// The body is chunked: read it through net/http's decoder.
	return conn, bufio.NewReader(resp.Body)
}

// readRawEvent reads one event's data (keep-alives skipped).
func readRawEvent(t *testing.T, br *bufio.Reader) string {
	t.Helper()
	ev, err := readRawEventErr(br)
	if err != nil {
		t.Fatalf("reading an event: %v", err)
	}
	return ev
}

func readRawEventErr(br *bufio.Reader) (string, error) {
	var data []string
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			if err == io.EOF && data != nil {
				return strings.Join(data, "\n"), nil
			}
			return "", err
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			if data != nil {
				return strings.Join(data, "\n"), nil
			}
			continue
		}
		if d, ok := strings.CutPrefix(line, "data: "); ok {
			data = append(data, d)
		}
	}
}

// TestSSERateLimit: POSTed frames count against rate_limit as WebSocket
// frames do: refused ones get rate_limited on the stream, and a client that
// keeps going is closed with 4003.
func TestSSERateLimit(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix()), RateLimit: &RateLimit{PerSecond: 5, Burst: 5}})
	s := openSSE(t, n.httpURL("/ws"), nil)
	closedBefore := testutil.ToFloat64(moduleMetrics().connectionsClosed.WithLabelValues(closeReason(closeRateLimited)))
	statuses := map[int]int{}
	for i := range 40 {
		status, _ := s.post(map[string]any{"op": "publish", "channel": "room:r", "id": i, "data": i})
		statuses[status]++
		if status == http.StatusNotFound {
			break // closed: its session is gone
		}
	}
	if statuses[http.StatusAccepted] == 0 {
		t.Fatalf("no POST accepted: %v", statuses)
	}
	limited := s.nextMatching("rate_limited error", func(m map[string]any) bool { return m["code"] == errRateLimited })
	if limited["type"] != "error" {
		t.Fatalf("got %v", limited)
	}
	if c := s.closeEvent(); c["code"] != float64(closeRateLimited) {
		t.Fatalf("close = %v, want 4003", c)
	}
	if ev := s.nextEvent(5 * time.Second); !ev.ended {
		t.Fatalf("after the close event: %v", ev)
	}
	waitFor(t, func() bool {
		return testutil.ToFloat64(moduleMetrics().connectionsClosed.WithLabelValues(closeReason(closeRateLimited))) >= closedBefore+1
	})
	if status, body := s.post(map[string]any{"op": "publish", "channel": "room:r", "data": 1}); status != http.StatusNotFound || !strings.Contains(body, `"not_found"`) {
		t.Fatalf("POST after close: %d %s", status, body)
	}
}

// TestSSEMaxConnections: streams and WebSockets share max_connections and
// max_connections_per_user; a refused stream gets the upgrade's statuses.
func TestSSEMaxConnections(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix()), MaxConnections: 3,
		JWT: &JWTConfig{Secret: testSecret}, Subscribe: []string{"**"}, Publish: []string{"**"}, MaxConnectionsPerUser: 2})
	auth := func(user string) http.Header {
		return http.Header{"Authorization": {"Bearer " + newToken(t, user).sign()}}
	}
	if _, status, body := tryOpenSSE(t, n.httpURL("/ws"), nil); status != http.StatusUnauthorized {
		t.Fatalf("no token: %d %s", status, body)
	}
	a1 := openSSE(t, n.httpURL("/ws"), auth("alice"))
	openSSE(t, n.httpURL("/ws"), auth("alice"))
	if _, status, _ := tryOpenSSE(t, n.httpURL("/ws"), auth("alice")); status != http.StatusTooManyRequests {
		t.Fatalf("alice's third: %d, want 429", status)
	}
	b := dial(t, n.url("/ws"), bearer(newToken(t, "bob").sign()))
	b.next("welcome")
	if _, status, _ := tryOpenSSE(t, n.httpURL("/ws"), auth("carol")); status != http.StatusServiceUnavailable {
		t.Fatalf("fourth connection: %d, want 503", status)
	}
	expectRefused(t, n.url("/ws"), bearer(newToken(t, "carol").sign()), http.StatusServiceUnavailable)
	a1.close()
	eventually(t, 5*time.Second, "a slot freed", func() (bool, string) {
		c, status, _ := tryOpenSSE(t, n.httpURL("/ws"), auth("carol"))
		if c != nil {
			c.close()
		}
		return c != nil, fmt.Sprint(status)
	})
}

// TestSSEAttacks: what a forged or broken request gets, and that none of
// it harms the stream it names.
func TestSSEAttacks(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix()), MaxMessageSize: 1024, Origins: []string{"chat.example.com"}})
	s := openSSE(t, n.httpURL("/ws?channel=room:1"), nil)
	s.next("ok")
	route := n.httpURL("/ws")

	for name, body := range map[string]string{
		"not JSON":   "hello",
		"an array":   `[{"op":"publish"}]`,
		"truncated":  `{"op":"publish","channel":"room:1"`,
		"empty":      "",
		"bad UTF-8":  "{\"op\":\"publish\",\"channel\":\"room:1\",\"data\":\"\xff\xfe\"}",
		"two frames": `{"op":"presence","channel":"room:1"}{"op":"presence"}`,
	} {
		if status, resp := s.post(body); status != http.StatusBadRequest || !strings.Contains(resp, `"bad_request"`) {
			t.Errorf("%s: %d %s, want 400", name, status, resp)
		}
	}
	big := fmt.Sprintf(`{"op":"publish","channel":"room:1","data":%q}`, strings.Repeat("x", 2000))
	if status, _ := s.post(big); status != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized body: %d, want 413", status)
	}
	for name, session := range map[string]string{
		"unknown":          n.h.hub.node + ".0123456789abcdef0123456789abcdef",
		"no node":          "0123456789abcdef",
		"too long":         n.h.hub.node + "." + strings.Repeat("a", 500),
		"another node's":   "nosuchnode.0123456789abcdef0123456789abcdef",
		"the conn id":      s.session[:strings.IndexByte(s.session, '.')] + ".",
		"a prefix of ours": s.session[:len(s.session)-1],
	} {
		if status, body := postFrame(t, route, session, map[string]any{"op": "publish", "channel": "room:1", "data": 1}); status != http.StatusNotFound || !strings.Contains(body, `"not_found"`) {
			t.Errorf("%s session: %d %s, want 404", name, status, body)
		}
	}
	// A POST without the header is not an op at all.
	if status, _ := postFrame(t, route, "", map[string]any{"op": "publish"}); status == http.StatusAccepted {
		t.Errorf("POST without a session accepted")
	}
	// Nothing of that reached the stream: the next event is this reply.
	s.mustPost(map[string]any{"op": "publish", "channel": "room:1", "id": 1, "data": "fine"})
	for {
		ev := s.nextEvent(5 * time.Second)
		if ev.data["type"] == "ok" && ev.data["id"] == float64(1) {
			break
		}
		if ev.data["type"] != "message" || ev.data["data"] != "fine" {
			t.Fatalf("after the attacks the stream got %v", ev.raw)
		}
	}

	lastID := func(v string) int {
		_, status, _ := tryOpenSSE(t, n.httpURL("/ws?channel=room:1"), http.Header{"Last-Event-ID": {v}})
		return status
	}
	many := make([]string, 101)
	for i := range many {
		many[i] = fmt.Sprintf("room:%d=1-0~abc", i)
	}
	for name, v := range map[string]string{
		"garbage":        "hello",
		"no epoch":       "room:1=1-0",
		"bad id":         "room:1=abc~e",
		"bad channel":    "room 1=1-0~e",
		"glob channel":   "room:*=1-0~e",
		"empty epoch":    "room:1=1-0~",
		"bad epoch":      "room:1=1-0~e\"}",
		"long epoch":     "room:1=1-0~" + strings.Repeat("e", 65),
		"duplicate":      "room:1=1-0~e,room:1=2-0~e",
		"too many":       strings.Join(many, ","),
		"too long":       "room:1=1-0~" + strings.Repeat("e", 20000),
		"trailing comma": "room:1=1-0~e,",
	} {
		if status := lastID(v); status != http.StatusBadRequest {
			t.Errorf("Last-Event-ID %s: %d, want 400", name, status)
		}
	}
	for name, q := range map[string]string{
		"negative history":  "?channel=room:1&history=-1",
		"bad history":       "?channel=room:1&history=lots",
		"too many channels": "?" + strings.Repeat("channel=room:1&", 101),
	} {
		if _, status, _ := tryOpenSSE(t, n.httpURL("/ws"+q), nil); status != http.StatusBadRequest {
			t.Errorf("%s: %d, want 400", name, status)
		}
	}
	// A bad channel name is the subscribe's error, as on a WebSocket.
	bad := openSSE(t, n.httpURL("/ws?channel="+url.QueryEscape("room:*")), nil)
	if e := bad.next("error"); e["code"] != errBadRequest || e["channel"] != "room:*" {
		t.Fatalf("bad channel answer = %v", e)
	}
	// The origin rule is the upgrade's.
	if _, status, _ := tryOpenSSE(t, n.httpURL("/ws"), http.Header{"Origin": {"https://evil.example"}}); status != http.StatusForbidden {
		t.Errorf("foreign origin: %d, want 403", status)
	}
	openSSE(t, n.httpURL("/ws"), http.Header{"Origin": {"https://chat.example.com"}})

	// A raw route has no SSE transport.
	raw := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix()), Protocol: protocolRaw, Channel: "room:raw"})
	if _, status, _ := tryOpenSSE(t, raw.httpURL("/ws"), nil); status != http.StatusBadRequest {
		t.Errorf("raw route stream: %d, want 400", status)
	}
	if status, _ := postFrame(t, raw.httpURL("/ws"), s.session, map[string]any{"op": "publish"}); status != http.StatusBadRequest {
		t.Errorf("raw route POST: %d, want 400", status)
	}
	s.mustPost(map[string]any{"op": "presence", "channel": "room:1", "id": 2})
	s.reply(2)
}

// TestSSEPostFloodDoesNotDelayOthers: one stream's client POSTs as fast as
// it can from many goroutines; its inbox refuses the excess (429) and
// rate_limit closes it, while two other clients' round trips stay fast.
func TestSSEPostFloodDoesNotDelayOthers(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix()), RateLimit: &RateLimit{PerSecond: 50, Burst: 50}})
	flood := openSSE(t, n.httpURL("/ws?channel=room:flood"), nil)
	flood.next("ok")
	// The flooder's events are drained so that only its POSTs press.
	go func() {
		for range flood.events {
		}
	}()
	a := dial(t, n.url("/ws"), nil)
	b := openSSE(t, n.httpURL("/ws?channel=room:calm"), nil)
	b.next("ok")
	a.subscribe("room:calm", 1)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	statuses := map[int]int{}
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				status := tryPost(flood.url, flood.session, `{"op":"publish","channel":"room:flood","data":"spam"}`)
				mu.Lock()
				statuses[status]++
				mu.Unlock()
			}
		}()
	}
	var worst time.Duration
	for i := range 30 {
		start := time.Now()
		b.mustPost(map[string]any{"op": "publish", "channel": "room:calm", "id": i, "data": i})
		a.nextMatching("the stream's message", func(m map[string]any) bool { return m["type"] == "message" && m["data"] == float64(i) })
		a.send(map[string]any{"op": "publish", "channel": "room:calm", "id": 100 + i, "data": -i})
		b.nextMatching("the websocket's message", func(m map[string]any) bool { return m["type"] == "message" && m["data"] == float64(-i) })
		worst = max(worst, time.Since(start))
		time.Sleep(20 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if statuses[http.StatusTooManyRequests]+statuses[http.StatusNotFound] == 0 {
		t.Fatalf("the flood was never refused: %v", statuses)
	}
	if worst > time.Second {
		t.Fatalf("a round trip took %v during the flood (statuses %v)", worst, statuses)
	}
	t.Logf("flood statuses %v; worst round trip %v", statuses, worst)
}

// tryPost POSTs body for session; 0 when the request failed (the flood
// goroutines must not call t.Fatal).
func tryPost(url, session, body string) int {
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return 0
	}
	req.Header.Set(sessionHeader, session)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}
