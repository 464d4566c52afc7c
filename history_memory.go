package caddychat

import (
	"context"
	"sort"
	"sync"
	"time"
	"unsafe"
)

// The in-process broker's history: a ring per channel that grows with use,
// and a cap in bytes on all of them together (history_memory), enforced by
// evicting whole channels, least recently written first.

// Bounds and costs of in-memory history.
const (
	// defaultHistoryMemory is the history_memory default: what a node keeps
	// of all its channels' history, however many channels clients create.
	defaultHistoryMemory = 64 << 20
	minHistoryMemory     = 1 << 20
	maxHistoryMemory     = 1 << 40

	// ringSlotBytes is what one slot of a ring's buffer costs (an id and a
	// slice header), counted for every allocated slot, used or not.
	ringSlotBytes = int64(unsafe.Sizeof(historyEntry{}))
	// channelBytes is what a channel's history costs besides its slots,
	// messages and name: the ring, its map entry, its epoch.
	channelBytes = 256
	// minRingSlots is a new ring's buffer: rings double from it as messages
	// arrive, up to the rule's count, so a count of 1,000,000 costs nothing
	// until a channel holds that many.
	minRingSlots = 8
)

// memoryHistory keeps each channel's last messages in process memory.
type memoryHistory struct {
	mu       sync.Mutex
	channels map[string]*memoryRing
	// lru links the rings by last write: lru.next is the most recently
	// written, lru.prev the least (the next to evict).
	lru memoryRing
	// bytes is what the rings cost (see ringSlotBytes, channelBytes);
	// limit the cap on it, 0 for none (no route set one yet).
	bytes int64
	limit int64
	// limits are the caps of the routes using the hub: the largest applies.
	limits map[any]int64
	// last is the last id given on any channel: ids never repeat within the
	// broker, so a channel evicted and created again in the same
	// millisecond cannot reuse an id its subscribers already saw.
	last streamID
}

// memoryRing is one channel's history: n entries from head, oldest first,
// in a buffer used as a ring.
type memoryRing struct {
	channel    string
	epoch      string
	buf        []historyEntry
	head, n    int
	bytes      int64
	expires    time.Time
	prev, next *memoryRing
}

func (r *memoryRing) at(i int) *historyEntry { return &r.buf[(r.head+i)%len(r.buf)] }

// search returns the index of the first entry whose id is not below id.
func (r *memoryRing) search(id streamID) int {
	return sort.Search(r.n, func(i int) bool { return !r.at(i).id.less(id) })
}

// entries copies the entries from index i to j.
func (r *memoryRing) entries(i, j int) []historyEntry {
	out := make([]historyEntry, 0, j-i)
	for ; i < j; i++ {
		out = append(out, *r.at(i))
	}
	return out
}

func entryBytes(e *historyEntry) int64 { return int64(cap(e.payload)) }

// add counts delta bytes to r, the broker and the metric.
func (m *memoryHistory) add(r *memoryRing, delta int64) {
	r.bytes += delta
	m.bytes += delta
	moduleMetrics().historyBytes.Add(float64(delta))
}

// resize moves r's entries to a buffer of size slots, oldest first.
func (m *memoryHistory) resize(r *memoryRing, size int) {
	buf := make([]historyEntry, size)
	for i := range r.n {
		buf[i] = *r.at(i)
	}
	m.add(r, int64(size-len(r.buf))*ringSlotBytes)
	r.buf, r.head = buf, 0
}

// dropOldest removes r's oldest entry.
func (m *memoryHistory) dropOldest(r *memoryRing) {
	e := r.at(0)
	m.add(r, -entryBytes(e))
	*e = historyEntry{} // so the envelope can be freed
	r.head = (r.head + 1) % len(r.buf)
	r.n--
}

func (m *memoryHistory) unlink(r *memoryRing) {
	r.prev.next, r.next.prev = r.next, r.prev
}

func (m *memoryHistory) pushFront(r *memoryRing) {
	if m.lru.next == nil {
		m.lru.next, m.lru.prev = &m.lru, &m.lru
	}
	r.prev, r.next = &m.lru, m.lru.next
	r.next.prev = r
	m.lru.next = r
}

// remove deletes r's channel history altogether.
func (m *memoryHistory) remove(r *memoryRing) {
	m.unlink(r)
	delete(m.channels, r.channel)
	m.add(r, -r.bytes)
}

// append stores a message and returns its id and envelope; the caller holds
// the broker's publish lock, so ids follow publish order. A channel with no
// history yet gets one unless create says it may not (errNewHistoryLimited).
func (m *memoryHistory) append(channel string, policy *historyPolicy, now time.Time, tail string, create *historyCreation) (streamID, []byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.channels == nil {
		m.channels = make(map[string]*memoryRing)
	}
	r := m.channels[channel]
	if r != nil && now.After(r.expires) {
		m.remove(r)
		r = nil
	}
	if r == nil {
		if create != nil && !create.allowed {
			return streamID{}, nil, errNewHistoryLimited
		}
		r = &memoryRing{channel: channel, epoch: newEpoch()}
		m.channels[channel] = r
		m.add(r, channelBytes+int64(len(channel)))
		if create != nil {
			create.created = true
		}
	} else {
		m.unlink(r)
	}
	m.pushFront(r)

	id := streamID{ms: uint64(now.UnixMilli())}
	if !m.last.less(id) {
		id = streamID{ms: m.last.ms, seq: m.last.seq + 1}
	}
	m.last = id
	r.expires = now.Add(policy.maxAge)
	payload := historyEnvelope(channel, id, r.epoch, tail)

	for r.n >= policy.count {
		m.dropOldest(r)
	}
	switch {
	case len(r.buf) > policy.count:
		m.resize(r, policy.count) // the count was lowered by a reload
	case r.n == len(r.buf):
		m.resize(r, min(max(2*len(r.buf), minRingSlots), policy.count))
	}
	e := r.at(r.n)
	*e = historyEntry{id: id, payload: payload}
	r.n++
	m.add(r, entryBytes(e))
	m.evict(r)
	return id, payload, nil
}

// evict brings the history within the cap: it deletes whole channels,
// least recently written first, and when only keep is left (one channel
// over the cap by itself), keep's oldest messages, never its newest. keep
// nil: the most recently written channel.
func (m *memoryHistory) evict(keep *memoryRing) {
	if keep == nil {
		keep = m.lru.next
	}
	for m.limit > 0 && m.bytes > m.limit && m.lru.prev != nil && m.lru.prev != &m.lru {
		victim := m.lru.prev
		if victim != keep {
			m.remove(victim)
			continue
		}
		if keep.n <= 1 {
			return
		}
		m.dropOldest(keep)
	}
}

// hold sets owner's cap (a route's history_memory, 0 when the route sets
// none): the largest cap set by the routes using the broker applies, the
// default when none sets one, and lowering it evicts at once.
func (m *memoryHistory) hold(owner any, limit int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.limits == nil {
		m.limits = make(map[any]int64)
	}
	m.limits[owner] = limit
	m.applyLimits()
}

func (m *memoryHistory) release(owner any) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.limits, owner)
	m.applyLimits()
}

func (m *memoryHistory) applyLimits() {
	m.limit = 0
	for _, l := range m.limits {
		m.limit = max(m.limit, l)
	}
	if m.limit == 0 && len(m.limits) > 0 {
		m.limit = defaultHistoryMemory
	}
	m.evict(nil)
}

// clear drops every channel's history (the broker is closing).
func (m *memoryHistory) clear() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, r := range m.channels {
		m.remove(r)
	}
}

// sweep deletes the channels whose history expired.
func (m *memoryHistory) sweep(now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, r := range m.channels {
		if now.After(r.expires) {
			m.remove(r)
		}
	}
}

func (m *memoryHistory) removeHistory(_ context.Context, channel string) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.channels[channel]
	if r == nil {
		return false, nil
	}
	m.remove(r)
	return true, nil
}

func (m *memoryHistory) ring(channel string) *memoryRing {
	r := m.channels[channel]
	if r == nil || time.Now().After(r.expires) {
		return nil
	}
	return r
}

func (m *memoryHistory) readSince(_ context.Context, channel string, since streamID, limit int) (historyPage, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.ring(channel)
	if r == nil {
		return historyPage{}, nil
	}
	page := historyPage{epoch: r.epoch}
	i := r.search(since)
	if i < r.n && r.at(i).id == since {
		page.sinceFound = true
		i++
	}
	if r.n-i > limit {
		i, page.more = r.n-limit, true
	}
	page.entries = r.entries(i, r.n)
	return page, nil
}

func (m *memoryHistory) readBefore(_ context.Context, channel string, before *streamID, limit int) (historyPage, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.ring(channel)
	if r == nil {
		return historyPage{}, nil
	}
	page := historyPage{epoch: r.epoch}
	end := r.n
	if before != nil {
		end = r.search(*before)
	}
	start := max(0, end-limit)
	page.more = start > 0
	page.entries = r.entries(start, end)
	return page, nil
}

// holdHistoryMemory applies a route's history_memory to its hub's
// in-process broker (with Redis it has no effect).
func (h *hub) holdHistoryMemory(owner any, limit int64) {
	if b, ok := h.broker.(*memoryBroker); ok {
		b.memoryHistory.hold(owner, limit)
	}
}

func (h *hub) releaseHistoryMemory(owner any) {
	if b, ok := h.broker.(*memoryBroker); ok {
		b.memoryHistory.release(owner)
	}
}
