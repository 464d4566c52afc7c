package caddychat

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
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
