package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The abuse scenario watches the nodes while it attacks them: VmRSS of the
// -pids every rssEvery, and the chat gauges and close counters of the
// -metrics-url pages (Caddy's admin /metrics) every second. A node whose RSS
// passes -max-rss stops the attacks, so that the machine survives a node
// that does not bound its memory.

// gaugeReading is one gauge of one node: before the attacks, the highest
// value seen while they ran and some seconds after they stopped. Nil: the
// node does not export the gauge (or -metrics-url was not given): "n/a".
type gaugeReading struct {
	Before *float64 `json:"before"`
	Peak   *float64 `json:"peak"`
	After  *float64 `json:"after"`
}

func (g *gaugeReading) sample(v *float64) {
	if v != nil && (g.Peak == nil || *v > *g.Peak) {
		x := *v
		g.Peak = &x
	}
}

// nodeMetrics is what the abuse scenario reads of one /metrics page.
type nodeMetrics struct {
	queued, history *float64           // caddy_chat_queued_bytes, caddy_chat_history_bytes
	closes          map[string]float64 // caddy_chat_connections_closed_total by reason
}

// parseMetrics reads the Prometheus text format: the two gauges (summed
// over their series, should they have labels) and the close counters.
func parseMetrics(r io.Reader) (nodeMetrics, error) {
	m := nodeMetrics{closes: map[string]float64{}}
	err := scanSamples(r, func(name, labels string, v float64) {
		switch name {
		case "caddy_chat_queued_bytes":
			addSample(&m.queued, v)
		case "caddy_chat_history_bytes":
			addSample(&m.history, v)
		case "caddy_chat_connections_closed_total":
			m.closes[labelValue(labels, "reason")] += v
		}
	})
	return m, err
}

// labelValue returns the value of label key in a Prometheus label list.
func labelValue(labels, key string) string {
	for _, part := range strings.Split(labels, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if ok && k == key {
			if s, err := strconv.Unquote(v); err == nil {
				return s
			}
			return strings.Trim(v, `"`)
		}
	}
	return ""
}

var metricsClient = &http.Client{Timeout: 3 * time.Second}

func fetchMetrics(ctx context.Context, url string) (nodeMetrics, error) {
	return fetchPage(ctx, url, parseMetrics)
}

// monitor samples the nodes for the abuse scenario.
type monitor struct {
	cfg   *config
	nodes []abuseNode
	over  func(reason string) // called once when a node passes -max-rss

	mu       sync.Mutex
	closes0  []map[string]float64
	selfPeak int64
	stop     chan struct{}
	wg       sync.WaitGroup
	tripped  bool
}

// startMonitor takes the "before" readings and starts sampling.
func startMonitor(ctx context.Context, cfg *config, over func(string)) *monitor {
	m := &monitor{cfg: cfg, over: over, stop: make(chan struct{})}
	m.nodes = make([]abuseNode, len(cfg.urls))
	m.closes0 = make([]map[string]float64, len(cfg.urls))
	for i := range m.nodes {
		n := &m.nodes[i]
		n.Node, n.URL = i, cfg.urls[i]
		if i < len(cfg.pids) {
			n.PID = cfg.pids[i]
			n.RSSBeforeKiB, _ = readRSS(n.PID)
			n.RSSPeakKiB = n.RSSBeforeKiB
		}
		if i < len(cfg.metricsURLs) {
			nm, err := fetchMetrics(ctx, cfg.metricsURLs[i])
			if err != nil {
				n.MetricsError = err.Error()
			}
			n.QueuedBytes.Before, n.HistoryBytes.Before = nm.queued, nm.history
			n.QueuedBytes.sample(nm.queued)
			n.HistoryBytes.sample(nm.history)
			m.closes0[i] = nm.closes
		}
	}
	m.wg.Add(2)
	go m.sampleRSS()
	go m.sampleMetrics(ctx)
	return m
}

func (m *monitor) sampleRSS() {
	defer m.wg.Done()
	tick := time.NewTicker(rssEvery)
	defer tick.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-tick.C:
		}
		self, _ := readRSS(os.Getpid())
		m.mu.Lock()
		m.selfPeak = max(m.selfPeak, self)
		var reason string
		for i := range m.nodes {
			n := &m.nodes[i]
			if n.PID == 0 {
				continue
			}
			kb, err := readRSS(n.PID)
			if err != nil {
				continue
			}
			n.RSSPeakKiB = max(n.RSSPeakKiB, kb)
			if m.cfg.maxRSS > 0 && kb*1024 > m.cfg.maxRSS && reason == "" {
				reason = fmt.Sprintf("node %d RSS %.0f MiB over -max-rss %.0f MiB", i, kib2mib(kb), float64(m.cfg.maxRSS)/(1<<20))
			}
		}
		if m.cfg.maxRSS > 0 && self*1024 > m.cfg.maxRSS && reason == "" {
			reason = fmt.Sprintf("chatbench's own RSS %.0f MiB over -max-rss", kib2mib(self))
		}
		trip := reason != "" && !m.tripped
		if trip {
			m.tripped = true
		}
		m.mu.Unlock()
		if trip && m.over != nil {
			m.over(reason)
		}
	}
}

func (m *monitor) sampleMetrics(ctx context.Context) {
	defer m.wg.Done()
	if len(m.cfg.metricsURLs) == 0 {
		return
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-tick.C:
		}
		for i, u := range m.cfg.metricsURLs {
			if i >= len(m.nodes) {
				break
			}
			nm, err := fetchMetrics(ctx, u)
			if err != nil {
				continue
			}
			m.mu.Lock()
			m.nodes[i].QueuedBytes.sample(nm.queued)
			m.nodes[i].HistoryBytes.sample(nm.history)
			m.mu.Unlock()
		}
	}
}

// stopPeak ends sampling; the peaks are final.
func (m *monitor) stopPeak() {
	select {
	case <-m.stop:
		return
	default:
	}
	close(m.stop)
	m.wg.Wait()
}

// after takes the "after" readings and returns the nodes' figures.
func (m *monitor) after(ctx context.Context) (nodes []abuseNode, selfPeakKiB int64) {
	m.stopPeak()
	for i := range m.nodes {
		n := &m.nodes[i]
		if n.PID != 0 {
			n.RSSAfterKiB, _ = readRSS(n.PID)
		}
		if i < len(m.cfg.metricsURLs) {
			nm, err := fetchMetrics(ctx, m.cfg.metricsURLs[i])
			if err != nil {
				n.MetricsError = err.Error()
				continue
			}
			n.QueuedBytes.After, n.HistoryBytes.After = nm.queued, nm.history
			for reason, v := range nm.closes {
				if d := int64(v - m.closes0[i][reason]); d > 0 {
					if n.Closes == nil {
						n.Closes = map[string]int64{}
					}
					n.Closes[reason] = d
				}
			}
		}
	}
	return m.nodes, m.selfPeak
}

// parseSize reads a byte count: 2GiB, 512MiB, 64KiB, 1GB, 100MB, 4096.
func parseSize(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3}, {"B", 1}}
	num, mult := strings.TrimSpace(s), int64(1)
	for _, u := range units {
		if strings.HasSuffix(num, u.suffix) {
			num, mult = strings.TrimSpace(strings.TrimSuffix(num, u.suffix)), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("bad size %q (want e.g. 2GiB, 512MiB or a byte count)", s)
	}
	return int64(f * float64(mult)), nil
}
