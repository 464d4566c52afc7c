package caddychat

import (
	"context"
	"encoding/json"
	"errors"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/coder/websocket"
)

// TestOneConnectionCannotGrowTheNode (issue 14, finding 1): a client that
// never reads asks again and again for a channel's history (re-subscribing
// with history and since, unsubscribing and subscribing again, history
// queries). What the node holds for it stays within its send queue's bound,
// in bytes; the client is refused with limit_exceeded and then closed as a
// slow consumer; an honest subscriber of the channel gets every message.
func TestOneConnectionCannotGrowTheNode(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Channels: "room:**", Count: 1000}}
		h.RateLimit = &RateLimit{PerSecond: -1}
		n := startNode(t, h)
		const channel = "room:big"
		pub := dial(t, n.url("/"), nil)
		pub.next("welcome")
		text := strings.Repeat("x", 1000)
		for i := range 1000 {
			pub.send(map[string]any{"op": "publish", "channel": channel, "data": text, "id": i})
		}
		for range 1000 {
			if r := pub.next("ok"); r["message_id"] == nil {
				t.Fatalf("publish: %v", r)
			}
		}
		honest := dial(t, n.url("/"), nil)
		honest.subscribe(channel, 1)

		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)

		attacker := dialSlowReader(t, n.url("/"))
		ops := []map[string]any{
			{"op": "subscribe", "channel": channel, "history": 1000},
			{"op": "subscribe", "channel": channel, "since": "1-0"},
			{"op": "history", "channel": channel, "limit": 1000},
			{"op": "unsubscribe", "channel": channel},
		}
		var peak atomic.Int64
		sampled := make(chan struct{})
		stop := make(chan struct{})
		go func() {
			defer close(sampled)
			for {
				if b := n.h.hub.queuedBytes(); b > peak.Load() {
					peak.Store(b)
				}
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond):
				}
			}
		}()
		for i := 0; i < 200; i++ {
			b, _ := json.Marshal(ops[i%len(ops)])
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			err := attacker.Write(ctx, websocket.MessageText, b)
			cancel()
			if err != nil {
				break // closed as a slow consumer
			}
		}
		time.Sleep(100 * time.Millisecond)
		close(stop)
		<-sampled
		// One client's share: send_queue, half of it again for a replay
		// queued whole, and the frame that was let into an empty queue.
		if bound := h.SendQueue*3/2 + 64<<10; peak.Load() > bound {
			t.Fatalf("the node held %d bytes for one client, over %d", peak.Load(), bound)
		}
		runtime.GC()
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 32<<20 {
			t.Fatalf("the heap grew by %d MiB under one client's history requests", grew>>20)
		}

		// Reading now: the client was told limit_exceeded, or cut off with 4000.
		limited, code := 0, websocket.StatusCode(-1)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, b, err := attacker.Read(ctx)
			cancel()
			if err != nil {
				code = websocket.CloseStatus(err)
				if code == -1 && !errors.Is(err, context.DeadlineExceeded) {
					t.Logf("attacker read: %v", err)
				}
				break
			}
			if strings.Contains(string(b), `"code":"limit_exceeded"`) {
				limited++
			}
		}
		if limited == 0 && code != closeSlowConsumer {
			t.Fatalf("the attacker got no limit_exceeded and was not closed as a slow consumer (close %d)", code)
		}
		t.Logf("peak held for the attacker: %d KiB; limit_exceeded replies read: %d; close code %d", peak.Load()>>10, limited, code)

		pub.publishOK(channel, "after", 5000)
		if m := honest.next("message"); m["data"] != "after" {
			t.Fatalf("the honest subscriber got %v", m)
		}
	})
}
