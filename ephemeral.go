package caddychat

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	"go.uber.org/zap"
	"golang.org/x/time/rate"
)

// Ephemeral publishes ({"op":"publish",...,"ephemeral":true}): events such
// as "alice is typing" that matter to whoever is subscribed right now and
// to nobody later. They go through the broker like messages (so every node
// delivers them) but are never kept, so history, resume and scroll-back
// never show them; they carry no message id, since nothing could ever
// refer to one; and the connection that sent one does not get it back,
// since it knows it is typing (its user's other connections do get it).
//
// They are not sent to the publish hook nor recorded as webhook events: a
// hook round trip per keystroke burst would add its latency and its load
// to events worth nothing once late, and webhooks are for what happened in
// a chat, which a typing event is not. What they carry is therefore not
// moderated: clients should not render ephemeral data as content. An
// operator who needs every client-sent byte moderated turns them off with
// ephemeral_rate off.

// ephemeralMark follows the stamp of an ephemeral payload, then comes the
// sending connection's id, ephemeralMark again and the envelope. Any other
// stamped payload starts with '{', so deliverBody tells them apart by one
// byte and normal messages pay nothing more on the fan-out path. The id
// travels outside the envelope so that clients never see it.
const ephemeralMark = '\x1f'

// Defaults of ephemeral_rate: about one event per keystroke burst is plenty.
const (
	defaultEphemeralPerSecond = 10
	defaultEphemeralBurst     = 20
)

// ephemeralEnvelope is an ephemeral message as JSON clients receive it:
// an envelope without id or epoch, marked ephemeral.
type ephemeralEnvelope struct {
	Type      string `json:"type"`
	Channel   string `json:"channel"`
	Ephemeral bool   `json:"ephemeral"`
	sender
	TS   int64           `json:"ts"`
	Data json.RawMessage `json:"data"`
}

// ephemeralPayload is msg as it travels through the broker: stamped, with
// the sending connection's id ahead of the envelope.
func (msg Publication) ephemeralPayload(now time.Time) ([]byte, error) {
	env, err := json.Marshal(ephemeralEnvelope{Type: envelopeType, Channel: msg.Channel, Ephemeral: true,
		sender: msg.sender(), TS: now.UnixMilli(), Data: msg.Data})
	if err != nil {
		return nil, fmt.Errorf("encoding ephemeral message: %w", err)
	}
	out := make([]byte, 0, len(nodeStamp)+2+len(msg.conn)+len(env))
	out = append(out, nodeStamp...)
	out = append(out, ephemeralMark)
	out = append(out, msg.conn...)
	out = append(out, ephemeralMark)
	return append(out, env...), nil
}

// cutEphemeral splits the body of a stamped ephemeral payload into the
// sending connection's id and the envelope; ok is false for anything else.
func cutEphemeral(body []byte) (conn string, env []byte, ok bool) {
	if len(body) == 0 || body[0] != ephemeralMark {
		return "", nil, false
	}
	id, env, found := bytes.Cut(body[1:], []byte{ephemeralMark})
	if !found || len(env) == 0 || env[0] != '{' {
		return "", nil, false
	}
	return string(id), env, true
}

// deliverEphemeral queues an ephemeral message (body after the stamp) to
// the local members of channel but its sender.
func (h *hub) deliverEphemeral(channel string, body []byte, born int64) {
	from, env, ok := cutEphemeral(body)
	if !ok {
		return // no node writes this: someone with Redis access did
	}
	h.mu.RLock()
	defer h.mu.RUnlock()
	cs := h.channels[channel]
	if cs == nil || cs.members.len() == 0 {
		return
	}
	// Not kept: messageID finds no id in it, so no resync or catch-up
	// treats it as part of the history.
	d := newDelivery(channel, env, true, h.ids)
	d.born, d.ephemeral = born, true
	queued, skipped := 0, 0
	for s := range cs.members.all() {
		if !s.wantsEphemeral(from) {
			skipped++
			continue
		}
		if s.enqueue(d) {
			queued++
		}
	}
	h.countFanOut(cs.members.len(), skipped, queued)
}

// wantsEphemeral: every JSON connection but the sender. Raw clients get
// data as bare text and could not tell a typing event from a message.
func (c *conn) wantsEphemeral(from string) bool {
	return c.rawChannel == "" && c.id != from
}

// opPublishEphemeral is the publish op with "ephemeral": true (data checked).
func (c *conn) opPublishEphemeral(f clientFrame) {
	if f.IdempotencyKey != nil {
		c.replyError(f.ID, errBadRequest, `an ephemeral publish takes no "idempotency_key": it is never kept, so there is nothing to deduplicate against`)
		return
	}
	if c.route.ephemeralRate <= 0 {
		c.replyError(f.ID, errBadRequest, "ephemeral publishes are off on this route (ephemeral_rate off)")
		return
	}
	if !c.identity.publish.allows(f.Channel) {
		c.replyError(f.ID, errForbidden, "may not publish on "+f.Channel)
		return
	}
	if c.ephemeralLimiter == nil {
		// Made on first use: most connections never send one.
		c.ephemeralLimiter = rate.NewLimiter(rate.Limit(c.route.ephemeralRate), c.route.ephemeralBurst)
	}
	if !c.ephemeralLimiter.Allow() {
		c.replyError(f.ID, errRateLimited, fmt.Sprintf("more than %g ephemeral publishes per second; slow down", c.route.ephemeralRate))
		return
	}
	ctx, cancel := c.brokerContext()
	_, err := c.hub.publish(ctx, Publication{Channel: f.Channel, From: c.identity.user, Origin: originOf(c.identity),
		Guest: c.identity.guest, Name: c.identity.name, Info: c.identity.info, Data: f.Data, Ephemeral: true, conn: c.id})
	cancel()
	if err != nil {
		c.route.log.Debug("ephemeral publish failed", zap.String("conn", c.id), zap.String("channel", f.Channel), zap.Error(err))
		c.replyError(f.ID, errUnavailable, "not published: the broker did not accept it within publish_timeout (down or overloaded); retry later")
		return
	}
	c.sendOwn(reply{Type: "ok", ID: f.ID, Channel: f.Channel})
}
