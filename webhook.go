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
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Webhooks: after-the-fact events (connect, disconnect, subscribe,
// unsubscribe, publish, join, leave) POSTed to the application's backend,
// each delivered once per cluster, at least once.
//
// Recording an event never waits: it is encoded and appended to a queue of
// the node bounded by max_backlog bytes (over it the event is dropped,
// counted and logged once per episode). Then:
//
//   - With Redis, a writer goroutine appends the queue to a Redis Stream
//     per webhook ("{<channel_prefix>webhook}:<hash of the URL>") in pipelined
//     XADDs with MAXLEN ~ stream_max_len, so Redis's memory is bounded too.
//     Every node joins the stream's consumer group "caddychat" (consumer: its
//     node id) and reads with XREADGROUP: each entry goes to one node, which
//     POSTs it in a batch and XACKs (and XDELs) it on a 2xx. Entries pending
//     on a node that died are claimed by another with XAUTOCLAIM once idle
//     for claim_idle; a node retrying a batch while the backend is down
//     keeps touching its entries (XCLAIM JUSTID) so that they are not
//     claimed from it.
//   - With the in-process broker, the queue itself is the backlog: one
//     goroutine POSTs it in batches and drops a batch from it on a 2xx.
//
// A failed POST (not 2xx, or no answer within timeout) is retried with
// exponential backoff (webhookMinBackoff to webhookMaxBackoff, jittered).
// An event's id is "<node>-<sequence>", made when it is recorded and
// stored inside the event, so it is the same on every redelivery: the
// backend deduplicates on it.

// Webhook is a backend URL that gets the route's events.
type Webhook struct {
	// URL the events are POSTed to. Placeholders such as {env.X} are expanded.
	URL string `json:"url"`
	// Events sent: connect, disconnect, subscribe, unsubscribe, publish,
	// join, leave. Default: all.
	Events []string `json:"events,omitempty"`
	// Secret that signs each request (Caddychat-Signature header, see
	// signature.go). Placeholders are expanded. Default: no signature.
	Secret string `json:"secret,omitempty"`
	// Most events in one POST. Default: 100.
	Batch int `json:"batch,omitempty"`
	// Bytes of encoded events the node holds for this webhook before
	// dropping new ones: with Redis, those not yet written to the stream;
	// with the in-process broker, those not yet delivered. Default: 16MiB.
	MaxBacklog int64 `json:"max_backlog,omitempty"`
	// Longest one POST may take. Default: 10s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// Redis only: how long an event stays pending on a node that took it
	// before another node may claim it (the node died). Default: 30s.
	ClaimIdle caddy.Duration `json:"claim_idle,omitempty"`
	// Redis only: the stream's approximate most entries (XADD MAXLEN ~);
	// older undelivered ones are trimmed, and counted dropped when a node
	// meets them. Default: 100000.
	StreamMaxLen int64 `json:"stream_max_len,omitempty"`
}

// Defaults and bounds of the webhook options.
const (
	defaultWebhookBatch        = 100
	defaultWebhookMaxBacklog   = 16 << 20
	defaultWebhookTimeout      = 10 * time.Second
	defaultWebhookClaimIdle    = 30 * time.Second
	defaultWebhookStreamMaxLen = 100000
	maxWebhookBatch            = 10000

	webhookMinBackoff = 250 * time.Millisecond
	webhookMaxBackoff = 5 * time.Second
	// webhookEventOverhead is what an event counts against max_backlog on
	// top of its encoding.
	webhookEventOverhead = 64
	webhookGroup         = "caddychat"
	webhookUserAgent     = "caddychat"
)

// webhookEventTypes are the events a webhook may ask for, by bit.
var webhookEventTypes = []string{"connect", "disconnect", "subscribe", "unsubscribe", "publish", "join", "leave"}

func webhookEventBit(kind string) uint8 {
	for i, k := range webhookEventTypes {
		if k == kind {
			return 1 << i
		}
	}
	return 0
}

// webhookEvent is one event as the backend receives it (PROTOCOL.md).
type webhookEvent struct {
	ID        string          `json:"id"`
	Type      string          `json:"type"`
	TS        int64           `json:"ts"`
	Node      string          `json:"node"`
	Route     string          `json:"route,omitempty"`
	User      string          `json:"user,omitempty"`
	Conn      string          `json:"conn,omitempty"`
	Channel   string          `json:"channel,omitempty"`
	MessageID string          `json:"message_id,omitempty"`
	Data      json.RawMessage `json:"data,omitempty"`
}

// webhookSettings are a provisioned Webhook's values, what identifies a
// deliverer within its hub.
type webhookSettings struct {
	url, secret  string
	batch        int
	maxBacklog   int64
	timeout      time.Duration
	claimIdle    time.Duration
	streamMaxLen int64
}

func (s webhookSettings) key() string {
	return fmt.Sprintf("%q|%q|%d|%d|%d|%d|%d", s.url, s.secret, s.batch, s.maxBacklog, s.timeout, s.claimIdle, s.streamMaxLen)
}

// provision applies the defaults and expands placeholders.
func (w *Webhook) provision(repl *caddy.Replacer) error {
	raw := w.URL
	w.URL = strings.TrimSpace(repl.ReplaceKnown(w.URL, ""))
	if err := emptyExpansion("webhook URL", raw, w.URL); err != nil {
		return err
	}
	raw = w.Secret
	w.Secret = repl.ReplaceKnown(w.Secret, "")
	if err := emptyExpansion("webhook secret", raw, w.Secret); err != nil {
		return err
	}
	if w.Batch == 0 {
		w.Batch = defaultWebhookBatch
	}
	if w.MaxBacklog == 0 {
		w.MaxBacklog = defaultWebhookMaxBacklog
	}
	if w.Timeout == 0 {
		w.Timeout = caddy.Duration(defaultWebhookTimeout)
	}
	if w.ClaimIdle == 0 {
		w.ClaimIdle = caddy.Duration(defaultWebhookClaimIdle)
	}
	if w.StreamMaxLen == 0 {
		w.StreamMaxLen = defaultWebhookStreamMaxLen
	}
	return nil
}

func (w *Webhook) settings() webhookSettings {
	return webhookSettings{url: w.URL, secret: w.Secret, batch: w.Batch, maxBacklog: w.MaxBacklog,
		timeout: time.Duration(w.Timeout), claimIdle: time.Duration(w.ClaimIdle), streamMaxLen: w.StreamMaxLen}
}

func (w *Webhook) mask() uint8 {
	if len(w.Events) == 0 {
		return 0xff
	}
	var m uint8
	for _, e := range w.Events {
		m |= webhookEventBit(e)
	}
	return m
}

// routeWebhooks are a route's webhooks: where its events go.
type routeWebhooks struct {
	hub      *hub
	sinks    []webhookSink // fixed once provisioned
	released sync.Once
}

type webhookSink struct {
	d    *webhookDeliverer
	mask uint8
}

// wants reports whether any webhook of the route takes kind: callers skip
// building an event nobody wants.
func (rw *routeWebhooks) wants(kind string) bool {
	if rw == nil {
		return false
	}
	bit := webhookEventBit(kind)
	for _, s := range rw.sinks {
		if s.mask&bit != 0 {
			return true
		}
	}
	return false
}

// record stamps ev (id, time, node) and queues it to the route's webhooks
// that take its type. It never blocks.
func (rw *routeWebhooks) record(ev webhookEvent) {
	if !rw.wants(ev.Type) {
		return
	}
	h := rw.hub
	ev.ID = h.node + "-" + strconv.FormatUint(h.webhookSeq.Add(1), 10)
	ev.TS = time.Now().UnixMilli()
	ev.Node = h.node
	b, err := json.Marshal(ev)
	if err != nil { // data was checked JSON; cannot happen
		h.log.Error("encoding a webhook event", zap.Error(err))
		return
	}
	bit := webhookEventBit(ev.Type)
	for _, s := range rw.sinks {
		if s.mask&bit != 0 {
			s.d.record(b)
		}
	}
}

// release gives the route's hold on its deliverers back to the hub.
func (rw *routeWebhooks) release() {
	if rw == nil {
		return
	}
	rw.released.Do(func() {
		for _, s := range rw.sinks {
			rw.hub.webhooks.release(s.d)
		}
	})
}

// webhookRegistry is a hub's deliverers, shared by the routes with equal
// settings, across reloads.
type webhookRegistry struct {
	mu     sync.Mutex
	byKey  map[string]*webhookDeliverer
	closed bool
}

// acquire returns the hub's deliverer of s, started if new.
func (h *hub) acquireWebhook(s webhookSettings) *webhookDeliverer {
	r := &h.webhooks
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.byKey == nil {
		r.byKey = make(map[string]*webhookDeliverer)
	}
	key := s.key()
	if d := r.byKey[key]; d != nil {
		d.refs++
		return d
	}
	d := newWebhookDeliverer(h, s)
	d.refs = 1
	r.byKey[key] = d
	if !r.closed {
		d.start()
	}
	return d
}

// release drops a hold on d; the last one closes it, handing what it still
// holds to a live deliverer of the same URL (the one a reload started).
func (r *webhookRegistry) release(d *webhookDeliverer) {
	r.mu.Lock()
	if d.refs--; d.refs > 0 {
		r.mu.Unlock()
		return
	}
	key := d.cfg.key()
	if r.byKey[key] == d {
		delete(r.byKey, key)
	}
	var successor *webhookDeliverer
	for _, o := range r.byKey {
		if o.cfg.url == d.cfg.url {
			successor = o
			break
		}
	}
	r.mu.Unlock()
	d.close(successor)
}

// closeAll closes every deliverer when the hub closes (before its Redis
// client: a deliverer writes what it still holds to the stream).
func (r *webhookRegistry) closeAll() {
	r.mu.Lock()
	r.closed = true
	all := make([]*webhookDeliverer, 0, len(r.byKey))
	for _, d := range r.byKey {
		all = append(all, d)
	}
	r.byKey = nil
	r.mu.Unlock()
	for _, d := range all {
		d.close(nil)
	}
}

// liveWebhooks are the deliverers not yet closed, for the backlog gauge.
var liveWebhooks sync.Map

func webhookBacklogBytes() float64 {
	var total int64
	liveWebhooks.Range(func(k, _ any) bool {
		d := k.(*webhookDeliverer)
		d.mu.Lock()
		total += d.queued
		d.mu.Unlock()
		return true
	})
	return float64(total)
}

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

// provisionWebhooks applies the webhooks' defaults and takes a hold on
// their hub's deliverers (started when new).
func (h *Handler) provisionWebhooks(repl *caddy.Replacer) error {
	if len(h.Webhooks) == 0 {
		return nil
	}
	for _, w := range h.Webhooks {
		if err := w.provision(repl); err != nil {
			return err
		}
	}
	rw := &routeWebhooks{hub: h.hub}
	for _, w := range h.Webhooks {
		rw.sinks = append(rw.sinks, webhookSink{d: h.hub.acquireWebhook(w.settings()), mask: w.mask()})
	}
	h.webhooks = rw
	return nil
}
