package caddychat

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/caddyserver/caddy/v2"
)

// TestRedisHistoryTrimmedAndExpiring: against a real redis-server, every
// publish trims a channel's stream to the rule's count and sets both its
// keys to expire after the rule's max age; once expired, the keys are gone,
// a resume says recovered false, and the channel starts a new epoch.
func TestRedisHistoryTrimmedAndExpiring(t *testing.T) {
	rs := redistest.Start(t)
	ctx := context.Background()
	rdb := rs.Client()
	h := &Handler{Redis: rs.URL(), ChannelPrefix: ptr(uniquePrefix()), History: []HistoryRule{
		{Channels: "short:*", Count: 10, MaxAge: caddy.Duration(2 * time.Second)},
		{Count: 5},
	}}
	n := startNode(t, h)
	c := dial(t, n.url("/"), nil)
	pad := strings.Repeat("x", 1024)
	last := ""
	for i := 1; i <= 25; i++ {
		last = c.publishOK("short:a", map[string]any{"n": i, "pad": pad}, float64(i))
	}
	for i := 1; i <= 12; i++ {
		c.publishOK("long:b", i, float64(100+i))
	}
	epoch := historyEpoch(t, c, "short:a")
	short, long := *h.ChannelPrefix+"short:a", *h.ChannelPrefix+"long:b"
	for _, tc := range []struct {
		name        string
		count       int64
		ttlMin, ttl time.Duration
	}{{short, 10, time.Second, 2 * time.Second}, {long, 5, 24*time.Hour - time.Minute, 24 * time.Hour}} {
		if got := rdb.XLen(ctx, historyStreamKey(tc.name)).Val(); got != tc.count {
			t.Errorf("XLEN %s = %d, want %d", historyStreamKey(tc.name), got, tc.count)
		}
		for _, key := range []string{historyStreamKey(tc.name), historyEpochKey(tc.name)} {
			if ttl := rdb.PTTL(ctx, key).Val(); ttl < tc.ttlMin || ttl > tc.ttl {
				t.Errorf("PTTL %s = %v, want within (%v, %v]", key, ttl, tc.ttlMin, tc.ttl)
			}
		}
	}
	usage := rdb.MemoryUsage(ctx, historyStreamKey(short)).Val()
	t.Logf("a stream of 10 messages of 1 KiB of data: MEMORY USAGE %d bytes", usage)
	if usage > 2*10*1024+4096 {
		t.Errorf("a stream of 10 messages of 1 KiB uses %d bytes", usage)
	}

	deadline := time.Now().Add(10 * time.Second)
	for rdb.Exists(ctx, historyStreamKey(short), historyEpochKey(short)).Val() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the keys of %s did not expire", short)
		}
		time.Sleep(100 * time.Millisecond)
	}
	r := c.request(map[string]any{"op": "subscribe", "channel": "short:a", "since": last, "epoch": epoch, "id": "resume"})
	if r["recovered"] != false || r["replayed"] != float64(0) {
		t.Fatalf("resume after expiry: %v", r)
	}
	c.publishOK("short:a", "again", 200)
	if e := historyEpoch(t, c, "short:a"); e == epoch {
		t.Fatal("an expired history kept its epoch")
	}
}

// TestRedisLostStreamGetsNewEpoch: when the stream goes but its epoch key
// stays (maxmemory with a volatile-* policy evicts keys one by one), the
// next publish starts a new epoch, so a resume says recovered false through
// the epoch as well as through the missing id, and gets the new epoch whole.
func TestRedisLostStreamGetsNewEpoch(t *testing.T) {
	rs := redistest.Start(t)
	h := &Handler{Redis: rs.URL(), ChannelPrefix: ptr(uniquePrefix()), History: []HistoryRule{{Count: 100}}}
	n := startNode(t, h)
	c := dial(t, n.url("/"), nil)
	last := ""
	for i := 1; i <= 3; i++ {
		last = c.publishOK("room:x", i, float64(i))
	}
	epoch := historyEpoch(t, c, "room:x")
	rs.Do("DEL", historyStreamKey(*h.ChannelPrefix+"room:x"))
	c.publishOK("room:x", 4, 4)
	if e := historyEpoch(t, c, "room:x"); e == epoch {
		t.Fatal("a history whose stream was lost kept its epoch")
	}
	r := c.request(map[string]any{"op": "subscribe", "channel": "room:x", "since": last, "epoch": epoch, "id": "resume"})
	// The new epoch holds message 4 only: all of it is newer than since.
	if r["recovered"] != false || r["replayed"] != float64(1) || r["epoch"] == epoch {
		t.Fatalf("resume after the stream was lost: want recovered false, the new epoch and replayed 1, got %v", r)
	}
	if data, _ := c.messages("room:x", 1); !equalData(data, seq(4, 4)) {
		t.Fatalf("replayed %v, want the new epoch's message 4", data)
	}
}

// TestRedisMaxmemoryEvictionReportsLoss: a Redis bounded with maxmemory
// and volatile-lru (the history keys all have a TTL) stays within it under
// a flood of fresh history channels, and a resume on a channel whose
// stream it evicted says recovered false.
func TestRedisMaxmemoryEvictionReportsLoss(t *testing.T) {
	rs := redistest.Start(t)
	ctx := context.Background()
	rdb := rs.Client()
	const maxmemory = 4 << 20
	rs.Do("CONFIG", "SET", "maxmemory", strconv.Itoa(maxmemory))
	rs.Do("CONFIG", "SET", "maxmemory-policy", "volatile-lru")
	h := &Handler{
		Redis: rs.URL(), ChannelPrefix: ptr(uniquePrefix()),
		History:            []HistoryRule{{Channels: "room:**", Count: 100}},
		HistoryNewChannels: &NewChannelLimit{Count: -1},
		RateLimit:          &RateLimit{PerSecond: -1},
		SendQueue:          8 << 20,
		PingInterval:       caddy.Duration(time.Hour),
	}
	n := startNode(t, h)
	c := dial(t, n.url("/"), nil)
	first := c.publishOK("room:first", 1, 1)
	epoch := historyEpoch(t, c, "room:first")
	replies := floodFreshChannels(t, c, "room:fresh-", 3000, 4096)
	info := rdb.Info(ctx, "memory", "stats").Val()
	used, evicted := infoField(info, "used_memory"), infoField(info, "evicted_keys")
	t.Logf("3,000 fresh channels of 4 KiB (12 MiB) into maxmemory %d: replies %v; used_memory %s, evicted_keys %s", maxmemory, replies, used, evicted)
	if u, _ := strconv.Atoi(used); u > maxmemory+(1<<20) || evicted == "0" {
		t.Fatalf("used_memory %s, evicted_keys %s with maxmemory %d", used, evicted, maxmemory)
	}
	// Find channels whose stream is gone: the first one, or an early fresh one.
	lost := 0
	for i := range 3000 {
		if rdb.Exists(ctx, historyStreamKey(fmt.Sprintf("%sroom:fresh-%d", *h.ChannelPrefix, i))).Val() == 0 {
			lost++
		}
	}
	t.Logf("%d of 3,000 fresh channels lost their stream", lost)
	if rdb.Exists(ctx, historyStreamKey(*h.ChannelPrefix+"room:first")).Val() == 0 {
		r := c.request(map[string]any{"op": "subscribe", "channel": "room:first", "since": first, "epoch": epoch, "id": "resume"})
		if r["type"] != "ok" || r["recovered"] != false {
			t.Fatalf("resume on an evicted history: %v", r)
		}
	} else {
		t.Log("room:first was not evicted (volatile-lru samples keys)")
	}
}

func infoField(info, name string) string {
	for _, line := range strings.Split(info, "\r\n") {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			return v
		}
	}
	return ""
}
