package caddychat

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// appendN stores messages from..to (their data is the number) on channel.
func appendN(t *testing.T, m *memoryHistory, channel string, p *historyPolicy, from, to int) []streamID {
	t.Helper()
	var ids []streamID
	for i := from; i <= to; i++ {
		tail, err := envelopeTail(sender{}, time.Now().UnixMilli(), json.RawMessage(fmt.Sprint(i)))
		if err != nil {
			t.Fatal(err)
		}
		id, _, err := m.append(channel, p, time.Now(), tail, nil)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	return ids
}

// entryData is the data of kept envelopes, oldest first.
func entryData(t *testing.T, entries []historyEntry) []any {
	t.Helper()
	var out []any
	for _, e := range entries {
		var m map[string]any
		if err := json.Unmarshal(e.payload, &m); err != nil {
			t.Fatalf("kept envelope %q: %v", e.payload, err)
		}
		out = append(out, m["data"])
	}
	return out
}

// recount is the history's cost computed from scratch, to check the
// running count.
func (m *memoryHistory) recount() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var total int64
	for ch, r := range m.channels {
		total += channelBytes + int64(len(ch)) + int64(len(r.buf))*ringSlotBytes
		for i := range r.n {
			total += entryBytes(r.at(i))
		}
	}
	return total
}

func newTestHistory(t *testing.T) *memoryHistory {
	m := &memoryHistory{}
	t.Cleanup(m.clear) // gives the metric back
	return m
}

// TestMemoryRingKeepsTheLastCountAcrossWrapAround: after every publish, for
// counts around the ring's growth steps, the ring holds exactly the last
// count messages in order, and reads forwards and backwards across the
// wrap-around find what they should.
func TestMemoryRingKeepsTheLastCountAcrossWrapAround(t *testing.T) {
	for _, count := range []int{1, 2, 5, 8, 9, 16, 17, 100} {
		m := newTestHistory(t)
		p := &historyPolicy{count: count, maxAge: time.Hour}
		var ids []streamID
		for i := 1; i <= 3*count+5; i++ {
			ids = append(ids, appendN(t, m, "ch", p, i, i)...)
			first := max(1, i-count+1)
			page, _ := m.readBefore(context.Background(), "ch", nil, 1000)
			if got := entryData(t, page.entries); !equalData(got, seq(first, i)) || page.more {
				t.Fatalf("count %d after %d: kept %v (more %v), want %d..%d", count, i, got, page.more, first, i)
			}
			r := m.channels["ch"]
			if len(r.buf) > count || len(r.buf) > max(minRingSlots, 2*r.n) {
				t.Fatalf("count %d after %d: a ring of %d slots for %d entries", count, i, len(r.buf), r.n)
			}
		}
		last := 3*count + 5
		first := last - count + 1
		// Forwards from every kept id, and from one trimmed.
		for k := first; k <= last; k++ {
			page, _ := m.readSince(context.Background(), "ch", ids[k-1], 1000)
			if !page.sinceFound || !equalData(entryData(t, page.entries), seq(k+1, last)) {
				t.Fatalf("count %d: since %d: %v found %v", count, k, entryData(t, page.entries), page.sinceFound)
			}
		}
		if page, _ := m.readSince(context.Background(), "ch", ids[first-2], 1000); page.sinceFound || !equalData(entryData(t, page.entries), seq(first, last)) {
			t.Fatalf("count %d: since a trimmed id: %v found %v", count, entryData(t, page.entries), page.sinceFound)
		}
		// Backwards in pages of 3.
		var got []any
		var before *streamID
		for {
			page, _ := m.readBefore(context.Background(), "ch", before, 3)
			got = append(entryData(t, page.entries), got...)
			if !page.more {
				break
			}
			before = &page.entries[0].id
		}
		if !equalData(got, seq(first, last)) {
			t.Fatalf("count %d: paged %v", count, got)
		}
		if m.bytes != m.recount() {
			t.Fatalf("count %d: counted %d bytes, recount %d", count, m.bytes, m.recount())
		}
	}
}

// TestMemoryRingGrowsWithUse: a count of 1,000,000 allocates nothing up
// front; the ring doubles as messages arrive; once full, a publish costs
// its envelope, not a copy of the ring (today's code copied all count
// entries on every publish).
func TestMemoryRingGrowsWithUse(t *testing.T) {
	m := newTestHistory(t)
	big := &historyPolicy{count: maxHistoryCount, maxAge: time.Hour}
	for _, step := range []struct{ total, slots int }{{1, 8}, {8, 8}, {9, 16}, {17, 32}, {1000, 1024}} {
		appendN(t, m, "big", big, len(m.channels["big"].entriesOrNil())+1, step.total)
		if got := len(m.channels["big"].buf); got != step.slots {
			t.Fatalf("after %d messages the ring has %d slots, want %d", step.total, got, step.slots)
		}
	}

	const count = 100000
	p := &historyPolicy{count: count, maxAge: time.Hour}
	appendN(t, m, "full", p, 1, count)
	tail, _ := envelopeTail(sender{}, 1, json.RawMessage("1"))
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	const extra = 2000
	start := time.Now()
	for range extra {
		if _, _, err := m.append("full", p, time.Now(), tail, nil); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(start)
	runtime.ReadMemStats(&after)
	perPublish := (after.TotalAlloc - before.TotalAlloc) / extra
	t.Logf("a full ring of %d: %d bytes allocated and %v per publish", count, perPublish, took/extra)
	if perPublish > 1024 {
		t.Fatalf("a publish on a full ring of %d allocates %d bytes: it copies the ring", count, perPublish)
	}
	if r := m.channels["full"]; r.n != count || len(r.buf) != count {
		t.Fatalf("full ring: %d entries in %d slots", r.n, len(r.buf))
	}
}

func (r *memoryRing) entriesOrNil() []historyEntry {
	if r == nil {
		return nil
	}
	return r.entries(0, r.n)
}

// TestMemoryHistoryEvictsLeastRecentlyWritten: over the cap, whole
// channels go, the one written longest ago first; a channel over the cap
// by itself keeps its newest messages; the gauge follows.
func TestMemoryHistoryEvictsLeastRecentlyWritten(t *testing.T) {
	gauge := moduleMetrics().historyBytes
	base := testutil.ToFloat64(gauge)
	m := newTestHistory(t)
	p := &historyPolicy{count: 100, maxAge: time.Hour}
	for _, ch := range []string{"a", "b", "c"} {
		appendN(t, m, ch, p, 1, 3)
	}
	appendN(t, m, "a", p, 4, 4) // a is now the most recently written, b the least
	m.hold("route", m.bytes+100)
	appendN(t, m, "d", p, 1, 1)
	if _, ok := m.channels["b"]; ok || len(m.channels) != 3 {
		t.Fatalf("after going over the cap: channels %v, want b evicted", keysOf(m.channels))
	}
	if m.bytes > m.limit || m.bytes != m.recount() {
		t.Fatalf("kept %d bytes (recount %d), cap %d", m.bytes, m.recount(), m.limit)
	}
	if got := testutil.ToFloat64(gauge) - base; got != float64(m.bytes) {
		t.Fatalf("caddy_chat_history_bytes grew by %v, the history keeps %d", got, m.bytes)
	}
	// The evicted channel reads as one without history: no epoch, since
	// not found (a resume reports recovered false).
	if page, _ := m.readSince(context.Background(), "b", streamID{1, 0}, 10); page.epoch != "" || page.sinceFound {
		t.Fatalf("evicted channel: %+v", page)
	}
	epochA := m.channels["a"].epoch

	// Lowering the cap evicts at once, down to the newest channel.
	m.hold("route", minHistoryMemory)
	m.hold("other route", 1)
	m.release("route") // the largest cap left is 1 byte
	if len(m.channels) != 1 || m.channels["d"] == nil || m.channels["d"].n != 1 {
		t.Fatalf("after lowering the cap: channels %v", keysOf(m.channels))
	}
	// Created again, a channel has a new epoch.
	m.release("other route")
	appendN(t, m, "a", p, 1, 1)
	if m.channels["a"].epoch == epochA {
		t.Fatal("a channel evicted and created again kept its epoch")
	}

	// One channel over the cap by itself keeps its newest messages.
	m.hold("route", minHistoryMemory)
	big := strings.Repeat("x", 4000)
	tail, _ := envelopeTail(sender{}, 1, json.RawMessage(`"`+big+`"`))
	var ids []streamID
	for range 1000 {
		id, _, err := m.append("huge", &historyPolicy{count: 1000, maxAge: time.Hour}, time.Now(), tail, nil)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	r := m.channels["huge"]
	if m.bytes > m.limit || len(m.channels) != 1 || r.n < 200 || r.n >= 1000 || r.at(r.n-1).id != ids[len(ids)-1] {
		t.Fatalf("one channel over the cap: %d channels, %d entries, %d bytes of %d", len(m.channels), r.n, m.bytes, m.limit)
	}
	if page, _ := m.readSince(context.Background(), "huge", ids[len(ids)-1-r.n], 10); page.sinceFound {
		t.Fatal("an id trimmed by the cap was found")
	}
	m.clear()
	if got := testutil.ToFloat64(gauge) - base; got != 0 || m.bytes != 0 {
		t.Fatalf("after clear: gauge %+v, bytes %d", got, m.bytes)
	}
}

func keysOf[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestHistoryMemoryCapHoldsUnderFreshChannelFlood: with the creation limit
// off, a client publishes on 10,000 fresh channels; the node's history
// stays within history_memory (1 MiB here), a resume on an evicted channel
// says recovered false, the channel comes back with a new epoch, and
// publishing and subscribing keep working.
func TestHistoryMemoryCapHoldsUnderFreshChannelFlood(t *testing.T) {
	const limit = 1 << 20
	n := startNode(t, &Handler{
		ChannelPrefix:      ptr(uniquePrefix()),
		History:            []HistoryRule{{Channels: "room:**", Count: 100}},
		HistoryMemory:      limit,
		HistoryNewChannels: &NewChannelLimit{Count: -1},
		RateLimit:          &RateLimit{PerSecond: -1},
		SendQueue:          8 << 20,
		PingInterval:       caddy.Duration(time.Hour),
	})
	mem := &n.h.hub.broker.(*memoryBroker).memoryHistory
	c := dial(t, n.url("/"), nil)
	last := ""
	for i := 1; i <= 3; i++ {
		last = c.publishOK("room:keep", i, float64(i))
	}
	epoch := historyEpoch(t, c, "room:keep")

	before := heapInUse()
	start := time.Now()
	replies := floodFreshChannels(t, c, "room:fresh-", 10000, 512)
	took := time.Since(start)
	after := heapInUse()
	mem.mu.Lock()
	kept, channels := mem.bytes, len(mem.channels)
	mem.mu.Unlock()
	t.Logf("10,000 fresh channels, 512 B each, in %v: replies %v; history %d bytes in %d channels (cap %d), gauge %v; live heap %+d bytes",
		took.Round(time.Millisecond), replies, kept, channels, limit, testutil.ToFloat64(moduleMetrics().historyBytes), int64(after)-int64(before))
	if replies["ok"] != 10000 {
		t.Fatalf("replies %v", replies)
	}
	if kept > limit || kept != mem.recount() || channels >= 10000 {
		t.Fatalf("history keeps %d bytes (recount %d) in %d channels, cap %d", kept, mem.recount(), channels, limit)
	}
	if grew := int64(after) - int64(before); grew > 8*limit {
		t.Fatalf("live heap grew by %d bytes with a history cap of %d", grew, limit)
	}

	sub := dial(t, n.url("/"), nil)
	r := sub.request(map[string]any{"op": "subscribe", "channel": "room:keep", "since": last, "epoch": epoch, "id": "resume"})
	if r["type"] != "ok" || r["recovered"] != false || r["replayed"] != float64(0) {
		t.Fatalf("resume on an evicted channel: %v", r)
	}
	c.publishOK("room:keep", 4, 4)
	if data, _ := sub.messages("room:keep", 1); !equalData(data, seq(4, 4)) {
		t.Fatalf("live after eviction: %v", data)
	}
	if e := historyEpoch(t, c, "room:keep"); e == epoch || e == "" {
		t.Fatalf("the channel created again has epoch %q, the evicted one had %q", e, epoch)
	}
}

// TestHistoryMemoryLargestCapOfTheHubApplies: routes sharing a hub share
// one cap, the largest they set; when that route goes, the next largest.
func TestHistoryMemoryLargestCapOfTheHubApplies(t *testing.T) {
	prefix := uniquePrefix()
	a := startNode(t, &Handler{ChannelPrefix: &prefix, HistoryMemory: 2 << 20})
	b := &Handler{ChannelPrefix: &prefix, HistoryMemory: 5 << 20}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := b.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	if a.h.hub != b.hub {
		t.Fatal("the routes do not share a hub")
	}
	mem := &a.h.hub.broker.(*memoryBroker).memoryHistory
	limit := func() int64 { mem.mu.Lock(); defer mem.mu.Unlock(); return mem.limit }
	if got := limit(); got != 5<<20 {
		t.Fatalf("cap %d with routes of 2 MiB and 5 MiB, want 5 MiB", got)
	}
	if err := b.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if got := limit(); got != 2<<20 {
		t.Fatalf("cap %d once the 5 MiB route is gone, want 2 MiB", got)
	}
	// A route that sets none leaves the cap to the others ...
	c := startNode(t, &Handler{ChannelPrefix: &prefix})
	if got := limit(); got != 2<<20 {
		t.Fatalf("cap %d after a route without history_memory joined, want 2 MiB", got)
	}
	// ... and when it is the only one, the default applies.
	if err := a.h.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if got := limit(); got != defaultHistoryMemory {
		t.Fatalf("cap %d with one route that sets none, want the default", got)
	}
	_ = c
	if d := (&Handler{}); d.HistoryMemory == 0 {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		defer cancel()
		d.ChannelPrefix = ptr(uniquePrefix())
		if err := d.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		defer d.Cleanup()
		if d.HistoryMemory != defaultHistoryMemory || d.HistoryNewChannels.Count != defaultNewChannels || time.Duration(d.HistoryNewChannels.Per) != time.Minute {
			t.Fatalf("defaults: history_memory %d, history_new_channels %+v", d.HistoryMemory, d.HistoryNewChannels)
		}
	}
}
