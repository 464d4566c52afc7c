package caddychat

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"
)

// The server API's stats: each node counts its own connections, users and
// channels, and with Redis reports them every statsEvery into one hash that
// any node reads to answer for the whole chat. A report older than
// statsKeep is a node that stopped: it is left out and deleted.
//
//	<prefix>#nodes  HASH  <node id> -> JSON nodeStats

const (
	statsEvery = 2 * time.Second
	statsKeep  = 10 * time.Second
)

// nodeStats is one node's figures, and per route.
type nodeStats struct {
	Node       string `json:"node"`
	ReportedAt int64  `json:"reported_at"` // Unix ms
	counts
	Channels int          `json:"channels"`
	Routes   []routeStats `json:"routes"`
}

// counts are the figures of a node, a route or the whole chat.
type counts struct {
	Connections int `json:"connections"`
	// Users are distinct authenticated users (per node: one connected to
	// two nodes counts on each); Anonymous are connections without one.
	Users         int `json:"users"`
	Anonymous     int `json:"anonymous"`
	Subscriptions int `json:"subscriptions"`
}

type routeStats struct {
	Route string `json:"route"`
	counts
}

func (c *counts) add(o counts) {
	c.Connections += o.Connections
	c.Users += o.Users
	c.Anonymous += o.Anonymous
	c.Subscriptions += o.Subscriptions
}

// localStats counts the node's connections now.
func (h *hub) localStats() nodeStats {
	type tally struct {
		counts
		users map[string]struct{}
	}
	byRoute := map[string]*tally{}
	all := &tally{users: map[string]struct{}{}}
	h.mu.RLock()
	for s := range h.subscribers {
		m, ok := s.(managed)
		if !ok {
			continue
		}
		sess := m.session()
		rt := byRoute[sess.route]
		if rt == nil {
			rt = &tally{users: map[string]struct{}{}}
			byRoute[sess.route] = rt
		}
		user, subs := sess.user, m.subscriptions()
		for _, t := range []*tally{rt, all} {
			t.Connections++
			t.Subscriptions += subs
			if user == "" {
				t.Anonymous++
			} else {
				t.users[user] = struct{}{}
			}
		}
	}
	channels := 0
	for _, cs := range h.channels {
		if cs.members.len() > 0 {
			channels++
		}
	}
	h.mu.RUnlock()
	out := nodeStats{Node: h.node, ReportedAt: time.Now().UnixMilli(), Channels: channels, Routes: []routeStats{}}
	all.Users = len(all.users)
	out.counts = all.counts
	for name, t := range byRoute {
		t.Users = len(t.users)
		out.Routes = append(out.Routes, routeStats{Route: name, counts: t.counts})
	}
	slices.SortFunc(out.Routes, func(a, b routeStats) int { return cmp.Compare(a.Route, b.Route) })
	return out
}

// statsKey is the hash of the nodes' reports.
func (h *hub) statsKey() string { return h.prefix + "#nodes" }

// reportStats writes the node's figures every statsEvery until stop, and
// takes them out when it stops (a node shutting down is gone at once).
func (h *hub) reportStats(stop <-chan struct{}) {
	t := time.NewTicker(statsEvery)
	defer t.Stop()
	for {
		h.writeStats()
		select {
		case <-stop:
			ctx, cancel := context.WithTimeout(context.Background(), h.brokerTimeout)
			_ = h.redis.HDel(ctx, h.statsKey(), h.node).Err()
			cancel()
			return
		case <-t.C:
		}
	}
}

func (h *hub) writeStats() {
	report, err := json.Marshal(h.localStats())
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), h.brokerTimeout)
	defer cancel()
	if err := h.redis.HSet(ctx, h.statsKey(), h.node, report).Err(); err != nil {
		h.log.Debug("reporting the node's stats", zap.Error(err))
	}
}

// chatStats are the figures of every node of the chat.
type chatStats struct {
	Nodes []nodeStats `json:"nodes"`
	counts
	Channels int          `json:"channels"`
	Routes   []routeStats `json:"routes"`
}

// clusterStats reads the nodes' reports (the node alone on the in-memory
// broker) and sums them.
func (h *hub) clusterStats(ctx context.Context) (chatStats, error) {
	var nodes []nodeStats
	if h.redis == nil {
		nodes = []nodeStats{h.localStats()}
	} else {
		all, err := h.redis.HGetAll(ctx, h.statsKey()).Result()
		if err != nil {
			return chatStats{}, fmt.Errorf("redis HGETALL %s: %w", h.statsKey(), err)
		}
		oldest := time.Now().Add(-statsKeep).UnixMilli()
		var stale []string
		// This node's own figures are read now rather than from its report.
		nodes = append(nodes, h.localStats())
		for node, raw := range all {
			var n nodeStats
			if json.Unmarshal([]byte(raw), &n) != nil || n.ReportedAt < oldest {
				stale = append(stale, node)
				continue
			}
			if node != h.node {
				nodes = append(nodes, n)
			}
		}
		if len(stale) > 0 {
			_ = h.redis.HDel(ctx, h.statsKey(), stale...).Err()
		}
	}
	slices.SortFunc(nodes, func(a, b nodeStats) int { return cmp.Compare(a.Node, b.Node) })
	out := chatStats{Nodes: nodes, Routes: []routeStats{}}
	if out.Nodes == nil {
		out.Nodes = []nodeStats{}
	}
	byRoute := map[string]*routeStats{}
	for _, n := range nodes {
		out.counts.add(n.counts)
		out.Channels += n.Channels
		for _, r := range n.Routes {
			sum := byRoute[r.Route]
			if sum == nil {
				sum = &routeStats{Route: r.Route}
				byRoute[r.Route] = sum
			}
			sum.counts.add(r.counts)
		}
	}
	for _, r := range byRoute {
		out.Routes = append(out.Routes, *r)
	}
	slices.SortFunc(out.Routes, func(a, b routeStats) int { return cmp.Compare(a.Route, b.Route) })
	return out, nil
}
