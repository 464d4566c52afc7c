package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// The abuse scenario: one hostile connection per attack (abuse_attacks.go)
// against the nodes for -duration while honest clients run on the same
// channels, watching the nodes' memory and metrics (abuse_monitor.go). It
// answers: does a node's memory stay bounded, does history stay within its
// cap, do honest subscribers on every node lose nothing, and what did each
// attacker get (error codes, close code)?

// abuseResult is the abuse scenario's report.
type abuseResult struct {
	Seconds      float64         `json:"attack_seconds"`
	StoppedEarly string          `json:"stopped_early,omitempty"`
	BusyChannel  string          `json:"busy_channel"`
	RawChannel   string          `json:"raw_channel,omitempty"`
	Nodes        []abuseNode     `json:"nodes"`
	Attackers    []*attackResult `json:"attackers"`
	Honest       []honestResult  `json:"honest_subscribers"`
	Publishers   []honestPub     `json:"honest_publishers"`
	// Seen counts the attackers' frames honest subscribers received, by
	// channel, then by attack, type and sender fields (from, server,
	// anonymous; "-" when absent).
	Seen map[string]map[string]int64 `json:"attacker_frames_seen,omitempty"`
	// ServerLike counts those that looked like the server's or a backend's
	// own: type message, from empty or absent, no anonymous marker.
	ServerLike     int64  `json:"attacker_frames_looking_like_server"`
	SelfRSSPeakKiB int64  `json:"chatbench_rss_peak_kib"`
	Incomplete     string `json:"incomplete,omitempty"`
}

// abuseNode is one node's memory and metrics around the attacks.
type abuseNode struct {
	Node         int              `json:"node"`
	URL          string           `json:"url"`
	PID          int              `json:"pid,omitempty"`
	RSSBeforeKiB int64            `json:"rss_before_kib"`
	RSSPeakKiB   int64            `json:"rss_peak_kib"`
	RSSAfterKiB  int64            `json:"rss_after_kib"`
	QueuedBytes  gaugeReading     `json:"queued_bytes"`
	HistoryBytes gaugeReading     `json:"history_bytes"`
	Closes       map[string]int64 `json:"closes,omitempty"` // increase of caddy_chat_connections_closed_total by reason
	MetricsError string           `json:"metrics_error,omitempty"`
}

// honestResult is one honest subscriber's accounting: every publish of the
// honest publishers on its channel not answered with an error is expected
// once.
type honestResult struct {
	Node       int     `json:"node"`
	Channel    string  `json:"channel"`
	Expected   int64   `json:"expected"`
	Received   int64   `json:"received"`
	Lost       int64   `json:"lost"`
	Duplicates int64   `json:"duplicates"`
	OutOfOrder int64   `json:"out_of_order"`
	P99MS      float64 `json:"p99_ms"`
	Closed     string  `json:"closed,omitempty"` // the server closed it: how
}

type honestPub struct {
	Node       int              `json:"node"`
	Channel    string           `json:"channel"`
	Published  int64            `json:"published"`
	OK         int64            `json:"ok"`
	Errors     map[string]int64 `json:"errors,omitempty"`
	Unanswered int64            `json:"unanswered"`
	Closed     string           `json:"closed,omitempty"`
}

// abuseChannels are the shared channels: the busy one, and the raw route's
// when a raw attack runs.
func abuseChannels(cfg *config) []string {
	chs := []string{cfg.abuseChannel}
	for _, name := range cfg.attacks {
		if a := findAttack(name); a != nil && (a.raw || a.name == "forge-json") && cfg.rawChannel != cfg.abuseChannel {
			return append(chs, cfg.rawChannel)
		}
	}
	return chs
}

// foreignTally counts attacker frames honest subscribers receive.
type foreignTally struct {
	mu         sync.Mutex
	seen       map[string]map[string]int64
	serverLike int64
}

// abuseTags are the markers the attacks put in their payloads; longer
// first, since "abuse:forge" is a prefix of "abuse:forge-json".
var abuseTags = []string{"forge-json", "forge", "impersonate", "fill", "create", "opflood", "http"}

// classifyForeign names a frame an honest subscriber got that is not a
// bench delivery, and says whether it looks like the server's own.
func classifyForeign(raw []byte) (kind string, serverLike bool) {
	typ, from, server, anon := "?", "-", "-", "-"
	eachField(raw, func(k, v []byte) error {
		switch string(k) {
		case "type":
			typ = string(plainString(v))
		case "from":
			from = string(v)
		case "server":
			server = string(v)
		case "anonymous":
			anon = string(v)
		}
		return nil
	})
	tag := "other"
	for _, t := range abuseTags {
		if bytes.Contains(raw, []byte("abuse:"+t)) {
			tag = t
			break
		}
	}
	serverLike = tag != "other" && typ == "message" && (from == "-" || from == `""`) && anon != "true"
	return fmt.Sprintf("%s: type=%s from=%s server=%s anonymous=%s", tag, typ, from, server, anon), serverLike
}

func (t *foreignTally) add(channel string, raw []byte) {
	kind, serverLike := classifyForeign(raw)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.seen[channel] == nil {
		t.seen[channel] = map[string]int64{}
	}
	t.seen[channel][kind]++
	if serverLike {
		t.serverLike++
	}
}

// honestExpected is what each subscriber of channels[i] expects: the
// publishes of that channel's publishers not answered with an error.
func honestExpected(pubs []*publisher) map[string]int64 {
	exp := map[string]int64{}
	for _, p := range pubs {
		sent, _, errs := p.counts()
		exp[p.channel] += sent - errs
	}
	return exp
}

// honestResults fills one result per subscriber from its accounting.
func honestResults(states []*subState, lats []*hist, nodes []int, channels []string, clients []*client, exp map[string]int64) []honestResult {
	out := make([]honestResult, len(states))
	for i, s := range states {
		t := sumSubs([]*subState{s})
		r := honestResult{Node: nodes[i], Channel: channels[i], Expected: exp[channels[i]], Received: t.unique, Duplicates: t.dups, OutOfOrder: t.outOfOrder}
		r.Lost = max(r.Expected-r.Received, 0)
		if lats[i] != nil {
			r.P99MS = lats[i].summary().P99MS
		}
		if c := clients[i]; c != nil && !c.stopping.Load() {
			select {
			case <-c.done:
				r.Closed = closeDescription(c.closeErr)
			default:
			}
		}
		out[i] = r
	}
	return out
}

// runAbuse runs the abuse scenario; see the usage text.
func runAbuse(ctx context.Context, cfg *config) (*scenarioResult, error) {
	const name = "abuse"
	res := &scenarioResult{Scenario: name, Targets: cfg.urls}
	ab := &abuseResult{BusyChannel: cfg.abuseChannel}
	res.Abuse = ab
	// The attackers never read, so nothing piles up here; a bound anyway,
	// so that this process cannot be what takes the machine down.
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(512 << 20))
	d, err := newDialer(cfg.urls, cfg.sources, cfg.connectTimeout)
	if err != nil {
		return res, err
	}
	defer d.close()
	env := &abuseEnv{cfg: cfg, d: d, busy: cfg.abuseChannel, rawCh: cfg.rawChannel}
	if len(cfg.rawURLs) > 0 {
		if env.rd, err = newDialer(cfg.rawURLs, cfg.sources, cfg.connectTimeout); err != nil {
			return res, err
		}
		defer env.rd.close()
	}
	channels := abuseChannels(cfg)
	if len(channels) > 1 {
		ab.RawChannel = cfg.rawChannel
	}
	nodes, k := d.nodes(), cfg.honestSubs

	// Honest subscribers: k per node per channel; senders are the nodes.
	nsubs := len(channels) * nodes * k
	states, lats := make([]*subState, nsubs), make([]*hist, nsubs)
	subNode, subCh := make([]int, nsubs), make([]string, nsubs)
	tally := &foreignTally{seen: map[string]map[string]int64{}}
	subs := newPool(nsubs)
	defer subs.closeAll(cfg.connectConcurrency)
	for i := range states {
		states[i], lats[i] = newSubState(nodes), &hist{}
		states[i].reset(0, 0, lats[i])
		subNode[i], subCh[i] = i%nodes, channels[i/(nodes*k)]
	}
	err = connectPool(ctx, cfg, name, res, subs, "honest subscribers", func(ctx context.Context, i int) (*client, error) {
		c, err := d.connect(ctx, i, subNode[i], subCh[i])
		if err != nil {
			return nil, err
		}
		c.ws.SetReadLimit(64 << 20) // history fill messages, -fill-size each
		ch := subCh[i]
		c.sub, c.slot = states[i], func(sender int64) int { return int(sender) }
		c.foreign = func(raw []byte) { tally.add(ch, raw) }
		c.run(subs.onDisconnect)
		return c, nil
	})
	if err != nil {
		return res, err
	}
	// Honest publishers: one per node per channel.
	pubs := make([]*publisher, len(channels)*nodes)
	pubPool := newPool(len(pubs))
	defer pubPool.closeAll(cfg.connectConcurrency)
	for i := range pubs {
		c, err := d.connect(ctx, nsubs+i, i%nodes, "")
		if err != nil {
			return res, fmt.Errorf("honest publisher %d: %w", i, err)
		}
		pubPool.clients[i] = c
		pubs[i] = newPublisher(c, channels[i/nodes], cfg.inflight, cfg.payload)
		c.run(pubPool.onDisconnect)
	}

	actx, stopAttacks := context.WithTimeout(ctx, cfg.duration)
	defer stopAttacks()
	var stopMu sync.Mutex
	mon := startMonitor(ctx, cfg, func(reason string) {
		stopMu.Lock()
		ab.StoppedEarly = reason
		stopMu.Unlock()
		logf(cfg, "[%s] stopping early: %s", name, reason)
		stopAttacks()
	})
	defer mon.stopPeak()
	start := time.Now()

	var wg sync.WaitGroup
	interval := max(time.Duration(float64(time.Second)/cfg.honestRate), time.Microsecond)
	for i, p := range pubs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := int64(0); ; n++ {
				if sleepUntil(actx, start.Add(time.Duration(n)*interval)) != nil || p.publish(actx, n, int64(i%nodes)) != nil {
					return
				}
			}
		}()
	}
	env.attackID = nsubs + len(pubs)
	var attackers []*attacker
	for i, nameA := range cfg.attacks {
		at := findAttack(nameA)
		a := &attacker{env: env, start: start, res: &attackResult{Attack: at.name, Letter: at.letter, What: at.what, Node: i % nodes,
			Target: cfg.urls[i%nodes], Types: map[string]int64{}, Codes: map[string]int64{}, HTTPStatus: map[string]int64{}}}
		attackers = append(attackers, a)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := at.run(actx, a); err != nil {
				a.res.Error = err.Error()
				a.res.ErrorAfter = time.Since(start).Seconds()
				var blocked blockedError
				if errors.As(err, &blocked) {
					a.res.ErrorAfter = blocked.since.Seconds()
				}
			}
		}()
	}
	stopProgress := startProgress(cfg, name, func() string {
		var sent, recv int64
		for _, a := range attackers {
			sent += a.sent.Load()
		}
		for _, s := range states {
			recv += s.uniqueNow()
		}
		return fmt.Sprintf("attack frames sent %d, honest received %d of %d", sent, recv, sumValues(honestExpected(pubs))*int64(nodes*k))
	})
	defer stopProgress()
	<-actx.Done()
	ab.Seconds = time.Since(start).Seconds()
	wg.Wait()

	// What each attacker got, then its connection closed.
	for _, a := range attackers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.drain(cfg.attackerDrain)
			a.res.Sent, a.res.SentBytes = a.sent.Load(), a.sentBytes.Load()
			if a.res.Close == "" {
				a.res.Close = "-"
			}
		}()
		ab.Attackers = append(ab.Attackers, a.res)
	}
	wg.Wait()

	ab.Incomplete = waitHonest(ctx, cfg, pubs, states, subCh)
	stopProgress()
	mon.stopPeak()
	sleepUntil(ctx, time.Now().Add(cfg.after))
	ab.Nodes, ab.SelfRSSPeakKiB = mon.after(ctx)

	exp := honestExpected(pubs)
	ab.Honest = honestResults(states, lats, subNode, subCh, subs.clients, exp)
	for i, p := range pubs {
		s, unanswered := p.take()
		hp := honestPub{Node: i % nodes, Channel: p.channel, Published: s.sent, OK: s.ok, Unanswered: unanswered}
		if len(s.errCodes) > 0 {
			hp.Errors = s.errCodes
		}
		if !p.alive() {
			hp.Closed = closeDescription(p.c.closeErr)
		}
		ab.Publishers = append(ab.Publishers, hp)
	}
	tally.mu.Lock()
	ab.Seen, ab.ServerLike = tally.seen, tally.serverLike
	tally.mu.Unlock()
	return res, ctx.Err()
}

func sumValues(m map[string]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}

// waitHonest waits until every publish is answered and every honest
// subscriber has what it expects, or nothing moved for cfg.drain.
func waitHonest(ctx context.Context, cfg *config, pubs []*publisher, states []*subState, chans []string) string {
	var last int64 = -1
	lastMove := time.Now()
	for {
		exp := honestExpected(pubs)
		var pending, got, missing int64
		for _, p := range pubs {
			if p.alive() {
				pending += int64(p.pending())
			}
		}
		for i, s := range states {
			u := s.uniqueNow()
			got += u
			missing += max(exp[chans[i]]-u, 0)
		}
		if pending == 0 && missing == 0 {
			return ""
		}
		if got+pending != last {
			last, lastMove = got+pending, time.Now()
		} else if time.Since(lastMove) > cfg.drain {
			return fmt.Sprintf("stopped waiting after %v without progress: %d honest deliveries and %d publish replies missing", cfg.drain, missing, pending)
		}
		if sleepUntil(ctx, time.Now().Add(20*time.Millisecond)) != nil {
			return "interrupted"
		}
	}
}

// writeAbuseTables prints the abuse scenario's tables.
func writeAbuseTables(w io.Writer, s *scenarioResult) {
	ab := s.Abuse
	fmt.Fprintf(w, "abuse: attacks ran %.1fs on %s", ab.Seconds, ab.BusyChannel)
	if ab.RawChannel != "" {
		fmt.Fprintf(w, " and %s", ab.RawChannel)
	}
	fmt.Fprintln(w)
	if ab.StoppedEarly != "" {
		fmt.Fprintf(w, "  STOPPED EARLY: %s\n", ab.StoppedEarly)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "node\tpid\trss_before_MiB\trss_peak_MiB\trss_after_MiB\tqueued_bytes_before/peak/after\thistory_bytes_before/peak/after\tcloses_during\t")
	for _, n := range ab.Nodes {
		rss := func(k int64) string {
			if n.PID == 0 {
				return "-"
			}
			return fmt.Sprintf("%.1f", kib2mib(k))
		}
		closes := "-"
		if len(n.Closes) > 0 {
			closes = formatCounts(n.Closes)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", n.Node, pidText(n.PID), rss(n.RSSBeforeKiB), rss(n.RSSPeakKiB), rss(n.RSSAfterKiB),
			n.QueuedBytes.text(), n.HistoryBytes.text(), closes)
	}
	tw.Flush()
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "attack\tnode\tsent\tsent_MiB\tsend_failed\tframes_read\terror_codes\tclose\t")
	for _, a := range ab.Attackers {
		failed := "-"
		if a.Error != "" {
			failed = fmt.Sprintf("%.1fs: %s", a.ErrorAfter, truncateText(lastCause(a.Error), 50))
		}
		codes := "-"
		if len(a.Codes) > 0 {
			codes = formatCounts(a.Codes)
		}
		if len(a.HTTPStatus) > 0 {
			codes = "HTTP " + formatCounts(a.HTTPStatus)
		}
		fmt.Fprintf(tw, "%s %s\t%d\t%d\t%.1f\t%s\t%d\t%s\t%s\t\n", a.Letter, a.Attack, a.Node, a.Sent, float64(a.SentBytes)/(1<<20), failed, a.FramesRead, codes, a.Close)
	}
	tw.Flush()
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "honest_sub\tnode\tchannel\texpected\treceived\tlost\tdup\tooo\tp99_ms\tclosed\t")
	for i, h := range ab.Honest {
		closed := "-"
		if h.Closed != "" {
			closed = h.Closed
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t%.1f\t%s\t\n", i, h.Node, h.Channel, h.Expected, h.Received, h.Lost, h.Duplicates, h.OutOfOrder, h.P99MS, closed)
	}
	tw.Flush()
	for _, p := range ab.Publishers {
		if len(p.Errors) > 0 || p.Unanswered > 0 || p.Closed != "" {
			fmt.Fprintf(w, "  honest publisher node %d %s: published %d ok %d errors %s unanswered %d closed %s\n", p.Node, p.Channel, p.Published, p.OK, formatCounts(p.Errors), p.Unanswered, p.Closed)
		}
	}
	if len(ab.Seen) > 0 {
		fmt.Fprintf(w, "  attacker frames honest subscribers got (%d looked like the server's own: from empty, no anonymous marker):\n", ab.ServerLike)
		chans := make([]string, 0, len(ab.Seen))
		for ch := range ab.Seen {
			chans = append(chans, ch)
		}
		sort.Strings(chans)
		for _, ch := range chans {
			kinds := make([]string, 0, len(ab.Seen[ch]))
			for k := range ab.Seen[ch] {
				kinds = append(kinds, k)
			}
			sort.Strings(kinds)
			for _, k := range kinds {
				fmt.Fprintf(w, "    %s  %s  x%d\n", ch, k, ab.Seen[ch][k])
			}
		}
	}
	if ab.Incomplete != "" {
		fmt.Fprintf(w, "  %s\n", ab.Incomplete)
	}
	fmt.Fprintf(w, "  chatbench's own RSS peak %.0f MiB\n", kib2mib(ab.SelfRSSPeakKiB))
}

func pidText(pid int) string {
	if pid == 0 {
		return "-"
	}
	return fmt.Sprint(pid)
}

func (g gaugeReading) text() string {
	f := func(v *float64) string {
		if v == nil {
			return "n/a"
		}
		return fmt.Sprintf("%.0f", *v)
	}
	return f(g.Before) + "/" + f(g.Peak) + "/" + f(g.After)
}

func truncateText(s string, n int) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// lastCause keeps the end of a chain of wrapped errors ("failed to write
// msg: failed to flush: write tcp …: broken pipe" → "broken pipe").
func lastCause(s string) string {
	if i := strings.LastIndex(s, ": "); i >= 0 && i+2 < len(s) {
		return s[i+2:]
	}
	return s
}
