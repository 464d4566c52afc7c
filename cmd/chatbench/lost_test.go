package main

import (
	"context"
	"testing"
	"time"
)

// TestRefusedDeliveriesDoNotOffsetLoss: a publish answered unavailable
// that the broker had already taken is delivered anyway. Counted among the
// received, it used to stand in for an expected message that never came:
// here one room of 2, where member 1 misses its own acknowledged seq 1
// while member 0 gets member 0's refused seq 1, read as 0 lost.
func TestRefusedDeliveriesDoNotOffsetLoss(t *testing.T) {
	const k = 2
	clients := newPool(k)
	states := make([]*subState, k)
	pubs := make([]*publisher, k)
	for i := range clients.clients {
		clients.clients[i] = &client{idx: i, done: make(chan struct{})}
		states[i] = newSubState(k)
		pubs[i] = &publisher{c: clients.clients[i], sentAt: map[int64]int64{}, stats: newPubStats()}
	}
	m := startMeasure(clients, states, 0, 0, nil, nil)
	m.senderOf = func(sub, slot int) int { return sub/k*k + slot }
	// Member 0 sent seqs 0 and 1, the second answered unavailable; member 1
	// sent 0 and 1, both acknowledged.
	pubs[0].stats.sent, pubs[0].stats.ok = 2, 1
	pubs[0].stats.errCodes["unavailable"] = 1
	pubs[0].stats.errSeqs = []int64{1}
	pubs[1].stats.sent, pubs[1].stats.ok = 2, 2
	now := time.Now()
	sent := now.UnixNano()
	states[0].deliver(0, 0, sent, now)
	states[0].deliver(0, 1, sent, now) // the refused one, delivered anyway
	states[0].deliver(1, 0, sent, now)
	states[0].deliver(1, 1, sent, now)
	states[1].deliver(0, 0, sent, now)
	states[1].deliver(1, 0, sent, now) // member 1's own seq 1 never comes

	cfg := &config{drain: 300 * time.Millisecond, drainMax: 5 * time.Second}
	ph := &deliveryPhase{}
	m.finish(context.Background(), cfg, ph, pubs, []int64{k, k})
	if ph.Expected != 6 || ph.Received != 6 {
		t.Fatalf("expected %d received %d, want 6 and 6", ph.Expected, ph.Received)
	}
	if ph.ErrorsReceived != 1 {
		t.Errorf("errors received %d, want 1 (member 0's refused seq 1 at member 0)", ph.ErrorsReceived)
	}
	if ph.Lost != 1 {
		t.Errorf("lost %d, want 1 (member 1's acknowledged seq 1 at member 1)", ph.Lost)
	}
	if ph.Incomplete == "" {
		t.Errorf("the wait ended as if every expected delivery had come")
	}
}
