package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// abuseTestConfig is a short abuse run against urls with the given attacks.
func abuseTestConfig(t *testing.T, urls []string, attacks ...string) *config {
	t.Helper()
	cfg := testConfig(urls)
	cfg.scenarios = []string{"abuse"}
	cfg.duration = 600 * time.Millisecond
	cfg.honestRate = 25
	cfg.fill, cfg.fillSize = 5, 1000
	cfg.oversize = 100 << 10 // over the fake's 32 KiB read limit: 1009
	cfg.attackRate = 50
	cfg.after = 50 * time.Millisecond
	cfg.attackerDrain = 300 * time.Millisecond
	cfg.maxRSS = 0
	if err := checkAbuseFlags(cfg, attacks); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func abuseCounts(ab *abuseResult) (expected, received, lost, dups, ooo int64) {
	for _, h := range ab.Honest {
		expected += h.Expected
		received += h.Received
		lost += h.Lost
		dups += h.Duplicates
		ooo += h.OutOfOrder
	}
	return
}

// TestAbuseHonestCounts: the honest subscribers' accounting finds the
// delivery the fake drops and the one it doubles, while attacks that
// publish nothing run on the same channel.
func TestAbuseHonestCounts(t *testing.T) {
	for _, tc := range []struct {
		name          string
		dropAt, dupAt int
		lost, dups    int64
	}{
		{"correct", 0, 0, 0, 0},
		{"drop", 5, 0, 1, 0},
		{"duplicate", 0, 7, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, urls := startFake(t, 2, tc.dropAt, tc.dupAt)
			cfg := abuseTestConfig(t, urls, "history", "opflood", "slowread")
			res, err := runAbuse(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			ab := res.Abuse
			// 2 nodes × 2 honest subscribers on the busy channel only.
			if len(ab.Honest) != 4 || len(ab.Publishers) != 2 {
				t.Fatalf("%d honest subscribers, %d publishers", len(ab.Honest), len(ab.Publishers))
			}
			var published int64
			for _, p := range ab.Publishers {
				published += p.OK
				if p.Published < 5 || p.OK != p.Published || p.Unanswered != 0 {
					t.Errorf("publisher %+v", p)
				}
			}
			exp, recv, lost, dups, ooo := abuseCounts(ab)
			if exp != 4*published || lost != tc.lost || dups != tc.dups || ooo != 0 || recv != exp-tc.lost {
				t.Errorf("expected %d received %d lost %d dup %d ooo %d; want expected %d, lost %d, dup %d", exp, recv, lost, dups, ooo, 4*published, tc.lost, tc.dups)
			}
			for _, h := range ab.Honest {
				if h.Expected != published || h.Closed != "" || h.Channel != cfg.abuseChannel {
					t.Errorf("honest subscriber %+v, want expected %d", h, published)
				}
			}
			if ab.Incomplete != "" && tc.lost == 0 {
				t.Error(ab.Incomplete)
			}
		})
	}
}

// TestAbuseAttackerOutcomes: each attacker's report says what the server
// did to it: error codes, the close code, or that it was still open.
func TestAbuseAttackerOutcomes(t *testing.T) {
	t.Parallel()
	fake, urls := startFake(t, 2, 0, 0)
	fake.strict, fake.maxFrames = true, 200
	cfg := abuseTestConfig(t, urls, "history", "opflood", "oversize", "slowread", "resubscribe", "create")
	rep := run(context.Background(), cfg, []string{"-test"})
	if rep.Error != "" {
		t.Fatal(rep.Error)
	}
	ab := rep.Scenarios[0].Abuse
	got := map[string]*attackResult{}
	for _, a := range ab.Attackers {
		got[a.Attack] = a
	}
	if len(got) != 6 {
		t.Fatalf("attackers %v", got)
	}
	// history: 50/s for 0.6 s, under maxFrames; each answered bad_request.
	if h := got["history"]; h.Codes["bad_request"] < 20 || h.Codes["bad_request"] != h.Sent || h.Close != "open" || h.Error != "" {
		t.Errorf("history: %+v", h)
	}
	if o := got["opflood"]; o.Close != "4003 rate_limited" || o.Sent < 200 || o.Codes["bad_request"] == 0 {
		t.Errorf("opflood: %+v", o)
	}
	if o := got["oversize"]; o.Close != "1009 too_big" {
		t.Errorf("oversize: %+v", o)
	}
	if s := got["slowread"]; s.Close != "open" || s.Sent != 0 {
		t.Errorf("slowread: %+v", s)
	}
	// resubscribe published its fill, then subscribed again and again; the
	// fake answers each with ok.
	if r := got["resubscribe"]; r.Sent < 10 || r.Types["ok"] != r.Sent || r.Close != "open" {
		t.Errorf("resubscribe: %+v", r)
	}
	if c := got["create"]; c.Sent < 10 || c.Types["ok"] != c.Sent {
		t.Errorf("create: %+v", c)
	}
	// The fill messages reached the honest subscribers as attacker frames
	// that look like the server's (from "").
	if ab.ServerLike < int64(cfg.fill) || len(ab.Seen[cfg.abuseChannel]) == 0 {
		t.Errorf("seen %v, server-like %d", ab.Seen, ab.ServerLike)
	}
	var table bytes.Buffer
	writeTable(&table, rep)
	t.Log("\n" + table.String())
	for _, want := range []string{"abuse: attacks ran", "rss_peak_MiB", "history_bytes_before/peak/after", "n/a/n/a/n/a", "b history", "f opflood", "4003 rate_limited", "1009 too_big",
		"honest_sub", "lost", "fill: type=message from=\"\" server=- anonymous=-"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
	b, _ := json.Marshal(rep)
	for _, key := range []string{`"abuse":`, `"attackers":`, `"honest_subscribers":`, `"error_codes":`, `"close":"4003 rate_limited"`, `"queued_bytes":{"before":null`} {
		if !bytes.Contains(b, []byte(key)) {
			t.Errorf("JSON lacks %s", key)
		}
	}
}

// TestAbuseStopsEarly: a node over -max-rss (here this test process, as the
// "node") stops the attacks long before -duration.
func TestAbuseStopsEarly(t *testing.T) {
	t.Parallel()
	_, urls := startFake(t, 2, 0, 0)
	cfg := abuseTestConfig(t, urls, "slowread")
	cfg.duration = time.Minute
	cfg.pids = []int{os.Getpid(), os.Getpid()}
	cfg.maxRSS = 1 << 20
	start := time.Now()
	res, err := runAbuse(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ab := res.Abuse
	if !strings.Contains(ab.StoppedEarly, "over -max-rss") || time.Since(start) > 20*time.Second {
		t.Fatalf("stopped early %q after %v", ab.StoppedEarly, time.Since(start))
	}
	n := ab.Nodes[0]
	if n.RSSBeforeKiB <= 0 || n.RSSPeakKiB < n.RSSBeforeKiB || n.RSSAfterKiB <= 0 {
		t.Errorf("RSS readings %+v", n)
	}
	var table bytes.Buffer
	writeAbuseTables(&table, res)
	if !strings.Contains(table.String(), "STOPPED EARLY") {
		t.Errorf("table:\n%s", table.String())
	}
}

func TestClassifyForeign(t *testing.T) {
	for _, tc := range []struct {
		frame, kind string
		serverLike  bool
	}{
		// Today: a raw client's text arrives wrapped with an empty from.
		{`{"type":"message","channel":"room:r","id":"1-n-1","from":"","ts":1,"data":"abuse:impersonate hi"}`, `impersonate: type=message from="" server=- anonymous=-`, true},
		// After the fix: marked as an anonymous client's.
		{`{"type":"message","channel":"room:r","id":"1-0","from":"","anonymous":true,"ts":1,"data":"abuse:impersonate hi"}`, `impersonate: type=message from="" server=- anonymous=true`, false},
		{`{"type":"message","channel":"room:r","id":"1-0","from":"mallory","ts":1,"data":{"m":"abuse:fill"}}`, `fill: type=message from="mallory" server=- anonymous=-`, false},
		{`{"type":"message","channel":"room:r","id":"9999999999999999999-0","epoch":"x","from":"","ts":1,"data":"abuse:forge"}`, `forge: type=message from="" server=- anonymous=-`, true},
		{`{"type":"message","channel":"room:r","id":"1-0","from":"","data":{"type":"message","data":"abuse:forge"}}`, `forge: type=message from="" server=- anonymous=-`, true},
		{`{"type":"message","channel":"room:r","id":"1-0","from":"","data":"abuse:forge-json"}`, `forge-json: type=message from="" server=- anonymous=-`, true},
		{`{"type":"join","channel":"room:r","user":"abuse:impersonate"}`, `impersonate: type=join from=- server=- anonymous=-`, false},
		{`{"type":"message","channel":"room:r","id":"1-0","from":"","server":true,"data":"deploy"}`, `other: type=message from="" server=true anonymous=-`, false},
	} {
		kind, like := classifyForeign([]byte(tc.frame))
		if kind != tc.kind || like != tc.serverLike {
			t.Errorf("%s: %q %v, want %q %v", tc.frame, kind, like, tc.kind, tc.serverLike)
		}
	}
}

func TestParseMetrics(t *testing.T) {
	text := `# HELP caddy_chat_connections_closed_total WebSocket connections closed, by reason.
# TYPE caddy_chat_connections_closed_total counter
caddy_chat_connections_closed_total{reason="normal"} 12
caddy_chat_connections_closed_total{reason="rate_limited"} 1
caddy_chat_connections_closed_total{reason="slow_consumer"} 2
caddy_chat_queued_bytes 1.048576e+06
caddy_chat_queued_bytes_other 5
caddy_chat_history_bytes{shard="a"} 100
caddy_chat_history_bytes{shard="b"} 50
`
	m, err := parseMetrics(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	if m.queued == nil || *m.queued != 1<<20 || m.history == nil || *m.history != 150 {
		t.Errorf("queued %v history %v", m.queued, m.history)
	}
	if m.closes["normal"] != 12 || m.closes["rate_limited"] != 1 || m.closes["slow_consumer"] != 2 || len(m.closes) != 3 {
		t.Errorf("closes %v", m.closes)
	}
	m, _ = parseMetrics(strings.NewReader("caddy_chat_connections 3\n"))
	if m.queued != nil || m.history != nil {
		t.Error("gauges found in a page without them")
	}
	var g gaugeReading
	if g.text() != "n/a/n/a/n/a" {
		t.Error(g.text())
	}
}

func TestAbuseFlags(t *testing.T) {
	two := "ws://a:1/ws,ws://b:2/ws"
	cfg, err := parseFlags([]string{"-url", two, "-scenario", "abuse", "-max-rss", "512MiB"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	// all: without -raw-url and -publish-url, the attacks that need them are left out.
	if strings.Join(cfg.attacks, ",") != "resubscribe,history,forge-json,create,opflood,oversize,slowread" || cfg.maxRSS != 512<<20 {
		t.Errorf("attacks %v max-rss %d", cfg.attacks, cfg.maxRSS)
	}
	cfg, err = parseFlags([]string{"-url", two, "-scenario", "abuse", "-attacks", "a,c,h", "-raw-url", "ws://a:1/raw/x", "-publish-url", "http://a:1/p"}, io.Discard)
	if err != nil || strings.Join(cfg.attacks, ",") != "resubscribe,forge,http" {
		t.Errorf("%v %v", cfg, err)
	}
	for _, bad := range [][]string{
		{"-url", "ws://a/ws", "-scenario", "abuse"},              // one node
		{"-url", two, "-scenario", "abuse", "-attacks", "forge"}, // no -raw-url
		{"-url", two, "-scenario", "abuse", "-attacks", "http"},  // no -publish-url
		{"-url", two, "-scenario", "abuse", "-attacks", "nope"},  // unknown
		{"-url", two, "-scenario", "abuse", "-metrics-url", "x"}, // one per node
		{"-url", two, "-scenario", "abuse", "-max-rss", "lots"},  // size
		{"-url", two, "-scenario", "abuse", "-honest-rate", "0"}, // rate
	} {
		if _, err := parseFlags(bad, io.Discard); err == nil {
			t.Errorf("%v: no error", bad)
		}
	}
	for s, want := range map[string]int64{"2GiB": 2 << 30, "1.5MiB": 3 << 19, "4096": 4096, "1GB": 1e9, "0": 0} {
		if got, err := parseSize(s); err != nil || got != want {
			t.Errorf("%s: %d %v", s, got, err)
		}
	}
}

// TestAbuseMetrics: the gauges are read before, at their peak and after the
// attacks, and the closes by reason as their increase over the run; a node
// without the gauges shows n/a.
func TestAbuseMetrics(t *testing.T) {
	t.Parallel()
	_, urls := startFake(t, 2, 0, 0)
	var scrapes atomic.Int64
	withGauges := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := scrapes.Add(1)
		queued := 1000 * n
		if n > 2 { // the peak is the second reading
			queued = 10
		}
		fmt.Fprintf(w, "# TYPE caddy_chat_queued_bytes gauge\ncaddy_chat_queued_bytes %d\ncaddy_chat_history_bytes 77\n", queued)
		fmt.Fprintf(w, "caddy_chat_connections_closed_total{reason=\"slow_consumer\"} %d\ncaddy_chat_connections_closed_total{reason=\"normal\"} 4\n", n)
	}))
	defer withGauges.Close()
	without := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, `caddy_chat_connections_closed_total{reason="rate_limited"} 0`)
	}))
	defer without.Close()
	cfg := abuseTestConfig(t, urls, "slowread")
	cfg.metricsURLs = []string{withGauges.URL, without.URL}
	cfg.duration = 1500 * time.Millisecond
	res, err := runAbuse(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	n0, n1 := res.Abuse.Nodes[0], res.Abuse.Nodes[1]
	q := n0.QueuedBytes
	if q.Before == nil || *q.Before != 1000 || q.Peak == nil || *q.Peak != 2000 || q.After == nil || *q.After != 10 {
		t.Errorf("queued bytes %s", q.text())
	}
	if n0.HistoryBytes.text() != "77/77/77" || n1.QueuedBytes.text() != "n/a/n/a/n/a" || n1.HistoryBytes.text() != "n/a/n/a/n/a" {
		t.Errorf("history %s, node 1 %s %s", n0.HistoryBytes.text(), n1.QueuedBytes.text(), n1.HistoryBytes.text())
	}
	if n0.Closes["slow_consumer"] < 1 || n0.Closes["normal"] != 0 || len(n1.Closes) != 0 || n0.MetricsError != "" {
		t.Errorf("closes %v %v (%s)", n0.Closes, n1.Closes, n0.MetricsError)
	}
}
