package main

// The command line: chatbench's usage, its configuration and the flags
// that set it.

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/go-redis/v9"
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
            connections and stops after the first whose p99 exceeds -max-p99
            (baseline with fanout in the run steps through every rate).
  rooms     -clients clients in rooms of -room-size; each subscribes to its
            room and publishes -client-rate msgs/s (jittered start) for
            -duration. Every message is expected by the room's members,
            the sender included.
  idle      -clients idle connections, each subscribed to its own channel
            (or all to -idle-channel), held for -hold. Reports the time to
            connect them and, with -pids (one server pid per node, in -url
            order), VmRSS before, -settle after connecting and at the end of
            the hold, and the growth in KiB per connection. -transport sse:
            one SSE stream per client instead of a WebSocket.
  baseline  the fanout measurement against a bare coder/websocket broadcast
            server inside this process (no Caddy, no broker; in a child
            process when both ends of -subs connections exceed this process's
            RLIMIT_NOFILE). With fanout in the same run, the table shows
            fanout's deliveries/s relative to baseline's (meaningful when both
            are saturated: -rate 0 or a high -rate).
            With -transport sse the subscribers read an SSE stream each
            (GET <route>?channel=..., Accept: text/event-stream) instead of
            a WebSocket; the publisher stays on WebSocket, latency is
            measured the same way.
  fanout-history  the fanout measurement against -history-url, the same
            nodes' route with history on; its vs_baseline column is
            relative to fanout in the same run: the cost of keeping history.
  fanout-hook  the fanout measurement against -hook-url, the same nodes'
            route with a publish_hook; its vs_baseline column is relative
            to fanout in the same run: the cost of asking the backend.
  fanout-memory  the fanout measurement against -memory-url, a route of
            the same node with the in-process broker (no redis option; it
            serves one node only, so give one -url). With fanout in the same
            run, fanout's vs_memory column is its deliveries/s relative to
            fanout-memory's: the Redis path against the memory broker.
  baseline-rooms  the rooms measurement against the same bare server; with
            rooms in the same run, the table shows rooms' deliveries/s
            relative to it.
  baseline-rooms-redis  the rooms measurement against -bridge-nodes bare
            servers (child processes), bridged through the Redis at
            -bridge-redis as caddychat's nodes are: a publish goes to Redis
            through go-redis's autopipeline and is answered ok once Redis
            answered; each server holds one SUBSCRIBE per room it has
            members in, confirmed before a member's subscribe is answered;
            channels are prefixed chatbench-bridge:. Clients are spread
            over the servers, so rooms span them. Its vs_baseline is
            relative to baseline-rooms (the Redis hop); with rooms in the
            same run, rooms' note and JSON give its deliveries/s and p99
            relative to it (bridged_baseline_ratio,
            p99_bridged_baseline_ratio): caddychat's cost beyond the hop.
  baseline-idle  the idle measurement against the bare server, always in a
            child process (its send channel 16 frames): with idle in the
            same run, idle's KiB per connection and connects/s relative to
            it (KiB_vs_base, conns/s_vs_base).
Each delivery scenario's vs_baseline and p99_vs_base columns are its
deliveries/s and p99 relative to its baseline's phase of the same index.
` + abuseUsage + `
Figures:
  latency       receive time minus the send time the publisher put in the
                payload (one machine, one clock); time a publisher waits for
                room in its -inflight window is not included.
  acked         publishes answered ok; refused: answered unavailable (not
                known to be published: the node would not take them, or
                the broker did not answer within publish_timeout, and one
                that had reached it is still delivered, beyond expected);
                pub_err: the other error answers.
  delivered     distinct messages received, summed over subscribers.
  reported      messages the server said it did not send: the "missed" of
                gap frames ({"type":"gap","channel":...,"missed":N}; SSE
                event: gap), credited to the phase they arrive in.
  lost          expected minus delivered minus reported: loss nobody was
                told of. expected counts every publish not answered with an
                error (unanswered ones included) once per subscriber (per
                room member for rooms); delivered here leaves out the
                deliveries of publishes answered with an error (noted as
                "deliveries of publishes answered with an error"), so that
                they do not stand in for expected ones that never came.
  lag_max_s     with -metrics-url, the highest caddy_chat_broker_lag_max_seconds
                the nodes showed during the phase (sampled every 500 ms; the
                gauge spans 10-20 s, so it may carry a previous phase's);
                a note gives the bound of caddy_chat_broker_lag_seconds that
                holds every lag observed in the phase, and the mechanism's
                backlog peak, late-skipped and refused-late counts when the
                nodes export them. max_ms is the client side's largest.
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
	hookURLs           []string // fanout-hook: a route of the same nodes with a publish_hook
	scenarios          []string
	sources            int
	connectConcurrency int
	connectTimeout     time.Duration
	timeout            time.Duration
	out                string
	compression        websocket.CompressionMode // fanout: what its WebSocket clients offer
	transport          string                    // subscribers of fanout and its variants, idle clients: websocket or sse
	// memoryURLs: for fanout-memory, a route of the same node with the
	// in-process broker (no redis option), to compare the Redis path with.
	memoryURLs []string
	quiet      bool
	cpuProfile string

	// fanout and baseline
	subs      int
	messages  int
	rate      float64
	inflight  int
	payload   int
	stepRates []float64
	maxP99    time.Duration
	drain     time.Duration
	// drainMax bounds the wait for deliveries after the last publish even
	// while they still arrive; publishFor bounds a fanout phase's
	// publishing (0: -messages alone).
	drainMax   time.Duration
	publishFor time.Duration

	// rooms and idle
	clients    int
	roomSize   int
	clientRate float64
	duration   time.Duration

	// baseline-rooms-redis: the Redis its bare servers are bridged
	// through, and how many of them
	bridgeRedis string
	bridgeNodes int

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
		transport:          "websocket",
		subs:               2000,
		messages:           200,
		rate:               100,
		inflight:           16,
		payload:            100,
		maxP99:             100 * time.Millisecond,
		drain:              5 * time.Second,
		drainMax:           time.Minute,
		clients:            2000,
		roomSize:           10,
		clientRate:         1,
		duration:           20 * time.Second,
		bridgeNodes:        2,
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
  chatbench -url ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws -scenario fanout -transport sse -subs 2000 -messages 300 -rate 50
  chatbench -url ws://127.0.0.1:8081/ws -memory-url ws://127.0.0.1:8081/wsm -metrics-url http://127.0.0.1:2019/metrics \
      -scenario baseline,fanout-memory,fanout -subs 10000 -rate 200 -messages 100000 -publish-for 5s -drain-max 10s
  chatbench -url ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws -scenario rooms -clients 2000 -room-size 10 -client-rate 1 -duration 30s
  chatbench -url ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws -scenario baseline-rooms,baseline-rooms-redis,rooms \
      -bridge-redis redis://127.0.0.1:6379/0 -bridge-nodes 2 -clients 5000 -room-size 10 -client-rate 1 -duration 15s
  chatbench -url ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws -scenario idle -clients 5000 -hold 30s -pids 1234,5678
  chatbench -url ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws -scenario abuse -duration 20s -pids 1234,5678 \
      -raw-url ws://127.0.0.1:8081/raw/abuse-raw,ws://127.0.0.1:8082/raw/abuse-raw -raw-channel room:abuse-raw \
      -metrics-url http://127.0.0.1:2019/metrics,http://127.0.0.1:2020/metrics \
      -publish-url http://127.0.0.1:8081/chat/publish -token "$(caddy chat token --sub mallory --publish 'room:**')"
`)
	}
	urls := fs.String("url", strings.Join(cfg.urls, ","), "node WebSocket URLs, comma separated; clients are spread round-robin over them")
	historyURLs := fs.String("history-url", "", "for fanout-history: the same nodes' URLs of a route that keeps history, comma separated")
	hookURLs := fs.String("hook-url", "", "for fanout-hook: the same nodes' URLs of a route with a publish_hook, comma separated")
	memoryURLs := fs.String("memory-url", "", "for fanout-memory: the same node's URL of a route with the in-process broker (no redis option)")
	metricsURLs := fs.String("metrics-url", "", "the nodes' Caddy admin /metrics URLs, one per -url in the same order: delivery phases report the broker lag they export; abuse reports gauges and closes")
	scen := fs.String("scenario", strings.Join(cfg.scenarios, ","), "fanout, rooms, idle, baseline, baseline-rooms, baseline-rooms-redis, baseline-idle, fanout-history, fanout-hook, fanout-memory, abuse, or a comma list of them")
	fs.IntVar(&cfg.sources, "sources", cfg.sources, "loopback source addresses 127.0.0.1..127.0.0.N to spread connections over (loopback nodes only)")
	fs.IntVar(&cfg.connectConcurrency, "connect-concurrency", cfg.connectConcurrency, "WebSocket handshakes in flight at once")
	fs.DurationVar(&cfg.connectTimeout, "connect-timeout", cfg.connectTimeout, "limit for one connection's handshake, welcome and subscribe")
	fs.DurationVar(&cfg.timeout, "timeout", cfg.timeout, "limit for the whole run")
	fs.StringVar(&cfg.transport, "transport", cfg.transport, "fanout, fanout-history, fanout-hook subscribers and idle clients: websocket, or sse (one GET event stream each; publishers stay on WebSocket)")
	compression := fs.String("compression", "off", "fanout: WebSocket clients offer permessage-deflate: off, on (no context takeover) or context_takeover; the phases report wire bytes and node CPU per delivery either way")
	fs.StringVar(&cfg.out, "out", cfg.out, `JSON results file ("" for none)`)
	fs.BoolVar(&cfg.quiet, "quiet", false, "no progress lines on stderr")
	fs.StringVar(&cfg.cpuProfile, "cpuprofile", "", "write a CPU profile of this tool to the file")

	fs.IntVar(&cfg.subs, "subs", cfg.subs, "fanout/baseline: subscribers of the channel")
	fs.IntVar(&cfg.messages, "messages", cfg.messages, "fanout/baseline: messages published (per phase)")
	fs.Float64Var(&cfg.rate, "rate", cfg.rate, "fanout/baseline: publishes per second (0: as fast as -inflight allows)")
	fs.IntVar(&cfg.inflight, "inflight", cfg.inflight, "publishes a publisher may have unanswered")
	fs.IntVar(&cfg.payload, "payload", cfg.payload, "approximate size of a message's data in bytes")
	steps := fs.String("step-rates", "", "fanout/baseline: comma list of rates (max or 0: unpaced), one phase each, stopping once p99 exceeds -max-p99")
	fs.DurationVar(&cfg.maxP99, "max-p99", cfg.maxP99, "fanout/baseline stepping: stop after a phase whose p99 latency is above this")
	fs.DurationVar(&cfg.drain, "drain", cfg.drain, "after publishing, wait this long without progress for missing deliveries and replies")
	fs.DurationVar(&cfg.drainMax, "drain-max", cfg.drainMax, "after publishing, stop waiting for deliveries after this long even while they arrive, and count the missing (0: no limit); stepping stops after a phase cut short so")
	fs.DurationVar(&cfg.publishFor, "publish-for", 0, "fanout/baseline: stop publishing a phase after this long even if fewer than -messages were sent (0: no limit)")

	fs.IntVar(&cfg.clients, "clients", cfg.clients, "rooms/idle: connections")
	fs.IntVar(&cfg.roomSize, "room-size", cfg.roomSize, "rooms: clients per room")
	fs.Float64Var(&cfg.clientRate, "client-rate", cfg.clientRate, "rooms: publishes per second of each client")
	fs.DurationVar(&cfg.duration, "duration", cfg.duration, "rooms: how long clients publish; abuse: how long the attacks run")
	fs.StringVar(&cfg.bridgeRedis, "bridge-redis", "", "baseline-rooms-redis (required for it): the Redis URL its bare servers are bridged through, e.g. redis://127.0.0.1:6379/0")
	fs.IntVar(&cfg.bridgeNodes, "bridge-nodes", cfg.bridgeNodes, "baseline-rooms-redis: bare servers bridged through -bridge-redis; the clients are spread over them")

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
	cfg.hookURLs = splitList(*hookURLs)
	cfg.memoryURLs = splitList(*memoryURLs)
	cfg.metricsURLs = splitList(*metricsURLs)
	if len(cfg.metricsURLs) > 0 && len(cfg.metricsURLs) != len(cfg.urls) {
		return nil, fmt.Errorf("-metrics-url: %d URLs for %d nodes; give one per node, in -url order", len(cfg.metricsURLs), len(cfg.urls))
	}
	cfg.scenarios = splitList(*scen)
	for _, s := range cfg.scenarios {
		switch s {
		case "fanout", "rooms", "idle", "baseline", "baseline-rooms", "baseline-idle":
		case "abuse":
			if err := checkAbuse(); err != nil {
				return nil, err
			}
		case "fanout-history":
			if len(cfg.historyURLs) == 0 {
				return nil, errors.New("-scenario fanout-history needs -history-url")
			}
		case "fanout-hook":
			if len(cfg.hookURLs) == 0 {
				return nil, errors.New("-scenario fanout-hook needs -hook-url")
			}
		case "fanout-memory":
			if len(cfg.memoryURLs) == 0 {
				return nil, errors.New("-scenario fanout-memory needs -memory-url")
			}
		case "baseline-rooms-redis":
			if cfg.bridgeRedis == "" {
				return nil, errNoBridgeRedis
			}
			if _, err := redis.ParseURL(cfg.bridgeRedis); err != nil {
				return nil, fmt.Errorf("-bridge-redis: %v", err)
			}
			if cfg.bridgeNodes < 1 {
				return nil, errors.New("-bridge-nodes must be at least 1")
			}
		default:
			return nil, fmt.Errorf("-scenario: unknown scenario %q (fanout, rooms, idle, baseline, baseline-rooms, baseline-rooms-redis, baseline-idle, fanout-history, fanout-hook, fanout-memory, abuse)", s)
		}
	}
	if len(cfg.scenarios) == 0 {
		return nil, errors.New("-scenario: none given")
	}
	var err error
	if cfg.compression, err = parseCompression(*compression); err != nil {
		return nil, err
	}
	switch cfg.transport {
	case "websocket":
	case "sse":
		for _, s := range cfg.scenarios {
			switch s {
			case "fanout", "fanout-history", "fanout-hook", "fanout-memory", "idle":
			default:
				return nil, fmt.Errorf("-transport sse: scenario %s runs over WebSocket only (sse: fanout, fanout-history, fanout-hook, fanout-memory, idle)", s)
			}
		}
	default:
		return nil, fmt.Errorf("-transport: %q is neither websocket nor sse", cfg.transport)
	}
	for _, s := range splitList(*steps) {
		if s == "max" {
			s = "0"
		}
		r, err := strconv.ParseFloat(s, 64)
		if err != nil || r < 0 {
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
	case cfg.drainMax < 0 || cfg.publishFor < 0:
		return nil, errors.New("-drain-max and -publish-for may not be negative")
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
