package caddychat

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// The in-process broker: a single node, no Redis. The history it keeps is
// history_memory.go's.

// memoryBroker serves a single node from process memory.
type memoryBroker struct {
	deliver deliverFunc
	ids     *idGenerator

	// mu serialises publishes so that every subscriber sees one order, and
	// history ids follow it.
	mu         sync.Mutex
	subscribed map[string]bool
	closed     bool
	lastSweep  time.Time
	idem       idemMemory

	memoryHistory
}

// historySweepEvery is how often expired in-memory histories are deleted.
const historySweepEvery = time.Minute

func newMemoryBroker(ids *idGenerator, deliver deliverFunc) *memoryBroker {
	return &memoryBroker{deliver: deliver, ids: ids, subscribed: make(map[string]bool)}
}

func (b *memoryBroker) Publish(_ context.Context, msg Publication) (string, error) {
	now := time.Now()
	if msg.History != nil {
		return b.publishKept(msg, now)
	}
	id := b.ids.next(now)
	payload, err := msg.payload(id, now)
	if err != nil {
		return "", fmt.Errorf("encoding message: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return "", errBrokerClosed
	}
	if first, ok := b.repeated(msg, now); ok {
		return first, nil
	}
	if msg.idem != nil {
		b.idem.record(msg.Channel, msg.idem, id, now)
	}
	if b.subscribed[msg.Channel] {
		b.deliver(msg.Channel, payload)
	}
	return id, nil
}

// publishKept keeps msg in its channel's ring and delivers it, under the
// publish lock, so history order is delivery order.
func (b *memoryBroker) publishKept(msg Publication, now time.Time) (string, error) {
	data, err := msg.historyData()
	if err != nil {
		return "", fmt.Errorf("encoding message: %w", err)
	}
	tail, err := envelopeTail(msg.sender(), now.UnixMilli(), data)
	if err != nil {
		return "", fmt.Errorf("encoding message: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return "", errBrokerClosed
	}
	if first, ok := b.repeated(msg, now); ok {
		return first, nil
	}
	if now.Sub(b.lastSweep) > historySweepEvery {
		b.memoryHistory.sweep(now)
		b.lastSweep = now
	}
	id, payload, err := b.memoryHistory.append(msg.Channel, msg.History, now, tail, msg.newHistory)
	if err != nil {
		return "", err
	}
	if msg.idem != nil {
		b.idem.record(msg.Channel, msg.idem, id.String(), now)
	}
	if b.subscribed[msg.Channel] {
		b.deliver(msg.Channel, stamped(payload))
	}
	return id.String(), nil
}

// repeated reports whether msg repeats an idempotent publish still in its
// window, with the first publish's id (and marks msg a duplicate); b.mu is
// held.
func (b *memoryBroker) repeated(msg Publication, now time.Time) (string, bool) {
	if msg.idem == nil {
		return "", false
	}
	first, ok := b.idem.seen(msg.Channel, msg.idem, now)
	if ok {
		msg.idem.duplicate = true
	}
	return first, ok
}

// signal delivers a control message to this node, the only one there is.
func (b *memoryBroker) signal(_ context.Context, channel string, payload []byte) (int64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, errBrokerClosed
	}
	if !b.subscribed[channel] {
		return 0, nil
	}
	b.deliver(channel, payload)
	return 1, nil
}

func (b *memoryBroker) Subscribe(_ context.Context, channel string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errBrokerClosed
	}
	b.subscribed[channel] = true
	return nil
}

func (b *memoryBroker) Unsubscribe(_ context.Context, channel string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.subscribed, channel)
	return nil
}

func (b *memoryBroker) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	b.memoryHistory.clear()
	b.idem.clear()
	return nil
}
