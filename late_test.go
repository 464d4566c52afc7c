package caddychat

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/caddychat/caddychat/internal/redistest"
)

// accounting is what one subscriber got of a channel: the ids of the
// messages delivered, in order, and the messages its gap frames reported.
type accounting struct {
	ids    []string
	missed int
	gaps   int
}

// accountFor reads c's frames until the messages of channel delivered plus
// those reported missed reach want, or nothing comes for 5s.
func (c *testClient) accountFor(channel string, want int) accounting {
	c.t.Helper()
	var a accounting
	for len(a.ids)+a.missed < want {
		m := c.nextMatching("a message or gap of "+channel, func(m map[string]any) bool {
			return (m["type"] == "message" || m["type"] == "gap") && m["channel"] == channel
		})
		if m["type"] == "gap" {
			n, _ := m["missed"].(float64)
			if n < 1 || n != float64(int(n)) {
				c.t.Fatalf("gap frame with missed %v: %v", m["missed"], m)
			}
			a.missed += int(n)
			a.gaps++
			continue
		}
		a.ids = append(a.ids, m["id"].(string))
	}
	if got := len(a.ids) + a.missed; got != want {
		c.t.Fatalf("%d delivered + %d reported missed = %d, want %d", len(a.ids), a.missed, got, want)
	}
	return a
}

// checkAccounting fails unless every delivered id was acknowledged, none
// came twice, and they came in the order published.
func checkAccounting(t *testing.T, who string, a accounting, acked []string) {
	t.Helper()
	order := make(map[string]int, len(acked))
	for i, id := range acked {
		order[id] = i
	}
	last := -1
	for _, id := range a.ids {
		i, ok := order[id]
		if !ok {
			t.Fatalf("%s: delivered %s, which no publish was acknowledged with", who, id)
		}
		if i <= last {
			t.Fatalf("%s: %s delivered twice or out of order", who, id)
		}
		last = i
	}
}

// TestOverloadEveryAckedMessageDeliveredOrReported: a node whose fan-out
// cannot keep up (its delivering goroutine slowed to 40 ms a message, so a
// burst of 50 publishes waits up to 2 s behind it) with max_lag 200ms.
// Every acknowledged message reaches each subscriber or is counted in a
// gap frame, none twice; the late ones are skipped at the hub, the broker
// lag metric moves, the backlog empties, and publishes on the node are
// refused as unavailable while it is behind.
func TestOverloadEveryAckedMessageDeliveredOrReported(t *testing.T) {
	const channel, delay, burst, subscribers = "overload:slow", 40 * time.Millisecond, 50, 3
	hook := func(ch string) {
		if ch == channel {
			time.Sleep(delay)
		}
	}
	testHookDeliver.Store(&hook)
	t.Cleanup(func() { testHookDeliver.Store(nil) })
	rs := redistest.Start(t)
	n := startNode(t, &Handler{Redis: rs.URL(), ChannelPrefix: ptr(uniquePrefix()), MaxLag: ptr(caddy.Duration(200 * time.Millisecond))})

	subs := make([]*testClient, subscribers)
	for i := range subs {
		subs[i] = dial(t, n.url("/ws"), nil)
		subs[i].next("welcome")
		subs[i].subscribe(channel, 1)
	}
	pub := dial(t, n.url("/ws"), nil)
	pub.next("welcome")
	lagCount0, _ := lagHistogram(t)
	skipped0 := testutil.ToFloat64(moduleMetrics().lateSkipped.WithLabelValues("hub"))

	// The burst goes out unanswered; Redis acknowledges each at once, the
	// slowed fan-out falls behind.
	for i := range burst {
		pub.send(map[string]any{"op": "publish", "channel": channel, "data": i, "id": i + 1})
	}
	var acked []string
	for i := range burst {
		r := pub.reply(float64(i + 1))
		if r["type"] != "ok" {
			t.Fatalf("publish %d of the burst: %v", i, r)
		}
		acked = append(acked, r["message_id"].(string))
	}
	// The node is now skipping: a publish on it is refused, not queued.
	eventually(t, 5*time.Second, "a publish refused while the node is behind", func() (bool, string) {
		r := pub.request(map[string]any{"op": "publish", "channel": "other:x", "data": "x", "id": 999})
		if r["type"] == "ok" {
			return false, "accepted"
		}
		if r["code"] != errUnavailable || !strings.Contains(fmt.Sprint(r["message"]), "running late") {
			t.Fatalf("refused publish answered %v, want unavailable, running late", r)
		}
		return true, ""
	})

	for i, s := range subs {
		a := s.accountFor(channel, len(acked))
		checkAccounting(t, fmt.Sprintf("subscriber %d", i), a, acked)
		if a.missed == 0 || len(a.ids) == 0 {
			t.Errorf("subscriber %d: %d delivered, %d missed: want some of each (the first within 200ms, most later)", i, len(a.ids), a.missed)
		}
	}
	if got := testutil.ToFloat64(moduleMetrics().lateSkipped.WithLabelValues("hub")) - skipped0; got < subscribers {
		t.Errorf("late_skipped_total{where=hub} grew by %v, want at least %d", got, subscribers)
	}
	if count, _ := lagHistogram(t); count-lagCount0 < burst {
		t.Errorf("broker lag histogram counted %d messages, want at least %d", count-lagCount0, burst)
	}
	eventually(t, 5*time.Second, "the backlog emptied", func() (bool, string) {
		b := n.h.hub.inbox.bytes.Load()
		return b == 0, fmt.Sprintf("%d bytes", b)
	})
	// Caught up: publishing works again, and is delivered.
	eventually(t, 5*time.Second, "publishes accepted again", func() (bool, string) {
		r := pub.request(map[string]any{"op": "publish", "channel": channel, "data": "after", "id": 1000})
		return r["type"] == "ok", fmt.Sprint(r)
	})
	m := subs[0].nextMatching("the message after", func(m map[string]any) bool { return m["type"] == "message" && m["data"] == "after" })
	if m["channel"] != channel {
		t.Fatalf("got %v", m)
	}
}

// dialSmallReceiveBuffer dials with a 4 KiB socket receive buffer, so
// that what the client does not read waits in the node's send queue.
func dialSmallReceiveBuffer(t *testing.T, url string) *websocket.Conn {
	t.Helper()
	dialer := &net.Dialer{Control: nil}
	transport := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dialer.DialContext(ctx, network, addr)
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetReadBuffer(4096)
		}
		return c, err
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPClient: &http.Client{Transport: transport}})
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	ws.SetReadLimit(-1)
	t.Cleanup(func() { _ = ws.CloseNow() })
	return ws
}

// TestLateInQueueReportedAsGap: a subscriber that stops reading for longer
// than max_lag, on either broker, does not get the messages that waited in
// its queue past the bound when it reads again: it gets a gap frame
// counting them, then the newer messages. Nothing is lost unreported and
// the connection stays open (its queue never filled).
func TestLateInQueueReportedAsGap(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		const channel, msgs = "room:late", 60
		h := newHandler()
		h.MaxLag = ptr(caddy.Duration(200 * time.Millisecond))
		h.SendQueue = 16 << 20
		n := startNode(t, h, smallSendBuffers())
		skipped0 := testutil.ToFloat64(moduleMetrics().lateSkipped.WithLabelValues("queue"))

		slow := dialSmallReceiveBuffer(t, n.url("/ws"))
		frames := make(chan map[string]any, 1000)
		var reading sync.Mutex // held while the slow client does not read
		reading.Lock()
		go func() {
			defer close(frames)
			first := true
			for {
				_, b, err := slow.Read(context.Background())
				if err != nil {
					return
				}
				var m map[string]any
				_ = json.Unmarshal(b, &m)
				frames <- m
				if first && m["type"] == "ok" {
					// Subscribed: now stop reading until the test says.
					first = false
					reading.Lock()
				}
			}
		}()
		if err := slow.Write(context.Background(), websocket.MessageText, []byte(`{"op":"subscribe","channel":"`+channel+`","id":1}`)); err != nil {
			t.Fatal(err)
		}
		pub := dial(t, n.url("/ws"), nil)
		pub.next("welcome")
		text := strings.Repeat("x", 16<<10)
		var acked []string
		for i := range msgs {
			acked = append(acked, pub.publishOK(channel, map[string]any{"i": i, "text": text}, float64(i+2)))
		}
		time.Sleep(400 * time.Millisecond) // past max_lag for all of them
		reading.Unlock()

		var a accounting
		deadline := time.After(10 * time.Second)
		for len(a.ids)+a.missed < msgs {
			select {
			case m, ok := <-frames:
				if !ok {
					t.Fatalf("the slow client was closed after %d delivered, %d missed", len(a.ids), a.missed)
				}
				switch m["type"] {
				case "message":
					a.ids = append(a.ids, m["id"].(string))
				case "gap":
					if m["channel"] != channel {
						t.Fatalf("gap for another channel: %v", m)
					}
					a.missed += int(m["missed"].(float64))
					a.gaps++
				}
			case <-deadline:
				t.Fatalf("within 10s: %d delivered, %d reported missed, want %d in all", len(a.ids), a.missed, msgs)
			}
		}
		if got := len(a.ids) + a.missed; got != msgs {
			t.Fatalf("%d delivered + %d missed = %d, want %d", len(a.ids), a.missed, got, msgs)
		}
		checkAccounting(t, "slow client", a, acked)
		if a.missed == 0 {
			t.Errorf("nothing reported missed (%d delivered): the queue's late messages were written", len(a.ids))
		}
		if got := testutil.ToFloat64(moduleMetrics().lateSkipped.WithLabelValues("queue")) - skipped0; got < float64(a.missed) {
			t.Errorf("late_skipped_total{where=queue} grew by %v, want at least %d", got, a.missed)
		}
		// Still open and current: a new message arrives at once.
		id := pub.publishOK(channel, "fresh", 999)
		select {
		case m := <-frames:
			if m["type"] != "message" || m["id"] != id {
				t.Fatalf("after the gap: got %v, want the fresh message %s", m, id)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the fresh message did not arrive")
		}
	})
}
