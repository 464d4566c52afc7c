package caddychat

import (
	"encoding/json"
	"errors"
	"time"
)

// Bounded latency (max_lag). A chat message delivered half a minute late is
// worse than an honest notice that it was missed, and a node that cannot
// keep up must not let its backlog grow where nothing bounds it. So a
// message that waited longer than max_lag since its publish is never
// written to a client; each client it was meant for is told how many of
// the channel's messages it missed, in a gap frame
// ({"type":"gap","channel":…,"missed":N}) sent before the channel's next
// message or as soon as there is nothing else to send. Two places check:
//
//   - the hub's delivering goroutine, as it takes a message from the inbox
//     (inbox.go): a late one is not fanned out at all, which sheds exactly
//     the work the node is behind on;
//   - a connection's writer, as it takes a message from the send queue:
//     a client (or a node) too slow to write gets the gap instead of stale
//     messages.
//
// A message's age is measured from its publish time, the envelope's "ts"
// (the publishing node's clock), or for a backend's plain payload from when
// this node read it. Presence events are not skipped (a client's member
// list must not go stale) and ephemeral messages are dropped without a
// count (they are lossy by design). While the hub has had to skip in the
// last second, publishes on the node are refused as unavailable: the
// publisher learns at once that the cluster is not keeping up, rather than
// adding to the backlog.

const defaultMaxLag = 5 * time.Second

// minMaxLag: a tighter bound would skip messages on an ordinary GC pause.
const minMaxLag = 10 * time.Millisecond

// refuseLateFor is how long after a late skip the node refuses publishes.
const refuseLateFor = time.Second

// errDeliveriesLate refuses a publish while the node is behind (late.go).
var errDeliveriesLate = errors.New("deliveries are running late on this node")

// lateReason is what a refused publisher is told.
const lateReason = "message not published: deliveries are running late on this node (max_lag); retry later"

// refuseIfLate refuses a publish, counted, with errDeliveriesLate while
// the node is behind by more than max_lag; nil otherwise.
func (h *hub) refuseIfLate() error {
	at := h.lateAt.Load()
	if at == 0 || time.Since(time.Unix(0, at)) >= refuseLateFor {
		return nil
	}
	moduleMetrics().publishRefusedLate.Inc()
	return errDeliveriesLate
}

// tooLate reports whether a message of channel that waited age (ns) since
// its publish is not to be fanned out: past max_lag, unless it is a
// presence event.
func (h *hub) tooLate(age int64, channel string, body []byte, stamped bool) bool {
	maxLag := h.maxLag.Load()
	return maxLag > 0 && age > maxLag && !(stamped && isPresenceEvent(channel, body))
}

// skipLate drops one late message of channel: the channel's members are
// owed it in their next gap frame. Only the delivering goroutine calls it.
func (h *hub) skipLate(channel string, body []byte, stamped bool) {
	if stamped && len(body) > 0 && body[0] == ephemeralMark {
		return
	}
	h.lateAt.Store(time.Now().UnixNano())
	h.mu.RLock()
	defer h.mu.RUnlock()
	cs := h.channels[channel]
	if cs == nil || cs.members.len() == 0 {
		return
	}
	if stamped {
		if id, kept := messageID(channel, body); kept && cs.lastKept.less(id) {
			// Handled: a resync after an outage must not deliver it late.
			cs.lastKept = id
			cs.noteEpoch(channel, body)
		}
	}
	h.owe(channel, cs, 1)
}

// skipDropped counts n messages of channel that a full inbox refused.
func (h *hub) skipDropped(channel string, n int) {
	h.lateAt.Store(time.Now().UnixNano())
	h.mu.RLock()
	defer h.mu.RUnlock()
	if cs := h.channels[channel]; cs != nil && cs.members.len() > 0 {
		h.owe(channel, cs, n)
	}
}

// owe adds n missed messages to cs's next gap frame, counted once per
// member; h.mu is read-locked.
func (h *hub) owe(channel string, cs *channelState, n int) {
	if cs.missed == 0 {
		h.gapped = append(h.gapped, channel)
	}
	cs.missed += n
	moduleMetrics().lateSkipped.WithLabelValues("hub").Add(float64(n * cs.members.len()))
}

// sendGap queues cs's gap frame to its members; h.mu is read-locked and
// the caller is the delivering goroutine.
func (h *hub) sendGap(channel string, cs *channelState) {
	if cs.missed == 0 {
		return
	}
	gap := &delivery{channel: channel, gap: cs.missed}
	cs.missed = 0
	for s := range cs.members.all() {
		s.enqueue(gap)
	}
}

// reportGaps sends every pending gap frame: the inbox is empty, so nothing
// newer will come first.
func (h *hub) reportGaps() {
	if len(h.gapped) == 0 {
		return
	}
	h.mu.RLock()
	for _, channel := range h.gapped {
		if cs := h.channels[channel]; cs != nil {
			h.sendGap(channel, cs)
		}
	}
	h.mu.RUnlock()
	clear(h.gapped)
	h.gapped = h.gapped[:0]
}

// gapFrame is the frame that reports missed messages to a client.
type gapFrame struct {
	Type    string `json:"type"`
	Channel string `json:"channel"`
	Missed  int    `json:"missed"`
}

// lateAt reports whether d, a live message, is older than maxLag at now.
func (d *delivery) lateAt(now int64, maxLag time.Duration) bool {
	return d.born != 0 && maxLag > 0 && now-d.born > int64(maxLag)
}

// screen is the writer's check of d before writing it: a gap delivery or a
// late message adds to what the connection is owed (and is not written);
// a message of a channel with missed messages first has its gap frame
// written. It reports whether d itself is to be written.
func (c *conn) screen(d *delivery, now int64) (write bool, err error) {
	if d.own != nil {
		return true, nil
	}
	if d.gap > 0 {
		c.oweGap(d.channel, d.gap)
		return false, nil
	}
	if d.lateAt(now, c.route.maxLag) {
		if !d.ephemeral {
			c.oweGap(d.channel, 1)
			moduleMetrics().lateSkipped.WithLabelValues("queue").Inc()
		}
		return false, nil
	}
	if n := c.owed[d.channel]; n > 0 {
		delete(c.owed, d.channel)
		return true, c.writeGap(d.channel, n)
	}
	return true, nil
}

func (c *conn) oweGap(channel string, n int) {
	if c.rawChannel != "" {
		return // a raw client has no frame to be told in
	}
	if c.owed == nil {
		c.owed = make(map[string]int)
	}
	c.owed[channel] += n
}

// writeOwedGaps writes every gap frame owed; the writer calls it when the
// queue is empty.
func (c *conn) writeOwedGaps() error {
	for channel, n := range c.owed {
		delete(c.owed, channel)
		if err := c.writeGap(channel, n); err != nil {
			return err
		}
	}
	c.owed = nil
	return nil
}

func (c *conn) writeGap(channel string, n int) error {
	frame, err := json.Marshal(gapFrame{Type: "gap", Channel: channel, Missed: n})
	if err != nil {
		return err
	}
	return c.tr.writeFrame(&delivery{own: frame}, frame)
}
