package caddychat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
)

// The JSON protocol's ops (PROTOCOL.md), one function each, run by the
// connection's reading side (conn.go) one frame at a time. Every error here
// is the client's alone: it gets an error reply and the connection stays
// open. Subscribing with since or history is in resume.go.

// handleFrame decodes one JSON-protocol frame and runs its op.
func (c *conn) handleFrame(frame []byte) {
	f, err := decodeClientFrame(frame)
	if err != nil {
		c.replyError(f.ID, errBadRequest, err.Error())
		return
	}
	runTestHookOp(f.Op, f.Channel)
	var op func(clientFrame)
	switch f.Op {
	case "subscribe":
		op = c.opSubscribe
	case "unsubscribe":
		op = c.opUnsubscribe
	case "publish":
		op = c.opPublish
	case "history":
		op = c.opHistory
	case "presence":
		op = c.opPresence
	case "refresh":
		c.opRefresh(f)
		return
	case "":
		c.replyError(f.ID, errBadRequest, `missing "op"`)
		return
	default:
		c.replyError(f.ID, errBadRequest, fmt.Sprintf("unknown op %q", truncate(f.Op, 32)))
		return
	}
	if err := validateChannel(f.Channel); err != nil {
		c.replyError(f.ID, errBadRequest, err.Error())
		return
	}
	op(f)
}

func (c *conn) opSubscribe(f clientFrame) {
	if !c.identity.subscribe.allows(f.Channel) {
		c.subscribeError(f, errForbidden, "may not subscribe to "+f.Channel)
		return
	}
	already := c.isSubscribed(f.Channel)
	if !already && c.subscriptions() >= c.route.maxSubscriptions {
		c.subscribeError(f, errLimitExceeded, fmt.Sprintf("at most %d subscriptions per connection", c.route.maxSubscriptions))
		return
	}
	if !already && !c.subscribeAllowed(f) {
		return
	}
	if f.Since != "" || f.History != 0 {
		c.subscribeWithHistory(f)
		return
	}
	if err := c.join(f.Channel); err != nil {
		c.replyUnavailableSubscribe(f, err)
		return
	}
	c.sendOwn(reply{Type: "ok", ID: f.ID, Channel: f.Channel})
}

func (c *conn) opUnsubscribe(f clientFrame) {
	c.leave(f.Channel)
	c.sendOwn(reply{Type: "ok", ID: f.ID, Channel: f.Channel})
}

func (c *conn) opPublish(f clientFrame) {
	if len(f.Data) == 0 {
		c.replyError(f.ID, errBadRequest, `publish needs "data"`)
		return
	}
	if f.Ephemeral {
		c.opPublishEphemeral(f)
		return
	}
	var idemKey string
	if f.IdempotencyKey != nil {
		if err := validateIdempotencyKey(*f.IdempotencyKey); err != nil {
			c.replyError(f.ID, errBadRequest, err.Error())
			return
		}
		idemKey = *f.IdempotencyKey
	}
	if !c.identity.publish.allows(f.Channel) {
		c.replyError(f.ID, errForbidden, "may not publish on "+f.Channel)
		return
	}
	data, verdict, reason := c.checkPublish(f.Channel, f.Data)
	switch verdict {
	case publishRejected:
		c.replyError(f.ID, errRejected, reason)
		return
	case publishFailed:
		c.replyError(f.ID, errUnavailable, reason)
		return
	}
	idem := c.route.idempotent(idemScope(c.identity, c.id), idemKey)
	msg := Publication{Channel: f.Channel, From: c.identity.user, Origin: originOf(c.identity), Guest: c.identity.guest, Name: c.identity.name, Info: c.identity.info, Data: data, conn: c.id, path: c.path, idem: idem}
	if c.publishPipelined(f.ID, msg) {
		return
	}
	ctx, cancel := c.brokerContext()
	id, err := c.route.publish(ctx, c.publisher(), msg)
	cancel()
	if errors.Is(err, errNewHistoryLimited) {
		c.replyError(f.ID, errLimitExceeded, c.route.newChannelsRefusal(f.Channel))
		return
	}
	if errors.Is(err, errDeliveriesLate) {
		c.replyError(f.ID, errUnavailable, lateReason)
		return
	}
	if err != nil {
		c.publishFailed(f.ID, f.Channel, err)
		return
	}
	c.sendOwn(reply{Type: "ok", ID: f.ID, Channel: f.Channel, MessageID: id, Duplicate: idem != nil && idem.duplicate})
}

// opHistory serves the history op: a page of kept messages older than
// before, for scroll-back.
func (c *conn) opHistory(f clientFrame) {
	if !c.identity.subscribe.allows(f.Channel) {
		c.replyError(f.ID, errForbidden, "may not read the history of "+f.Channel)
		return
	}
	if !c.isSubscribed(f.Channel) && !c.subscribeAllowed(f) {
		return
	}
	policy := c.route.history.policyFor(f.Channel)
	if policy == nil {
		c.replyError(f.ID, errBadRequest, f.Channel+" keeps no history on this route")
		return
	}
	if c.historyRefused(f) {
		return
	}
	limit := f.Limit
	if limit == 0 {
		limit = defaultHistoryLimit
	}
	if limit < 0 || limit > c.route.maxReplay {
		c.replyError(f.ID, errBadRequest, fmt.Sprintf(`"limit" must be between 1 and %d`, c.route.maxReplay))
		return
	}
	var before *streamID
	if f.Before != "" {
		id, ok := parseStreamID(f.Before)
		if !ok {
			c.replyError(f.ID, errBadRequest, `"before" must be a message id like "1732540000000-0"`)
			return
		}
		before = &id
	}
	ctx, cancel := c.brokerContext()
	page, err := c.hub.broker.readBefore(ctx, f.Channel, before, min(limit, policy.count))
	cancel()
	if err != nil {
		c.route.log.Debug("reading history failed", zap.String("conn", c.id), zap.String("channel", f.Channel), zap.Error(err))
		c.replyError(f.ID, errUnavailable, "the history could not be read within publish_timeout (broker down or overloaded); retry later")
		return
	}
	entries, aged := withinAge(page.entries, time.Now().Add(-policy.maxAge))
	entries, cut := newestWithin(entries, c.replayBudget())
	out := historyReply{Type: "history", ID: f.ID, Channel: f.Channel, Epoch: page.epoch, More: (page.more && !aged) || cut}
	out.Messages = make([]json.RawMessage, len(entries))
	for i, e := range entries {
		out.Messages[i] = e.payload
	}
	c.sendOwn(out)
}

// opPresence answers {"op":"presence"}: who is on the channel, on every
// node. It takes the permission to subscribe to the channel.
func (c *conn) opPresence(f clientFrame) {
	if !c.route.presence {
		c.replyError(f.ID, errBadRequest, "presence is off on this route")
		return
	}
	if !c.identity.subscribe.allows(f.Channel) {
		c.replyError(f.ID, errForbidden, "may not see presence on "+f.Channel+" (needs permission to subscribe to it)")
		return
	}
	if !c.isSubscribed(f.Channel) && !c.subscribeAllowed(f) {
		return
	}
	ctx, cancel := c.brokerContext()
	users, err := c.hub.presence.list(ctx, f.Channel)
	cancel()
	if err != nil {
		c.hub.presence.failed("presence query", f.Channel, err)
		c.replyError(f.ID, errUnavailable, "presence not available: the broker did not answer within publish_timeout (down or overloaded); retry later")
		return
	}
	if users == nil {
		users = []presenceUser{}
	}
	c.sendOwn(presenceReply{Type: "presence", ID: f.ID, Channel: f.Channel, Users: users})
}

// opRefresh replaces the connection's token before it expires. The new token
// must be valid and name the same user; its permissions apply from now on
// (subscriptions it no longer allows are dropped).
func (c *conn) opRefresh(f clientFrame) {
	if !c.route.usesTokens {
		c.replyError(f.ID, errBadRequest, "this route does not use tokens")
		return
	}
	if c.identity.hooked {
		c.replyError(f.ID, errBadRequest, "this connection was admitted by the connect hook, which set its permissions and expiry; reconnect to renew it")
		return
	}
	if f.Token == "" {
		c.replyError(f.ID, errBadRequest, `refresh needs "token"`)
		return
	}
	id, err := c.route.auth.verify(f.Token)
	if err != nil {
		c.replyError(f.ID, errUnauthorized, err.Error())
		return
	}
	if !c.identity.anonymous && id.user != c.identity.user {
		c.replyError(f.ID, errForbidden, "the new token is for another user")
		return
	}
	if c.identity.anonymous {
		c.replyError(f.ID, errForbidden, "an anonymous connection cannot become a user; reconnect with the token")
		return
	}
	c.identity = id
	c.setSession()
	c.armExpiry()
	for _, ch := range c.subscribedChannels() {
		if !id.subscribe.allows(ch) {
			c.leave(ch) // ends a catch-up on ch too
		}
	}
	c.sendOwn(reply{Type: "ok", ID: f.ID})
}

// publishRaw publishes one frame of a raw route; false: the connection is closing.
func (c *conn) publishRaw(frame []byte) bool {
	if !c.identity.publish.allows(c.rawChannel) {
		c.fail(closePolicyViolation, "may not publish on "+c.rawChannel)
		return false
	}
	if c.route.publishHook.applies(c.rawChannel) {
		text, _ := json.Marshal(string(frame))
		data, verdict, reason := c.checkPublish(c.rawChannel, text)
		switch verdict {
		case publishRejected:
			c.fail(closeRefused, closeReasonText(reason))
			return false
		case publishFailed:
			c.fail(closeTryAgainLater, "publish hook unavailable")
			return false
		}
		// The replacement's text: a JSON string's content, else the JSON.
		var s string
		if json.Unmarshal(data, &s) == nil {
			frame = []byte(s)
		} else {
			frame = data
		}
	}
	ctx, cancel := c.brokerContext()
	defer cancel()
	if _, err := c.route.publish(ctx, c.publisher(), Publication{Channel: c.rawChannel, From: c.identity.user, Origin: originOf(c.identity), Guest: c.identity.guest, Name: c.identity.name, Info: c.identity.info, Raw: frame, conn: c.id, path: c.path}); err != nil {
		if errors.Is(err, errNewHistoryLimited) {
			c.fail(closeRateLimited, "creating history channels too fast")
			return false
		}
		c.route.log.Debug("raw publish failed", zap.String("conn", c.id), zap.Error(err))
		c.fail(closeTryAgainLater, "broker unavailable")
		return false
	}
	return true
}

// join subscribes the connection to channel (presence included: hub.go).
func (c *conn) join(channel string) error {
	ctx, cancel := c.brokerContext()
	defer cancel()
	return c.joinWithin(ctx, channel)
}

// joinWithin is join within ctx. The server API's subscribe calls it too
// (conn_server.go), and may end after the connection listed its channels
// for the last time: then it undoes itself, or the hub would keep the
// closed connection as a member.
func (c *conn) joinWithin(ctx context.Context, channel string) error {
	if err := c.hub.subscribe(ctx, c, channel); err != nil {
		return err
	}
	c.subMu.Lock()
	ended := c.subsEnded
	if !ended && !c.subscribed.has(channel) {
		c.subscribed.add(channel)
	}
	c.subMu.Unlock()
	if ended {
		c.hub.unsubscribe(c, channel)
		return errConnClosing
	}
	return nil
}

// leave unsubscribes the connection from channel.
func (c *conn) leave(channel string) {
	c.subMu.Lock()
	ok := c.subscribed.remove(channel)
	c.subMu.Unlock()
	if ok {
		c.hub.unsubscribe(c, channel)
	}
	// Only now: until the hub stopped delivering, a catch-up must keep
	// holding the channel's messages, or they would go out unordered.
	c.cancelCatchUp(channel)
}

// publisher is the budget the connection's publishes spend.
func (c *conn) publisher() *publisherKey {
	if c.identity.user != "" {
		return &publisherKey{user: c.identity.user}
	}
	return &publisherKey{conn: c.id}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
