// Command chatbench is the load generator of caddychat: it drives real
// WebSocket clients against one or more chat nodes through the public JSON
// protocol and reports delivery throughput, publish→receive latency, lost,
// duplicated and reordered messages, connection rate and server memory per
// connection. Run with -h for the usage.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"time"
)

func main() { os.Exit(mainCode()) }

func mainCode() int {
	if len(os.Args) >= 2 && os.Args[1] == serveBaselineFlag {
		return serveBaselineChild(os.Args[2:])
	}
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "chatbench:", err)
		return 2
	}
	if !cfg.quiet {
		cfg.progress = os.Stderr
	}
	if cfg.cpuProfile != "" {
		f, err := os.Create(cfg.cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "chatbench: -cpuprofile:", err)
			return 2
		}
		defer pprof.StopCPUProfile()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	rep := run(ctx, cfg, os.Args[1:])
	writeTable(os.Stdout, rep)
	if cfg.out != "" {
		if err := writeJSON(cfg.out, rep); err != nil {
			fmt.Fprintln(os.Stderr, "chatbench:", err)
			return 1
		}
		fmt.Fprintf(os.Stderr, "results written to %s\n", cfg.out)
	}
	if rep.Error != "" {
		fmt.Fprintln(os.Stderr, "chatbench:", rep.Error)
		return 1
	}
	return 0
}

// run raises the file limit, runs every scenario in order and returns the
// report. A scenario that fails (a node refusing connections, say) is
// reported with its error and the others still run.
func run(ctx context.Context, cfg *config, args []string) *report {
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	rep := &report{Tool: "chatbench", Started: time.Now(), Args: args, Settings: cfg.settings}
	rep.Host = collectHostInfo()
	if cur, max, err := raiseNoFile(); err != nil {
		logf(cfg, "cannot raise RLIMIT_NOFILE: %v (limit %d)", err, cur)
	} else {
		rep.Host.NoFile = cur
		if need := uint64(maxConns(cfg)) + 64; need > cur {
			logf(cfg, "warning: up to %d connections but RLIMIT_NOFILE is %d (hard %d)", need-64, cur, max)
		}
	}
	var errs []string
	for _, s := range cfg.scenarios {
		var res *scenarioResult
		var err error
		switch s {
		case "fanout":
			res, err = runFanout(ctx, cfg, "fanout", cfg.urls, cfg.pids)
		case "baseline":
			res, err = runBaseline(ctx, cfg, s, cfg.subs+1, runFanout)
		case "rooms":
			res, err = runRooms(ctx, cfg, s, cfg.urls, cfg.pids)
		case "baseline-rooms":
			res, err = runBaseline(ctx, cfg, s, cfg.clients, runRooms)
		case "baseline-rooms-redis":
			res, err = runBridgedBaseline(ctx, cfg, s)
		case "fanout-history":
			res, err = runFanout(ctx, cfg, s, cfg.historyURLs, cfg.pids)
		case "fanout-hook":
			res, err = runFanout(ctx, cfg, s, cfg.hookURLs, cfg.pids)
		case "fanout-memory":
			res, err = runFanout(ctx, cfg, s, cfg.memoryURLs, cfg.pids)
		case "idle":
			res, err = runIdle(ctx, cfg, s, cfg.urls, cfg.pids)
		case "baseline-idle":
			res, err = runBaselineIdle(ctx, cfg, s)
		case "abuse":
			res, err = runAbuse(ctx, cfg)
		}
		if res == nil {
			res = &scenarioResult{Scenario: s}
		}
		rep.Scenarios = append(rep.Scenarios, res)
		if err != nil {
			res.Error = err.Error()
			errs = append(errs, fmt.Sprintf("%s: %v", s, err))
		}
	}
	rep.Error = strings.Join(errs, "; ")
	addBaselineRatios(rep)
	rep.Seconds = time.Since(rep.Started).Seconds()
	return rep
}

func maxConns(cfg *config) int {
	n := 0
	for _, s := range cfg.scenarios {
		switch s {
		case "fanout", "baseline", "fanout-history", "fanout-hook", "fanout-memory": // a baseline that does not fit runs its server in a child
			n = max(n, cfg.subs+1)
		case "rooms", "baseline-rooms", "baseline-rooms-redis", "idle", "baseline-idle":
			n = max(n, cfg.clients)
		case "abuse":
			n = max(n, 2*len(cfg.urls)*(cfg.honestSubs+1)+len(abuseAttacks))
		}
	}
	return n
}

// addBaselineRatios sets, phase by phase, fanout's and fanout-memory's
// deliveries/s and p99 relative to baseline's, rooms' relative to
// baseline-rooms' and to baseline-rooms-redis' (the bridged baseline),
// baseline-rooms-redis' relative to baseline-rooms' (the Redis hop),
// fanout-history's and fanout-hook's relative to fanout's
// (the cost of keeping history, of a publish hook), and fanout's
// deliveries/s relative to fanout-memory's (the Redis path against the
// in-process broker); and idle's memory per connection and connect rate
// relative to baseline-idle's.
func addBaselineRatios(rep *report) {
	baseOf := map[string]string{"fanout": "baseline", "fanout-memory": "baseline", "rooms": "baseline-rooms", "baseline-rooms-redis": "baseline-rooms", "fanout-history": "fanout", "fanout-hook": "fanout"}
	bases := map[string]*scenarioResult{}
	for _, s := range rep.Scenarios {
		bases[s.Scenario] = s
	}
	ratio := func(a, b float64) *float64 {
		if b <= 0 {
			return nil
		}
		r := a / b
		return &r
	}
	for _, s := range rep.Scenarios {
		if base := bases[baseOf[s.Scenario]]; base != nil {
			for i, p := range s.Phases {
				if i < len(base.Phases) {
					p.BaselineRatio = ratio(p.DeliveriesPerSec, base.Phases[i].DeliveriesPerSec)
					p.P99Ratio = ratio(p.Latency.P99MS, base.Phases[i].Latency.P99MS)
				}
			}
		}
		if base := bases["baseline-rooms-redis"]; base != nil && s.Scenario == "rooms" {
			for i, p := range s.Phases {
				if i < len(base.Phases) {
					p.BridgedRatio = ratio(p.DeliveriesPerSec, base.Phases[i].DeliveriesPerSec)
					p.P99BridgedRatio = ratio(p.Latency.P99MS, base.Phases[i].Latency.P99MS)
				}
			}
		}
		if mem := bases["fanout-memory"]; mem != nil && s.Scenario == "fanout" {
			for i, p := range s.Phases {
				if i < len(mem.Phases) {
					p.MemoryRatio = ratio(p.DeliveriesPerSec, mem.Phases[i].DeliveriesPerSec)
				}
			}
		}
		if base := bases["baseline-idle"]; base != nil && base.Idle != nil && s.Scenario == "idle" && s.Idle != nil {
			s.Idle.BaselineKiBRatio = ratio(s.Idle.Total.KiBPerConnSettled, base.Idle.Total.KiBPerConnSettled)
			s.Idle.BaselineConnectsRatio = ratio(s.ConnectsPerSec, base.ConnectsPerSec)
		}
	}
}

// metricsFor is the -metrics-url pages of the nodes scenario runs against:
// none for the bare server.
func (cfg *config) metricsFor(scenario string) []string {
	if strings.HasPrefix(scenario, "baseline") {
		return nil
	}
	return cfg.metricsURLs
}

var logMu sync.Mutex

func logf(cfg *config, format string, args ...any) {
	if cfg.progress == nil {
		return
	}
	logMu.Lock()
	defer logMu.Unlock()
	fmt.Fprintf(cfg.progress, "chatbench: "+format+"\n", args...)
}

// startProgress prints line() every second, prefixed with the scenario and
// the elapsed time, until the returned stop is called.
func startProgress(cfg *config, name string, line func() string) (stop func()) {
	if cfg.progress == nil {
		return func() {}
	}
	start := time.Now()
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case now := <-t.C:
				logf(cfg, "[%s %3.0fs] %s", name, now.Sub(start).Seconds(), line())
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done); wg.Wait() }) }
}

type hostInfo struct {
	Hostname   string `json:"hostname"`
	CPUs       int    `json:"cpus"`
	GOMAXPROCS int    `json:"gomaxprocs"`
	GoVersion  string `json:"go_version"`
	OS         string `json:"os"`
	NoFile     uint64 `json:"rlimit_nofile"`
}

func collectHostInfo() hostInfo {
	h, _ := os.Hostname()
	return hostInfo{Hostname: h, CPUs: runtime.NumCPU(), GOMAXPROCS: runtime.GOMAXPROCS(0), GoVersion: runtime.Version(), OS: runtime.GOOS + "/" + runtime.GOARCH}
}
