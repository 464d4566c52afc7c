package caddychat

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// rssBytes is the resident set size of the node's Caddy process.
func (n *caddyNode) rssBytes(t testing.TB) int64 {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", n.cmd.Process.Pid))
	if err != nil {
		t.Fatalf("%s: %v", n.name, err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("%s: VmRSS %q: %v", n.name, v, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("%s: no VmRSS", n.name)
	return 0
}

// floodNode publishes one message of size bytes on each of n fresh
// channels through one connection, sent at once, and counts the replies.
func floodNode(t *testing.T, nd *caddyNode, n, size int) map[string]int {
	t.Helper()
	c := dialJSON(t, "flood@"+nd.name, nd.wsURL("/ws"))
	pad := strings.Repeat("x", size)
	go func() {
		for i := range n {
			b, _ := json.Marshal(map[string]any{"op": "publish", "channel": fmt.Sprintf("room:fresh-%d", i), "data": pad, "id": "f" + strconv.Itoa(i)})
			if c.send(websocket.MessageText, b) != nil {
				return
			}
		}
	}()
	replies := map[string]int{}
	for got := 0; got < n; {
		m, err := c.readMsg(30 * time.Second)
		if err != nil {
			t.Fatalf("%s: after %d replies %v: %v", nd.name, got, replies, err)
		}
		if !strings.HasPrefix(string(m.ID), `"f`) {
			continue
		}
		got++
		if m.Type == "ok" {
			replies["ok"]++
		} else {
			replies[m.Code]++
		}
	}
	return replies
}

// TestFreshChannelFloodOnARealNode: issue 14's attack against Caddy
// processes with the in-process broker: 10,000 fresh history channels from
// one client. With the defaults the node refuses all but a few
// (limit_exceeded); with the creation limit off and history_memory 1MiB it
// keeps at most 1 MiB of history (caddy_chat_history_bytes on /metrics).
// The figures (RSS, kept bytes) are logged.
func TestFreshChannelFloodOnARealNode(t *testing.T) {
	const route = "\tchat /ws {\n\t\trate_limit off\n\t\tsend_queue 8MiB\n\t\thistory room:** 100\n%s\t}"
	limited := startCaddy(t, "defaults", fmt.Sprintf(route, ""))
	capped := startCaddy(t, "capped", fmt.Sprintf(route, "\t\thistory_memory 1MiB\n\t\thistory_new_channels off\n"))
	for _, nd := range []*caddyNode{limited, capped} {
		before := nd.rssBytes(t)
		start := time.Now()
		replies := floodNode(t, nd, 10000, 512)
		took := time.Since(start)
		after := nd.rssBytes(t)
		kept := nd.scrapeMetrics(t)["caddy_chat_history_bytes"]
		t.Logf("%s: 10,000 fresh channels of 512 B in %v: %v; caddy_chat_history_bytes %.0f; RSS %.1f -> %.1f MiB",
			nd.name, took.Round(time.Millisecond), replies, kept, float64(before)/(1<<20), float64(after)/(1<<20))
		switch nd {
		case limited:
			if replies["limit_exceeded"] < 9900 || kept > 64<<10 {
				t.Errorf("%s: replies %v, %v bytes kept: want all but a few refused", nd.name, replies, kept)
			}
		case capped:
			if replies["ok"] != 10000 || kept > 1<<20 || kept < 512<<10 {
				t.Errorf("%s: replies %v, %v bytes kept: want all accepted and at most 1 MiB kept", nd.name, replies, kept)
			}
		}
		// Honest use goes on.
		c := dialJSON(t, "honest@"+nd.name, nd.wsURL("/ws"))
		c.subscribe("room:honest")
		c.mustPublish("room:honest", map[string]int{"n": 1})
		c.expectMessage("room:honest", 5*time.Second)
	}
}
