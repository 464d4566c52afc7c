package caddychat

import (
	"fmt"
	"time"

	"go.uber.org/zap"
)

// A subscribe with since or history is served in this order, so the client
// sees no gap and no duplicate: the connection starts holding the channel's
// live messages, joins the channel, reads the history (which by then holds
// every message published before the join took effect), and finally queues
// the ok reply, the history, and the held live messages newer than the last
// one replayed, before letting live messages through again.

// catchUp holds one channel's live messages while its history is read, and
// afterwards drops the live messages the replay already sent: the history
// read and the live stream travel on different Redis connections, so live
// copies of replayed messages can still be on their way.
type catchUp struct {
	held      []*delivery
	heldBytes int64
	// draining: the replay is queued; live messages up to floor are
	// duplicates. The first newer one ends the catch-up, since the broker
	// delivers a channel's kept messages in id order.
	draining bool
	floor    streamID
}

// holdForCatchUp takes d when its channel is catching up: held while the
// history is read, dropped as a duplicate while draining. It reports
// held false when the caller must queue d as usual.
func (c *conn) holdForCatchUp(d *delivery) (held, ok bool) {
	c.catchMu.Lock()
	defer c.catchMu.Unlock()
	cu := c.catchUps[d.channel]
	if cu == nil {
		return false, true
	}
	if cu.draining {
		if !d.kept {
			return false, true // an event or a backend's payload: never replayed
		}
		if !cu.floor.less(d.keptID) {
			return true, true
		}
		c.endCatchUpLocked(d.channel)
		return false, true
	}
	// Held messages are waiting to be sent: with the queue's live messages
	// they count against send_queue (a replay still queued does not: see
	// finishCatchUp).
	size := d.size()
	if c.send.queuedLiveBytes()+cu.heldBytes+size > c.route.sendQueue {
		c.fail(closeSlowConsumer, "send queue full")
		return true, false
	}
	cu.held = append(cu.held, d)
	cu.heldBytes += size
	c.heldBytes.Add(size)
	return true, true
}

func (c *conn) beginCatchUp(channel string) {
	c.catchMu.Lock()
	defer c.catchMu.Unlock()
	if c.catchUps == nil {
		c.catchUps = make(map[string]*catchUp)
	}
	if c.catchUps[channel] == nil {
		c.catchingUp.Add(1)
	}
	c.catchUps[channel] = &catchUp{}
}

// endCatchUpLocked lets the channel's live messages through again.
func (c *conn) endCatchUpLocked(channel string) {
	if cu, ok := c.catchUps[channel]; ok {
		c.heldBytes.Add(-cu.heldBytes)
		delete(c.catchUps, channel)
		c.catchingUp.Add(-1)
	}
}

// cancelCatchUp ends a channel's catch-up, dropping what it held (the
// subscribe failed, or the client left the channel).
func (c *conn) cancelCatchUp(channel string) {
	if c.catchingUp.Load() == 0 {
		return
	}
	c.catchMu.Lock()
	defer c.catchMu.Unlock()
	c.endCatchUpLocked(channel)
}

// finishCatchUp queues first (the reply), then the replayed entries after
// since, then the held live messages newer than the last of them, and
// starts draining. All under catchMu, so no live message of the channel
// can be queued in between.
func (c *conn) finishCatchUp(channel string, first *delivery, since streamID, entries []historyEntry) {
	c.catchMu.Lock()
	defer c.catchMu.Unlock()
	cu := c.catchUps[channel]
	if cu == nil || cu.draining {
		return
	}
	// Queued whatever send_queue says: the replay was cut so that the
	// replays waiting hold at most half of send_queue (resumeBudget), and
	// the held messages were bounded as they came (holdForCatchUp), so the
	// queue holds at most 1.5 send_queue and one reply. The reply and the
	// replay are queued as a replay: while they wait they do not count
	// against send_queue, so that a client reading them is not taken for a
	// slow one by the live messages behind them; a client that stops
	// reading is still closed once those pass send_queue.
	out := make([]*delivery, 0, 1+len(entries)+len(cu.held))
	out = append(out, first)
	last := since
	for _, e := range entries {
		if last.less(e.id) {
			out = append(out, newDelivery(channel, e.payload, true, c.hub.ids))
			last = e.id
		}
	}
	replay := len(out)
	for _, d := range cu.held {
		if !d.kept {
			out = append(out, d) // not from history: it cannot be a duplicate
			continue
		}
		if last.less(d.keptID) {
			out = append(out, d)
			last = d.keptID
		}
	}
	c.send.pushAll(out, replay)
	c.heldBytes.Add(-cu.heldBytes)
	*cu = catchUp{draining: true, floor: last}
	c.kickWriter()
}

// replayBudget is how many bytes of history one answer (a resume's replay,
// a history page) may queue: half of send_queue, so that live messages
// still fit behind it.
func (c *conn) replayBudget() int64 { return c.route.sendQueue / 2 }

// resumeBudget is how many bytes a resume's replay (or a subscribe's
// history) may queue: what is left of replayBudget by the replays still
// waiting, which do not count against send_queue, so that they hold at most
// half of it together.
func (c *conn) resumeBudget() int64 {
	return max(c.replayBudget()-c.send.queuedReplayBytes(), 0)
}

// newestWithin keeps the newest entries that fit in budget bytes (at least
// one, so a message larger than the budget can still be read); cut reports
// whether older ones were left out.
func newestWithin(entries []historyEntry, budget int64) (kept []historyEntry, cut bool) {
	var total int64
	for i := len(entries) - 1; i >= 0; i-- {
		total += int64(len(entries[i].payload)) + frameOverhead
		if total > budget && i < len(entries)-1 {
			return entries[i+1:], true
		}
	}
	return entries, false
}

// historyRefused answers a request that would queue history while the
// client has not read what already waits for it; it reports whether it did.
func (c *conn) historyRefused(f clientFrame) bool {
	waiting := c.send.queuedBytes() + c.heldBytes.Load()
	if waiting <= c.replayBudget() {
		return false
	}
	c.replyError(f.ID, errLimitExceeded, fmt.Sprintf("%d bytes wait to be sent to this connection (over half of send_queue); read them before asking for history", waiting))
	return true
}

// subscribeWithHistory serves a subscribe frame carrying since or history.
func (c *conn) subscribeWithHistory(f clientFrame) {
	var since streamID
	resume := f.Since != ""
	if resume {
		var ok bool
		if since, ok = parseStreamID(f.Since); !ok {
			c.replyError(f.ID, errBadRequest, `"since" must be a message id of a channel with history, like "1732540000000-0"`)
			return
		}
	}
	if f.History < 0 {
		c.replyError(f.ID, errBadRequest, `"history" must be a positive number of messages`)
		return
	}
	// One catch-up per channel and connection: a channel already held
	// streams live, and replaying again would only queue duplicates.
	if c.isSubscribed(f.Channel) {
		c.replyError(f.ID, errBadRequest, "already subscribed to "+f.Channel+": its messages arrive live; unsubscribe first to resume again, or page back with the history op")
		return
	}
	if c.historyRefused(f) {
		return
	}
	policy := c.route.history.policyFor(f.Channel)
	if policy == nil {
		// Nothing to replay: a plain subscribe, telling a resuming client it
		// cannot have what it missed.
		if err := c.join(f.Channel); err != nil {
			c.replyUnavailableSubscribe(f, err)
			return
		}
		r := reply{Type: "ok", ID: f.ID, Channel: f.Channel}
		if resume {
			r.Recovered = new(bool)
		}
		c.sendOwn(r)
		return
	}

	c.beginCatchUp(f.Channel)
	if err := c.join(f.Channel); err != nil {
		c.cancelCatchUp(f.Channel)
		c.replyUnavailableSubscribe(f, err)
		return
	}
	ctx, cancel := c.brokerContext()
	var page historyPage
	var err error
	if resume {
		page, err = c.hub.broker.readSince(ctx, f.Channel, since, c.route.maxReplay)
		if err == nil && f.Epoch != "" && page.epoch != f.Epoch {
			// since names a message of a lost history: everything kept now
			// is newer than it, so the whole new epoch is replayed.
			since = streamID{}
			page, err = c.hub.broker.readSince(ctx, f.Channel, since, c.route.maxReplay)
		}
	} else {
		page, err = c.hub.broker.readBefore(ctx, f.Channel, nil, min(f.History, c.route.maxReplay, policy.count))
	}
	cancel()
	if err != nil {
		c.leave(f.Channel)
		c.route.log.Debug("reading history failed", zap.String("conn", c.id), zap.String("channel", f.Channel), zap.Error(err))
		c.replyError(f.ID, errUnavailable, "not subscribed: the history could not be read within publish_timeout (broker down or overloaded); retry later")
		return
	}
	cutoff := time.Now().Add(-policy.maxAge)
	entries, aged := withinAge(page.entries, cutoff)
	entries, cut := newestWithin(entries, c.resumeBudget())
	page.more = page.more || cut
	r := reply{Type: "ok", ID: f.ID, Channel: f.Channel, Epoch: page.epoch, Limited: page.more}
	if resume {
		sameEpoch := f.Epoch == "" || f.Epoch == page.epoch
		recovered := sameEpoch && page.sinceFound && !page.more && !aged && int64(since.ms) >= cutoff.UnixMilli()
		r.Recovered = &recovered
	}
	n := len(entries)
	r.Replayed = &n
	first, err := c.encodeOwn(r)
	if err != nil {
		c.cancelCatchUp(f.Channel)
		return
	}
	c.finishCatchUp(f.Channel, first, since, entries)
}

// withinAge drops the entries older than cutoff; aged reports whether any was.
func withinAge(entries []historyEntry, cutoff time.Time) (kept []historyEntry, aged bool) {
	ms := uint64(max(cutoff.UnixMilli(), 0))
	i := 0
	for i < len(entries) && entries[i].id.ms < ms {
		i++
	}
	return entries[i:], i > 0
}

func (c *conn) replyUnavailableSubscribe(f clientFrame, err error) {
	c.route.log.Debug("subscribe failed", zap.String("conn", c.id), zap.String("channel", f.Channel), zap.Error(err))
	c.replyError(f.ID, errUnavailable, "not subscribed: the broker did not answer within publish_timeout (down or overloaded); retry later")
}
