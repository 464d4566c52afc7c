package caddychat

// End-to-end: the Prometheus metrics of a node move with its traffic.

import (
	"bufio"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
)

// scrapeMetrics reads the node's admin /metrics and returns every caddy_chat_
// sample by its name with labels, e.g. `caddy_chat_connections_closed_total{reason="normal"}`.
func (n *caddyNode) scrapeMetrics(t testing.TB) map[string]float64 {
	t.Helper()
	resp, err := adminHTTP.Get("http://" + n.admin + "/metrics")
	if err != nil {
		t.Fatalf("%s: GET /metrics: %v", n.name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: GET /metrics: %s", n.name, resp.Status)
	}
	samples := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "caddy_chat_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("%s: metrics line %q: %v", n.name, line, err)
		}
		samples[line[:i]] = v
	}
	return samples
}

// brokerUpSample is the broker_up sample of the hub on redisURL (no
// password in it) with channel prefix.
func brokerUpSample(redisURL, prefix string) string {
	return fmt.Sprintf("caddy_chat_broker_up{broker=%q,channel_prefix=%q}", redisURL, prefix)
}

// TestMetricsMoveWithTraffic: every metric of the module is on the admin
// /metrics endpoint and counts what the test does.
func TestMetricsMoveWithTraffic(t *testing.T) {
	rs := redistest.Start(t)
	n := startCaddy(t, "node", chatRoutes(rs.URL())+`
	chat /secure {
		jwt {
			secret 0123456789abcdef0123456789abcdef
		}
	}`)
	before := n.scrapeMetrics(t)
	for _, name := range []string{
		"caddy_chat_connections", "caddy_chat_connections_opened_total", "caddy_chat_channels",
		"caddy_chat_messages_received_total", "caddy_chat_messages_delivered_total",
		"caddy_chat_messages_dropped_total", "caddy_chat_slow_consumers_total",
		"caddy_chat_broker_publish_seconds_count", "caddy_chat_broker_reconnects_total", brokerUpSample(rs.URL(), "chat:"),
		"caddy_chat_broker_lag_seconds_count", "caddy_chat_broker_lag_max_seconds",
	} {
		if _, ok := before[name]; !ok {
			t.Errorf("/metrics lacks %s", name)
		}
	}

	const channel = "room:metrics"
	subs := []*wsClient{dialJSON(t, "sub1", n.wsURL("/ws")), dialJSON(t, "sub2", n.wsURL("/ws"))}
	for _, c := range subs {
		c.subscribe(channel)
	}
	pub := dialJSON(t, "pub", n.wsURL("/ws"))
	for i := range 4 {
		pub.mustPublish(channel, map[string]int{"n": i})
	}
	for _, c := range subs {
		for range 4 {
			c.expectMessage(channel, 5*time.Second)
		}
	}
	if _, err := dialWS(t, "anonymous", n.wsURL("/secure")); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("connecting to /secure without a token: %v, want a 401", err)
	}

	during := n.scrapeMetrics(t)
	delta := func(m map[string]float64, name string) float64 { return m[name] - before[name] }
	expect := map[string]float64{
		"caddy_chat_connections":                                 3,
		"caddy_chat_connections_opened_total":                    3,
		"caddy_chat_channels":                                    1,
		"caddy_chat_messages_received_total":                     6, // 2 subscribes, 4 publishes
		"caddy_chat_messages_delivered_total":                    8, // 4 messages × 2 subscribers
		"caddy_chat_broker_publish_seconds_count":                4,
		"caddy_chat_broker_lag_seconds_count":                    4, // once per message, not per subscriber
		`caddy_chat_auth_failures_total{reason="missing_token"}`: 1,
	}
	for name, want := range expect {
		if got := delta(during, name); got != want {
			t.Errorf("%s grew by %v, want %v", name, got, want)
		}
	}

	// A Redis restart while a subscriber stays: one reconnect.
	rs.Kill()
	rs.Restart()
	eventually(t, 10*time.Second, "a broker reconnect counted", func() (bool, string) {
		got := delta(n.scrapeMetrics(t), "caddy_chat_broker_reconnects_total")
		return got >= 1, fmt.Sprint(got)
	})
	for _, c := range subs {
		c.closeNormal()
	}
	pub.closeNormal()
	eventually(t, 10*time.Second, "connections closed and the channel released", func() (bool, string) {
		after := n.scrapeMetrics(t)
		state := fmt.Sprintf("connections %v, closed normal +%v, channels %v",
			delta(after, "caddy_chat_connections"), delta(after, `caddy_chat_connections_closed_total{reason="normal"}`),
			delta(after, "caddy_chat_channels"))
		return delta(after, "caddy_chat_connections") == 0 &&
			delta(after, `caddy_chat_connections_closed_total{reason="normal"}`) == 3 &&
			delta(after, "caddy_chat_channels") == 0, state
	})
}
