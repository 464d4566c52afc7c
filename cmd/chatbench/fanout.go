package main

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// runFanout measures one channel with cfg.subs subscribers spread over the
// nodes and one publisher on the first node: one phase at cfg.rate, or one
// per -step-rates rate until a phase's p99 exceeds -max-p99. The baseline
// scenario runs the same against the in-process server.
//
// pids are the server processes whose CPU use is reported (none for the
// in-process baseline).
func runFanout(ctx context.Context, cfg *config, name string, urls []string, pids []int) (*scenarioResult, error) {
	res := &scenarioResult{Scenario: name, Targets: urls, Transport: cfg.transport}
	d, err := newDialer(urls, cfg.sources, cfg.connectTimeout)
	if err != nil {
		return res, err
	}
	defer d.close()
	d.compression = cfg.compression
	channel := "bench:fanout:" + cfg.runID

	states := make([]*subState, cfg.subs)
	for i := range states {
		states[i] = newSubState(1)
	}
	subs := newPool(cfg.subs)
	defer subs.closeAll(cfg.connectConcurrency)
	connect := d.subscriberConnect(cfg.transport)
	err = connectPool(ctx, cfg, name, res, subs, "subscribers", func(ctx context.Context, i int) (*client, error) {
		c, err := connect(ctx, i, d.nodeOf(i), channel)
		if err != nil {
			return nil, err
		}
		c.sub = states[i]
		c.run(subs.onDisconnect)
		return c, nil
	})
	if err != nil {
		return res, err
	}

	pubs := newPool(1)
	defer pubs.closeAll(1)
	pc, err := d.connect(ctx, cfg.subs, 0, "")
	if err != nil {
		return res, fmt.Errorf("publisher: %w", err)
	}
	pubs.clients[0] = pc
	pub := newPublisher(pc, channel, cfg.inflight, cfg.payload)
	pc.run(pubs.onDisconnect)

	rates, stepping := cfg.stepRates, len(cfg.stepRates) > 0
	if !stepping {
		rates = []float64{cfg.rate}
	}
	var base int64
	for i, rate := range rates {
		ph, err := fanoutPhase(ctx, cfg, name, i+1, rate, base, pub, subs, states, pids)
		res.Phases = append(res.Phases, ph)
		if err != nil {
			return res, err
		}
		base += int64(cfg.messages)
		if stepping && ph.Latency.P99MS > float64(cfg.maxP99)/float64(time.Millisecond) && !cfg.comparedWith(name) {
			ph.OverMaxP99 = true
			break
		}
		if ph.DrainCapped {
			break
		}
		if alive(subs) == 0 {
			return res, errors.New("every subscriber was disconnected")
		}
	}
	return res, nil
}

// connectPool opens every connection of p, showing progress, and records the
// connect time in res.
func connectPool(ctx context.Context, cfg *config, name string, res *scenarioResult, p *pool, what string, open func(ctx context.Context, i int) (*client, error)) error {
	n := len(p.clients)
	stop := startProgress(cfg, name, func() string {
		return fmt.Sprintf("connecting %s: %d/%d", what, p.connected.Load(), n)
	})
	start := time.Now()
	err := p.connectAll(ctx, cfg.connectConcurrency, open)
	stop()
	res.Connections = int(p.connected.Load())
	res.ConnectSeconds = time.Since(start).Seconds()
	if res.ConnectSeconds > 0 {
		res.ConnectsPerSec = float64(res.Connections) / res.ConnectSeconds
	}
	if err == nil {
		logf(cfg, "[%s] %d %s connected in %.2fs (%.0f/s)", name, n, what, res.ConnectSeconds, res.ConnectsPerSec)
	}
	return err
}

// fanoutPhase publishes cfg.messages messages with seqs from base at rate and
// measures their delivery.
func fanoutPhase(ctx context.Context, cfg *config, name string, phase int, rate float64, base int64, pub *publisher, subs *pool, states []*subState, pids []int) (*deliveryPhase, error) {
	ph := &deliveryPhase{Phase: phase, Rate: rate, Publishers: 1}
	m := startMeasure(subs, states, base, int64(cfg.messages), pids, cfg.metricsFor(name))
	ph.Subscribers = m.alive
	weights := []int64{int64(m.alive)}
	pubs := []*publisher{pub}

	stop := startProgress(cfg, name, func() string {
		sent, ok, errs := pub.counts()
		return fmt.Sprintf("rate %s: published %d/%d ok %d err %d, %s", rateText(rate), sent, cfg.messages, ok, errs, m.progress())
	})
	defer stop()

	var interval time.Duration
	if rate > 0 {
		interval = time.Duration(float64(time.Second) / rate)
	}
	// Above saturation the node may answer publishes slower than -rate:
	// -publish-for bounds the phase's time instead of -messages alone.
	pctx := ctx
	if cfg.publishFor > 0 {
		var cancel context.CancelFunc
		pctx, cancel = context.WithTimeout(ctx, cfg.publishFor)
		defer cancel()
	}
	var pubErr error
	start := time.Now()
	for k := 0; k < cfg.messages; k++ {
		if interval > 0 {
			if pubErr = sleepUntil(pctx, start.Add(time.Duration(k)*interval)); pubErr != nil {
				break
			}
		}
		if pubErr = pub.publish(pctx, base+int64(k), -1); pubErr != nil {
			break
		}
	}
	if pubErr != nil && ctx.Err() == nil && pctx.Err() != nil {
		pubErr, ph.PublishStopped = nil, true
	}
	if elapsed := time.Since(start).Seconds(); elapsed > 0 {
		sent, _, _ := pub.counts()
		ph.PublishRate = float64(sent) / elapsed
	}
	m.finish(ctx, cfg, ph, pubs, weights)
	if pubErr != nil {
		return ph, fmt.Errorf("publishing: %w", pubErr)
	}
	return ph, ctx.Err()
}

// comparedWith says whether scenario is the baseline of another fanout
// scenario of the run: it then steps through every rate, so that each of
// the other's phases has one to be compared with.
func (cfg *config) comparedWith(scenario string) bool {
	if scenario != "baseline" {
		return false
	}
	for _, s := range cfg.scenarios {
		if s == "fanout" || s == "fanout-memory" {
			return true
		}
	}
	return false
}

func rateText(r float64) string {
	if r <= 0 {
		return "max"
	}
	return fmt.Sprintf("%g/s", r)
}

// measure is one phase's receive-side bookkeeping, shared by fanout and
// rooms.
type measure struct {
	subs   *pool
	states []*subState
	lat    *shardedHist
	alive  int
	disc0  int64
	codes0 map[string]int
	start  time.Time
	cpu    *cpuMeter
	wire0  int64 // wireRead at the start
	lag    *lagSampler
	// senderOf is the index in the phase's publishers of subscriber sub's
	// sender slot; nil: every slot is publisher 0.
	senderOf func(sub, slot int) int
}

// errSeqsNow is each publisher's seqs answered with an error so far.
func errSeqsNow(pubs []*publisher) [][]int64 {
	seqs := make([][]int64, len(pubs))
	for i, p := range pubs {
		p.mu.Lock()
		seqs[i] = p.stats.errSeqs[:len(p.stats.errSeqs):len(p.stats.errSeqs)]
		p.mu.Unlock()
	}
	return seqs
}

// errorsReceived counts, over every subscriber, the deliveries of
// publishes answered with an error (errSeqs[i]: publisher i's).
func (m *measure) errorsReceived(errSeqs [][]int64) int64 {
	var n int64
	for i, s := range m.states {
		n += s.errorsReceived(func(slot int) []int64 {
			p := 0
			if m.senderOf != nil {
				p = m.senderOf(i, slot)
			}
			if p < 0 || p >= len(errSeqs) {
				return nil
			}
			return errSeqs[p]
		})
	}
	return n
}

// startMeasure resets every subscriber for a phase expecting seqs
// [base, base+limit) (limit 0: any seq from base).
// CPU use is measured for this process and the server pids, lag from the
// nodes' metrics pages.
func startMeasure(subs *pool, states []*subState, base, limit int64, pids []int, metrics []string) *measure {
	m := &measure{subs: subs, states: states, lat: &shardedHist{}, start: time.Now(), cpu: startCPU(pids), wire0: wireRead.Load(), lag: startLagSampler(metrics)}
	for i, s := range states {
		s.reset(base, limit, m.lat.shard(i))
	}
	m.alive = alive(subs)
	m.disc0 = subs.disconnected.Load()
	m.codes0 = subs.codes()
	return m
}

// alive counts the connections of p whose reader still runs.
func alive(p *pool) int {
	n := 0
	for _, c := range p.clients {
		if c == nil {
			continue
		}
		select {
		case <-c.done:
		default:
			n++
		}
	}
	return n
}

// progress is the receive part of a progress line.
func (m *measure) progress() string {
	var n int64
	for _, s := range m.states {
		n += s.delivered.Load()
	}
	el := time.Since(m.start).Seconds()
	return fmt.Sprintf("deliveries %d (%.0f/s), disconnected %d", n, float64(n)/el, m.subs.disconnected.Load()-m.disc0)
}

// expected is the number of distinct deliveries the publishes so far call
// for: each publish not refused is expected once by weights[i] subscribers.
func expected(pubs []*publisher, weights []int64) int64 {
	var e int64
	for i, p := range pubs {
		sent, _, errs := p.counts()
		e += weights[i] * (sent - errs)
	}
	return e
}

// finish waits until every publish is answered and every expected delivery
// arrived or was reported missed, or until nothing moved for cfg.drain, or
// cfg.drainMax after publishing ended (a node far behind keeps making
// progress for minutes), then fills ph.
func (m *measure) finish(ctx context.Context, cfg *config, ph *deliveryPhase, pubs []*publisher, weights []int64) {
	var lastPending, lastUnique int64 = -1, -1
	lastMove := time.Now()
	var capAt time.Time
	if cfg.drainMax > 0 {
		capAt = lastMove.Add(cfg.drainMax)
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		var pending, unique int64
		for _, p := range pubs {
			if p.alive() { // a closed connection gets no more replies
				pending += int64(p.pending())
			}
		}
		for _, s := range m.states {
			u, r := s.accountedNow()
			unique += u + r
		}
		want := expected(pubs, weights)
		// Deliveries of refused publishes would end the wait early: they
		// are taken off once the count looks complete (counting them on
		// every tick would scan every refused seq for every subscriber).
		if pending == 0 && unique >= want && unique-m.errorsReceived(errSeqsNow(pubs)) >= want {
			break
		}
		if pending != lastPending || unique != lastUnique {
			lastPending, lastUnique, lastMove = pending, unique, time.Now()
		} else if time.Since(lastMove) > cfg.drain {
			ph.Incomplete = fmt.Sprintf("stopped waiting after %v without progress: %d deliveries and %d publish replies missing", cfg.drain, max(want-unique, 0), pending)
			break
		}
		if !capAt.IsZero() && time.Now().After(capAt) {
			ph.Incomplete = fmt.Sprintf("stopped waiting %v after the last publish (-drain-max): %d deliveries and %d publish replies missing", cfg.drainMax, max(want-unique, 0), pending)
			ph.DrainCapped = unique < want
			break
		}
		if ctx.Err() != nil {
			ph.Incomplete = "interrupted: " + ctx.Err().Error()
			break
		}
		<-tick.C
	}

	ph.Expected = expected(pubs, weights)
	ph.PublishErrors = map[string]int64{}
	ack := &hist{}
	var first time.Time
	errSeqs := make([][]int64, len(pubs))
	for i, p := range pubs {
		s, unanswered := p.take()
		errSeqs[i] = s.errSeqs
		ph.Published += s.sent
		ph.PublishOK += s.ok
		ph.Unanswered += unanswered
		for code, n := range s.errCodes {
			ph.PublishErrors[code] += n
		}
		ack.merge(s.ack)
		if !s.firstSent.IsZero() && (first.IsZero() || s.firstSent.Before(first)) {
			first = s.firstSent
		}
	}
	ph.AckLatency = ack.summary()
	ph.Refused = ph.PublishErrors["unavailable"]
	ph.ErrorsReceived = m.errorsReceived(errSeqs)

	t := sumSubs(m.states)
	ph.Received = t.unique
	ph.Deliveries = t.deliveries
	ph.Duplicates = t.dups
	ph.OutOfOrder = t.outOfOrder
	ph.Stray = t.stray
	ph.Reported = t.reported
	ph.GapFrames = t.gaps
	ph.Lost = max(ph.Expected-(t.unique-ph.ErrorsReceived)-t.reported, 0)
	if !first.IsZero() && t.last.After(first) {
		ph.Seconds = t.last.Sub(first).Seconds()
		ph.DeliveriesPerSec = float64(t.deliveries) / ph.Seconds
	}
	ph.Latency = m.lat.merged().summary()

	ph.CPU = m.cpu.stop()
	ph.NodeLag = m.lag.finish()
	ph.WireBytesPerDelivery = perDelivery(float64(wireRead.Load()-m.wire0), ph.Deliveries)
	var srv float64
	for _, s := range ph.CPU.ServerSeconds {
		srv += s
	}
	ph.ServerCPUMicrosPerDelivery = perDelivery(srv*1e6, ph.Deliveries)
	ph.Disconnected = m.subs.disconnected.Load() - m.disc0
	for code, n := range m.subs.codes() {
		if d := n - m.codes0[code]; d > 0 {
			if ph.CloseCodes == nil {
				ph.CloseCodes = map[string]int{}
			}
			ph.CloseCodes[code] = d
		}
	}
}

func sleepUntil(ctx context.Context, t time.Time) error {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err()
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
