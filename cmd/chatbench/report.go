package main

// The report: what a run measured, as JSON and as the table.

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

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
	Server         string           `json:"server,omitempty"`    // baseline: where its server ran
	Transport      string           `json:"transport,omitempty"` // of the subscribers (fanout) or clients (idle)
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

	// Refused: publishes answered unavailable (the node would not take
	// them, e.g. deliveries running later than its max_lag); also counted
	// in PublishErrors.
	Refused int64 `json:"refused"`

	Expected   int64 `json:"expected"`
	Received   int64 `json:"received"`   // distinct messages, summed over subscribers
	Deliveries int64 `json:"deliveries"` // delivery frames, duplicates included
	// Reported: messages the server said it did not send (the missed
	// counts of gap frames, GapFrames of them); not lost.
	Reported  int64 `json:"reported"`
	GapFrames int64 `json:"gap_frames"`
	// ErrorsReceived: deliveries (among Received) of publishes answered
	// with an error, which are not expected: an unavailable publish that
	// reached the broker before publish_timeout ran out is still delivered.
	ErrorsReceived int64 `json:"errors_received"`
	// Lost: expected − (received − errors received) − reported, loss
	// nobody was told of.
	Lost       int64 `json:"lost"`
	Duplicates int64 `json:"duplicates"`
	OutOfOrder int64 `json:"out_of_order"`
	Stray      int64 `json:"stray"` // deliveries not belonging to this phase

	Seconds          float64  `json:"seconds"` // first publish → last delivery
	DeliveriesPerSec float64  `json:"deliveries_per_sec"`
	BaselineRatio    *float64 `json:"baseline_ratio,omitempty"`
	// P99Ratio is p99 over the baseline phase's p99 (the same comparison as
	// BaselineRatio); MemoryRatio is a fanout phase's deliveries/s over the
	// fanout-memory phase's (the Redis path against the in-process broker).
	P99Ratio    *float64 `json:"p99_baseline_ratio,omitempty"`
	MemoryRatio *float64 `json:"memory_ratio,omitempty"`
	// BridgedRatio and P99BridgedRatio: a rooms phase's deliveries/s and
	// p99 over baseline-rooms-redis' (the bare servers bridged through
	// Redis): caddychat's cost beyond the Redis hop.
	BridgedRatio    *float64       `json:"bridged_baseline_ratio,omitempty"`
	P99BridgedRatio *float64       `json:"p99_bridged_baseline_ratio,omitempty"`
	Latency         latencySummary `json:"latency"`
	AckLatency      latencySummary `json:"publish_ack_latency"`

	CPU cpuUsage `json:"cpu"`
	// Bytes every connection of chatbench read during the phase (frames,
	// the publisher's replies too) and the nodes' CPU (-pids), each per
	// delivery.
	WireBytesPerDelivery       float64        `json:"wire_bytes_per_delivery,omitempty"`
	ServerCPUMicrosPerDelivery float64        `json:"server_cpu_us_per_delivery,omitempty"`
	Disconnected               int64          `json:"subscribers_disconnected"`
	CloseCodes                 map[string]int `json:"close_codes,omitempty"`
	OverMaxP99                 bool           `json:"over_max_p99,omitempty"`
	Incomplete                 string         `json:"incomplete,omitempty"`
	// DrainCapped: waiting stopped -drain-max after the last publish with
	// deliveries missing; stepping stops after such a phase, as the next
	// rate would receive what is still in flight.
	DrainCapped bool `json:"drain_capped,omitempty"`
	// PublishStopped: -publish-for ended publishing before -messages.
	PublishStopped bool     `json:"publish_stopped,omitempty"`
	NodeLag        *nodeLag `json:"node_lag,omitempty"`
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
		fmt.Fprintln(tw, "scenario\tphase\trate\tsubs\tpubs\tpublished\tpub/s\tacked\trefused\tpub_err\tunanswered\texpected\tdelivered\treported\tlost\tdup\tooo\tdisc\tdeliveries/s\tvs_baseline\tvs_memory\tp50_ms\tp90_ms\tp99_ms\tp99_vs_base\tmax_ms\tlag_max_s\tack_p99_ms\ttool_cores\tsrv_cores\tsrv_rss_MiB\t")
		for _, s := range phases {
			for _, p := range s.Phases {
				var errs int64
				for _, n := range p.PublishErrors {
					errs += n
				}
				errs -= p.Refused
				lag := "-"
				if p.NodeLag != nil && p.NodeLag.LagMaxSeconds != nil {
					lag = fmt.Sprintf("%.2f", *p.NodeLag.LagMaxSeconds)
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
				fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d\t%d\t%.0f\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%.0f\t%s\t%s\t%.2f\t%.2f\t%.2f\t%s\t%.2f\t%s\t%.2f\t%.2f\t%s\t%s\t\n",
					s.label(), p.Phase, rate, p.Subscribers, p.Publishers, p.Published, p.PublishRate, p.PublishOK, p.Refused, errs, p.Unanswered,
					p.Expected, p.Received, p.Reported, p.Lost, p.Duplicates, p.OutOfOrder, p.Disconnected,
					p.DeliveriesPerSec, ratioText(p.BaselineRatio), ratioText(p.MemoryRatio), p.Latency.P50MS, p.Latency.P90MS, p.Latency.P99MS, ratioText(p.P99Ratio),
					p.Latency.MaxMS, lag, p.AckLatency.P99MS, p.CPU.ToolCores, srvCores, srvRSS)
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
				if p.ErrorsReceived > 0 {
					notes = append(notes, fmt.Sprintf("%d deliveries of publishes answered with an error (not expected, not counted against lost)", p.ErrorsReceived))
				}
				if p.OverMaxP99 {
					notes = append(notes, "p99 over -max-p99: stepping stopped")
				}
				if p.WireBytesPerDelivery > 0 {
					note := fmt.Sprintf("%.0f wire bytes/delivery", p.WireBytesPerDelivery)
					if p.ServerCPUMicrosPerDelivery > 0 {
						note += fmt.Sprintf(", %.2f µs node CPU/delivery", p.ServerCPUMicrosPerDelivery)
					}
					notes = append(notes, note)
				}
				if p.BridgedRatio != nil || p.P99BridgedRatio != nil {
					notes = append(notes, fmt.Sprintf("vs baseline-rooms-redis: deliveries/s %s, p99 %s", ratioText(p.BridgedRatio), ratioText(p.P99BridgedRatio)))
				}
				if p.GapFrames > 0 {
					notes = append(notes, fmt.Sprintf("%d gap frames reported %d missed messages", p.GapFrames, p.Reported))
				}
				if p.PublishStopped {
					notes = append(notes, "publishing stopped by -publish-for")
				}
				if p.NodeLag != nil {
					notes = append(notes, p.NodeLag.text())
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
		fmt.Fprintln(tw, "scenario\tconns\tconnect_s\tconns/s\tdisc\tnode\tpid\tnode_conns\trss_before_MiB\trss_settled_MiB\trss_end_MiB\tKiB/conn_settled\tKiB/conn_end\tKiB_vs_base\tconns/s_vs_base\t")
		for _, s := range idles {
			id := s.Idle
			vs := ratioText(id.BaselineKiBRatio) + "\t" + ratioText(id.BaselineConnectsRatio)
			if len(id.Nodes) == 0 {
				fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.0f\t%d\t-\t-\t-\t-\t-\t-\t-\t-\t%s\t\n", s.label(), s.Connections, s.ConnectSeconds, s.ConnectsPerSec, id.Disconnected, vs)
			}
			for _, n := range id.Nodes {
				fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.0f\t%d\t%d\t%d\t%d\t%.1f\t%.1f\t%.1f\t%.2f\t%.2f\t-\t-\t\n", s.label(), s.Connections, s.ConnectSeconds, s.ConnectsPerSec, id.Disconnected,
					n.Node, n.PID, n.Conns, kib2mib(n.RSSBeforeKiB), kib2mib(n.RSSSettledKiB), kib2mib(n.RSSEndKiB), n.KiBPerConnSettled, n.KiBPerConnEnd)
			}
			if len(id.Nodes) > 0 {
				t := id.Total
				fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.0f\t%d\tall\t-\t%d\t%.1f\t%.1f\t%.1f\t%.2f\t%.2f\t%s\t\n", s.label(), s.Connections, s.ConnectSeconds, s.ConnectsPerSec, id.Disconnected,
					t.Conns, kib2mib(t.RSSBeforeKiB), kib2mib(t.RSSSettledKiB), kib2mib(t.RSSEndKiB), t.KiBPerConnSettled, t.KiBPerConnEnd, vs)
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

func ratioText(r *float64) string {
	if r == nil {
		return "-"
	}
	return fmt.Sprintf("%.2f", *r)
}

// text is the phase note of the nodes' figures.
func (l *nodeLag) text() string {
	var parts []string
	if l.LagBucketSeconds != nil {
		le := "+Inf"
		if *l.LagBucketSeconds >= 0 {
			le = strconv.FormatFloat(*l.LagBucketSeconds, 'g', -1, 64)
		}
		parts = append(parts, fmt.Sprintf("node broker lag <= %s s for all %.0f messages (histogram)", le, *l.LagObserved))
	}
	if l.BacklogPeakBytes != nil {
		parts = append(parts, fmt.Sprintf("backlog peak %.0f bytes", *l.BacklogPeakBytes))
	}
	if len(l.LateSkipped) > 0 {
		m := map[string]int64{}
		for k, v := range l.LateSkipped {
			m[k] = int64(v)
		}
		parts = append(parts, "late skipped "+formatCounts(m))
	}
	if l.RefusedLate != nil {
		parts = append(parts, fmt.Sprintf("publishes refused late %.0f", *l.RefusedLate))
	}
	if len(l.Errors) > 0 {
		parts = append(parts, "metrics: "+strings.Join(l.Errors, "; "))
	}
	if len(parts) == 0 {
		return "no lag metrics on the nodes"
	}
	return strings.Join(parts, ", ")
}

// label names the scenario in the tables: with "/sse" when its subscribers
// read SSE streams.
func (s *scenarioResult) label() string {
	if s.Transport == "sse" {
		return s.Scenario + "/sse"
	}
	return s.Scenario
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
