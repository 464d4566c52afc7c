package caddychat

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// heapInUse is the live heap after a full collection.
func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// floodFreshChannels publishes one message of size bytes on each of n
// channel names never used before, all sent at once, and counts the
// replies by code ("ok" for accepted).
func floodFreshChannels(t *testing.T, c *testClient, prefix string, n, size int) map[string]int {
	t.Helper()
	pad := strings.Repeat("x", size)
	go func() {
		for i := range n {
			c.send(map[string]any{"op": "publish", "channel": fmt.Sprintf("%s%d", prefix, i), "data": pad, "id": fmt.Sprintf("flood-%d", i)})
		}
	}()
	replies := map[string]int{}
	deadline := time.After(120 * time.Second)
	for got := 0; got < n; {
		select {
		case m, ok := <-c.frames:
			if !ok {
				t.Fatalf("flooding connection closed after %d replies: %v", got, <-c.closed)
			}
			id, _ := m["id"].(string)
			if !strings.HasPrefix(id, "flood-") {
				continue
			}
			got++
			if m["type"] == "ok" {
				replies["ok"]++
			} else {
				replies[fmt.Sprint(m["code"])]++
			}
		case <-deadline:
			t.Fatalf("flood: %d replies of %d within 120s: %v", len(replies), n, replies)
		}
	}
	return replies
}

// TestFreshChannelFloodIsBounded is issue 14's attack: one client publishes
// on 10,000 channel names never used before under a history rule, with the
// route's defaults (no rate limit, to make it quick). Each would be a new
// history ring kept for the rule's max age; the node must refuse most of
// them (limit_exceeded), keep its memory bounded, and keep serving the
// channels that exist and the other clients.
func TestFreshChannelFloodIsBounded(t *testing.T) {
	n := startNode(t, &Handler{
		ChannelPrefix: ptr(uniquePrefix()),
		History:       []HistoryRule{{Channels: "room:**", Count: 500}},
		RateLimit:     &RateLimit{PerSecond: -1},
		SendQueue:     8 << 20,
		PingInterval:  caddy.Duration(time.Hour), // no ping during the flood
	})
	attacker := dial(t, n.url("/"), nil)
	attacker.publishOK("room:mine", "before the flood", 1)
	honest := dial(t, n.url("/"), nil)
	honest.subscribe("room:mine", 1)

	before := heapInUse()
	start := time.Now()
	replies := floodFreshChannels(t, attacker, "room:fresh-", 10000, 4096)
	took := time.Since(start)
	after := heapInUse()
	grew := int64(after) - int64(before)
	t.Logf("10,000 fresh channels, 4 KiB each: replies %v in %v; live heap %d -> %d bytes (%+d)", replies, took.Round(time.Millisecond), before, after, grew)

	if replies["limit_exceeded"] == 0 || replies["ok"] > 100 {
		t.Errorf("replies %v: want most fresh channels refused with limit_exceeded", replies)
	}
	if grew > 16<<20 {
		t.Errorf("the node's live heap grew by %d bytes under the flood, want under 16 MiB", grew)
	}
	// The attacker's existing channel still works, and so does a new
	// channel of another connection (its own budget).
	attacker.publishOK("room:mine", "after the flood", 2)
	if data, _ := honest.messages("room:mine", 1); data[0] != "after the flood" {
		t.Fatalf("honest subscriber got %v", data)
	}
	honest.publishOK("room:honest-new", "a new room", 3)
}
