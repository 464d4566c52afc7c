package main

import (
	"math"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"
)

// Latencies go into a fixed-size log-linear histogram (the HDR histogram
// idea): values are microseconds; below 256 µs every microsecond has its
// own bucket, above that every power of two is split into 128 buckets, so a
// recorded value is off by less than 0.8 %. The histogram is 32 KiB however
// long the run, and recording is a few atomic adds.
const (
	histSubBits    = 7
	histSub        = 1 << histSubBits // buckets per power of two
	histOctaves    = 30               // up to 2^37 µs, about 38 hours
	histBucketsLen = histSub*2 + (histOctaves-1)*histSub
)

// hist is a latency histogram safe for concurrent use.
type hist struct {
	counts [histBucketsLen]atomic.Uint64
	n      atomic.Uint64
	sumUS  atomic.Uint64
	maxUS  atomic.Uint64
}

func histIndex(us uint64) int {
	if us < 2*histSub {
		return int(us)
	}
	e := bits.Len64(us) - (histSubBits + 1) // us>>e is in [histSub, 2*histSub)
	i := histSub + e*histSub + int(us>>uint(e)) - histSub
	if i >= histBucketsLen {
		return histBucketsLen - 1
	}
	return i
}

// histValue is the middle of bucket i, in microseconds.
func histValue(i int) float64 {
	if i < 2*histSub {
		return float64(i)
	}
	e := (i - histSub) / histSub
	lower := uint64(histSub+(i-histSub)%histSub) << uint(e)
	return float64(lower) + float64(uint64(1)<<uint(e))/2
}

// record adds one latency; negative values (clock skew) count as zero.
func (h *hist) record(d time.Duration) {
	us := uint64(0)
	if d > 0 {
		us = uint64(d / time.Microsecond)
	}
	h.counts[histIndex(us)].Add(1)
	h.n.Add(1)
	h.sumUS.Add(us)
	for {
		m := h.maxUS.Load()
		if us <= m || h.maxUS.CompareAndSwap(m, us) {
			break
		}
	}
}

// merge adds o's counts to h. Not atomic as a whole: call it once recording
// into o has stopped.
func (h *hist) merge(o *hist) {
	for i := range o.counts {
		if c := o.counts[i].Load(); c != 0 {
			h.counts[i].Add(c)
		}
	}
	h.n.Add(o.n.Load())
	h.sumUS.Add(o.sumUS.Load())
	if m := o.maxUS.Load(); m > h.maxUS.Load() {
		h.maxUS.Store(m)
	}
}

// quantile returns the latency below which a fraction q of the values lie, in
// microseconds. The maximum is exact, the others are bucket midpoints.
func (h *hist) quantile(q float64) float64 {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(n)))
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i := range h.counts {
		seen += h.counts[i].Load()
		if seen >= rank {
			v := histValue(i)
			if m := float64(h.maxUS.Load()); v > m {
				v = m
			}
			return v
		}
	}
	return float64(h.maxUS.Load())
}

// latencySummary is what the table and the JSON file show of a histogram.
type latencySummary struct {
	Count  uint64  `json:"count"`
	MeanMS float64 `json:"mean_ms"`
	P50MS  float64 `json:"p50_ms"`
	P90MS  float64 `json:"p90_ms"`
	P99MS  float64 `json:"p99_ms"`
	MaxMS  float64 `json:"max_ms"`
}

func (h *hist) summary() latencySummary {
	n := h.n.Load()
	s := latencySummary{Count: n}
	if n == 0 {
		return s
	}
	s.MeanMS = float64(h.sumUS.Load()) / float64(n) / 1000
	s.P50MS = h.quantile(0.50) / 1000
	s.P90MS = h.quantile(0.90) / 1000
	s.P99MS = h.quantile(0.99) / 1000
	s.MaxMS = float64(h.maxUS.Load()) / 1000
	return s
}

// shardedHist spreads concurrent recorders over a few histograms so that
// thousands of reader goroutines do not all hit the same cache lines.
type shardedHist struct {
	shards [16]hist
}

func (s *shardedHist) shard(i int) *hist { return &s.shards[i%len(s.shards)] }

func (s *shardedHist) merged() *hist {
	var h hist
	for i := range s.shards {
		h.merge(&s.shards[i])
	}
	return &h
}

// seqSet remembers which sequence numbers of one sender a subscriber got.
type seqSet struct {
	bits []uint64
	max  int64 // highest seq seen, -1 for none
}

// add records seq and says whether it was a duplicate or arrived after a
// higher one (out of order).
func (s *seqSet) add(seq int64) (dup, outOfOrder bool) {
	w := int(seq >> 6)
	if w >= len(s.bits) {
		n := 2 * len(s.bits)
		if n <= w {
			n = w + 1
		}
		nb := make([]uint64, n)
		copy(nb, s.bits)
		s.bits = nb
	}
	mask := uint64(1) << uint(seq&63)
	if s.bits[w]&mask != 0 {
		return true, false
	}
	s.bits[w] |= mask
	if seq < s.max {
		return false, true
	}
	s.max = seq
	return false, false
}

// has reports whether seq was recorded.
func (s *seqSet) has(seq int64) bool {
	w := seq >> 6
	return seq >= 0 && w < int64(len(s.bits)) && s.bits[w]&(uint64(1)<<uint(seq&63)) != 0
}

// errorsReceived counts the deliveries to s of publishes answered with an
// error (errSeqs(slot): the seqs its sender in that slot had refused),
// each once: an unavailable publish that had reached the broker before
// publish_timeout ran out is still delivered, and counted among the
// received it would offset a loss of the expected ones.
func (s *subState) errorsReceived(errSeqs func(slot int) []int64) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for slot := range s.senders {
		for _, seq := range errSeqs(slot) {
			if s.senders[slot].has(seq - s.base) {
				n++
			}
		}
	}
	return n
}

// subState is the receive-side accounting of one subscriber for the current
// phase. Its reader goroutine updates it; the scenario resets and reads it
// between phases. The mutex is uncontended except at those moments.
type subState struct {
	mu sync.Mutex
	// senders: one seqSet per sender this subscriber expects messages from
	// (the fanout publisher; the members of a room).
	senders []seqSet
	base    int64 // first seq of the phase; earlier seqs are strays
	limit   int64 // seqs at or above base+limit are strays; 0: no limit
	lat     *hist

	unique, deliveries, dups, outOfOrder, stray int64
	last                                        time.Time
	// reported is the sum of the gap frames' missed counts, gaps their
	// number: messages the server says it did not send, which are not lost.
	reported, gaps int64

	// delivered counts deliveries for the progress line without the lock.
	delivered atomic.Int64
}

func newSubState(senders int) *subState {
	s := &subState{senders: make([]seqSet, senders)}
	for i := range s.senders {
		s.senders[i].max = -1
	}
	return s
}

// reset starts a new phase: seqs in [base, base+limit) are expected.
func (s *subState) reset(base, limit int64, lat *hist) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range s.senders {
		s.senders[i] = seqSet{max: -1}
	}
	s.base, s.limit, s.lat = base, limit, lat
	s.unique, s.deliveries, s.dups, s.outOfOrder, s.stray = 0, 0, 0, 0, 0
	s.reported, s.gaps = 0, 0
	s.last = time.Time{}
	s.delivered.Store(0)
}

// deliver accounts one delivery of (sender slot, seq) sent at t.
func (s *subState) deliver(slot int, seq, sentNanos int64, now time.Time) {
	s.delivered.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	if slot < 0 || slot >= len(s.senders) || seq < s.base || (s.limit > 0 && seq >= s.base+s.limit) {
		s.stray++
		return
	}
	s.deliveries++
	s.last = now
	dup, ooo := s.senders[slot].add(seq - s.base)
	switch {
	case dup:
		s.dups++
		return
	case ooo:
		s.outOfOrder++
	}
	s.unique++
	if s.lat != nil {
		s.lat.record(now.Sub(time.Unix(0, sentNanos)))
	}
}

// gap accounts a gap frame: missed messages of the channel were not sent.
// The frame names no seqs, so a gap is credited to the phase it arrives in.
func (s *subState) gap(missed int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gaps++
	s.reported += missed
}

// uniqueNow is the number of distinct messages received so far this phase.
func (s *subState) uniqueNow() int64 {
	u, _ := s.accountedNow()
	return u
}

// accountedNow is the number of distinct messages received so far this
// phase and the number reported missed.
func (s *subState) accountedNow() (unique, reported int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.unique, s.reported
}

// subTotals sums the accounting of many subscribers.
type subTotals struct {
	unique, deliveries, dups, outOfOrder, stray int64
	reported, gaps                              int64
	last                                        time.Time
}

func sumSubs(subs []*subState) subTotals {
	var t subTotals
	for _, s := range subs {
		s.mu.Lock()
		t.unique += s.unique
		t.deliveries += s.deliveries
		t.dups += s.dups
		t.outOfOrder += s.outOfOrder
		t.stray += s.stray
		t.reported += s.reported
		t.gaps += s.gaps
		if s.last.After(t.last) {
			t.last = s.last
		}
		s.mu.Unlock()
	}
	return t
}
