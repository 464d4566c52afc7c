package caddychat

import (
	"bufio"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
)

// TestRedisOutageLogIsJSON: Caddy's log stays one JSON object per line
// through a Redis outage, go-redis's own notes included (they go through
// the module's logger, at debug level); and the log says what happened: a
// node that has never reached Redis says it cannot reach it, a node that
// had a connection says it lost it, then that it is back.
func TestRedisOutageLogIsJSON(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	up := startCaddy(t, "up", chatRoutes(rs.URL()), debugLog())
	sub := dialJSON(t, "sub", up.wsURL("/ws"))
	sub.subscribe("room:log")

	down := redistest.Start(t)
	down.Kill()
	never := startCaddy(t, "never", chatRoutes(down.URL()), debugLog())
	c := dialJSON(t, "c", never.wsURL("/ws"))
	if m, err := c.publishErr("room:log", "x", 10*time.Second); err != nil || m.Code != "unavailable" {
		t.Fatalf("publish without Redis: %v %v, want unavailable", m, err)
	}

	rs.Kill()
	pub := dialJSON(t, "pub", up.wsURL("/ws"))
	if m, err := pub.publishErr("room:log", "x", 10*time.Second); err != nil || m.Code != "unavailable" {
		t.Fatalf("publish during the outage: %v %v, want unavailable", m, err)
	}
	time.Sleep(2 * time.Second) // go-redis retries, and notes it
	rs.Restart()
	eventually(t, 20*time.Second, "the node publishes again", func() (bool, string) {
		m, err := pub.publishErr("room:log", "y", 5*time.Second)
		if err != nil {
			return false, err.Error()
		}
		return m.Type == "ok", m.String()
	})
	eventually(t, 20*time.Second, "the node logs the pub/sub connection restored", func() (bool, string) {
		return len(logMessages(t, up, "redis pub/sub connection restored")) > 0, up.logTail(5)
	})

	for _, n := range []*caddyNode{up, never} {
		lines, entries := readJSONLog(t, n)
		if lines == 0 {
			t.Fatalf("%s: empty log", n.name)
		}
		fromRedis := 0
		for _, e := range entries {
			if e["logger"] == "http.handlers.chat.redis" {
				fromRedis++
			}
		}
		t.Logf("%s: %d JSON lines, %d from go-redis", n.name, lines, fromRedis)
	}
	if got := logMessages(t, never, "cannot reach Redis for pub/sub; retrying until it answers"); len(got) == 0 {
		t.Errorf("never: no \"cannot reach Redis\" line; log:\n%s", never.logTail(30))
	}
	if got := logMessages(t, never, "redis pub/sub connection lost; retrying"); len(got) != 0 {
		t.Errorf("never: says a connection was lost, but it never had one: %v", got)
	}
	if got := logMessages(t, up, "redis pub/sub connection lost; retrying"); len(got) != 1 {
		t.Errorf("up: %d \"connection lost\" lines, want 1; log:\n%s", len(got), up.logTail(30))
	}
	for _, e := range logMessages(t, up, "redis pub/sub connection lost; retrying") {
		if e["broker"] != rs.URL() {
			t.Errorf("up: the lost line names broker %v, want %s", e["broker"], rs.URL())
		}
	}
}

// readJSONLog reads the node's log and fails the test on any line that is
// not one JSON object.
func readJSONLog(t *testing.T, n *caddyNode) (lines int, entries []map[string]any) {
	t.Helper()
	f, err := os.Open(n.logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		lines++
		var e map[string]any
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Errorf("%s: a log line is not JSON: %q", n.name, line)
			continue
		}
		entries = append(entries, e)
	}
	return lines, entries
}

// logMessages returns the node's log entries whose msg is msg.
func logMessages(t *testing.T, n *caddyNode, msg string) []map[string]any {
	t.Helper()
	_, entries := readJSONLog(t, n)
	var out []map[string]any
	for _, e := range entries {
		if e["msg"] == msg {
			out = append(out, e)
		}
	}
	return out
}
