package caddychat

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// route is what a connection needs of its route, resolved once by
// Provision from the Handler's options and defaults. Connections read this,
// never the Handler: the operator's config stays the Handler's business,
// and a connection sees only the values it acts on.
type route struct {
	// name labels the route's figures in the server API's stats.
	name string
	hub  *hub
	log  *zap.Logger
	auth *authenticator

	// raw: the route bridges one channel, each text frame a message.
	raw bool
	// usesTokens: the route has a jwt block, so refresh has meaning.
	usesTokens bool
	// tokenLeeway keeps a token valid that much past its expiry.
	tokenLeeway time.Duration

	sendQueue        int64
	maxSubscriptions int
	maxReplay        int
	publishTimeout   time.Duration
	// maxLag: later than this a message is not written (late.go); 0: off.
	maxLag time.Duration
	// idemWindow: how long idempotency keys are remembered; 0: keys are
	// ignored.
	idemWindow   time.Duration
	writeTimeout time.Duration
	pingInterval time.Duration
	// rate is the frames per second one connection may send, 0 for no
	// limit; rateBurst the bucket's size.
	rate      float64
	rateBurst int
	// ephemeralRate is the ephemeral publishes per second one connection
	// may send, not positive when they are off; ephemeralBurst the
	// bucket's size.
	ephemeralRate  float64
	ephemeralBurst int

	presence    bool
	presenceTTL time.Duration

	history     *compiledHistory
	newChannels *creationLimiter // nil: publishers may create history channels freely

	// webhooks get the route's events (webhook.go); nil: none.
	webhooks       *routeWebhooks
	maxMessageSize int64
	// The synchronous hooks (hook.go), nil when not configured;
	// connectHeaders are the request headers the connect hook gets, and
	// hookCache the subscribe hook's decisions (nil: no cache).
	connectHook    *hookClient
	subscribeHook  *hookClient
	publishHook    *hookClient
	connectHeaders []string
	hookCache      *hookCache

	// lastPath is the path the route's latest connection came on
	// (connPath); connections on one path share it.
	lastPath atomic.Pointer[string]
}

// connPath is the path a connection keeps for its hooks and webhooks. The
// request's own path is a substring of its request line, so keeping it
// would keep the line, a ?token=… of a few KiB included, for the life of the
// connection; this is a copy, shared by connections on the same path.
func (r *route) connPath(requestPath string) string {
	if last := r.lastPath.Load(); last != nil && *last == requestPath {
		return *last
	}
	p := strings.Clone(requestPath)
	r.lastPath.Store(&p)
	return p
}

// resolveRoute builds the route of a provisioned Handler.
func (h *Handler) resolveRoute() *route {
	r := &route{
		name:             h.Name,
		hub:              h.hub,
		log:              h.logger,
		auth:             h.auth,
		raw:              h.Protocol == protocolRaw,
		usesTokens:       h.JWT != nil,
		sendQueue:        h.SendQueue,
		maxSubscriptions: h.MaxSubscriptions,
		maxReplay:        h.MaxReplay,
		publishTimeout:   time.Duration(h.PublishTimeout),
		writeTimeout:     time.Duration(h.WriteTimeout),
		pingInterval:     time.Duration(h.PingInterval),
		presence:         h.Presence,
		presenceTTL:      time.Duration(h.PresenceTTL),
		history:          h.history,
		newChannels:      h.newChannels,
		webhooks:         h.webhooks,
		maxMessageSize:   h.MaxMessageSize,
	}
	if c := h.ConnectHook; c != nil {
		r.connectHook = newHookClient("connect", c, h.logger)
		for _, name := range c.Headers {
			r.connectHeaders = append(r.connectHeaders, http.CanonicalHeaderKey(name))
		}
	}
	if c := h.SubscribeHook; c != nil {
		r.subscribeHook = newHookClient("subscribe", c, h.logger)
		r.hookCache = newHookCache(time.Duration(c.Cache))
	}
	if c := h.PublishHook; c != nil {
		r.publishHook = newHookClient("publish", c, h.logger)
	}
	r.maxLag = defaultMaxLag
	if l := h.MaxLag; l != nil {
		r.maxLag = time.Duration(*l)
	}
	r.idemWindow = defaultIdempotencyWindow
	if w := h.IdempotencyWindow; w != nil {
		r.idemWindow = time.Duration(*w)
	}
	if h.JWT != nil {
		r.tokenLeeway = time.Duration(h.JWT.Leeway)
	}
	if h.RateLimit != nil && h.RateLimit.PerSecond > 0 {
		r.rate, r.rateBurst = h.RateLimit.PerSecond, h.RateLimit.Burst
	}
	if h.EphemeralRate != nil {
		r.ephemeralRate, r.ephemeralBurst = h.EphemeralRate.PerSecond, h.EphemeralRate.Burst
	}
	return r
}

// publish sends msg with its channel's history policy; when the channel
// keeps history and key is set (nil: the publish key, not limited), a
// publish that would create the history is refused with
// errNewHistoryLimited if key's publisher is over history_new_channels.
// The broker checks whether the history exists as it stores the message
// (a map lookup; in Redis, in the publish script), so this costs no round
// trip.
func (r *route) publish(ctx context.Context, key *publisherKey, msg Publication) (string, error) {
	id, err := r.publishMessage(ctx, key, msg)
	if err == nil && msg.idem != nil && msg.idem.duplicate {
		return id, nil // the first publish was recorded; nothing new happened
	}
	if err == nil {
		r.recordPublish(msg, id)
	}
	return id, err
}

// recordPublish records the publish event of msg, which the broker took
// with id: the one place it is recorded, for every way of publishing.
func (r *route) recordPublish(msg Publication, id string) {
	if !r.webhooks.wants("publish") {
		return
	}
	data := msg.Data
	if msg.Raw != nil {
		data, _ = json.Marshal(string(msg.Raw))
	}
	r.webhooks.record(webhookEvent{Type: "publish", Route: msg.path, User: msg.From, Conn: msg.conn,
		Channel: msg.Channel, MessageID: id, Data: data})
}

func (r *route) publishMessage(ctx context.Context, key *publisherKey, msg Publication) (string, error) {
	if err := r.hub.refuseIfLate(); err != nil {
		return "", err
	}
	msg.History = r.history.policyFor(msg.Channel)
	if msg.History == nil || key == nil || r.newChannels == nil {
		return r.hub.publish(ctx, msg)
	}
	create := &historyCreation{allowed: r.newChannels.mayCreate(*key, time.Now())}
	msg.newHistory = create
	id, err := r.hub.publish(ctx, msg)
	if create.created {
		r.newChannels.charge(*key, time.Now())
	}
	return id, err
}

// idempotent is the idempotency of a publish with key by scope: nil when
// no key was sent or the route has idempotency_window 0.
func (r *route) idempotent(scope, key string) *idempotency {
	if key == "" || r.idemWindow <= 0 {
		return nil
	}
	return &idempotency{scope: scope, key: key, window: r.idemWindow}
}

// close lets go of what the route holds: the hooks' idle connections.
func (r *route) close() {
	r.connectHook.close()
	r.subscribeHook.close()
	r.publishHook.close()
}

// newChannelsRefusal is the error message of a publish refused by
// history_new_channels.
func (r *route) newChannelsRefusal(channel string) string {
	return fmt.Sprintf("message not published: %s has no history yet, and this publisher may create at most %s (history_new_channels); publish on existing channels, or retry later", channel, r.newChannels.desc)
}
