package main

import (
	"context"
	"fmt"
	"time"
)

// idleResult is the idle scenario's report.
type idleResult struct {
	Channel      string         `json:"channel"` // "per connection" or the shared channel
	HoldSeconds  float64        `json:"hold_seconds"`
	Disconnected int64          `json:"disconnected"`
	CloseCodes   map[string]int `json:"close_codes,omitempty"`
	Nodes        []idleNode     `json:"nodes,omitempty"` // with -pids
	Total        idleNode       `json:"total"`
	// With baseline-idle in the run: KiB per connection (settled) and
	// connects/s relative to the bare server's.
	BaselineKiBRatio      *float64 `json:"baseline_kib_ratio,omitempty"`
	BaselineConnectsRatio *float64 `json:"baseline_connects_ratio,omitempty"`
}

// idleNode is the memory of one server process (or, as the total, of all).
type idleNode struct {
	Node          int    `json:"node"`
	URL           string `json:"url,omitempty"`
	PID           int    `json:"pid,omitempty"`
	Conns         int    `json:"conns"`
	RSSBeforeKiB  int64  `json:"rss_before_kib"`
	RSSSettledKiB int64  `json:"rss_settled_kib"`
	RSSEndKiB     int64  `json:"rss_end_kib"`
	// KiB per connection: (settled − before) / conns and (end − before) / conns.
	KiBPerConnSettled float64 `json:"kib_per_conn_settled"`
	KiBPerConnEnd     float64 `json:"kib_per_conn_end"`
}

// runIdle opens cfg.clients connections to urls, each subscribed to its own
// channel (or all to -idle-channel), holds them for cfg.hold and reads the
// VmRSS of pids (one per URL) before, cfg.settle after connecting and at the
// end of the hold.
func runIdle(ctx context.Context, cfg *config, name string, urls []string, pids []int) (*scenarioResult, error) {
	res := &scenarioResult{Scenario: name, Targets: urls, Transport: cfg.transport}
	id := &idleResult{Channel: "per connection", HoldSeconds: cfg.hold.Seconds()}
	res.Idle = id
	if cfg.idleChannel != "" {
		id.Channel = cfg.idleChannel
	}
	d, err := newDialer(urls, cfg.sources, cfg.connectTimeout)
	if err != nil {
		return res, err
	}
	defer d.close()

	// RSS readings, one slice per moment, one value per pid.
	read := func() ([]int64, error) {
		out := make([]int64, len(pids))
		for i, pid := range pids {
			kb, err := readRSS(pid)
			if err != nil {
				return nil, err
			}
			out[i] = kb
		}
		return out, nil
	}
	before, err := read()
	if err != nil {
		return res, err
	}

	clients := newPool(cfg.clients)
	defer clients.closeAll(cfg.connectConcurrency)
	connect := d.subscriberConnect(cfg.transport)
	err = connectPool(ctx, cfg, name, res, clients, "connections", func(ctx context.Context, i int) (*client, error) {
		ch := cfg.idleChannel
		if ch == "" {
			ch = fmt.Sprintf("bench:idle:%s:%d", cfg.runID, i)
		}
		c, err := connect(ctx, i, d.nodeOf(i), ch)
		if err != nil {
			return nil, err
		}
		c.run(clients.onDisconnect) // reads to answer pings; deliveries are ignored
		return c, nil
	})
	if err != nil {
		return res, err
	}

	held := time.Now()
	stop := startProgress(cfg, name, func() string {
		line := fmt.Sprintf("holding %d connections (%.0fs of %v), disconnected %d", cfg.clients, time.Since(held).Seconds(), cfg.hold, clients.disconnected.Load())
		if now, err := read(); err == nil && len(now) > 0 {
			line += ", VmRSS MiB"
			for _, kb := range now {
				line += fmt.Sprintf(" %.1f", kib2mib(kb))
			}
		}
		return line
	})
	defer stop()
	settle := min(cfg.settle, cfg.hold)
	if err := sleepUntil(ctx, held.Add(settle)); err != nil {
		return res, err
	}
	settled, err := read()
	if err != nil {
		return res, err
	}
	if err := sleepUntil(ctx, held.Add(cfg.hold)); err != nil {
		return res, err
	}
	end, err := read()
	if err != nil {
		return res, err
	}
	stop()

	id.Disconnected = clients.disconnected.Load()
	if codes := clients.codes(); len(codes) > 0 {
		id.CloseCodes = codes
	}
	perNode := make([]int, d.nodes())
	for i := range cfg.clients {
		perNode[d.nodeOf(i)]++
	}
	id.Total = idleNode{Node: -1, Conns: cfg.clients}
	for i, pid := range pids {
		n := idleNode{Node: i, URL: urls[i], PID: pid, Conns: perNode[i], RSSBeforeKiB: before[i], RSSSettledKiB: settled[i], RSSEndKiB: end[i]}
		n.perConn()
		id.Nodes = append(id.Nodes, n)
		id.Total.RSSBeforeKiB += n.RSSBeforeKiB
		id.Total.RSSSettledKiB += n.RSSSettledKiB
		id.Total.RSSEndKiB += n.RSSEndKiB
	}
	id.Total.perConn()
	return res, nil
}

func (n *idleNode) perConn() {
	if n.Conns == 0 {
		return
	}
	n.KiBPerConnSettled = float64(n.RSSSettledKiB-n.RSSBeforeKiB) / float64(n.Conns)
	n.KiBPerConnEnd = float64(n.RSSEndKiB-n.RSSBeforeKiB) / float64(n.Conns)
}
