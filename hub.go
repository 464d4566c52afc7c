package caddychat

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// hubs holds one hub per broker configuration, shared by every handler
// instance that names it, so that a config reload reuses the hub, its
// connections and its Redis connections instead of opening new ones.
var hubs = caddy.NewUsagePool()

// liveHubs are the hubs not yet destructed, for the metrics that sum over them.
var liveHubs hubSet

type hubSet struct{ sync.Map }

// queuedBytes is what waits to be sent to the clients of every live hub.
func (s *hubSet) queuedBytes() float64 {
	var total int64
	s.Range(func(k, _ any) bool {
		total += k.(*hub).queuedBytes()
		return true
	})
	return float64(total)
}

func (h *hub) queuedBytes() int64 {
	h.mu.RLock()
	defer h.mu.RUnlock()
	var total int64
	for s := range h.subscribers {
		total += s.queuedBytes()
	}
	return total
}

// subscriber is what the hub knows of a local client (a WebSocket
// connection: conn.go). The hub hands it deliveries and never waits for it.
type subscriber interface {
	// enqueue queues d without blocking. A subscriber that cannot take d
	// (its queue is full: it does not keep up) closes itself as a slow
	// consumer and reports false, so that it never holds anyone back.
	enqueue(d *delivery) bool
	// fail starts closing the subscriber with code and reason; the first
	// call wins.
	fail(code websocket.StatusCode, reason string)
	// wantsPresence reports whether join and leave events are delivered to it.
	wantsPresence() bool
	// wantsEphemeral reports whether an ephemeral message sent by the
	// connection with id from is delivered to it (ephemeral.go).
	wantsEphemeral(from string) bool
	// presenceInfo is how it is listed in presence; ok is false on a route
	// without presence.
	presenceInfo() (info presenceInfo, ok bool)
	// queuedBytes is what waits to be sent to it.
	queuedBytes() int64
	// recordEvent records a webhook event of kind (subscribe, unsubscribe,
	// join, leave) on channel for it, without blocking (webhook.go).
	recordEvent(kind, channel string)
}

// hubConfig is what identifies a hub: handlers with equal hubConfigs share one.
type hubConfig struct {
	redisURL       string
	sentinel       *RedisSentinel // instead of redisURL
	cluster        *RedisCluster  // instead of redisURL
	redisTLS       *RedisTLS      // TLS to any of them (redis_tls.go)
	channelPrefix  string
	brokerTimeouts time.Duration
}

// key holds every field of c: handlers share a hub, its Redis client and the
// timeouts they were built with, only when all of them are equal, and a
// reload that changes any of them gets a new hub. Strings are quoted so that
// no value can pose as another field.
func (c hubConfig) key() string {
	return fmt.Sprintf("caddychat|%q|%q|%d", c.servers(), c.channelPrefix, c.brokerTimeouts)
}

// hub is a node's registry of channels and their local subscribers. It holds
// one broker subscription per channel however many local clients listen, and
// fans each incoming message out to them without ever waiting on a socket.
type hub struct {
	node string
	ids  *idGenerator
	// brokerTimeout bounds the hub's own broker calls (a resync's reads).
	brokerTimeout time.Duration
	// brokerName and prefix label the hub's broker_up metric.
	brokerName string
	prefix     string
	broker     Broker
	redis      redis.UniversalClient // nil for the in-memory broker
	log        *zap.Logger
	// presence holds this node's presence entries; see presence.go.
	presence *presence

	// streams are the node's SSE streams by session (sse_session.go).
	streams streamRegistry

	mu          sync.RWMutex
	channels    map[string]*channelState
	subscribers map[subscriber]struct{}
	closed      bool
	connWG      sync.WaitGroup

	// admitted counts connections accepted or being accepted, and userConns
	// those of each authenticated user; both guarded by admitMu.
	admitMu   sync.Mutex
	admitted  int
	userConns map[string]int

	// drainPeriod bounds how long closing the hub's connections may take
	// (nanoseconds), set by the handlers that use it.
	drainPeriod atomic.Int64

	connSeq atomic.Uint64
	// publishOutage is when publishes started failing (unix ns), 0 while
	// they succeed: an outage is logged once when it starts and once when it
	// ends, never once per refused message.
	publishOutage atomic.Int64
	// dropped counts deliveries not queued because a client's send queue was full.
	dropped atomic.Uint64
	// lag holds the recent broker lags of its messages (lag.go).
	lag lagWindow

	// inbox is where a Redis broker's messages wait for the delivering
	// goroutine (inbox.go); nil with the memory broker. maxLag (ns, 0: off)
	// is the latest configuration's max_lag, lateAt when the delivering
	// goroutine last skipped a late message (Unix ns), and gapped the
	// channels whose members are owed a gap frame, that goroutine's own
	// (late.go).
	inbox  *inbox
	maxLag atomic.Int64
	lateAt atomic.Int64
	gapped []string

	// webhooks are the deliverers of the routes' webhooks (webhook.go), and
	// webhookSeq numbers the node's webhook events.
	webhooks   webhookRegistry
	webhookSeq atomic.Uint64

	// control carries the server API's requests to every node (control.go);
	// revocations are the tokens it revoked (revoke.go); routes are the
	// routes using the hub, which the admin API acts for (api.go).
	control     *control
	revocations *revocations
	routesMu    sync.Mutex
	routes      []*route
}

// channelState is one channel with local subscribers (or joins in progress).
type channelState struct {
	// brokerMu serialises the channel's broker Subscribe and Unsubscribe calls
	// so Redis always sees them in the order the hub decided them.
	brokerMu   sync.Mutex
	subscribed bool // guarded by brokerMu

	// refs counts members plus joins in progress; guarded by hub.mu. The entry
	// stays in hub.channels while refs > 0 or a broker call is under way.
	refs    int
	members memberSet // guarded by hub.mu

	// lastKept is the id of the last kept message delivered; only the
	// broker's delivering goroutine touches it. It drops live copies of
	// messages a resync already delivered, and is where a resync starts.
	lastKept streamID
	// lastEpoch is the epoch of that message (epochresync.go); same owner.
	lastEpoch string
	// missed counts the messages the members were not sent because they
	// were late, until the gap frame that reports them (late.go); same owner.
	missed int
}

var errHubClosed = errors.New("node is shutting down")

func newHub(cfg hubConfig) (*hub, error) {
	node, err := newNodeID()
	if err != nil {
		return nil, err
	}
	brokerName := cfg.brokerName()
	h := &hub{
		node:        node,
		ids:         &idGenerator{node: node},
		log:         caddy.Log().Named("http.handlers.chat").With(zap.String("node", node), zap.String("broker", brokerName)),
		brokerName:  brokerName,
		prefix:      cfg.channelPrefix,
		channels:    make(map[string]*channelState),
		subscribers: make(map[subscriber]struct{}),

		brokerTimeout: cfg.brokerTimeouts,
	}
	h.control = newControl(h)
	if !cfg.usesRedis() {
		h.broker = newMemoryBroker(h.ids, h.deliverRecovering)
		h.presence = newPresence(newMemoryPresence(h.broker), node, h.log)
		h.revocations = newRevocations(nil, cfg.channelPrefix, h.log)
		h.live()
		return h, nil
	}
	useRedisLogger()
	client, sharded, err := newRedisClient(cfg, "caddychat-"+node)
	if err != nil {
		return nil, err
	}
	h.redis = client
	var broker Broker
	h.inbox = newInbox(h)
	if sharded {
		broker, err = newClusterBroker(client.(*redis.ClusterClient), cfg.channelPrefix, h.ids, h.log, h.inbox.push, h.inbox.pushResync)
	} else {
		broker, err = newRedisBroker(client, cfg.channelPrefix, h.ids, h.log, h.inbox.push, h.inbox.pushResync)
	}
	if err != nil {
		h.inbox.close()
		_ = client.Close()
		return nil, err
	}
	h.broker = broker
	h.presence = newPresence(newRedisPresence(client, cfg.channelPrefix, sharded), node, h.log)
	h.revocations = newRevocations(client, cfg.channelPrefix, h.log)
	h.live()
	return h, nil
}

// live counts the hub in the metrics that sum over hubs, and shows its
// broker as up until a publish fails.
func (h *hub) live() {
	liveHubs.Store(h, struct{}{})
	moduleMetrics().brokerUp.WithLabelValues(h.brokerName, h.prefix).Set(1)
}

func newNodeID() (string, error) {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generating node id: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

func (h *hub) nextConnID() string {
	return fmt.Sprintf("%s-%d", h.node, h.connSeq.Add(1))
}

// errTooManyConnections and errTooManyUserConnections refuse an upgrade.
var (
	errTooManyConnections     = errors.New("this node has too many connections")
	errTooManyUserConnections = errors.New("too many connections for this user")
)

// admit reserves a connection slot for user (empty: anonymous) before the
// upgrade; release gives it back when the connection ends. There is no
// release closure: one per connection would be held by every idle one.
func (h *hub) admit(user string, maxTotal, maxPerUser int) error {
	h.admitMu.Lock()
	defer h.admitMu.Unlock()
	if h.admitted >= maxTotal {
		return errTooManyConnections
	}
	if user != "" {
		if h.userConns == nil {
			h.userConns = make(map[string]int)
		}
		if h.userConns[user] >= maxPerUser {
			return errTooManyUserConnections
		}
		h.userConns[user]++
	}
	h.admitted++
	return nil
}

// release gives back the slot admit reserved for user; once per admit.
func (h *hub) release(user string) {
	h.admitMu.Lock()
	defer h.admitMu.Unlock()
	h.admitted--
	if user != "" {
		if h.userConns[user]--; h.userConns[user] <= 0 {
			delete(h.userConns, user)
		}
	}
}

// register adds s to the node's subscribers, so that closing the hub closes it.
func (h *hub) register(s subscriber) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return errHubClosed
	}
	h.subscribers[s] = struct{}{}
	h.connWG.Add(1)
	return nil
}

// unregister removes s and every subscription it still holds, with its
// presence entries (in one round trip to the store).
func (h *hub) unregister(s subscriber, channels []string) {
	h.presence.leaveAll(s, channels)
	for _, ch := range channels {
		if cs := h.dropMember(s, ch); cs != nil {
			s.recordEvent("unsubscribe", ch)
			h.releaseIfIdle(ch, cs)
		}
	}
	h.mu.Lock()
	delete(h.subscribers, s)
	h.mu.Unlock()
	h.connWG.Done()
}

// subscribe adds s to channel's members, subscribing the node to the channel
// at the broker first when s is its first local member, and then enters s
// in the channel's presence. ctx bounds both.
func (h *hub) subscribe(ctx context.Context, s subscriber, channel string) error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return errHubClosed
	}
	cs := h.channels[channel]
	if cs == nil {
		cs = &channelState{}
		h.channels[channel] = cs
	}
	if cs.members.has(s) {
		h.mu.Unlock()
		return nil
	}
	cs.refs++
	h.mu.Unlock()

	cs.brokerMu.Lock()
	var err error
	if !cs.subscribed {
		if err = h.broker.Subscribe(ctx, channel); err == nil {
			cs.subscribed = true
			moduleMetrics().channels.Inc()
		}
	}
	h.mu.Lock()
	if err == nil && !cs.members.has(s) {
		cs.members.add(s)
	} else {
		// Failed, or a join of s that ran beside this one won: one ref.
		cs.refs--
	}
	h.mu.Unlock()
	cs.brokerMu.Unlock()

	if err != nil {
		h.releaseIfIdle(channel, cs)
		return err
	}
	s.recordEvent("subscribe", channel)
	h.presence.join(ctx, s, channel)
	return nil
}

// unsubscribe removes s from channel's members and presence; the last
// member leaving unsubscribes the node from the channel.
func (h *hub) unsubscribe(s subscriber, channel string) {
	if cs := h.dropMember(s, channel); cs != nil {
		s.recordEvent("unsubscribe", channel)
		h.presence.leave(s, channel)
		h.releaseIfIdle(channel, cs)
	}
}

// dropMember takes s out of channel's members; it returns the channel's
// state, for releaseIfIdle, or nil when s was not a member.
func (h *hub) dropMember(s subscriber, channel string) *channelState {
	h.mu.Lock()
	defer h.mu.Unlock()
	cs := h.channels[channel]
	if cs == nil {
		return nil
	}
	if !cs.members.remove(s) {
		return nil
	}
	cs.refs--
	return cs
}

func (h *hub) releaseIfIdle(channel string, cs *channelState) {
	cs.brokerMu.Lock()
	defer cs.brokerMu.Unlock()
	h.mu.RLock()
	idle := cs.refs == 0
	h.mu.RUnlock()
	if !idle {
		return
	}
	if cs.subscribed {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if err := h.broker.Unsubscribe(ctx, channel); err != nil {
			// The broker has forgotten the channel all the same: it will not be
			// resubscribed on reconnect.
			h.log.Debug("unsubscribing channel", zap.String("channel", channel), zap.Error(err))
		}
		cancel()
		cs.subscribed = false
		moduleMetrics().channels.Dec()
	}
	h.mu.Lock()
	if cs.refs == 0 && h.channels[channel] == cs {
		delete(h.channels, channel)
	}
	h.mu.Unlock()
}

// deliver queues one broker message to every local member of channel. It is
// the broker's deliverFunc: it never blocks, and a member whose queue is full
// is disconnected as a slow consumer rather than waited for.
func (h *hub) deliver(channel string, payload []byte) {
	h.deliverReceived(channel, payload, 0)
}

// deliverReceived delivers one broker message that the inbox received at
// received (Unix ns), or, with 0, one delivered on its publisher's
// goroutine (the memory broker), which is never late at the hub.
func (h *hub) deliverReceived(channel string, payload []byte, received int64) {
	if channel != "" && channel[0] == '#' {
		h.control.receive(channel, payload)
		return
	}
	now := time.Now()
	body, stamped := unstamp(payload)
	born := received
	if born == 0 {
		born = now.UnixNano()
	}
	if stamped {
		if ts, ok := h.observeLag(body, now); ok {
			born = ts
		}
	}
	if received != 0 && h.tooLate(now.UnixNano()-born, channel, body, stamped) {
		h.skipLate(channel, body, stamped)
		return
	}
	h.deliverBody(channel, body, stamped, born)
}

// deliverBody delivers a payload whose stamp was checked (and cut off): only
// a stamped one is read for an id or a presence event (envelope.go). born
// is its publish time (Unix ns), by which writers drop it once it is later
// than max_lag (late.go); 0 for what a resync reads from history, which is
// old by nature and must reach the clients anyway.
func (h *hub) deliverBody(channel string, body []byte, stamped bool, born int64) {
	if stamped && len(body) > 0 && body[0] == ephemeralMark {
		h.deliverEphemeral(channel, body, born)
		return
	}
	h.mu.RLock()
	defer h.mu.RUnlock()
	cs := h.channels[channel]
	if cs == nil || cs.members.len() == 0 {
		return
	}
	d := newDelivery(channel, body, stamped, h.ids)
	h.sendGap(channel, cs)
	if d.kept {
		if !cs.lastKept.less(d.keptID) {
			return // a resync delivered it already
		}
		cs.lastKept = d.keptID
		cs.noteEpoch(channel, body)
	}
	// Join and leave events go to the clients that asked for presence only.
	event := stamped && isPresenceEvent(channel, body)
	if !event {
		d.born = born
	}
	queued, skipped := 0, 0
	for s := range cs.members.all() {
		if event && !s.wantsPresence() {
			skipped++
			continue
		}
		if s.enqueue(d) {
			queued++
		}
	}
	h.countFanOut(cs.members.len(), skipped, queued)
}

// countFanOut records one message's fan-out to members subscribers, of
// which skipped were not meant to get it and queued took it: the rest were
// dropped (full queues). One metrics update per message, not per subscriber.
func (h *hub) countFanOut(members, skipped, queued int) {
	m := moduleMetrics()
	m.delivered.Add(float64(queued))
	if dropped := members - skipped - queued; dropped > 0 {
		h.dropped.Add(uint64(dropped))
		m.dropped.Add(float64(dropped))
	}
}

// publish sends msg through the broker.
func (h *hub) publish(ctx context.Context, msg Publication) (string, error) {
	start := time.Now()
	id, err := h.broker.Publish(ctx, msg)
	if errors.Is(err, errNewHistoryLimited) {
		return id, err // the publisher's limit, not the broker's health
	}
	return id, h.published(start, err)
}

// published records the outcome of a publish started at start: its time,
// and the broker's health (an outage is logged once when it starts and
// once when it ends). It returns err.
func (h *hub) published(start time.Time, err error) error {
	m := moduleMetrics()
	m.publishSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		m.publishFailures.Inc()
		// A publish abandoned because its connection is closing says nothing
		// about the broker.
		if !errors.Is(err, context.Canceled) && h.publishOutage.CompareAndSwap(0, start.UnixNano()) {
			m.brokerUp.WithLabelValues(h.brokerName, h.prefix).Set(0)
			h.log.Warn("the broker is not accepting publishes; clients are told unavailable until it is back", zap.Error(err))
		}
		return err
	}
	if since := h.publishOutage.Load(); since != 0 && h.publishOutage.CompareAndSwap(since, 0) {
		m.brokerUp.WithLabelValues(h.brokerName, h.prefix).Set(1)
		h.log.Info("the broker accepts publishes again", zap.Duration("outage", time.Since(time.Unix(0, since))))
	}
	return nil
}

// Destruct closes the hub when no handler uses it any more: on shutdown
// (1001, going away) or when a reload changed the broker settings (1012,
// service restart: reconnect and you reach the new configuration).
func (h *hub) Destruct() error {
	code, reason := closeServiceRestart, "configuration changed"
	if caddy.Exiting() {
		code, reason = closeGoingAway, "node shutting down"
	}
	liveHubs.Delete(h)
	moduleMetrics().brokerUp.DeleteLabelValues(h.brokerName, h.prefix)
	h.mu.Lock()
	h.closed = true
	subs := make([]subscriber, 0, len(h.subscribers))
	for s := range h.subscribers {
		subs = append(subs, s)
	}
	h.mu.Unlock()

	h.drain(subs, code, reason)
	done := make(chan struct{})
	go func() { h.connWG.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(closeWait + time.Second):
		h.log.Warn("connections still closing at hub shutdown", zap.Int("connections", len(subs)))
	}
	h.presence.close()
	h.control.close()
	// Before the Redis client closes: deliverers write what they hold.
	h.webhooks.closeAll()

	err := h.broker.Close()
	if h.inbox != nil {
		h.inbox.close()
	}
	if h.redis != nil {
		err = errors.Join(err, h.redis.Close())
	}
	return err
}

var _ caddy.Destructor = (*hub)(nil)

// drainPace is the fastest a node closes its connections when it drains:
// clients told to reconnect at once would all come back in the same
// instant, to whichever nodes remain.
const drainPace = 1000 // connections per second

// drain closes subs at an even pace, at most drainPace per second, over
// at most the drain period: a few connections go at once, thousands are
// spread out so their reconnects are too.
func (h *hub) drain(subs []subscriber, code websocket.StatusCode, reason string) {
	offsets := drainSchedule(len(subs), time.Duration(h.drainPeriod.Load()))
	if n := len(offsets); n > 0 && offsets[n-1] > 0 {
		h.log.Info("draining connections", zap.Int("connections", n), zap.Duration("over", offsets[n-1]))
	}
	start := time.Now()
	for i, s := range subs {
		if wait := time.Until(start.Add(offsets[i])); wait > 0 {
			time.Sleep(wait)
		}
		s.fail(code, reason)
	}
}

// drainSchedule is when each of n connections is closed, from the start of
// a drain: evenly over min(period, n/drainPace).
func drainSchedule(n int, period time.Duration) []time.Duration {
	span := min(period, time.Duration(n)*time.Second/drainPace)
	out := make([]time.Duration, n)
	if span <= 0 || n < 2 {
		return out
	}
	for i := range out {
		out[i] = span * time.Duration(i) / time.Duration(n-1)
	}
	return out
}

// closeWait bounds how long closing one connection may take.
const closeWait = 5 * time.Second
