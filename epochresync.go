package caddychat

import (
	"context"

	"go.uber.org/zap"
)

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
		h.deliverBody(channel, e.payload, true)
	}
	h.log.Info("the channel's history was lost (new epoch); delivered the new epoch's messages",
		zap.String("channel", channel), zap.String("old_epoch", oldEpoch), zap.String("epoch", page.epoch), zap.Int("messages", len(page.entries)))
	return true
}
