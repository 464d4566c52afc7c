package caddychat

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"
	"go.uber.org/zap"
)

// TestStalledWriteIsCutAtWriteTimeout: a client that stops reading while
// its messages keep coming has its connection cut with 4000 "write timed
// out" once a write has waited write_timeout, though its send queue has
// room and no ping is due for an hour: the write deadline, not the ping or
// the queue, ends it.
func TestStalledWriteIsCutAtWriteTimeout(t *testing.T) {
	const writeTimeout = 300 * time.Millisecond
	n := startNode(t, &Handler{SendQueue: 256 << 20, WriteTimeout: caddy.Duration(writeTimeout), PingInterval: caddy.Duration(time.Hour), RateLimit: &RateLimit{PerSecond: -1}}, smallSendBuffers(), observeLogs())
	const channel = "room:stall"
	slow := dialSlowReader(t, n.url("/ws"))
	b, _ := json.Marshal(map[string]any{"op": "subscribe", "channel": channel, "id": 1})
	if err := slow.Write(context.Background(), websocket.MessageText, b); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return n.h.hub.members(channel) == 1 })

	pub := dial(t, n.url("/ws"), nil)
	payload := strings.Repeat("x", 16<<10)
	closed := func() (websocket.StatusCode, string, bool) {
		for _, e := range n.logs.FilterMessage("connection closed").All() {
			f := e.ContextMap()
			if code, _ := f["code"].(int64); code != 0 {
				return websocket.StatusCode(code), fmt.Sprint(f["reason"]), true
			}
		}
		return 0, "", false
	}
	// Publish until the slow client's socket is full and a write stalls;
	// its queue (256 MiB) never fills.
	start := time.Now()
	for i := 0; ; i++ {
		if _, _, done := closed(); done {
			break
		}
		if time.Since(start) > 20*time.Second {
			t.Fatalf("the connection of a client that reads nothing is still open after %d messages of 16 KiB", i)
		}
		pub.send(map[string]any{"op": "publish", "channel": channel, "id": i, "data": payload})
		if r := pub.reply(float64(i)); r["type"] != "ok" {
			t.Fatalf("publish %d: %v", i, r)
		}
		if i > 50 {
			time.Sleep(10 * time.Millisecond) // the socket is full by now: wait for the deadline
		}
	}
	code, why, _ := closed()
	if code != closeSlowConsumer || why != "write timed out" {
		t.Fatalf("closed with %d %q, want %d %q", code, why, closeSlowConsumer, "write timed out")
	}
}

// fakeTransport is a transport that records how the connection ends.
type fakeTransport struct{ closed chan websocket.StatusCode }

func (f *fakeTransport) read() ([]byte, bool, error)               { select {} }
func (f *fakeTransport) cork()                                     {}
func (f *fakeTransport) writeFrame(*delivery, []byte) error        { return nil }
func (f *fakeTransport) uncork() error                             { return nil }
func (f *fakeTransport) close(code websocket.StatusCode, _ string) { f.closed <- code }
func (f *fakeTransport) closeNow()                                 {}
func (f *fakeTransport) ping() error                               { return nil }
func (f *fakeTransport) name() string                              { return "fake" }

// TestExpiringConnectionHoldsOneTimer: a connection whose token expires
// keeps its expiry on the timer that also pings and bounds its writes: a
// refresh that moves the expiry and a write's deadline take no timer (no
// allocation) of their own, and that one timer still closes the connection
// with 4002 when its token expires.
func TestExpiringConnectionHoldsOneTimer(t *testing.T) {
	tr := &fakeTransport{closed: make(chan websocket.StatusCode, 1)}
	rt := &route{log: zap.NewNop(), pingInterval: time.Hour, writeTimeout: time.Hour}
	later := []*identity{{expires: time.Now().Add(time.Hour)}, {expires: time.Now().Add(2 * time.Hour)}}
	c := &conn{route: rt, tr: tr, identity: later[0]}
	c.startPings()
	c.armExpiry()
	timer := c.timer.t
	i := 0
	allocs := testing.AllocsPerRun(100, func() {
		i++
		c.identity = later[i%2] // a refresh
		c.armExpiry()
		c.startWriteDeadline() // a batch
		c.endWriteDeadline()
	})
	if allocs != 0 {
		t.Errorf("a refresh and a write allocate %v times, want 0 (a timer of their own?)", allocs)
	}
	if c.timer.t != timer {
		t.Error("the connection's timer was replaced")
	}
	const ttl = 200 * time.Millisecond
	c.identity = &identity{expires: time.Now().Add(ttl)}
	armed := time.Now()
	c.armExpiry()
	select {
	case code := <-tr.closed:
		if code != closeTokenExpired {
			t.Fatalf("closed with %d, want %d", code, closeTokenExpired)
		}
		if early := ttl - time.Since(armed); early > 0 {
			t.Fatalf("closed %v before the token expired", early)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the connection outlived its token by 10s")
	}
	c.stopTimer()
}

// TestPongsReadByTheLibraryKeepTheConnection: a pong that reaches the node
// inside a fragmented message is read by the library, not by awaitFrame;
// it answers the ping all the same (pongRead), so a client that answers
// every ping only so is never closed 4001.
func TestPongsReadByTheLibraryKeepTheConnection(t *testing.T) {
	const ping = 400 * time.Millisecond
	n := startNode(t, &Handler{PingInterval: caddy.Duration(ping)})
	c, br := rawHandshake(t, n)
	pings := 0
	deadline := time.Now().Add(8 * ping)
	for time.Now().Before(deadline) || pings < 3 {
		if time.Since(deadline) > 10*time.Second {
			t.Fatalf("%d pings in %v", pings, 8*ping+10*time.Second)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		op, payload, err := readServerFrameOp(br)
		if err != nil {
			t.Fatalf("after %d pings: %v", pings, err)
		}
		switch op {
		case 0x8: // close
			t.Fatalf("closed after %d pings answered within fragmented messages: % x", pings, payload)
		case 0x9: // ping: answered between two fragments of a subscribe
			pings++
			msg := fmt.Sprintf(`{"op":"subscribe","channel":"pong:%d","id":%d}`, pings, pings)
			var w []byte
			w = append(w, maskedFrame(0x01, msg[:10])...) // text, not final
			w = append(w, maskedFrame(0x8a, payload)...)  // the pong
			w = append(w, maskedFrame(0x80, msg[10:])...) // final continuation
			if _, err := c.Write(w); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestIdleConnectionAllocations bounds the heap an idle subscribed
// WebSocket keeps: the node's conn, transport, timer, library connection
// and buffers, and the test's side of a raw socket, per connection, once
// pings have been answered.
func TestIdleConnectionAllocations(t *testing.T) {
	if !canPeekSocket {
		t.Skip("no idle wait on " + runtime.GOOS)
	}
	if raceEnabled() {
		t.Skip("the race detector allocates on its own")
	}
	// Measured at about 4,050 B here (4,290 B before one timer per
	// connection, the cork writer inside the transport, one pong function
	// and no reader wrapper per connection); the bound lies between.
	const bound = 4170
	const clients = 400
	live := func() uint64 {
		var m runtime.MemStats
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	// As many connections to another node first, closed again, warm up
	// what outlives them (the runtime's goroutine and poller tables, pools).
	warm := startNode(t, &Handler{PingInterval: caddy.Duration(time.Hour)})
	openIdle(t, warm, clients, closeAll)
	waitFor(t, func() bool {
		warm.h.hub.admitMu.Lock()
		defer warm.h.hub.admitMu.Unlock()
		return warm.h.hub.admitted == 0
	})
	n := startNode(t, &Handler{PingInterval: caddy.Duration(time.Hour)})
	before := live()
	conns := openIdle(t, n, clients, nil)
	after := live()
	runtime.KeepAlive(conns)
	per := (int64(after) - int64(before)) / clients
	t.Logf("live heap per idle connection (node and client side): %d B", per)
	if per > bound {
		t.Errorf("an idle connection keeps %d B of heap, more than %d", per, bound)
	}
	closeAll(conns)
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		c.Close()
	}
}

// openIdle opens k WebSockets to n, each subscribed to a channel of its
// own, and then passes them to done (if set).
func openIdle(t *testing.T, n *testNode, k int, done func([]net.Conn)) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, k)
	for i := range conns {
		c, br := rawHandshake(t, n)
		channel := fmt.Sprintf("idle:%d", i)
		if _, err := c.Write(maskedFrame(0x81, fmt.Sprintf(`{"op":"subscribe","channel":%q,"id":1}`, channel))); err != nil {
			t.Fatal(err)
		}
		for {
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, p, err := readServerFrameOp(br)
			if err != nil {
				t.Fatalf("client %d: %v", i, err)
			}
			if strings.Contains(string(p), `"id":1`) {
				break
			}
		}
		conns[i] = c // br, the test's reader, is dropped
	}
	if done != nil {
		done(conns)
	}
	return conns
}

// rawUpgradeRequest asks for a WebSocket on /ws, written byte by byte.
var rawUpgradeRequest = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" +
	"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + base64.StdEncoding.EncodeToString([]byte("0123456789abcdef")) + "\r\n\r\n"

// rawHandshake opens a WebSocket to n's /ws over a plain socket, so that
// the test writes and reads frames byte by byte; br holds what follows the
// 101.
func rawHandshake(t *testing.T, n *testNode) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(n.srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(rawUpgradeRequest)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReaderSize(c, 512)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %v, %v", resp, err)
	}
	_ = c.SetDeadline(time.Time{})
	return c, br
}

// maskedFrame is a client's frame whose first byte is first (payload under
// 126 bytes).
func maskedFrame(first byte, s string) []byte {
	mask := [4]byte{1, 2, 3, 4}
	b := []byte{first, 0x80 | byte(len(s)), mask[0], mask[1], mask[2], mask[3]}
	for i := range len(s) {
		b = append(b, s[i]^mask[i%4])
	}
	return b
}

// readServerFrameOp reads one unmasked server frame (payload under 126
// bytes, or a text frame of any size) and returns its opcode and payload.
func readServerFrameOp(br *bufio.Reader) (byte, string, error) {
	first, err := br.Peek(1)
	if err != nil {
		return 0, "", err
	}
	op := first[0] & 0x0f
	p, err := readServerFrame(br)
	return op, p, err
}

// TestFarFutureExpiryIsNoDeadline: a token that "never expires" (exp
// 9999-12-31, or a hook's expires_at in the year 3000) is further away than
// time.Until can say; added to the monotonic clock, its cap used to wrap
// below zero, read as already past, and close the connection at once with
// 4002.
func TestFarFutureExpiryIsNoDeadline(t *testing.T) {
	for _, expires := range []time.Time{time.Unix(253402300799, 0), time.Unix(32503680000, 0)} {
		tr := &fakeTransport{closed: make(chan websocket.StatusCode, 1)}
		rt := &route{log: zap.NewNop(), pingInterval: time.Hour, writeTimeout: time.Hour}
		c := &conn{route: rt, tr: tr, identity: &identity{expires: expires}}
		c.startPings()
		c.armExpiry()
		select {
		case code := <-tr.closed:
			t.Fatalf("expiry %v: closed at once with %d", expires, code)
		case <-time.After(300 * time.Millisecond):
		}
		if at := c.timer.expiryAt.Load(); at != 0 && at < monoNow()+int64(100*365*24*time.Hour) {
			t.Errorf("expiry %v: deadline %d, within a century of now", expires, at)
		}
		c.stopTimer()
	}
}
