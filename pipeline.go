package caddychat

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"go.uber.org/zap"
)

// Pipelined publishes. A connection's frames are handled one at a time, so
// a publish that waited for Redis's answer before the next frame was read
// held a fast publisher (a backend's connection, a busy room's client) to
// one message per round trip: under load, a few milliseconds each, where
// the in-process broker answers as soon as the fan-out is queued. Now a
// plain publish (no history, no idempotency key) on a Redis broker is
// queued on the node's publish pipeline in the order its frames came, and
// the reading goroutine goes on with the next frame; a goroutine of the
// connection's own, started with its first pipelined publish, waits for the
// answers in that order and sends each reply. Redis receives the publishes
// in order, so their messages are delivered in order; the replies to other
// frames may overtake a publish's (clients match replies by id).

// maxPipelinedPublishes bounds the publishes of one connection waiting for
// Redis; a connection with that many waits before reading its next frame.
const maxPipelinedPublishes = 64

// pendingPublish is a publish queued on the pipeline, waiting for Redis.
type pendingPublish struct {
	reqID  json.RawMessage
	msg    Publication
	msgID  string
	start  time.Time
	wait   func() error
	cancel context.CancelFunc
}

// submitter is a broker that can queue a plain publish without waiting
// (the Redis brokers).
type submitter interface {
	submit(ctx context.Context, msg Publication) (id string, wait func() error, err error)
}

// publishPipelined queues msg, the publish op with id reqID, when it can be
// pipelined, and reports whether it did; otherwise the caller publishes it
// and waits.
func (c *conn) publishPipelined(reqID json.RawMessage, msg Publication) bool {
	b, ok := c.hub.broker.(submitter)
	if !ok || msg.idem != nil || c.route.history.policyFor(msg.Channel) != nil {
		return false
	}
	if c.hub.refuseIfLate() != nil {
		c.replyError(reqID, errUnavailable, lateReason)
		return true
	}
	ctx, cancel := c.brokerContext()
	p := pendingPublish{reqID: reqID, msg: msg, start: time.Now(), cancel: cancel}
	id, wait, err := b.submit(ctx, msg)
	if err != nil {
		cancel()
		c.publishFailed(reqID, msg.Channel, c.hub.published(p.start, err))
		return true
	}
	p.msgID, p.wait = id, wait
	if c.pipeline == nil {
		c.pipeline = make(chan pendingPublish, maxPipelinedPublishes)
		go c.answerPublishes(c.pipeline)
	}
	select {
	case c.pipeline <- p:
	case <-c.context().Done():
		cancel()
	}
	return true
}

// answerPublishes waits for each queued publish's answer, in order, and
// replies; it ends with the connection.
func (c *conn) answerPublishes(pipeline <-chan pendingPublish) {
	defer c.recoverPanic("publish replies")
	for {
		select {
		case p := <-pipeline:
			c.answerPublish(p)
		case <-c.context().Done():
			// The waits end with the connection's context: release them.
			for {
				select {
				case p := <-pipeline:
					p.cancel()
				default:
					return
				}
			}
		}
	}
}

func (c *conn) answerPublish(p pendingPublish) {
	err := p.wait()
	p.cancel()
	if err := c.hub.published(p.start, err); err != nil {
		c.publishFailed(p.reqID, p.msg.Channel, err)
		return
	}
	c.route.recordPublish(p.msg, p.msgID)
	c.sendOwn(reply{Type: "ok", ID: p.reqID, Channel: p.msg.Channel, MessageID: p.msgID})
}

// publishFailed answers a publish the broker did not take.
func (c *conn) publishFailed(reqID json.RawMessage, channel string, err error) {
	if errors.Is(err, context.Canceled) && c.closing.Load() {
		return // the connection is closing; no one to answer
	}
	c.route.log.Debug("publish failed", zap.String("conn", c.id), zap.String("channel", channel), zap.Error(err))
	c.replyError(reqID, errUnavailable, "message not published: the broker did not accept it within publish_timeout (down or overloaded); retry later")
}
