package caddychat

import (
	"bytes"
	"sync/atomic"
	"time"
)

// Broker lag: how long a message took from its publishing node to this
// node's hub. Every envelope a node publishes carries "ts", the publishing
// node's clock in Unix milliseconds when it encoded the message
// (envelope.go, ephemeral.go); when the broker hands the message to a hub,
// now − ts is observed in caddy_chat_broker_lag_seconds and kept in the
// hub's lagWindow for caddy_chat_broker_lag_max_seconds.
//
// What it includes: the publish round trip to Redis, Redis's output buffer
// for this node's subscription, the socket, go-redis's receive buffer and
// the messages ahead of it on the node's delivering goroutine (which
// delivers one message at a time): exactly the backlog that no send queue
// sees. And the clock skew between the publishing node and this one, as
// both clocks are read: a few milliseconds under NTP.
//
// What it leaves out: payloads without the node stamp (a backend's plain
// PUBLISH carries no trusted time), presence events (no ts), control
// messages, and what a resync reads from history (deliverBody called
// directly: its ts is the message's age, not a delay of the live path).

// lagSkewLimit bounds a plausible lag both ways. A ts ahead of this node's
// clock by less is clock skew, observed as 0; a ts further off either way
// was not written by a node's clock (anyone with Redis access can publish
// a stamped payload) and is ignored, so that it poisons neither the
// histogram's sum nor the max gauge. No message waits an hour in Redis
// pub/sub: its output-buffer limit cuts the subscription long before.
const lagSkewLimit = time.Hour

// lagWindowSpan is how long a lag stays in the max gauge: it reports the
// largest lag of the last one to two spans, and 0 once no stamped message
// arrived for two.
const lagWindowSpan = 10 * time.Second

// observeLag records the broker lag of a stamped body (the payload after
// the node stamp) that reached the hub at now. It runs once per message,
// not per subscriber, and allocates nothing. It returns the publish time
// (Unix ns) when the body has a plausible one.
func (h *hub) observeLag(body []byte, now time.Time) (born int64, ok bool) {
	ts, ok := envelopeTS(body)
	if !ok {
		return 0, false
	}
	lag := now.Sub(time.UnixMilli(ts))
	if lag < -lagSkewLimit || lag > lagSkewLimit {
		return 0, false
	}
	lag = max(lag, 0)
	moduleMetrics().brokerLag.Observe(lag.Seconds())
	h.lag.observe(now.UnixNano(), int64(lag))
	return ts * int64(time.Millisecond), true
}

// envelopeTS returns the "ts" of a stamped body (a message's envelope or an
// ephemeral payload), without decoding it: the first `,"ts":<digits>`
// followed by `,"data":`, as both envelopes put data right after ts. Only
// the sender's info (from the connect hook, ahead of ts) can hold another
// such key; what a client chooses (data) comes after. ok is false when
// there is none, or it does not fit an int64 or is 0.
func envelopeTS(body []byte) (ts int64, ok bool) {
	const key, next = `,"ts":`, `,"data":`
	for {
		i := bytes.Index(body, []byte(key))
		if i < 0 {
			return 0, false
		}
		body = body[i+len(key):]
		n, digits := int64(0), 0
		for _, b := range body {
			if b < '0' || b > '9' {
				break
			}
			if digits == 18 {
				return 0, false // beyond any Unix ms a clock gives
			}
			n = n*10 + int64(b-'0')
			digits++
		}
		if digits > 0 && bytes.HasPrefix(body[digits:], []byte(next)) {
			return n, n > 0
		}
	}
}

// lagWindow keeps the largest lag of the current span and the previous
// one. Deliveries may run on several goroutines at once (the memory
// broker's publishers, a cluster's shards), hence atomics; a lag recorded
// as a span turns over may land in either span, which a gauge can afford.
type lagWindow struct {
	start atomic.Int64 // unix ns when the current span began
	cur   atomic.Int64 // largest lag (ns) of the current span
	prev  atomic.Int64 // of the previous span
}

func (w *lagWindow) observe(now, lag int64) {
	if start := w.start.Load(); now-start >= int64(lagWindowSpan) && w.start.CompareAndSwap(start, now) {
		if now-start >= 2*int64(lagWindowSpan) {
			w.prev.Store(0) // nothing arrived during the previous span
		} else {
			w.prev.Store(w.cur.Load())
		}
		w.cur.Store(0)
	}
	for {
		old := w.cur.Load()
		if lag <= old || w.cur.CompareAndSwap(old, lag) {
			return
		}
	}
}

// max is the largest lag of the last one to two spans at now.
func (w *lagWindow) max(now int64) time.Duration {
	age := now - w.start.Load()
	switch {
	case age >= 2*int64(lagWindowSpan):
		return 0
	case age >= int64(lagWindowSpan):
		return time.Duration(w.cur.Load()) // the current span is the previous one by now
	}
	return time.Duration(max(w.cur.Load(), w.prev.Load()))
}

// maxLag is the largest recent broker lag of every live hub, in seconds.
func (s *hubSet) maxLag() float64 {
	now := time.Now().UnixNano()
	var worst time.Duration
	s.Range(func(k, _ any) bool {
		worst = max(worst, k.(*hub).lag.max(now))
		return true
	})
	return worst.Seconds()
}
