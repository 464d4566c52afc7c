package caddychat

import (
	"context"

	"go.uber.org/zap"
)

// After a broker outage the hub resyncs its channels from history (resync,
// below), so that connected clients miss nothing the broker acknowledged.
//
// When Redis loses a channel's history (restarted without persistence,
// flushed, keys evicted), the history starts again under a new epoch. A node
// whose pub/sub subscription was down meanwhile may have missed messages
// that Redis acknowledged and kept in the new epoch: publishes are accepted
// again as soon as Redis answers, a little before the subscription is back.
// Every message of a new epoch is newer than anything the node delivered
// from the old one, so the resync delivers the new epoch's whole history
// (when it fits one read) instead of telling clients to reconnect.

// noteEpoch records the epoch of the kept message d, delivered on cs; only
// the broker's delivering goroutine calls it.
func (cs *channelState) noteEpoch(channel string, body []byte) {
	if ep := messageEpoch(channel, body); string(ep) != cs.lastEpoch {
		cs.lastEpoch = string(ep)
	}
}

// resyncNewEpoch delivers the whole history of the channel's new epoch to
// its local clients, and reports false when it cannot (the read failed or
// the history holds more than one read returns): the caller then tells the
// clients to reconnect. It runs on the broker's delivering goroutine.
func (h *hub) resyncNewEpoch(channel, oldEpoch string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), h.brokerTimeout)
	page, err := h.broker.readSince(ctx, channel, streamID{}, defaultMaxReplay)
	cancel()
	if err != nil || page.more {
		h.log.Warn("the channel's history was lost and the new one cannot be read whole; clients of the channel are told to reconnect",
			zap.String("channel", channel), zap.String("old_epoch", oldEpoch), zap.String("epoch", page.epoch), zap.Error(err))
		return false
	}
	h.mu.RLock()
	if cs := h.channels[channel]; cs != nil {
		// Ids of the new epoch say nothing about those of the old one.
		cs.lastKept = streamID{}
	}
	h.mu.RUnlock()
	for _, e := range page.entries {
		h.deliverBody(channel, e.payload, true, 0)
	}
	h.log.Info("the channel's history was lost (new epoch); delivered the new epoch's messages",
		zap.String("channel", channel), zap.String("old_epoch", oldEpoch), zap.String("epoch", page.epoch), zap.Int("messages", len(page.entries)))
	return true
}

// resync runs when the broker's subscription connection is back after an
// outage: messages published meanwhile (acknowledged to their publishers
// through other connections) never reached this node live. For channels
// with history it reads what came after the last kept message delivered and
// delivers it, so connected clients miss nothing (or, when the channel's
// epoch changed, the whole new history: resyncNewEpoch); when that is impossible
// (the history is shorter than the gap), the channel's clients
// are told to reconnect (1012), and their resume says recovered false. It
// runs on the broker's delivering goroutine, before any newer message.
func (h *hub) resync() {
	type pending struct {
		channel string
		since   streamID
		epoch   string
	}
	var todo []pending
	h.mu.RLock()
	for ch, cs := range h.channels {
		if cs.lastKept != (streamID{}) && cs.members.len() > 0 {
			todo = append(todo, pending{ch, cs.lastKept, cs.lastEpoch})
		}
	}
	h.mu.RUnlock()
	for _, p := range todo {
		ctx, cancel := context.WithTimeout(context.Background(), h.brokerTimeout)
		page, err := h.broker.readSince(ctx, p.channel, p.since, defaultMaxReplay)
		cancel()
		if err == nil && p.epoch != "" && page.epoch != p.epoch {
			// The history was lost: everything kept now is newer than
			// what the clients have (epochresync.go).
			if !h.resyncNewEpoch(p.channel, p.epoch) {
				h.restartMembers(p.channel)
			}
			continue
		}
		if err != nil || !page.sinceFound || page.more {
			h.log.Warn("messages missed during a broker outage cannot be recovered; clients of the channel are told to reconnect",
				zap.String("channel", p.channel), zap.Error(err))
			h.restartMembers(p.channel)
			continue
		}
		for _, e := range page.entries {
			h.deliverBody(p.channel, e.payload, true, 0)
		}
		if n := len(page.entries); n > 0 {
			h.log.Info("delivered messages missed during a broker outage", zap.String("channel", p.channel), zap.Int("messages", n))
		}
	}
}

// restartMembers closes the channel's local clients with 1012 so they
// reconnect and resume.
func (h *hub) restartMembers(channel string) {
	h.mu.RLock()
	var members []subscriber
	if cs := h.channels[channel]; cs != nil {
		members = make([]subscriber, 0, cs.members.len())
		for s := range cs.members.all() {
			members = append(members, s)
		}
	}
	h.mu.RUnlock()
	for _, s := range members {
		s.fail(closeServiceRestart, "messages were lost; resume")
	}
}
