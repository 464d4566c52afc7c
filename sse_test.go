package caddychat

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
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
		if m := c.nextMatching("the websocket's message", func(m map[string]any) bool {
			return m["type"] == "message" && m["data"] != nil && fmt.Sprint(m["data"]) != "map[from:sse]"
		}); m["data"] != "from ws\nwith a line break" || m["channel"] != "room:1" {
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

// TestSSEDataLines: a frame with line breaks (a backend's payload may hold
// them) becomes several data lines, which a client joins back into JSON.
func TestSSEDataLines(t *testing.T) {
	for in, want := range map[string]string{
		`{"a":1}`:           "data: {\"a\":1}\n\n",
		"{\"a\":\n1}":       "data: {\"a\":\ndata: 1}\n\n",
		"{\"a\":\r\n1\r}":   "data: {\"a\":\ndata: 1\ndata: }\n\n",
		"{\"a\":\n\n\"x\"}": "data: {\"a\":\ndata: \ndata: \"x\"}\n\n",
	} {
		if got := string(appendSSEData(nil, []byte(in))); got != want {
			t.Errorf("appendSSEData(%q) = %q, want %q", in, got, want)
		}
	}
	ps := []ssePosition{{"room:1", "1-0", "ab"}, {"room:2", "2-3", "cd"}}
	got, err := parsePositions(formatPositions(ps))
	if err != nil || fmt.Sprint(got) != fmt.Sprint(ps) {
		t.Fatalf("round trip: %v %v", got, err)
	}
}
