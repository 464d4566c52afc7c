package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"
)

// runRooms puts cfg.clients clients in rooms of cfg.roomSize (client i is in
// room i/roomSize, on node i mod nodes, so a room spans the nodes). Every
// client subscribes to its room's channel, then publishes cfg.clientRate
// messages per second for cfg.duration, starting at a random point of its
// first interval. Each message is expected by every member of the room,
// its sender included. The baseline-rooms scenario runs the same against the
// bare server.
func runRooms(ctx context.Context, cfg *config, name string, urls []string, pids []int) (*scenarioResult, error) {
	res := &scenarioResult{Scenario: name, Targets: urls}
	d, err := newDialer(urls, cfg.sources, cfg.connectTimeout)
	if err != nil {
		return res, err
	}
	defer d.close()
	k := cfg.roomSize
	room := func(i int) string { return fmt.Sprintf("bench:room:%s:%d", cfg.runID, i/k) }
	// A message's sender is a client index; its slot among the receiver's
	// senders is its place in the room.
	slot := func(sender int64) int { return int(sender % int64(k)) }

	states := make([]*subState, cfg.clients)
	for i := range states {
		states[i] = newSubState(k)
	}
	pubs := make([]*publisher, cfg.clients)
	clients := newPool(cfg.clients)
	defer clients.closeAll(cfg.connectConcurrency)
	err = connectPool(ctx, cfg, name, res, clients, "clients", func(ctx context.Context, i int) (*client, error) {
		c, err := d.connect(ctx, i, d.nodeOf(i), room(i))
		if err != nil {
			return nil, err
		}
		c.sub, c.slot = states[i], slot
		pubs[i] = newPublisher(c, room(i), cfg.inflight, cfg.payload)
		c.run(clients.onDisconnect)
		return c, nil
	})
	if err != nil {
		return res, err
	}

	ph := &deliveryPhase{Phase: 1, Rate: cfg.clientRate, Publishers: cfg.clients, RoomSize: k}
	res.Phases = append(res.Phases, ph)
	m := startMeasure(clients, states, 0, 0, pids, cfg.metricsFor(name))
	m.senderOf = func(sub, slot int) int { return sub/k*k + slot }
	ph.Subscribers = m.alive
	// A client's publishes are expected by the members of its room that are
	// connected now.
	members := map[string]int64{}
	for i, c := range clients.clients {
		select {
		case <-c.done:
		default:
			members[room(i)]++
		}
	}
	weights := make([]int64, cfg.clients)
	for i := range weights {
		weights[i] = members[room(i)]
	}

	stop := startProgress(cfg, name, func() string {
		var sent, ok, errs int64
		for _, p := range pubs {
			s, o, e := p.counts()
			sent, ok, errs = sent+s, ok+o, errs+e
		}
		return fmt.Sprintf("published %d ok %d err %d, %s", sent, ok, errs, m.progress())
	})
	defer stop()

	interval := max(time.Duration(float64(time.Second)/cfg.clientRate), time.Microsecond)
	start := time.Now()
	deadline := start.Add(cfg.duration)
	// Publishing stops at the deadline, also for a client waiting for room
	// in its window.
	pctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	var wg sync.WaitGroup
	for i, p := range pubs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			first := start.Add(rand.N(interval))
			for n := int64(0); ; n++ {
				at := first.Add(time.Duration(n) * interval)
				if !at.Before(deadline) || sleepUntil(pctx, at) != nil {
					return
				}
				if p.publish(pctx, n, int64(i)) != nil {
					return // the deadline, or disconnected (counted as such)
				}
			}
		}()
	}
	wg.Wait()
	var sent int64
	for _, p := range pubs {
		s, _, _ := p.counts()
		sent += s
	}
	ph.PublishRate = float64(sent) / time.Since(start).Seconds()
	m.finish(ctx, cfg, ph, pubs, weights)
	return res, ctx.Err()
}
