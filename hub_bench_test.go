package caddychat

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/coder/websocket"
)

// BenchmarkHubDeliver measures the fan-out path: one broker message queued to
// every local subscriber of its channel. allocs/delivery is the figure that
// must stay at 0: the one delivery value per message is shared by all.
func BenchmarkHubDeliver(b *testing.B) {
	for _, subscribers := range []int{100, 1000, 10000} {
		b.Run(fmt.Sprintf("subscribers=%d", subscribers), func(b *testing.B) {
			h, err := newHub(hubConfig{})
			if err != nil {
				b.Fatal(err)
			}
			const channel = "room:bench"
			cs := &channelState{subscribed: true, refs: subscribers}
			h.channels[channel] = cs
			var drained sync.WaitGroup
			stop := make(chan struct{})
			// Queues deep enough that drainers sharing two cores with the
			// deliveries never fill one (a full queue would close the client).
			rt := &route{sendQueue: 1 << 30}
			for range subscribers {
				c := &conn{route: rt}
				c.writing.Store(true) // the drain goroutine below is its writer
				cs.members.add(c)
				drained.Add(1)
				go func() {
					defer drained.Done()
					for {
						if c.send.pop() == nil {
							select {
							case <-stop:
								return
							default:
								runtime.Gosched()
							}
						}
					}
				}()
			}
			payload := []byte(`{"type":"message","channel":"room:bench","id":"1-a-1","from":"","ts":1,"data":{"text":"hello"}}`)
			// Warm up: each queue grows once to the backlog its drainer lets
			// build up, and keeps that capacity.
			for range 2000 {
				h.deliver(channel, payload)
			}
			b.ReportAllocs()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			b.ResetTimer()
			for range b.N {
				h.deliver(channel, payload)
			}
			b.StopTimer()
			runtime.ReadMemStats(&after)
			b.ReportMetric(float64(after.Mallocs-before.Mallocs)/float64(b.N*subscribers), "allocs/delivery")
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*subscribers), "ns/delivery")
			close(stop)
			drained.Wait()
		})
	}
}

// BenchmarkConnWrite measures one connection's writer: a queued delivery
// written to a real WebSocket over loopback.
func BenchmarkConnWrite(b *testing.B) {
	n := startNode(b, &Handler{SendQueue: 1 << 20, RateLimit: &RateLimit{PerSecond: -1}})
	ctx := context.Background()
	client, _, err := websocket.Dial(ctx, n.url("/ws"), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer client.CloseNow()
	client.SetReadLimit(-1)
	if _, _, err := client.Read(ctx); err != nil { // welcome
		b.Fatal(err)
	}
	if err := client.Write(ctx, websocket.MessageText, []byte(`{"op":"subscribe","channel":"room:w","id":1}`)); err != nil {
		b.Fatal(err)
	}
	if _, _, err := client.Read(ctx); err != nil { // ok
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range b.N {
			if _, _, err := client.Read(ctx); err != nil {
				return
			}
		}
	}()
	payload := []byte(`{"type":"message","channel":"room:w","id":"1-a-1","from":"","ts":1,"data":{"text":"` + strings.Repeat("x", 100) + `"}}`)
	h := n.h.hub
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		h.deliver("room:w", payload)
		if i%64 == 63 {
			// Stay below the send queue's bound: this measures writing, not
			// slow-consumer handling.
			for h.queued("room:w") > 128 {
			}
		}
	}
	<-done
}

// queued is how many frames wait in the queues of channel's members.
func (h *hub) queued(channel string) int {
	h.mu.RLock()
	defer h.mu.RUnlock()
	n := 0
	if cs := h.channels[channel]; cs != nil {
		for s := range cs.members.all() {
			n += s.(*conn).send.len()
		}
	}
	return n
}
