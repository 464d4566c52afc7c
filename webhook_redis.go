package caddychat

import (
	"context"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// With Redis, a webhook's events go through a stream that every node
// writes to and reads from in one consumer group, so that each is delivered
// by one node (webhook.go).

// writeStream appends the queue to the webhook's stream, in pipelined
// batches; while Redis is down the events wait in the (bounded) queue.
func (d *webhookDeliverer) writeStream() {
	const perPipeline = 256
	for attempt := 0; ; {
		batch := d.peek(perPipeline)
		if len(batch) == 0 {
			if !d.waitWork() {
				return
			}
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := d.xadd(ctx, batch)
		cancel()
		if err != nil {
			d.log.Debug("writing webhook events to Redis", zap.Error(err))
			if !d.sleep(backoff(attempt)) {
				return
			}
			attempt++
			continue
		}
		attempt = 0
		d.done(len(batch))
	}
}

func (d *webhookDeliverer) xadd(ctx context.Context, batch [][]byte) error {
	pipe := d.redis.Pipeline()
	for _, ev := range batch {
		pipe.XAdd(ctx, &redis.XAddArgs{Stream: d.stream, MaxLen: d.cfg.streamMaxLen, Approx: true, Values: []any{"e", ev}})
	}
	_, err := pipe.Exec(ctx)
	return err
}

// readStream is this node's consumer of the webhook's group: it delivers
// what XREADGROUP gives it, and what XAUTOCLAIM takes from dead consumers.
func (d *webhookDeliverer) readStream() {
	consumer := d.node
	var lastClaim time.Time
	claimFrom := "0-0"
	groupReady := false
	for attempt := 0; d.ctx.Err() == nil; {
		if !groupReady {
			ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
			err := d.redis.XGroupCreateMkStream(ctx, d.stream, webhookGroup, "0").Err()
			cancel()
			if err != nil && !strings.HasPrefix(err.Error(), "BUSYGROUP") {
				d.log.Debug("creating the webhook consumer group", zap.Error(err))
				if !d.sleep(backoff(attempt)) {
					return
				}
				attempt++
				continue
			}
			groupReady = true
		}
		var msgs []redis.XMessage
		var err error
		if time.Since(lastClaim) >= d.cfg.claimIdle/4 {
			ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
			msgs, claimFrom, err = d.redis.XAutoClaim(ctx, &redis.XAutoClaimArgs{
				Stream: d.stream, Group: webhookGroup, Consumer: consumer,
				MinIdle: d.cfg.claimIdle, Start: claimFrom, Count: int64(d.cfg.batch),
			}).Result()
			cancel()
			if claimFrom == "" || claimFrom == "0-0" || err != nil {
				claimFrom, lastClaim = "0-0", time.Now()
			}
			if err == nil && len(msgs) > 0 {
				d.log.Info("claimed webhook events pending on another node", zap.Int("events", len(msgs)))
			}
		}
		if err == nil && len(msgs) == 0 {
			var streams []redis.XStream
			ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
			streams, err = d.redis.XReadGroup(ctx, &redis.XReadGroupArgs{
				Group: webhookGroup, Consumer: consumer, Streams: []string{d.stream, ">"},
				Count: int64(d.cfg.batch), Block: time.Second,
			}).Result()
			cancel()
			if err == redis.Nil {
				err = nil
			}
			for _, s := range streams {
				msgs = append(msgs, s.Messages...)
			}
		}
		if err != nil {
			if d.ctx.Err() != nil {
				return
			}
			if strings.HasPrefix(err.Error(), "NOGROUP") {
				groupReady = false // the stream was deleted (a flush): create it again
			}
			d.log.Debug("reading webhook events from Redis", zap.Error(err))
			if !d.sleep(backoff(attempt)) {
				return
			}
			attempt++
			continue
		}
		attempt = 0
		if len(msgs) > 0 && !d.deliverEntries(msgs) {
			return
		}
	}
}

// deliverEntries POSTs stream entries and acknowledges them; false: the
// deliverer closed first (the entries stay pending, for another consumer).
func (d *webhookDeliverer) deliverEntries(msgs []redis.XMessage) bool {
	ids := make([]string, 0, len(msgs))
	batch := make([][]byte, 0, len(msgs))
	trimmed := 0
	for _, msg := range msgs {
		ids = append(ids, msg.ID)
		if v, ok := msg.Values["e"].(string); ok {
			batch = append(batch, []byte(v))
		} else {
			trimmed++ // trimmed by MAXLEN before anyone delivered it
		}
	}
	if trimmed > 0 {
		moduleMetrics().webhookEvents.WithLabelValues("dropped").Add(float64(trimmed))
		d.log.Warn("webhook events trimmed from the stream (stream_max_len) before delivery", zap.Int("events", trimmed))
	}
	if len(batch) > 0 {
		lastTouch := time.Now()
		touch := func() {
			// Keep the entries ours while the backend is down: reset their
			// idle time so that no other node claims them.
			if time.Since(lastTouch) < d.cfg.claimIdle/3 {
				return
			}
			lastTouch = time.Now()
			ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
			_ = d.redis.XClaimJustID(ctx, &redis.XClaimArgs{Stream: d.stream, Group: webhookGroup, Consumer: d.node, Messages: ids}).Err()
			cancel()
		}
		if !d.post(batch, touch) {
			return false
		}
	}
	for attempt := 0; ; attempt++ {
		ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
		pipe := d.redis.Pipeline()
		pipe.XAck(ctx, d.stream, webhookGroup, ids...)
		pipe.XDel(ctx, d.stream, ids...)
		_, err := pipe.Exec(ctx)
		cancel()
		if err == nil {
			return true
		}
		// Unacknowledged, they would be delivered again after claim_idle.
		d.log.Debug("acknowledging webhook events", zap.Error(err))
		if attempt >= 5 || !d.sleep(backoff(attempt)) {
			return d.ctx.Err() == nil
		}
	}
}
