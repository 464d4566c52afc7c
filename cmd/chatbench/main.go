// Command chatbench is the load generator of caddychat: it drives real
// WebSocket clients against one or more chat nodes through the public JSON
// protocol and reports delivery throughput, publish→receive latency, lost,
// duplicated and reordered messages, connection rate and server memory per
// connection. Run with -h for the usage.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

const usageText = `chatbench: load generator for caddychat nodes (WebSocket, JSON protocol).

Usage:
  chatbench [flags]

The nodes under test must be configured with "rate_limit off" in their chat
block: the default limit (50 frames/s per connection) would refuse the
publisher, and the tool cannot change it. A large "send_queue" (e.g. 4MiB)
avoids slow-consumer closes (4000) when one machine runs clients and nodes.

Scenarios (-scenario, a comma list runs several in order):
  fanout    one channel, -subs subscribers spread round-robin over the nodes,
            one publisher on the first node sending -messages messages at
            -rate msgs/s with at most -inflight unanswered publishes.
            -step-rates 100,200,400 runs one phase per rate on the same
            connections and stops after the first whose p99 exceeds -max-p99.
  rooms     -clients clients in rooms of -room-size; each subscribes to its
            room and publishes -client-rate msgs/s (jittered start) for
            -duration. Every message is expected by the room's members,
            the sender included.
  idle      -clients idle connections, each subscribed to its own channel
            (or all to -idle-channel), held for -hold. Reports the time to
            connect them and, with -pids (one server pid per node, in -url
            order), VmRSS before, -settle after connecting and at the end of
            the hold, and the growth in KiB per connection.
  baseline  the fanout measurement against a bare coder/websocket broadcast
            server inside this process (no Caddy, no broker; in a child
            process when both ends of -subs connections exceed this process's
            RLIMIT_NOFILE). With fanout in the same run, the table shows
            fanout's deliveries/s relative to baseline's (meaningful when both
            are saturated: -rate 0 or a high -rate).
  fanout-history  the fanout measurement against -history-url, the same
            nodes' route with history on; its vs_baseline column is
            relative to fanout in the same run: the cost of keeping history.
  baseline-rooms  the rooms measurement against the same bare server; with
            rooms in the same run, the table shows rooms' deliveries/s
            relative to it.
` + abuseUsage + `
Figures:
  latency       receive time minus the send time the publisher put in the
                payload (one machine, one clock); time a publisher waits for
                room in its -inflight window is not included.
  lost          expected minus distinct messages received; expected counts
                every publish not answered with an error (unanswered ones
                included) once per subscriber (per room member for rooms).
  deliveries/s  delivery frames received by all subscribers over the time
                from the first publish to the last delivery.
  tool_cores    CPU used by this process (cores busy on average), srv_cores
                that of the -pids processes: when they add up to the
                machine's cores, the figures measure the machine.
  srv_rss_MiB   VmRSS of the -pids processes together at the start of the
                phase and the highest reading during it (sampled every
                250 ms): whether memory stays bounded under load.
For idle RSS figures start the nodes fresh: a Go process keeps memory it has
freed, so a node that served an earlier run shows too little growth.
The table goes to stdout, a progress line per second to stderr, and all
results to the -out JSON file.

Flags:
`

// config is every flag.
type config struct {
	urls               []string
	historyURLs        []string // fanout-history: a route of the same nodes with history on
	scenarios          []string
	sources            int
	connectConcurrency int
	connectTimeout     time.Duration
	timeout            time.Duration
	out                string
	quiet              bool
	cpuProfile         string

	// fanout and baseline
	subs      int
	messages  int
	rate      float64
	inflight  int
	payload   int
	stepRates []float64
	maxP99    time.Duration
	drain     time.Duration

	// rooms and idle
	clients    int
	roomSize   int
	clientRate float64
	duration   time.Duration

	// idle
	hold        time.Duration
	settle      time.Duration
	idleChannel string
	pids        []int

	abuseConfig

	runID    string
	progress io.Writer // nil: no progress lines
	settings map[string]string
}

func defaultConfig() *config {
	return &config{
		urls:               []string{"ws://127.0.0.1:8081/ws"},
		scenarios:          []string{"fanout"},
		sources:            8,
		connectConcurrency: 200,
		connectTimeout:     10 * time.Second,
		timeout:            10 * time.Minute,
		out:                "results.json",
		subs:               2000,
		messages:           200,
		rate:               100,
		inflight:           16,
		payload:            100,
		maxP99:             100 * time.Millisecond,
		drain:              5 * time.Second,
		clients:            2000,
		roomSize:           10,
		clientRate:         1,
		duration:           20 * time.Second,
		hold:               30 * time.Second,
		settle:             5 * time.Second,
		runID:              newRunID(),
		abuseConfig:        defaultAbuseConfig(),
	}
}

func parseFlags(args []string, stderr io.Writer) (*config, error) {
	cfg := defaultConfig()
	fs := flag.NewFlagSet("chatbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usageText)
		fs.PrintDefaults()
		fmt.Fprint(stderr, `
Examples:
  chatbench -url ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws -scenario fanout,baseline -subs 2000 -messages 200 -rate 200
  chatbench -url ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws -scenario fanout,baseline -subs 2000 -step-rates 10,25,50,75,100 -max-p99 100ms
  chatbench -url ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws -scenario rooms -clients 2000 -room-size 10 -client-rate 1 -duration 30s
  chatbench -url ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws -scenario idle -clients 5000 -hold 30s -pids 1234,5678
  chatbench -url ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws -scenario abuse -duration 20s -pids 1234,5678 \
      -raw-url ws://127.0.0.1:8081/raw/abuse-raw,ws://127.0.0.1:8082/raw/abuse-raw -raw-channel room:abuse-raw \
      -metrics-url http://127.0.0.1:2019/metrics,http://127.0.0.1:2020/metrics \
      -publish-url http://127.0.0.1:8081/chat/publish -token "$(chattoken -sub mallory -publish 'room:**')"
`)
	}
	urls := fs.String("url", strings.Join(cfg.urls, ","), "node WebSocket URLs, comma separated; clients are spread round-robin over them")
	historyURLs := fs.String("history-url", "", "for fanout-history: the same nodes' URLs of a route that keeps history, comma separated")
	scen := fs.String("scenario", strings.Join(cfg.scenarios, ","), "fanout, rooms, idle, baseline, baseline-rooms, fanout-history, abuse, or a comma list of them")
	fs.IntVar(&cfg.sources, "sources", cfg.sources, "loopback source addresses 127.0.0.1..127.0.0.N to spread connections over (loopback nodes only)")
	fs.IntVar(&cfg.connectConcurrency, "connect-concurrency", cfg.connectConcurrency, "WebSocket handshakes in flight at once")
	fs.DurationVar(&cfg.connectTimeout, "connect-timeout", cfg.connectTimeout, "limit for one connection's handshake, welcome and subscribe")
	fs.DurationVar(&cfg.timeout, "timeout", cfg.timeout, "limit for the whole run")
	fs.StringVar(&cfg.out, "out", cfg.out, `JSON results file ("" for none)`)
	fs.BoolVar(&cfg.quiet, "quiet", false, "no progress lines on stderr")
	fs.StringVar(&cfg.cpuProfile, "cpuprofile", "", "write a CPU profile of this tool to the file")

	fs.IntVar(&cfg.subs, "subs", cfg.subs, "fanout/baseline: subscribers of the channel")
	fs.IntVar(&cfg.messages, "messages", cfg.messages, "fanout/baseline: messages published (per phase)")
	fs.Float64Var(&cfg.rate, "rate", cfg.rate, "fanout/baseline: publishes per second (0: as fast as -inflight allows)")
	fs.IntVar(&cfg.inflight, "inflight", cfg.inflight, "publishes a publisher may have unanswered")
	fs.IntVar(&cfg.payload, "payload", cfg.payload, "approximate size of a message's data in bytes")
	steps := fs.String("step-rates", "", "fanout/baseline: comma list of rates, one phase each, stopping once p99 exceeds -max-p99")
	fs.DurationVar(&cfg.maxP99, "max-p99", cfg.maxP99, "fanout/baseline stepping: stop after a phase whose p99 latency is above this")
	fs.DurationVar(&cfg.drain, "drain", cfg.drain, "after publishing, wait this long without progress for missing deliveries and replies")

	fs.IntVar(&cfg.clients, "clients", cfg.clients, "rooms/idle: connections")
	fs.IntVar(&cfg.roomSize, "room-size", cfg.roomSize, "rooms: clients per room")
	fs.Float64Var(&cfg.clientRate, "client-rate", cfg.clientRate, "rooms: publishes per second of each client")
	fs.DurationVar(&cfg.duration, "duration", cfg.duration, "rooms: how long clients publish; abuse: how long the attacks run")

	fs.DurationVar(&cfg.hold, "hold", cfg.hold, "idle: how long the connections are held")
	fs.DurationVar(&cfg.settle, "settle", cfg.settle, "idle: wait after connecting before the second RSS reading")
	fs.StringVar(&cfg.idleChannel, "idle-channel", "", "idle: one channel for all connections (default: one channel each)")
	pids := fs.String("pids", "", "server pids, one per -url in the same order: idle and abuse report their VmRSS, fanout and rooms their CPU use")

	checkAbuse := addAbuseFlags(fs, cfg)

	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	cfg.urls = splitList(*urls)
	cfg.historyURLs = splitList(*historyURLs)
	cfg.scenarios = splitList(*scen)
	for _, s := range cfg.scenarios {
		switch s {
		case "fanout", "rooms", "idle", "baseline", "baseline-rooms":
		case "abuse":
			if err := checkAbuse(); err != nil {
				return nil, err
			}
		case "fanout-history":
			if len(cfg.historyURLs) == 0 {
				return nil, errors.New("-scenario fanout-history needs -history-url")
			}
		default:
			return nil, fmt.Errorf("-scenario: unknown scenario %q (fanout, rooms, idle, baseline, baseline-rooms, fanout-history, abuse)", s)
		}
	}
	if len(cfg.scenarios) == 0 {
		return nil, errors.New("-scenario: none given")
	}
	for _, s := range splitList(*steps) {
		r, err := strconv.ParseFloat(s, 64)
		if err != nil || r <= 0 {
			return nil, fmt.Errorf("-step-rates: bad rate %q", s)
		}
		cfg.stepRates = append(cfg.stepRates, r)
	}
	for _, s := range splitList(*pids) {
		p, err := strconv.Atoi(s)
		if err != nil || p <= 0 {
			return nil, fmt.Errorf("-pids: bad pid %q", s)
		}
		cfg.pids = append(cfg.pids, p)
	}
	if len(cfg.pids) > 0 && len(cfg.pids) != len(cfg.urls) {
		return nil, fmt.Errorf("-pids: %d pids for %d node URLs; give one per node, in -url order", len(cfg.pids), len(cfg.urls))
	}
	switch {
	case cfg.subs < 1, cfg.clients < 1, cfg.messages < 1:
		return nil, errors.New("-subs, -clients and -messages must be at least 1")
	case cfg.roomSize < 1:
		return nil, errors.New("-room-size must be at least 1")
	case cfg.rate < 0 || cfg.clientRate <= 0:
		return nil, errors.New("-rate must be >= 0 and -client-rate > 0")
	}
	cfg.settings = map[string]string{}
	fs.VisitAll(func(f *flag.Flag) { cfg.settings[f.Name] = f.Value.String() })
	return cfg, nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func newRunID() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Results. The JSON file holds a report; the table shows the same figures.

type report struct {
	Tool      string            `json:"tool"`
	Started   time.Time         `json:"started"`
	Seconds   float64           `json:"seconds"`
	Args      []string          `json:"args"`
	Settings  map[string]string `json:"settings"`
	Host      hostInfo          `json:"host"`
	Scenarios []*scenarioResult `json:"scenarios"`
	Error     string            `json:"error,omitempty"`
}

type scenarioResult struct {
	Scenario       string           `json:"scenario"`
	Targets        []string         `json:"targets"`
	Server         string           `json:"server,omitempty"` // baseline: where its server ran
	Connections    int              `json:"connections"`
	ConnectSeconds float64          `json:"connect_seconds"`
	ConnectsPerSec float64          `json:"connects_per_sec"`
	Phases         []*deliveryPhase `json:"phases,omitempty"`
	Idle           *idleResult      `json:"idle,omitempty"`
	Abuse          *abuseResult     `json:"abuse,omitempty"`
	Error          string           `json:"error,omitempty"`
}

// deliveryPhase is one measured run of publishes (fanout, baseline, rooms).
type deliveryPhase struct {
	Phase int `json:"phase"`
	// Rate is the target: publishes/s of the one publisher (fanout, 0 for
	// unpaced) or of each client (rooms).
	Rate        float64 `json:"rate"`
	Subscribers int     `json:"subscribers"`
	Publishers  int     `json:"publishers"`
	RoomSize    int     `json:"room_size,omitempty"`

	Published     int64            `json:"published"`
	PublishOK     int64            `json:"publish_ok"`
	PublishErrors map[string]int64 `json:"publish_errors"`
	Unanswered    int64            `json:"publish_unanswered"`
	PublishRate   float64          `json:"publish_rate"` // achieved, all publishers

	Expected   int64 `json:"expected"`
	Received   int64 `json:"received"`   // distinct messages, summed over subscribers
	Deliveries int64 `json:"deliveries"` // delivery frames, duplicates included
	Lost       int64 `json:"lost"`
	Duplicates int64 `json:"duplicates"`
	OutOfOrder int64 `json:"out_of_order"`
	Stray      int64 `json:"stray"` // deliveries not belonging to this phase

	Seconds          float64        `json:"seconds"` // first publish → last delivery
	DeliveriesPerSec float64        `json:"deliveries_per_sec"`
	BaselineRatio    *float64       `json:"baseline_ratio,omitempty"`
	Latency          latencySummary `json:"latency"`
	AckLatency       latencySummary `json:"publish_ack_latency"`

	CPU          cpuUsage       `json:"cpu"`
	Disconnected int64          `json:"subscribers_disconnected"`
	CloseCodes   map[string]int `json:"close_codes,omitempty"`
	OverMaxP99   bool           `json:"over_max_p99,omitempty"`
	Incomplete   string         `json:"incomplete,omitempty"`
}

func main() { os.Exit(mainCode()) }

func mainCode() int {
	if len(os.Args) == 2 && os.Args[1] == serveBaselineFlag {
		return serveBaselineChild()
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
		case "fanout-history":
			res, err = runFanout(ctx, cfg, s, cfg.historyURLs, cfg.pids)
		case "idle":
			res, err = runIdle(ctx, cfg)
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
		case "fanout", "baseline", "fanout-history": // a baseline that does not fit runs its server in a child
			n = max(n, cfg.subs+1)
		case "rooms", "baseline-rooms", "idle":
			n = max(n, cfg.clients)
		case "abuse":
			n = max(n, 2*len(cfg.urls)*(cfg.honestSubs+1)+len(abuseAttacks))
		}
	}
	return n
}

// addBaselineRatios sets fanout's deliveries/s relative to baseline's,
// rooms' relative to baseline-rooms', and fanout-history's relative to
// fanout's (the cost of keeping history), phase by phase.
func addBaselineRatios(rep *report) {
	baseOf := map[string]string{"fanout": "baseline", "rooms": "baseline-rooms", "fanout-history": "fanout"}
	bases := map[string]*scenarioResult{}
	for _, s := range rep.Scenarios {
		bases[s.Scenario] = s
	}
	for _, s := range rep.Scenarios {
		base := bases[baseOf[s.Scenario]]
		if base == nil {
			continue
		}
		for i, p := range s.Phases {
			if i < len(base.Phases) && base.Phases[i].DeliveriesPerSec > 0 {
				r := p.DeliveriesPerSec / base.Phases[i].DeliveriesPerSec
				p.BaselineRatio = &r
			}
		}
	}
}

func writeJSON(path string, rep *report) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// writeTable prints one table for the delivery scenarios and one for idle.
func writeTable(w io.Writer, rep *report) {
	var phases, idles []*scenarioResult
	for _, s := range rep.Scenarios {
		if len(s.Phases) > 0 {
			phases = append(phases, s)
		}
		if s.Idle != nil {
			idles = append(idles, s)
		}
	}
	if len(phases) > 0 {
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "scenario\tphase\trate\tsubs\tpubs\tpublished\tpub/s\tpub_err\tunanswered\texpected\treceived\tlost\tdup\tooo\tdisc\tdeliveries/s\tvs_baseline\tp50_ms\tp90_ms\tp99_ms\tmax_ms\tack_p99_ms\ttool_cores\tsrv_cores\tsrv_rss_MiB\t")
		for _, s := range phases {
			for _, p := range s.Phases {
				ratio := "-"
				if p.BaselineRatio != nil {
					ratio = fmt.Sprintf("%.2f", *p.BaselineRatio)
				}
				var errs int64
				for _, n := range p.PublishErrors {
					errs += n
				}
				srvCores, srvRSS := "-", "-"
				if len(p.CPU.ServerSeconds) > 0 {
					srvCores = fmt.Sprintf("%.2f", p.CPU.ServerCoresSum)
				}
				if p.CPU.ServerRSSPeakKiB > 0 {
					srvRSS = fmt.Sprintf("%.0f->%.0f", kib2mib(p.CPU.ServerRSSStartKiB), kib2mib(p.CPU.ServerRSSPeakKiB))
				}
				rate := "max"
				if p.Rate > 0 {
					rate = strconv.FormatFloat(p.Rate, 'g', -1, 64)
				}
				fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d\t%d\t%.0f\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%.0f\t%s\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%s\t%s\t\n",
					s.Scenario, p.Phase, rate, p.Subscribers, p.Publishers, p.Published, p.PublishRate, errs, p.Unanswered,
					p.Expected, p.Received, p.Lost, p.Duplicates, p.OutOfOrder, p.Disconnected,
					p.DeliveriesPerSec, ratio, p.Latency.P50MS, p.Latency.P90MS, p.Latency.P99MS, p.Latency.MaxMS, p.AckLatency.P99MS, p.CPU.ToolCores, srvCores, srvRSS)
			}
		}
		tw.Flush()
		for _, s := range phases {
			for _, p := range s.Phases {
				var notes []string
				if len(p.PublishErrors) > 0 {
					notes = append(notes, "publish errors "+formatCounts(p.PublishErrors))
				}
				if p.PublishErrors["rate_limited"] > 0 {
					notes = append(notes, `the nodes must run with "rate_limit off"`)
				}
				if len(p.CloseCodes) > 0 {
					notes = append(notes, "close codes "+formatCounts(p.CloseCodes))
				}
				if p.Stray > 0 {
					notes = append(notes, fmt.Sprintf("%d stray deliveries", p.Stray))
				}
				if p.OverMaxP99 {
					notes = append(notes, "p99 over -max-p99: stepping stopped")
				}
				if p.Incomplete != "" {
					notes = append(notes, p.Incomplete)
				}
				if len(notes) > 0 {
					fmt.Fprintf(w, "  %s phase %d: %s\n", s.Scenario, p.Phase, strings.Join(notes, "; "))
				}
			}
		}
	}
	if len(idles) > 0 {
		if len(phases) > 0 {
			fmt.Fprintln(w)
		}
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "scenario\tconns\tconnect_s\tconns/s\tdisc\tnode\tpid\tnode_conns\trss_before_MiB\trss_settled_MiB\trss_end_MiB\tKiB/conn_settled\tKiB/conn_end\t")
		for _, s := range idles {
			id := s.Idle
			if len(id.Nodes) == 0 {
				fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.0f\t%d\t-\t-\t-\t-\t-\t-\t-\t-\t\n", s.Scenario, s.Connections, s.ConnectSeconds, s.ConnectsPerSec, id.Disconnected)
			}
			for _, n := range id.Nodes {
				fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.0f\t%d\t%d\t%d\t%d\t%.1f\t%.1f\t%.1f\t%.2f\t%.2f\t\n", s.Scenario, s.Connections, s.ConnectSeconds, s.ConnectsPerSec, id.Disconnected,
					n.Node, n.PID, n.Conns, kib2mib(n.RSSBeforeKiB), kib2mib(n.RSSSettledKiB), kib2mib(n.RSSEndKiB), n.KiBPerConnSettled, n.KiBPerConnEnd)
			}
			if len(id.Nodes) > 0 {
				t := id.Total
				fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.0f\t%d\tall\t-\t%d\t%.1f\t%.1f\t%.1f\t%.2f\t%.2f\t\n", s.Scenario, s.Connections, s.ConnectSeconds, s.ConnectsPerSec, id.Disconnected,
					t.Conns, kib2mib(t.RSSBeforeKiB), kib2mib(t.RSSSettledKiB), kib2mib(t.RSSEndKiB), t.KiBPerConnSettled, t.KiBPerConnEnd)
			}
		}
		tw.Flush()
		for _, s := range idles {
			if len(s.Idle.CloseCodes) > 0 {
				fmt.Fprintf(w, "  %s: close codes %s\n", s.Scenario, formatCounts(s.Idle.CloseCodes))
			}
		}
	}
	for _, s := range rep.Scenarios {
		if s.Abuse != nil {
			if len(phases)+len(idles) > 0 {
				fmt.Fprintln(w)
			}
			writeAbuseTables(w, s)
		}
	}
	for _, s := range rep.Scenarios {
		if s.Error != "" {
			fmt.Fprintf(w, "%s: error: %s\n", s.Scenario, s.Error)
		}
	}
}

func kib2mib(k int64) float64 { return float64(k) / 1024 }

func formatCounts[V int | int64](m map[string]V) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, m[k])
	}
	return strings.Join(parts, " ")
}

// Progress: one line a second on stderr while a scenario runs.

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
