package caddychat

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"
)

// serverConnStacks lists the stacks of the goroutines that run the node's
// connections (their reading side; a writer or a ping write is short-lived).
func serverConnStacks() []string {
	buf := make([]byte, 64<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "caddychat.(*conn).") {
			out = append(out, g)
		}
	}
	return out
}

// TestIdleConnectionsWaitOnOneShallowGoroutine: an idle subscribed
// WebSocket, after several pings answered, is one goroutine per connection,
// parked in awaitFrame (a 2 KiB stack), not in the library's Read (whose
// frames need a 4 KiB stack), and the pongs keep it open.
func TestIdleConnectionsWaitOnOneShallowGoroutine(t *testing.T) {
	if !canPeekSocket {
		t.Skip("no idle wait on " + runtime.GOOS)
	}
	const clients = 50
	ping := 100 * time.Millisecond
	n := startNode(t, &Handler{PingInterval: caddy.Duration(ping)})
	conns := make([]*testClient, clients)
	for i := range conns {
		conns[i] = dial(t, n.url("/ws"), nil)
		conns[i].next("welcome")
		conns[i].subscribe(fmt.Sprintf("idle:%d", i), 1)
	}
	// Several pings each: an unanswered one closes a connection at the next.
	time.Sleep(6 * ping)
	var stacks []string
	eventually(t, 5*time.Second, "connections idle", func() (bool, string) {
		stacks = serverConnStacks()
		waiting := 0
		for _, s := range stacks {
			if strings.Contains(s, "(*idleReader).awaitFrame") && !strings.Contains(s, "coder/websocket") {
				waiting++
			}
		}
		return len(stacks) == clients && waiting == clients,
			fmt.Sprintf("%d connection goroutines, %d of them waiting in awaitFrame, for %d connections; first:\n%s", len(stacks), waiting, clients, first(stacks))
	})
	for i, c := range conns {
		select {
		case err := <-c.closed:
			t.Fatalf("client %d closed while answering pings: %v", i, err)
		default:
		}
	}
	// And they still read: a frame wakes one up.
	conns[0].subscribe("idle:again", 2)
}

func first(s []string) string {
	if len(s) == 0 {
		return "(none)"
	}
	return s[0]
}

// TestUnansweredPingCloses4001: a client that stops reading (so answers no
// ping) is closed with 4001 once a ping has gone a whole interval without
// its pong.
func TestUnansweredPingCloses4001(t *testing.T) {
	ping := 100 * time.Millisecond
	n := startNode(t, &Handler{PingInterval: caddy.Duration(ping)})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, n.url("/ws"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	time.Sleep(5 * ping) // not reading: the library answers no ping
	for {
		_, _, err := ws.Read(ctx)
		if err == nil {
			continue // the welcome
		}
		if code := websocket.CloseStatus(err); code != closePingTimeout {
			t.Fatalf("closed with %v (%v), want %d", code, err, closePingTimeout)
		}
		return
	}
}

// TestFrameSentWithTheHandshakeIsRead: a client that sends its first frame
// right behind the upgrade request, before the 101, gets its answer (those
// bytes wait where awaitFrame cannot see them).
func TestFrameSentWithTheHandshakeIsRead(t *testing.T) {
	n := startNode(t, &Handler{})
	c, err := net.Dial("tcp", strings.TrimPrefix(n.srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	frame := maskedFrame(0x81, `{"op":"subscribe","channel":"early","id":7}`)
	if _, err := c.Write(append([]byte(rawUpgradeRequest), frame...)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %v, %v", resp, err)
	}
	for {
		payload, err := readServerFrame(br)
		if err != nil {
			t.Fatalf("no answer to the early subscribe: %v", err)
		}
		if strings.Contains(payload, `"id":7`) {
			if !strings.Contains(payload, `"type":"ok"`) {
				t.Fatalf("early subscribe answered %s", payload)
			}
			return
		}
	}
}

// readServerFrame reads one unmasked server frame and returns its payload.
func readServerFrame(br *bufio.Reader) (string, error) {
	var h [2]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return "", err
	}
	n := int(h[1] & 0x7f)
	if n >= 126 {
		ext := make([]byte, 2)
		if n == 127 {
			ext = make([]byte, 8)
		}
		if _, err := io.ReadFull(br, ext); err != nil {
			return "", err
		}
		n = 0
		for _, x := range ext {
			n = n<<8 | int(x)
		}
	}
	p := make([]byte, n)
	_, err := io.ReadFull(br, p)
	return string(p), err
}

func TestPongFrames(t *testing.T) {
	pong := []byte{0x8a, 0x80, 1, 2, 3, 4}
	pong2 := []byte{0x8a, 0x82, 1, 2, 3, 4, 'h', 'i'}
	for _, tc := range []struct {
		in   []byte
		want int
	}{
		{nil, 0},
		{pong[:5], 0},
		{pong, 6},
		{append(append([]byte{}, pong...), pong2...), 14},
		{append(append([]byte{}, pong...), pong2[:7]...), 6},
		{append(append([]byte{}, pong...), 0x81, 0x80), 6},
		{[]byte{0x8a, 0x00}, 0},             // unmasked: not a client's
		{[]byte{0x0a, 0x80, 1, 2, 3, 4}, 0}, // not final
		{append([]byte{0x8a, 0xfe, 0, 0}, make([]byte, 200)...), 0},
	} {
		if got := pongFrames(tc.in); got != tc.want {
			t.Errorf("pongFrames(% x) = %d, want %d", tc.in, got, tc.want)
		}
	}
}
