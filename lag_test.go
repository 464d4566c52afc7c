package caddychat

import (
	"encoding/json"
	"strconv"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// lagHistogram reads caddy_chat_broker_lag_seconds's count and sum.
func lagHistogram(t *testing.T) (count uint64, sum float64) {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(moduleMetrics().brokerLag)
	mfs, err := reg.Gather()
	if err != nil || len(mfs) != 1 || len(mfs[0].GetMetric()) != 1 {
		t.Fatalf("gathering the lag histogram: %v, %v", mfs, err)
	}
	h := mfs[0].GetMetric()[0].GetHistogram()
	return h.GetSampleCount(), h.GetSampleSum()
}

// TestEnvelopeTSLag: the ts of every envelope a node publishes is found,
// without allocating; anything else is not a ts.
func TestEnvelopeTSLag(t *testing.T) {
	now := time.UnixMilli(1_700_000_000_123)
	want := now.UnixMilli()
	plain, err := Publication{Channel: "room:a", From: "alice", Data: json.RawMessage(`{"ts":1,"data":2}`)}.payload("1-n-1", now)
	if err != nil {
		t.Fatal(err)
	}
	ephemeral, err := Publication{Channel: "room:a", Ephemeral: true, conn: "n-7", Data: json.RawMessage(`",\"ts\":5,\"data\":"`)}.payload("", now)
	if err != nil {
		t.Fatal(err)
	}
	// The connect hook's info comes ahead of ts and may hold the same key.
	tail, err := envelopeTail(sender{User: "bob", Info: json.RawMessage(`{"n":{"ts":7},"x":1,"ts":8,"y":2}`)}, want, json.RawMessage(`"hi"`))
	if err != nil {
		t.Fatal(err)
	}
	kept := historyEnvelope("room:a", streamID{ms: 5, seq: 1}, "ep", tail)
	for name, p := range map[string][]byte{"message": plain, "ephemeral": ephemeral} {
		body, ok := unstamp(p)
		if !ok {
			t.Fatalf("%s payload not stamped: %q", name, p)
		}
		if got, ok := envelopeTS(body); !ok || got != want {
			t.Errorf("envelopeTS(%s %q) = %d, %v; want %d", name, body, got, ok, want)
		}
	}
	if got, ok := envelopeTS(kept); !ok || got != want {
		t.Errorf("envelopeTS(kept %q) = %d, %v; want %d", kept, got, ok, want)
	}

	for _, body := range []string{
		`{"type":"join","channel":"room:a","user":"alice"}`,
		`hello`,
		``,
		`{"type":"message","ts":"123","data":1}`,
		`{"type":"message","ts":-5,"data":1}`,
		`{"type":"message","ts":0,"data":1}`,
		`{"type":"message","ts":99999999999999999999999,"data":1}`,
		`{"type":"message","ts":12}`,
		`{"type":"message","ts":12,"data"`,
		`{"type":"message","ts":`,
	} {
		if got, ok := envelopeTS([]byte(body)); ok {
			t.Errorf("envelopeTS(%q) = %d, true; want none", body, got)
		}
	}

	body, _ := unstamp(plain)
	if n := testing.AllocsPerRun(100, func() { envelopeTS(body); envelopeTS(kept) }); n != 0 {
		t.Errorf("envelopeTS allocates %v times; it runs once per delivered message", n)
	}
}

// TestBrokerLagWindow: the max gauge holds a lag for one to two spans,
// then falls back to 0; a smaller lag does not hide a larger one.
func TestBrokerLagWindow(t *testing.T) {
	var w lagWindow
	span := int64(lagWindowSpan)
	t0 := time.Now().UnixNano()
	w.observe(t0, int64(3*time.Second))
	w.observe(t0+1, int64(time.Second))
	if got := w.max(t0 + 2); got != 3*time.Second {
		t.Fatalf("max right after = %v, want 3s", got)
	}
	// The next span: the previous span's 3 s still shows.
	w.observe(t0+span+1, int64(time.Millisecond))
	if got := w.max(t0 + span + 2); got != 3*time.Second {
		t.Errorf("max one span later = %v, want 3s", got)
	}
	// Two spans on, only the newer span's lag is left.
	if got := w.max(t0 + 2*span + 2); got != time.Millisecond {
		t.Errorf("max two spans later = %v, want 1ms", got)
	}
	if got := w.max(t0 + 3*span + 2); got != 0 {
		t.Errorf("max with nothing for two spans = %v, want 0", got)
	}
	// After a quiet gap of more than two spans nothing old comes back.
	w.observe(t0+10*span, int64(2*time.Millisecond))
	if got := w.max(t0 + 10*span + 1); got != 2*time.Millisecond {
		t.Errorf("max after a gap = %v, want 2ms", got)
	}
}

// TestBrokerLagMeasuredWhenDeliverySlowed: with the node's delivering
// goroutine slowed, messages wait behind one another on the Redis path,
// and the lag histogram and the max gauge show it.
func TestBrokerLagMeasuredWhenDeliverySlowed(t *testing.T) {
	const channel, delay, msgs = "lag:slow", 150 * time.Millisecond, 4
	hook := func(ch string) {
		if ch == channel {
			time.Sleep(delay)
		}
	}
	testHookDeliver.Store(&hook)
	t.Cleanup(func() { testHookDeliver.Store(nil) })
	rs := redistest.Start(t)
	n := startNode(t, &Handler{Redis: rs.URL(), ChannelPrefix: ptr(uniquePrefix())})

	sub := dial(t, n.url("/ws"), nil)
	sub.next("welcome")
	sub.subscribe(channel, 1)
	pub := dial(t, n.url("/ws"), nil)
	pub.next("welcome")
	count0, sum0 := lagHistogram(t)
	// Acknowledged once Redis has them: all published before the first
	// delivery ends, so message i waits about (i+1) × delay.
	for i := range msgs {
		pub.publishOK(channel, i, float64(10+i))
	}
	sub.messages(channel, msgs)

	count, sum := lagHistogram(t)
	if count-count0 != msgs {
		t.Errorf("lag histogram counted %d messages, want %d", count-count0, msgs)
	}
	// Each waited at least its own delay; together about 1+2+3+4 delays.
	if got, min := sum-sum0, float64(msgs)*delay.Seconds(); got < min {
		t.Errorf("lag histogram sum grew by %.3fs, want at least %.3fs", got, min)
	}
	// The last one waited behind all the others.
	hubMax := n.h.hub.lag.max(time.Now().UnixNano())
	if hubMax < (msgs-1)*delay {
		t.Errorf("hub's max lag %v, want at least %v", hubMax, (msgs-1)*delay)
	}
	if got := testutil.ToFloat64(moduleMetrics().brokerLagMax); got < hubMax.Seconds() || got < delay.Seconds() {
		t.Errorf("caddy_chat_broker_lag_max_seconds = %v, want at least %v (the hub's) and the injected %v", got, hubMax.Seconds(), delay)
	}
}

// TestBrokerLagIgnoresUnstampedAndGarbage: a backend's plain PUBLISH is not
// observed; a stamped payload whose ts is garbage or far off is delivered
// but not observed, and one slightly ahead (clock skew) counts as 0. None
// panics or moves the max gauge; a real message afterwards is measured.
func TestBrokerLagIgnoresUnstampedAndGarbage(t *testing.T) {
	rs := redistest.Start(t)
	prefix := uniquePrefix()
	n := startNode(t, &Handler{Redis: rs.URL(), ChannelPrefix: ptr(prefix)})
	const channel = "lag:garbage"
	sub := dial(t, n.url("/ws"), nil)
	sub.next("welcome")
	sub.subscribe(channel, 1)
	panics0 := testutil.ToFloat64(moduleMetrics().panics)
	count0, sum0 := lagHistogram(t)

	forged := func(ts string) string {
		return nodeStamp + `{"type":"message","channel":"` + channel + `","id":"f-1","from":"","ts":` + ts + `,"data":"forged"}`
	}
	nowMS := time.Now().UnixMilli()
	for _, p := range []string{
		`plain backend message`,
		`{"type":"message","channel":"lag:garbage","id":"p-1","from":"","ts":1,"data":"unstamped"}`,
		forged(strconv.FormatInt(nowMS+10*365*24*3600*1000, 10)), // ten years ahead
		forged("1"), // 1970
		forged(`"soon"`),
		forged("99999999999999999999999"),
		forged("-5"),
	} {
		redisPublish(t, rs, prefix+channel, p)
		sub.next("message")
	}
	if got := testutil.ToFloat64(moduleMetrics().panics); got != panics0 {
		t.Fatalf("panics went from %v to %v", panics0, got)
	}
	if count, sum := lagHistogram(t); count != count0 || sum != sum0 {
		t.Errorf("lag histogram moved on unstamped or garbage ts: count %d→%d, sum %v→%v", count0, count, sum0, sum)
	}
	if got := n.h.hub.lag.max(time.Now().UnixNano()); got != 0 {
		t.Errorf("hub's max lag %v after garbage only, want 0", got)
	}

	// Ten minutes ahead is clock skew: observed, as 0.
	redisPublish(t, rs, prefix+channel, forged(strconv.FormatInt(nowMS+10*60*1000, 10)))
	sub.next("message")
	if count, sum := lagHistogram(t); count != count0+1 || sum != sum0 {
		t.Errorf("a ts ahead by clock skew: count %d→%d (want +1), sum %v→%v (want +0)", count0, count, sum0, sum)
	}

	// A real message is measured, and the gauge is sane.
	pub := dial(t, n.url("/ws"), nil)
	pub.next("welcome")
	pub.publishOK(channel, "real", 2)
	sub.next("message")
	count, sum := lagHistogram(t)
	if count != count0+2 {
		t.Errorf("after a real message the histogram counted %d, want %d", count-count0, 2)
	}
	if got := sum - sum0; got < 0 || got > 1 {
		t.Errorf("a real message on loopback lagged %vs", got)
	}
	if got := n.h.hub.lag.max(time.Now().UnixNano()); got > time.Second {
		t.Errorf("hub's max lag %v, want under 1s", got)
	}
}
