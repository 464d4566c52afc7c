package caddychat

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"
)

// busyPublisher publishes {"n":1,"pad":…}, {"n":2,…}, … on one channel at a
// steady rate and records the message id of each acknowledged one.
type busyPublisher struct {
	c       *testClient
	mu      sync.Mutex
	ids     []string // ids[n-1] is the id of message n, in ack order
	epoch   string
	failure string
	stop    chan struct{}
	done    sync.WaitGroup
}

func startBusyPublisher(t *testing.T, url, channel, pad string, every time.Duration) *busyPublisher {
	t.Helper()
	p := &busyPublisher{c: dial(t, url, nil), stop: make(chan struct{})}
	p.c.next("welcome")
	p.done.Add(2)
	go func() {
		defer p.done.Done()
		tick := time.NewTicker(every)
		defer tick.Stop()
		for n := 1; ; n++ {
			select {
			case <-tick.C:
			case <-p.stop:
				return
			}
			b := fmt.Sprintf(`{"op":"publish","channel":%q,"id":%d,"data":{"n":%d,"pad":%q}}`, channel, n, n, pad)
			if err := p.c.ws.Write(t.Context(), websocket.MessageText, []byte(b)); err != nil {
				return
			}
		}
	}()
	go func() {
		defer p.done.Done()
		for m := range p.c.frames {
			p.mu.Lock()
			switch {
			case m["type"] == "ok" && m["message_id"] != nil:
				p.ids = append(p.ids, m["message_id"].(string))
			case m["type"] == "error" && p.failure == "":
				p.failure = fmt.Sprint(m)
			}
			p.mu.Unlock()
		}
	}()
	t.Cleanup(p.halt)
	return p
}

func (p *busyPublisher) halt() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
		_ = p.c.ws.CloseNow()
	}
	p.done.Wait()
}

// acked is how many messages were acknowledged, and the id of message n.
func (p *busyPublisher) acked(t *testing.T, n int) (int, string) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failure != "" {
		t.Fatalf("publisher: %s", p.failure)
	}
	id := ""
	if n >= 1 && n <= len(p.ids) {
		id = p.ids[n-1]
	}
	return len(p.ids), id
}

func (p *busyPublisher) waitAcked(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if got, _ := p.acked(t, n); got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("publisher: %d acked within 30s, want %d", func() int { a, _ := p.acked(t, 0); return a }(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// connByID is the node's connection with the given id (from its welcome).
func (h *hub) connByID(id string) *conn {
	h.mu.RLock()
	defer h.mu.RUnlock()
	for s := range h.subscribers {
		if c := s.(*conn); c.id == id {
			return c
		}
	}
	return nil
}

// TestResumeOnABusyChannelKeepsAReadingClient (issue 15, finding 1): 20
// clients that each missed 800 messages of a channel publishing 400 msg/s
// resume, and each gets every message after the one it last saw, the replay
// and then the live ones, in order, with no duplicate, and is never closed.
//
// In this process a client reads faster than the node writes, so its queue
// is empty within milliseconds and no budget is ever tested. Over a real
// network (or in a browser busy rendering the replay) the client reads at
// its own pace and the replay waits in the node's queue while live messages
// pile up behind it. The test makes that deterministic: each client reads
// nothing (4 KiB socket buffers on both ends) until the node holds more than send_queue
// for it, the replay (800 messages of about 550 bytes, 0.45 send_queue) plus
// 0.55 send_queue of live ones, then reads as fast as it can. A client that
// had not resumed would hold only those live messages, well within
// send_queue: the replay must not make it look slow.
func TestResumeOnABusyChannelKeepsAReadingClient(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Channels: "room:*", Count: 10000}}
		h.MaxReplay = 2000
		h.RateLimit = &RateLimit{PerSecond: -1}
		h.WriteTimeout = caddy.Duration(time.Minute)
		h.PingInterval = caddy.Duration(time.Hour)
		n := startNode(t, h, smallSendBuffers()) // send_queue: the default, 1 MiB
		const channel, missed, rounds, liveAfter = "room:busy", 800, 20, 100
		pub := startBusyPublisher(t, n.url("/"), channel, strings.Repeat("p", 250), time.Second/400)
		pub.waitAcked(t, missed+1)

		var wg sync.WaitGroup
		for round := range rounds {
			ws := dialSlowReader(t, n.url("/"))
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			_, b, err := ws.Read(ctx)
			cancel()
			var welcome struct{ Conn string }
			if err != nil || json.Unmarshal(b, &welcome) != nil {
				t.Fatalf("round %d: welcome: %v %s", round, err, b)
			}
			sc := n.h.hub.connByID(welcome.Conn)
			// The client last saw message k; 800 were published since.
			total, _ := pub.acked(t, 0)
			k := total - missed
			_, since := pub.acked(t, k)
			resume, _ := json.Marshal(map[string]any{"op": "subscribe", "channel": channel, "since": since, "id": "r"})
			if err := ws.Write(t.Context(), websocket.MessageText, resume); err != nil {
				t.Fatal(err)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				fail := func(format string, args ...any) {
					t.Errorf("round %d: "+format, append([]any{round}, args...)...)
				}
				// Not reading until the node holds more than send_queue for it,
				// or closed it.
				for !sc.closing.Load() && sc.send.queuedBytes()+sc.heldBytes.Load() <= h.SendQueue+16<<10 {
					time.Sleep(2 * time.Millisecond)
				}
				if sc.closing.Load() {
					fail("the node closed the resuming client (%+v) holding %d bytes for it", sc.closeWith, sc.send.queuedBytes())
					return
				}
				c := adopt(t, ws)
				next := func() map[string]any {
					select {
					case m, ok := <-c.frames:
						if !ok {
							fail("connection closed: %v", <-c.closed)
							return nil
						}
						return m
					case <-time.After(10 * time.Second):
						fail("no frame within 10s")
						return nil
					}
				}
				r := next()
				if r == nil {
					return
				}
				if r["type"] != "ok" || r["recovered"] != true {
					fail("resume after %d missed: %v", missed, r)
					return
				}
				replayed := int(r["replayed"].(float64))
				if replayed < missed {
					fail("replayed %d, want at least %d", replayed, missed)
					return
				}
				// Every message after k, the replay and then live ones, until
				// liveAfter live ones have arrived.
				for want := k + 1; want <= k+replayed+liveAfter; want++ {
					m := next()
					if m == nil {
						return
					}
					if m["type"] != "message" || m["channel"] != channel {
						fail("after message %d: %v", want-1, m)
						return
					}
					if got := m["data"].(map[string]any)["n"]; got != float64(want) {
						fail("got message %v, want %d", got, want)
						return
					}
				}
				_ = ws.CloseNow()
			}()
		}
		wg.Wait()
	})
}

// TestResumeThenStopReadingIsClosed (issue 15, finding 1): the replay's
// allowance does not let a client that stops reading hold more. On a
// channel publishing 400 msg/s, one client resumes after 800 missed messages
// and reads nothing at all; another reads the reply and the replay, then
// stops. Both are closed with 4000, and what the node holds for each stays
// within 1.5 × send_queue plus one message.
func TestResumeThenStopReadingIsClosed(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Channels: "room:*", Count: 10000}}
		h.MaxReplay = 2000
		h.RateLimit = &RateLimit{PerSecond: -1}
		h.WriteTimeout = caddy.Duration(time.Minute)
		h.PingInterval = caddy.Duration(time.Hour)
		n := startNode(t, h, smallSendBuffers())
		const channel, missed = "room:busy", 800
		pub := startBusyPublisher(t, n.url("/"), channel, strings.Repeat("p", 250), time.Second/400)
		pub.waitAcked(t, missed+1)

		var wg sync.WaitGroup
		for _, readReplay := range []bool{false, true} {
			ws := dialSlowReader(t, n.url("/"))
			read := func() []byte {
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				defer cancel()
				_, b, err := ws.Read(ctx)
				if err != nil {
					t.Fatalf("read: %v", err)
				}
				return b
			}
			var welcome struct{ Conn string }
			if err := json.Unmarshal(read(), &welcome); err != nil {
				t.Fatal(err)
			}
			sc := n.h.hub.connByID(welcome.Conn)
			total, _ := pub.acked(t, 0)
			_, since := pub.acked(t, total-missed)
			resume, _ := json.Marshal(map[string]any{"op": "subscribe", "channel": channel, "since": since, "id": "r"})
			if err := ws.Write(t.Context(), websocket.MessageText, resume); err != nil {
				t.Fatal(err)
			}
			if readReplay {
				var r struct {
					Recovered bool
					Replayed  int
				}
				if err := json.Unmarshal(read(), &r); err != nil || !r.Recovered || r.Replayed < missed {
					t.Fatalf("resume: %+v %v", r, err)
				}
				for range r.Replayed {
					read()
				}
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				// The client reads no more: sample what the node holds for it
				// until it is closed.
				var peak int64
				for !sc.closing.Load() {
					peak = max(peak, sc.send.queuedBytes()+sc.heldBytes.Load())
					time.Sleep(time.Millisecond)
				}
				peak = max(peak, sc.send.queuedBytes()+sc.heldBytes.Load())
				// One client's share: send_queue of live messages, half of it
				// again for a replay, and one message (about 700 bytes here).
				if bound := h.SendQueue*3/2 + 4<<10; peak > bound {
					t.Errorf("read replay %v: the node held %d bytes for a client that stopped reading, over %d", readReplay, peak, bound)
				}
				// Reading now: what was queued before the close, then 4000.
				var err error
				for err == nil {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					_, _, err = ws.Read(ctx)
					cancel()
				}
				if code := websocket.CloseStatus(err); code != closeSlowConsumer {
					t.Errorf("read replay %v: closed with %v (%v), want %d", readReplay, code, err, closeSlowConsumer)
				}
				t.Logf("read replay %v: peak held %d KiB (send_queue %d KiB), closed %v", readReplay, peak>>10, h.SendQueue>>10, sc.closeWith)
			}()
		}
		wg.Wait()
	})
}

// TestReplaysWaitingShareHalfOfSendQueue: the replays waiting to be sent to
// a connection hold at most half of send_queue together. A client that has
// not yet read one resume's replay (0.45 × send_queue) and resumes another
// channel gets what is left of that half, the newest messages, limited.
func TestReplaysWaitingShareHalfOfSendQueue(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Channels: "room:*", Count: 1000}}
		h.MaxReplay = 1000
		h.RateLimit = &RateLimit{PerSecond: -1}
		h.WriteTimeout = caddy.Duration(time.Minute)
		n := startNode(t, h, smallSendBuffers())
		pub := dial(t, n.url("/"), nil)
		pub.next("welcome")
		pad := strings.Repeat("p", 250)
		first := map[string]string{}
		for _, ch := range []string{"room:a", "room:b"} {
			first[ch] = pub.publishOK(ch, map[string]any{"n": 0, "pad": pad}, 0)
			for i := 1; i <= 800; i++ {
				pub.send(map[string]any{"op": "publish", "channel": ch, "data": map[string]any{"n": i, "pad": pad}, "id": i})
			}
			for range 800 {
				if r := pub.next("ok"); r["message_id"] == nil {
					t.Fatalf("publish: %v", r)
				}
			}
		}
		ws := dialSlowReader(t, n.url("/"))
		for i, ch := range []string{"room:a", "room:b"} {
			b, _ := json.Marshal(map[string]any{"op": "subscribe", "channel": ch, "since": first[ch], "id": i})
			if err := ws.Write(t.Context(), websocket.MessageText, b); err != nil {
				t.Fatal(err)
			}
		}
		c := adopt(t, ws)
		ra := c.reply(0)
		if ra["recovered"] != true || ra["replayed"] != float64(800) {
			t.Fatalf("first resume: %v", ra)
		}
		if data, _ := c.messages("room:a", 800); data[799].(map[string]any)["n"] != float64(800) {
			t.Fatalf("first replay ends with %v", data[799])
		}
		rb := c.reply(1)
		replayed, _ := rb["replayed"].(float64)
		if rb["type"] != "ok" || rb["recovered"] != false || rb["limited"] != true || replayed >= 800 {
			t.Fatalf("second resume while the first replay waits: %v; want limited", rb)
		}
		// The newest that fit, up to the last one.
		data, _ := c.messages("room:b", int(replayed))
		if len(data) > 0 && data[len(data)-1].(map[string]any)["n"] != float64(800) {
			t.Fatalf("second replay ends with %v", data[len(data)-1])
		}
		t.Logf("second resume replayed %v of 800", replayed)
	})
}
