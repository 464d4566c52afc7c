package main

// Issue 21's bounded latency as chatbench sees it: gap frames, publishes
// refused with unavailable, a phase whose deliveries run late, and the
// nodes' lag metrics. The fake server (chatbench_test.go) plays the node.

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// owe records that sub was not sent a message of channel; s.mu is held.
func (s *fakeServer) owe(sub *fakeConn, channel string, i int) {
	if s.owed == nil {
		s.owed = map[*fakeConn]int64{}
	}
	s.owed[sub]++
	if s.gapNow != nil && s.gapNow(i) {
		s.payGap(sub, channel)
	}
}

// payGap sends sub one gap frame for what it is owed; s.mu is held.
func (s *fakeServer) payGap(sub *fakeConn, channel string) {
	n := s.owed[sub]
	if n == 0 {
		return
	}
	delete(s.owed, sub)
	s.reported += n
	s.gapFrames++
	sub.sendGap(fmt.Appendf(nil, `{"type":"gap","channel":%q,"missed":%d}`, channel, n))
}

// sendGap writes a gap frame: over SSE as the spec has it, an event named
// gap without an id line (sendSSE writes a delivery's id).
func (c *fakeConn) sendGap(b []byte) {
	if c.ws != nil {
		c.send(b)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended {
		return
	}
	fmt.Fprintf(c.w, "event: gap\ndata: %s\n\n", b)
	c.w.(http.Flusher).Flush()
}

// TestGapsAndRefusals: messages reported in gap frames are neither
// delivered nor lost, refused publishes are expected by nobody, and a
// message dropped without a word is still lost, over both transports.
func TestGapsAndRefusals(t *testing.T) {
	for _, transport := range []string{"websocket", "sse"} {
		t.Run(transport, func(t *testing.T) {
			t.Parallel()
			s, urls := startFake(t, 2, 0, 0)
			s.refuseEvery = 4 // publishes 4, 8, ..., 20: 5 of 20
			s.dropAt = 7      // the second subscriber never hears of it
			// The third subscriber misses 2, 3 and 5 and hears of them
			// before 6; the fourth misses 17 to 19, each reported at once.
			s.skip = func(n, i int) bool {
				return i == 2 && (n == 2 || n == 3 || n == 5) || i == 3 && n >= 17 && n <= 19
			}
			s.gapNow = func(i int) bool { return i == 3 }
			cfg := testConfig(urls)
			cfg.transport = transport
			res, err := runFanout(context.Background(), cfg, "fanout", urls, nil)
			p := onePhase(t, res, err)
			s.mu.Lock()
			refused, reported, frames := s.refused, s.reported, s.gapFrames
			s.mu.Unlock()
			if refused != 5 || reported != 6 || frames != 4 {
				t.Fatalf("the fake refused %d, reported %d in %d frames; the test means 5, 6, 4", refused, reported, frames)
			}
			want := int64(cfg.subs) * (int64(cfg.messages) - refused)
			if p.Refused != refused || p.PublishOK != int64(cfg.messages)-refused || p.PublishErrors["unavailable"] != refused {
				t.Errorf("refused %d acked %d errors %v; want %d refused", p.Refused, p.PublishOK, p.PublishErrors, refused)
			}
			if p.Expected != want || p.Reported != reported || p.GapFrames != frames || p.Lost != 1 || p.Received != want-reported-1 {
				t.Errorf("expected %d delivered %d reported %d (%d frames) lost %d; want %d, %d, %d (%d), 1",
					p.Expected, p.Received, p.Reported, p.GapFrames, p.Lost, want, want-reported-1, reported, frames)
			}
			if p.Stray != 0 || p.Duplicates != 0 || p.Disconnected != 0 || !strings.Contains(p.Incomplete, " 1 deliveries ") {
				t.Errorf("stray %d dup %d disc %d incomplete %q (the dropped message only)", p.Stray, p.Duplicates, p.Disconnected, p.Incomplete)
			}
			var table bytes.Buffer
			writeTable(&table, &report{Scenarios: []*scenarioResult{res}})
			for _, col := range []string{"acked", "refused", "delivered", "reported", "lost", "disc", "lag_max_s", "p99_vs_base", "4 gap frames reported 6 missed"} {
				if !strings.Contains(table.String(), col) {
					t.Errorf("table lacks %q:\n%s", col, table.String())
				}
			}
		})
	}
}

// TestDrainMaxBoundsALatePhase: deliveries that keep trickling in after
// the last publish (each one arrives well within -drain, so waiting for
// progress would go on) are waited for -drain-max only, the missing ones
// are counted lost, and stepping stops, as the next rate would get them.
func TestDrainMaxBoundsALatePhase(t *testing.T) {
	t.Parallel()
	s, urls := startFake(t, 1, 0, 0)
	s.delay = 50 * time.Millisecond // publish 20's deliveries 1 s late
	cfg := testConfig(urls)
	cfg.drain = time.Second
	cfg.drainMax = 300 * time.Millisecond
	cfg.stepRates = []float64{0, 0}
	cfg.maxP99 = time.Hour
	start := time.Now()
	res, err := runFanout(context.Background(), cfg, "fanout", urls, nil)
	if took := time.Since(start); took > 1500*time.Millisecond {
		t.Errorf("the phase took %v with -drain-max %v", took, cfg.drainMax)
	}
	p := onePhase(t, res, err) // the second rate did not run
	if !p.DrainCapped || !strings.Contains(p.Incomplete, "-drain-max") {
		t.Errorf("capped %v, incomplete %q", p.DrainCapped, p.Incomplete)
	}
	if p.Lost == 0 || p.Received == 0 || p.Received+p.Lost != p.Expected || p.Expected != int64(cfg.subs*cfg.messages) {
		t.Errorf("expected %d delivered %d lost %d", p.Expected, p.Received, p.Lost)
	}

	// Without the cap the same phase waits for every delivery (the fake's
	// publishes 21 to 40 arrive 1 to 2 s late).
	cfg.drainMax = 0
	cfg.drain = 3 * time.Second
	cfg.stepRates = nil
	res, err = runFanout(context.Background(), cfg, "fanout", urls, nil)
	p = onePhase(t, res, err)
	if p.DrainCapped || p.Lost != 0 {
		t.Errorf("uncapped: capped %v lost %d (%s)", p.DrainCapped, p.Lost, p.Incomplete)
	}
}

// TestPublishForStopsPublishing: a phase publishes for -publish-for, not
// until -messages are sent, and that is not an error.
func TestPublishForStopsPublishing(t *testing.T) {
	t.Parallel()
	_, urls := startFake(t, 1, 0, 0)
	cfg := testConfig(urls)
	cfg.rate = 20
	cfg.messages = 1000
	cfg.publishFor = 300 * time.Millisecond
	res, err := runFanout(context.Background(), cfg, "fanout", urls, nil)
	p := onePhase(t, res, err)
	if !p.PublishStopped || p.Published < 3 || p.Published > 10 {
		t.Errorf("published %d, stopped %v", p.Published, p.PublishStopped)
	}
	if p.Lost != 0 || p.Expected != int64(cfg.subs)*p.Published || p.Unanswered != 0 {
		t.Errorf("expected %d lost %d unanswered %d", p.Expected, p.Lost, p.Unanswered)
	}
}

// fakeMetrics serves a node's /metrics page whose lag grows with every
// read: the gauge is 0.5 s × the read's number, capped at 4 s, and each
// read observes one more lag in the 2.5 s bucket.
func fakeMetrics(t *testing.T, withMechanism bool) (url string, reads *atomic.Int64) {
	reads = &atomic.Int64{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := reads.Add(1)
		fmt.Fprintf(w, "# HELP caddy_chat_broker_lag_max_seconds x\n# TYPE caddy_chat_broker_lag_max_seconds gauge\n")
		fmt.Fprintf(w, "caddy_chat_broker_lag_max_seconds %g\n", min(0.5*float64(n), 4))
		for _, b := range []struct {
			le    string
			extra int64
		}{{"0.1", 0}, {"1", 0}, {"2.5", n}, {"5", n}, {"+Inf", n}} {
			fmt.Fprintf(w, "caddy_chat_broker_lag_seconds_bucket{le=%q} %d\n", b.le, 100+b.extra)
		}
		fmt.Fprintf(w, "caddy_chat_broker_lag_seconds_count %d\n", 100+n)
		fmt.Fprintf(w, "caddy_chat_queued_bytes 123\n")
		if withMechanism {
			fmt.Fprintf(w, "caddy_chat_broker_backlog_bytes %d\n", 1000*n)
			fmt.Fprintf(w, "caddy_chat_late_skipped_total{where=\"hub\"} %d\n", 10*n)
			fmt.Fprintf(w, "caddy_chat_late_skipped_total{where=\"queue\"} 7\n")
			fmt.Fprintf(w, "caddy_chat_publish_refused_late_total %d\n", 2*n)
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL + "/metrics", reads
}

// TestNodeLagFromMetrics: a phase reads the nodes' lag while it runs and
// reports the peak of the gauge, the histogram bound of the phase's own
// observations and, when the node has them, the mechanism's counters.
func TestNodeLagFromMetrics(t *testing.T) {
	t.Parallel()
	s, urls := startFake(t, 1, 0, 0)
	s.delay = 2 * time.Millisecond
	for _, withMechanism := range []bool{true, false} {
		murl, reads := fakeMetrics(t, withMechanism)
		cfg := testConfig(urls)
		cfg.metricsURLs = []string{murl}
		cfg.rate = 20 // 1 s of publishing: the sampler reads the page a few times
		res, err := runFanout(context.Background(), cfg, "fanout", urls, nil)
		p := onePhase(t, res, err)
		l := p.NodeLag
		n := reads.Load()
		if l == nil || l.LagMaxSeconds == nil || n < 3 {
			t.Fatalf("mechanism %v: %d reads, lag %+v", withMechanism, n, l)
		}
		// The last read is the phase's end: its gauge is the peak.
		if want := min(0.5*float64(n), 4); *l.LagMaxSeconds != want {
			t.Errorf("lag max %v after %d reads, want %v", *l.LagMaxSeconds, n, want)
		}
		if l.LagBucketSeconds == nil || *l.LagBucketSeconds != 2.5 || *l.LagObserved != float64(n-1) {
			t.Errorf("histogram bound %v over %v observations, want 2.5 over %d", l.LagBucketSeconds, l.LagObserved, n-1)
		}
		if !withMechanism {
			if l.BacklogPeakBytes != nil || l.LateSkipped != nil || l.RefusedLate != nil {
				t.Errorf("figures of a mechanism the node lacks: %+v", l)
			}
			continue
		}
		if l.BacklogPeakBytes == nil || *l.BacklogPeakBytes != float64(1000*n) || l.RefusedLate == nil || *l.RefusedLate != float64(2*(n-1)) ||
			l.LateSkipped["hub"] != float64(10*(n-1)) || l.LateSkipped["queue"] != 0 {
			t.Errorf("backlog %v refused late %v skipped %v after %d reads", l.BacklogPeakBytes, l.RefusedLate, l.LateSkipped, n)
		}
		if !strings.Contains(l.text(), "late skipped hub=") {
			t.Errorf("note %q", l.text())
		}
	}
	// The bare server has no metrics page.
	cfg := testConfig(urls)
	cfg.metricsURLs = []string{"http://127.0.0.1:1/metrics"}
	if cfg.metricsFor("baseline") != nil || cfg.metricsFor("baseline-rooms") != nil || cfg.metricsFor("fanout-memory") == nil {
		t.Error("metricsFor")
	}
}

// TestRatiosToBaselineAndMemory: every delivery scenario gets its
// throughput and p99 relative to its baseline, fanout its throughput
// relative to fanout-memory, idle its memory and connect rate relative
// to baseline-idle.
func TestRatiosToBaselineAndMemory(t *testing.T) {
	t.Parallel()
	_, urls := startFake(t, 1, 0, 0)
	_, memURLs := startFake(t, 1, 0, 0)
	cfg := testConfig(urls)
	cfg.memoryURLs = memURLs
	cfg.pids = []int{os.Getpid()} // idle reads this test's RSS
	cfg.scenarios = []string{"baseline", "fanout-memory", "fanout", "baseline-rooms", "rooms", "idle", "baseline-idle"}
	rep := run(context.Background(), cfg, []string{"-test"})
	if rep.Error != "" {
		t.Fatal(rep.Error)
	}
	by := map[string]*scenarioResult{}
	for _, s := range rep.Scenarios {
		by[s.Scenario] = s
	}
	for _, name := range []string{"fanout", "fanout-memory", "rooms"} {
		p := by[name].Phases[0]
		if p.BaselineRatio == nil || p.P99Ratio == nil || *p.P99Ratio <= 0 {
			t.Errorf("%s: ratios %v %v", name, p.BaselineRatio, p.P99Ratio)
		}
	}
	if r := by["fanout"].Phases[0].MemoryRatio; r == nil || *r <= 0 {
		t.Error("fanout has no ratio to fanout-memory")
	}
	if by["fanout-memory"].Phases[0].MemoryRatio != nil || by["baseline"].Phases[0].P99Ratio != nil {
		t.Error("a ratio where none belongs")
	}
	idle, base := by["idle"], by["baseline-idle"]
	if base.Server == "" || len(base.Idle.Nodes) != 1 || base.Idle.Nodes[0].PID == os.Getpid() || base.Idle.Total.RSSSettledKiB <= 0 {
		t.Fatalf("baseline-idle did not measure a child process: %+v", base.Idle)
	}
	if idle.Idle.BaselineConnectsRatio == nil || *idle.Idle.BaselineConnectsRatio <= 0 {
		t.Errorf("idle has no connect-rate ratio to baseline-idle")
	}
	var table bytes.Buffer
	writeTable(&table, rep)
	for _, col := range []string{"vs_memory", "p99_vs_base", "KiB_vs_base", "conns/s_vs_base", "baseline-idle"} {
		if !strings.Contains(table.String(), col) {
			t.Errorf("table lacks %q:\n%s", col, table.String())
		}
	}
}

func TestStepRatesMax(t *testing.T) {
	cfg, err := parseFlags([]string{"-step-rates", "50,max,0", "-drain-max", "10s", "-publish-for", "5s"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(cfg.stepRates) != "[50 0 0]" || cfg.drainMax != 10*time.Second || cfg.publishFor != 5*time.Second {
		t.Errorf("parsed %v %v %v", cfg.stepRates, cfg.drainMax, cfg.publishFor)
	}
	for _, bad := range [][]string{
		{"-scenario", "fanout-memory"}, // needs -memory-url
		{"-scenario", "baseline-idle", "-transport", "sse"},
		{"-metrics-url", "http://a/metrics,http://b/metrics"}, // one node
		{"-drain-max", "-1s"},
	} {
		if _, err := parseFlags(bad, &bytes.Buffer{}); err == nil {
			t.Errorf("%v: no error", bad)
		}
	}
}

// TestBaselineStepsEveryRateWithFanout: a baseline compared with fanout
// does not stop at -max-p99, so that every fanout phase has a ratio.
func TestBaselineStepsEveryRateWithFanout(t *testing.T) {
	t.Parallel()
	_, urls := startFake(t, 1, 0, 0)
	cfg := testConfig(urls)
	cfg.stepRates = []float64{2000, 4000, 8000}
	cfg.maxP99 = 0
	cfg.scenarios = []string{"baseline", "fanout"}
	rep := run(context.Background(), cfg, []string{"-test"})
	if rep.Error != "" {
		t.Fatal(rep.Error)
	}
	base, fan := rep.Scenarios[0], rep.Scenarios[1]
	if len(base.Phases) != 3 || len(fan.Phases) != 1 || !fan.Phases[0].OverMaxP99 || fan.Phases[0].BaselineRatio == nil {
		t.Errorf("baseline %d phases, fanout %d", len(base.Phases), len(fan.Phases))
	}
}
