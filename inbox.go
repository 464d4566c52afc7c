package caddychat

import (
	"sync"
	"sync/atomic"
	"time"
)

// The inbox stands between a Redis broker's receive loop and the hub's
// fan-out. Fanning one message out to thousands of local subscribers takes
// far longer than reading it off the pub/sub socket; when the loop did both,
// a node that could not keep up left the backlog in Redis's output buffer
// for its subscription, where no metric saw it, until Redis cut the
// subscription and the messages were lost without a word. Now the receive
// loop only appends to the inbox, so Redis's buffer stays small, and one
// delivering goroutine empties the inbox in order: the backlog is in the
// node, bounded in bytes (inboxLimit), shown in
// caddy_chat_broker_backlog_bytes, and what waited too long is skipped and
// reported (late.go) instead of delivered late.
//
// The memory broker has no inbox: it delivers on the publisher's goroutine,
// so a node that cannot keep up slows its publishers down instead.

// inboxLimit bounds the bytes waiting in one hub's inbox. Beyond it a
// message is dropped and reported to the channel's clients as missed, as a
// late one is.
const inboxLimit = 64 << 20

// inboxItemOverhead is what an item counts for beyond its channel and
// payload: the item itself and go-redis's message it was read from.
const inboxItemOverhead = 96

// inboxItem is one message read from the broker, or a resync to run at its
// place in the order (the subscription was restored after an outage).
type inboxItem struct {
	channel  string
	payload  []byte
	received int64 // Unix ns when the receive loop read it
	resync   bool
}

func (it *inboxItem) size() int64 {
	return int64(len(it.channel)+len(it.payload)) + inboxItemOverhead
}

type inbox struct {
	h *hub

	mu    sync.Mutex
	items []inboxItem
	// dropped counts, per channel, the messages refused because the inbox
	// was full; one entry per channel the node is subscribed to at most.
	dropped map[string]int

	// bytes is what items and the batch being delivered count for.
	bytes atomic.Int64

	wake    chan struct{}
	done    chan struct{}
	stopped chan struct{}
}

func newInbox(h *hub) *inbox {
	in := &inbox{h: h, wake: make(chan struct{}, 1), done: make(chan struct{}), stopped: make(chan struct{})}
	go in.run()
	return in
}

// push is the Redis brokers' deliverFunc. Control messages bypass the
// inbox: the server API must keep working on a node that is behind, and
// their own queue is bounded (control.go).
func (in *inbox) push(channel string, payload []byte) {
	if channel != "" && channel[0] == '#' {
		in.h.deliverRecovering(channel, payload)
		return
	}
	in.add(inboxItem{channel: channel, payload: payload, received: time.Now().UnixNano()})
}

// pushResync is the Redis brokers' restored callback: the resync runs after
// the messages received before the outage and before any received after.
func (in *inbox) pushResync() {
	in.add(inboxItem{resync: true})
}

func (in *inbox) add(it inboxItem) {
	size := it.size()
	in.mu.Lock()
	if !it.resync && in.bytes.Load()+size > inboxLimit {
		if in.dropped == nil {
			in.dropped = make(map[string]int)
		}
		in.dropped[it.channel]++
		in.mu.Unlock()
		in.signal()
		return
	}
	in.items = append(in.items, it)
	in.bytes.Add(size)
	first := len(in.items) == 1
	in.mu.Unlock()
	if first {
		in.signal()
	}
}

func (in *inbox) signal() {
	select {
	case in.wake <- struct{}{}:
	default:
	}
}

// batchKeep is the capacity a drained batch keeps for the next one; a
// larger one (after a burst) is let go.
const batchKeep = 4096

// run is the hub's delivering goroutine: it takes everything waiting at
// once, delivers it in order, and when the inbox is empty tells the
// channels' clients of the messages they missed (late.go).
func (in *inbox) run() {
	defer close(in.stopped)
	var batch []inboxItem
	for {
		select {
		case <-in.done:
			return
		default:
		}
		in.mu.Lock()
		batch, in.items = in.items, batch[:0]
		dropped := in.dropped
		in.dropped = nil
		in.mu.Unlock()
		if len(batch) == 0 && dropped == nil {
			in.h.reportGaps()
			select {
			case <-in.wake:
				continue
			case <-in.done:
				return
			}
		}
		for channel, n := range dropped {
			in.h.skipDropped(channel, n)
		}
		var size int64
		for i := range batch {
			it := &batch[i]
			size += it.size()
			if it.resync {
				in.h.resyncRecovering()
			} else {
				in.h.deliverReceivedRecovering(it.channel, it.payload, it.received)
			}
		}
		clear(batch) // let the payloads go
		in.bytes.Add(-size)
		if cap(batch) > batchKeep {
			batch = nil
		}
	}
}

// close stops the delivering goroutine, after the broker stopped pushing.
// What still waits is not delivered: the hub is closing its connections.
func (in *inbox) close() {
	close(in.done)
	<-in.stopped
}

// backlogBytes is what waits in the inboxes of every live hub.
func (s *hubSet) backlogBytes() float64 {
	var total int64
	s.Range(func(k, _ any) bool {
		if in := k.(*hub).inbox; in != nil {
			total += in.bytes.Load()
		}
		return true
	})
	return float64(total)
}
