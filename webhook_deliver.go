package caddychat

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// A webhook deliverer: the node's bounded queue of recorded events and,
// with the in-process broker, their delivery: batches POSTed with retries
// and backoff (webhook.go says what webhooks are; webhook_redis.go is the
// stream that makes them once per cluster).

// webhookDeliverer is one webhook of a hub: its node's queue and the
// goroutines that write it to the stream (Redis) and deliver it.
type webhookDeliverer struct {
	cfg    webhookSettings
	refs   int // guarded by the registry's mu
	node   string
	log    *zap.Logger
	client *http.Client
	redis  redis.UniversalClient // nil: in-process
	stream string

	mu     sync.Mutex
	queue  [][]byte // encoded events, oldest first
	queued int64    // bytes, with webhookEventOverhead each
	// dropped counts the events dropped in the current overflow episode
	// (0: none), which is logged when it starts and when it ends.
	dropped   int
	closed    bool
	successor *webhookDeliverer // where events recorded after close go

	wake   chan struct{} // an event was queued
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// down is when POSTs started failing (zero while they succeed), so
	// that an outage is logged once when it starts and once when it ends.
	downMu sync.Mutex
	down   time.Time
}

func newWebhookDeliverer(h *hub, s webhookSettings) *webhookDeliverer {
	ctx, cancel := context.WithCancel(context.Background())
	sum := sha256.Sum256([]byte(s.url))
	return &webhookDeliverer{
		cfg:    s,
		node:   h.node,
		log:    h.log.With(zap.String("webhook", redactURL(s.url))),
		client: &http.Client{Timeout: s.timeout},
		redis:  h.redis,
		stream: "{" + h.prefix + "webhook}:" + hex.EncodeToString(sum[:8]),
		wake:   make(chan struct{}, 1),
		ctx:    ctx,
		cancel: cancel,
	}
}

func (d *webhookDeliverer) start() {
	liveWebhooks.Store(d, struct{}{})
	if d.redis == nil {
		d.wg.Go(d.deliverQueue)
		return
	}
	d.wg.Go(d.writeStream)
	d.wg.Go(d.readStream)
}

// record queues one encoded event, or drops it when the backlog is full.
func (d *webhookDeliverer) record(ev []byte) {
	m := moduleMetrics()
	d.mu.Lock()
	if d.closed {
		next := d.successor
		d.mu.Unlock()
		if next != nil {
			next.record(ev)
		}
		return
	}
	size := int64(len(ev) + webhookEventOverhead)
	if d.queued+size > d.cfg.maxBacklog {
		if d.dropped == 0 {
			d.log.Warn("webhook backlog full (max_backlog): dropping new events until it drains; the backend or Redis does not keep up",
				zap.Int64("max_backlog", d.cfg.maxBacklog))
		}
		d.dropped++
		d.mu.Unlock()
		m.webhookEvents.WithLabelValues("dropped").Inc()
		return
	}
	d.queue = append(d.queue, ev)
	d.queued += size
	d.mu.Unlock()
	m.webhookEvents.WithLabelValues("recorded").Inc()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// peek returns up to n events from the queue's head, without taking them.
func (d *webhookDeliverer) peek(n int) [][]byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	n = min(n, len(d.queue))
	return append([][]byte(nil), d.queue[:n]...)
}

// done takes the n events at the queue's head off it.
func (d *webhookDeliverer) done(n int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, ev := range d.queue[:n] {
		d.queued -= int64(len(ev) + webhookEventOverhead)
	}
	clear(d.queue[:n])
	d.queue = d.queue[n:]
	if len(d.queue) == 0 {
		d.queue = nil // let the array go
	}
	if d.dropped > 0 && d.queued <= d.cfg.maxBacklog/2 {
		d.log.Info("webhook backlog drained: events are recorded again", zap.Int("dropped", d.dropped))
		d.dropped = 0
	}
}

// waitWork waits for an event or the deliverer's close; false: closed.
func (d *webhookDeliverer) waitWork() bool {
	select {
	case <-d.wake:
		return true
	case <-d.ctx.Done():
		return false
	}
}

// sleep waits for the delay, false if the deliverer closes first.
func (d *webhookDeliverer) sleep(delay time.Duration) bool {
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-d.ctx.Done():
		return false
	}
}

func backoff(attempt int) time.Duration {
	b := webhookMinBackoff << min(attempt, 10)
	b = min(b, webhookMaxBackoff)
	return b/2 + rand.N(b/2+1)
}

// deliverQueue is the in-process broker's delivery: the queue's head, in
// batches, each retried until the backend takes it.
func (d *webhookDeliverer) deliverQueue() {
	for {
		batch := d.peek(d.cfg.batch)
		if len(batch) == 0 {
			if !d.waitWork() {
				return
			}
			continue
		}
		if !d.post(batch, nil) {
			return
		}
		d.done(len(batch))
	}
}

// post delivers a batch, retrying with backoff until a 2xx; false: the
// deliverer closed first. touch, if set, runs between retries.
func (d *webhookDeliverer) post(batch [][]byte, touch func()) bool {
	body := encodeWebhookBatch(batch)
	m := moduleMetrics()
	for attempt := 0; ; attempt++ {
		err := d.send(body)
		if err == nil {
			d.up()
			m.webhookEvents.WithLabelValues("delivered").Add(float64(len(batch)))
			now := time.Now().UnixMilli()
			for _, ev := range batch {
				if ts := eventTS(ev); ts > 0 {
					m.webhookSeconds.Observe(float64(max(now-ts, 0)) / 1000)
				}
			}
			return true
		}
		if d.ctx.Err() != nil {
			return false
		}
		d.failed(err)
		m.webhookEvents.WithLabelValues("retried").Add(float64(len(batch)))
		if !d.sleep(backoff(attempt)) {
			return false
		}
		if touch != nil {
			touch()
		}
	}
}

func encodeWebhookBatch(batch [][]byte) []byte {
	var buf bytes.Buffer
	buf.WriteString(`{"events":[`)
	for i, ev := range batch {
		if i > 0 {
			buf.WriteByte(',')
		}
		buf.Write(ev)
	}
	buf.WriteString("]}")
	return buf.Bytes()
}

// eventTS reads the "ts" of an encoded event, 0 if it has none.
func eventTS(ev []byte) int64 {
	var v struct {
		TS int64 `json:"ts"`
	}
	_ = json.Unmarshal(ev, &v)
	return v.TS
}

// send POSTs body once.
func (d *webhookDeliverer) send(body []byte) error {
	req, err := http.NewRequestWithContext(d.ctx, http.MethodPost, d.cfg.url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", webhookUserAgent)
	if d.cfg.secret != "" {
		req.Header.Set(signatureHeader, signature([]byte(d.cfg.secret), body, time.Now()))
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("the backend answered %s", resp.Status)
	}
	return nil
}

func (d *webhookDeliverer) failed(err error) {
	d.downMu.Lock()
	defer d.downMu.Unlock()
	if d.down.IsZero() {
		d.down = time.Now()
		d.log.Warn("webhook delivery failing; retrying with backoff until the backend takes the events", zap.Error(err))
	}
}

func (d *webhookDeliverer) up() {
	d.downMu.Lock()
	defer d.downMu.Unlock()
	if !d.down.IsZero() {
		d.log.Info("webhook delivery works again", zap.Duration("outage", time.Since(d.down)))
		d.down = time.Time{}
	}
}

// close stops the deliverer. What is still queued goes to successor (the
// deliverer of the same URL a reload started) or, with Redis, is written
// to the stream for the cluster to deliver; an in-process queue with no
// successor is lost (logged).
func (d *webhookDeliverer) close(successor *webhookDeliverer) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return
	}
	d.closed = true
	d.successor = successor
	d.mu.Unlock()
	d.cancel()
	d.wg.Wait()
	liveWebhooks.Delete(d)

	d.mu.Lock()
	rest := d.queue
	d.queue, d.queued = nil, 0
	d.mu.Unlock()
	if len(rest) == 0 {
		return
	}
	if successor != nil {
		for _, ev := range rest {
			successor.record(ev)
		}
		return
	}
	if d.redis != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := d.xadd(ctx, rest)
		cancel()
		if err == nil {
			return
		}
		d.log.Warn("webhook events not written to Redis at shutdown are lost", zap.Int("events", len(rest)), zap.Error(err))
		return
	}
	d.log.Warn("webhook events not delivered at shutdown are lost", zap.Int("events", len(rest)))
}
