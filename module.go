// Package caddychat is a Caddy HTTP handler that turns a route into a
// real-time chat and pub/sub gateway: it upgrades requests to WebSockets and
// bridges them to channels of a broker shared by every node, Redis Pub/Sub or,
// for a single node, an in-process broker.
package caddychat

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/coder/websocket"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(Handler{})
}

const (
	protocolJSON = "json"
	protocolRaw  = "raw"
)

// Defaults of the handler's options.
const (
	defaultChannelPrefix  = "chat:"
	defaultRouteName      = "chat"
	defaultMaxMessageSize = 64 << 10
	defaultSendQueue      = 1 << 20 // bytes
	defaultPingInterval   = 25 * time.Second
	defaultWriteTimeout   = 10 * time.Second
	defaultPublishTimeout = 2 * time.Second

	defaultRatePerSecond         = 50
	defaultRateBurst             = 100
	defaultMaxConnections        = 100000
	defaultMaxConnectionsPerUser = 100
	defaultMaxSubscriptions      = 100
	defaultDrainPeriod           = 10 * time.Second

	minSendQueue = 16 << 10
	maxSendQueue = 1 << 30
)

// Handler serves WebSocket clients of a chat and pub/sub gateway. Every node
// configured with the same Redis forms one service: a message published on
// any node reaches the channel's subscribers on all of them.
type Handler struct {
	// Redis URL (redis:// or rediss://, with user, password and database) of
	// the Redis that the nodes share. Empty (and no redis_sentinel or
	// redis_cluster): an in-process broker that serves this node alone.
	// Placeholders such as {env.REDIS_URL} are expanded.
	Redis string `json:"redis,omitempty"`

	// Redis Sentinel instead of redis: the master the sentinels name, found
	// again after a failover without the clients noticing.
	RedisSentinel *RedisSentinel `json:"redis_sentinel,omitempty"`

	// Redis Cluster instead of redis: channels travel with sharded pub/sub,
	// spread over the cluster's shards by slot.
	RedisCluster *RedisCluster `json:"redis_cluster,omitempty"`

	// TLS to Redis: a private CA, a client certificate (mutual TLS) and the
	// servers' name, for redis (rediss://), redis_sentinel or redis_cluster.
	// See redis_tls.go.
	RedisTLS *RedisTLS `json:"redis_tls,omitempty"`

	// Prefix of every channel's name in Redis, keeping the gateway's channels
	// apart from other users of the same Redis. Default: "chat:".
	ChannelPrefix *string `json:"channel_prefix,omitempty"`

	// Wire protocol: "json" (default), JSON frames with subscribe, unsubscribe
	// and publish operations; or "raw", where the route bridges the one channel
	// named by Channel and every text frame is a message.
	Protocol string `json:"protocol,omitempty"`

	// Channel bridged by a raw-protocol route. Request placeholders are
	// expanded, e.g. "room:{http.request.uri.path.1}". Only for protocol raw.
	Channel string `json:"channel,omitempty"`

	// Origins allowed to open a WebSocket, as host patterns (path.Match
	// syntax: "app.example.com", "*.example.com", "localhost:*"); "*" allows
	// any. Default: only the host the request was sent to.
	Origins []string `json:"origins,omitempty"`

	// Largest frame a client may send, in bytes. A larger frame closes the
	// connection with 1009. Default: 65536.
	MaxMessageSize int64 `json:"max_message_size,omitempty"`

	// Bytes that may wait to be sent to one client: messages, replies,
	// history answers and resume replays all count (each frame also counts
	// 128 bytes of overhead). A client whose queue would pass it is
	// disconnected with 4000 (slow consumer); a history request while more
	// than half of it waits is refused with limit_exceeded. Default: 1MiB.
	SendQueue int64 `json:"send_queue,omitempty"`

	// Interval between pings; a peer that does not answer within one interval
	// is dropped. Default: 25s.
	PingInterval caddy.Duration `json:"ping_interval,omitempty"`

	// Longest a single frame write may take before the connection is
	// dropped. Default: 10s.
	WriteTimeout caddy.Duration `json:"write_timeout,omitempty"`

	// Longest a publish or subscribe waits for the broker before the client is
	// told "unavailable". Default: 2s.
	PublishTimeout caddy.Duration `json:"publish_timeout,omitempty"`

	// How late a message may reach a client. A message that has waited
	// longer (since its publish, in the node's backlog from the broker or in
	// a connection's queue) is not sent: the connection gets a gap frame
	// counting the messages it missed instead, and while the node's own
	// backlog is that far behind, publishes on it are answered unavailable.
	// So a message is delivered within max_lag or its loss is reported
	// (late.go). Routes sharing a broker share one backlog: the bound
	// loaded last applies to it. 0 turns it off (JSON; "off" in a
	// Caddyfile). Default: 5s.
	MaxLag *caddy.Duration `json:"max_lag,omitempty"`

	// How long a publish's idempotency_key is remembered: a publish with
	// the same key, by the same publisher, on the same channel within it
	// delivers nothing and is answered with the first message id, on every
	// node. Default (unset): 5m; 0 turns idempotency keys off (they are
	// then ignored). At most 24h.
	IdempotencyWindow *caddy.Duration `json:"idempotency_window,omitempty"`

	// JWT authentication before the upgrade. Without it the route has no
	// authentication: every connection is anonymous, with the permissions of
	// Anonymous (default: every channel).
	JWT *JWTConfig `json:"jwt,omitempty"`

	// Channels every authenticated user may subscribe to and publish on, in
	// addition to those the token's claims grant.
	Subscribe []string `json:"subscribe,omitempty"`
	Publish   []string `json:"publish,omitempty"`

	// Lets connections without a token in, with these permissions. Off by
	// default when JWT is set; without JWT it defaults to every channel.
	Anonymous *Permissions `json:"anonymous,omitempty"`

	// Frames per second one connection may send (any frame counts). Over it,
	// a frame gets a rate_limited error (raw: it is dropped); a client that
	// keeps going is closed with 4003. Default: 50/s, burst 100.
	RateLimit *RateLimit `json:"rate_limit,omitempty"`

	// Ephemeral publishes one connection may send per second (typing
	// indicators: never kept, not echoed to the sender). Over it, the
	// publish gets a rate_limited error; the frame limit applies as well.
	// A negative rate (Caddyfile: off) refuses ephemeral publishes.
	// Default: 10/s, burst 20.
	EphemeralRate *RateLimit `json:"ephemeral_rate,omitempty"`

	// Connections this node accepts on the route's hub; more get 503.
	// Default: 100000.
	MaxConnections int `json:"max_connections,omitempty"`

	// Connections one authenticated user may hold on this node; more get 429.
	// Default: 100. Anonymous connections count only towards MaxConnections.
	MaxConnectionsPerUser int `json:"max_connections_per_user,omitempty"`

	// Channels one connection may be subscribed to. Default: 100.
	MaxSubscriptions int `json:"max_subscriptions,omitempty"`

	// Presence: who is subscribed to a channel right now, on every node. The
	// route's JSON clients get join and leave events (once per user, however
	// many connections it has) and may ask with the "presence" op. Only
	// authenticated users are listed. Default: off.
	Presence bool `json:"presence,omitempty"`

	// How long a node's presence entries outlive its last heartbeat (nodes
	// heartbeat every presence_ttl/3), hence how long the users of a crashed
	// node stay listed: others get their leave within presence_ttl +
	// presence_ttl/3. Default: 15s, at least 3s.
	PresenceTTL caddy.Duration `json:"presence_ttl,omitempty"`

	// Path of the HTTP publish endpoint for backends (POST), e.g.
	// "/chat/publish". The Caddyfile adds it to the directive's matcher.
	PublishEndpoint string `json:"publish_endpoint,omitempty"`

	// Name of the route in the server API's stats (the admin API's
	// /chat/stats), which counts each route's connections apart. The
	// Caddyfile's default is the directive's first path (chat /ws: "/ws");
	// otherwise "chat".
	Name string `json:"name,omitempty"`

	// API key that authorizes HTTP publishes to any channel, sent as
	// "Authorization: Bearer <key>". A JWT with publish rights works too.
	PublishKey string `json:"publish_key,omitempty"`

	// Channels whose messages are kept, so that clients resume after a
	// reconnect without a gap and scroll back. The first rule matching a
	// channel applies; channels no rule matches keep nothing (the default).
	History []HistoryRule `json:"history,omitempty"`

	// Most bytes of history the in-process broker keeps (no redis option),
	// for all its channels together: messages plus a bookkeeping cost per
	// message and per channel. Over it, whole channels are evicted, least
	// recently written first; a resume on one reports recovered false. The
	// routes sharing a hub (same broker settings) share one cap, the largest
	// any of them sets (the default when none does). No effect with Redis
	// (bound Redis with maxmemory).
	// Default: 64MiB.
	HistoryMemory int64 `json:"history_memory,omitempty"`

	// How fast one publisher may create history channels that do not exist
	// yet (publishing on a channel whose history exists is not limited): an
	// authenticated user on this node, across its connections and HTTP
	// publishes; each anonymous connection on its own; the publish key is
	// not limited. Over it a publish gets limit_exceeded (HTTP: 429; raw:
	// the connection is closed with 4003). Default: 30 per 1m.
	HistoryNewChannels *NewChannelLimit `json:"history_new_channels,omitempty"`

	// Longest a node takes to close its connections when it shuts down (1001)
	// or a reload changes the broker (1012): they are closed at an even pace
	// of at most 1000 per second within it, so that clients do not all
	// reconnect in the same instant. Default: 10s.
	DrainPeriod caddy.Duration `json:"drain_period,omitempty"`

	// Serve the chat page: a plain browser GET of the route gets a page with
	// rooms, messages, who is online and the connection status, talking to
	// this route. The client library is served either way, at
	// <route path>/caddychat.js.
	UI bool `json:"ui,omitempty"`

	// Let connections without a token pick a display name (?name= on the
	// upgrade URL) and give each a guest id: envelopes and presence carry
	// both beside "anonymous":true, never as "from", so a guest cannot
	// pass for a user. Presence lists guests. Off by default. See guest.go.
	GuestNames bool `json:"guest_names,omitempty"`

	// Most messages one resume replays and one history page holds. A resume
	// that would replay more replays the newest max_replay and says it was
	// limited. Default: 1000.
	MaxReplay int `json:"max_replay,omitempty"`

	// Ask the application's backend at the handshake who the connection
	// is and what it may do (with or instead of a JWT); it may refuse, with
	// a reason the client reads in the close frame (4004). See hook.go,
	// hook_connect.go and PROTOCOL.md's Hooks.
	ConnectHook *HookConfig `json:"connect_hook,omitempty"`

	// Ask the backend whether a connection may subscribe to a channel (of
	// the hook's channels): a denied subscribe gets forbidden with the
	// backend's reason. See hook_channel.go.
	SubscribeHook *HookConfig `json:"subscribe_hook,omitempty"`

	// Ask the backend before a message (of the hook's channels) is fanned
	// out: it may let it through, reject it (the client gets rejected with
	// the reason; the message never reaches the broker) or replace its data.
	PublishHook *HookConfig `json:"publish_hook,omitempty"`

	// Backends that get the route's events after the fact (connect,
	// disconnect, subscribe, unsubscribe, publish, join, leave), each event
	// delivered once per cluster, at least once, in signed batches. See
	// webhook.go and the README's Webhooks section.
	Webhooks []*Webhook `json:"webhook,omitempty"`

	// permessage-deflate for the WebSocket clients that offer it: "off"
	// (default), "on" (no context takeover: every message compressed on
	// its own, once per delivery for all subscribers, no deflate state
	// kept per connection) or "context_takeover" (each connection keeps a
	// 32 KiB window and a deflate writer, compressing better at the cost of
	// memory and CPU per connection). Messages under 128 bytes are sent
	// uncompressed. See compression.go.
	Compression string `json:"compression,omitempty"`

	hub           *hub
	hubKey        string
	auth          *authenticator
	acceptOptions websocket.AcceptOptions
	logger        *zap.Logger
	history       *compiledHistory
	publishLimit  *userRateLimiter // token holders' HTTP publishes; nil: none
	webhooks      *routeWebhooks   // nil: no webhook
	newChannels   *creationLimiter
	route         *route // what connections need, resolved from the above
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.chat",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision applies defaults and attaches the handler to its node's hub,
// shared with every other handler instance of the same broker settings
// (across config reloads too).
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if err := moduleMetrics().register(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("chat: registering metrics: %w", err)
	}
	repl := caddy.NewReplacer()
	rawRedis := h.Redis
	h.Redis = strings.TrimSpace(repl.ReplaceKnown(h.Redis, ""))
	if err := emptyExpansion("redis URL", rawRedis, h.Redis); err != nil {
		return err
	}
	if h.ChannelPrefix == nil {
		prefix := defaultChannelPrefix
		h.ChannelPrefix = &prefix
	} else {
		prefix := repl.ReplaceKnown(*h.ChannelPrefix, "")
		h.ChannelPrefix = &prefix
	}
	if h.Protocol == "" {
		h.Protocol = protocolJSON
	}
	if h.Name == "" {
		h.Name = defaultRouteName
	}
	if h.MaxMessageSize == 0 {
		h.MaxMessageSize = defaultMaxMessageSize
	}
	if h.SendQueue == 0 {
		h.SendQueue = defaultSendQueue
	}
	if h.PingInterval == 0 {
		h.PingInterval = caddy.Duration(defaultPingInterval)
	}
	if h.WriteTimeout == 0 {
		h.WriteTimeout = caddy.Duration(defaultWriteTimeout)
	}
	if h.PublishTimeout == 0 {
		h.PublishTimeout = caddy.Duration(defaultPublishTimeout)
	}
	for i, o := range h.Origins {
		h.Origins[i] = repl.ReplaceKnown(o, "")
		if err := emptyExpansion("origins pattern", o, h.Origins[i]); err != nil {
			return err
		}
		if h.Origins[i] == "*" {
			h.acceptOptions.InsecureSkipVerify = true
		}
	}
	h.acceptOptions.OriginPatterns = h.Origins
	h.acceptOptions.Subprotocols = []string{appSubprotocol}
	h.acceptOptions.CompressionMode, _ = compressionMode(h.Compression) // checked by Validate
	h.acceptOptions.CompressionThreshold = compressionThreshold

	if h.RateLimit == nil {
		h.RateLimit = &RateLimit{PerSecond: defaultRatePerSecond}
	}
	if h.RateLimit.Burst == 0 && h.RateLimit.PerSecond > 0 {
		h.RateLimit.Burst = max(1, int(2*h.RateLimit.PerSecond))
	}
	if h.EphemeralRate == nil {
		h.EphemeralRate = &RateLimit{PerSecond: defaultEphemeralPerSecond, Burst: defaultEphemeralBurst}
	}
	if h.EphemeralRate.Burst == 0 && h.EphemeralRate.PerSecond > 0 {
		h.EphemeralRate.Burst = max(1, int(2*h.EphemeralRate.PerSecond))
	}
	if h.PublishEndpoint != "" && h.JWT != nil {
		h.publishLimit = newUserRateLimiter(h.RateLimit, maxRateLimitedUsers)
	}
	if h.MaxConnections == 0 {
		h.MaxConnections = defaultMaxConnections
	}
	if h.MaxConnectionsPerUser == 0 {
		h.MaxConnectionsPerUser = defaultMaxConnectionsPerUser
	}
	if h.MaxSubscriptions == 0 {
		h.MaxSubscriptions = defaultMaxSubscriptions
	}
	if h.PresenceTTL == 0 {
		h.PresenceTTL = caddy.Duration(defaultPresenceTTL)
	}
	if h.Presence && h.JWT == nil && !h.GuestNames {
		h.logger.Warn("presence is on but the route has no jwt block: anonymous connections are never listed, so presence stays empty")
	}
	rawKey := h.PublishKey
	h.PublishKey = repl.ReplaceKnown(h.PublishKey, "")
	if err := emptyExpansion("publish_key", rawKey, h.PublishKey); err != nil {
		return err
	}
	if h.DrainPeriod == 0 {
		h.DrainPeriod = caddy.Duration(defaultDrainPeriod)
	}
	if h.MaxReplay == 0 {
		h.MaxReplay = defaultMaxReplay
	}
	h.history = compileHistory(h.History)
	setMemory := h.HistoryMemory // 0: the route leaves the hub's cap to others
	if h.HistoryMemory == 0 {
		h.HistoryMemory = defaultHistoryMemory
	} else if h.Redis != "" || h.RedisSentinel != nil || h.RedisCluster != nil {
		h.logger.Warn("history_memory bounds the in-process broker only; with Redis, bound Redis's memory with maxmemory")
	}
	if h.HistoryNewChannels == nil {
		h.HistoryNewChannels = &NewChannelLimit{Count: defaultNewChannels}
	}
	if h.HistoryNewChannels.Per == 0 {
		h.HistoryNewChannels.Per = caddy.Duration(defaultNewChannelsPer)
	}
	h.newChannels = newCreationLimiter(h.HistoryNewChannels)
	if err := h.provisionHooks(repl); err != nil {
		return err
	}
	if err := h.provisionAuth(repl); err != nil {
		return err
	}

	// Before the hub: a hub is never built from a Redis setting that is wrong.
	if err := h.provisionRedisTopology(repl); err != nil {
		return err
	}
	cfg := hubConfig{
		redisURL:       h.Redis,
		sentinel:       h.RedisSentinel,
		cluster:        h.RedisCluster,
		redisTLS:       h.RedisTLS,
		channelPrefix:  *h.ChannelPrefix,
		brokerTimeouts: time.Duration(h.PublishTimeout),
	}
	key := cfg.key()
	value, loaded, err := hubs.LoadOrNew(key, func() (caddy.Destructor, error) { return newHub(cfg) })
	if err != nil {
		return fmt.Errorf("chat: starting hub: %w", err)
	}
	h.hub, h.hubKey = value.(*hub), key
	if !loaded {
		h.hub.checkRedisAtStart(cfg.brokerTimeouts)
		h.hub.startControl()
	}
	h.auth.revocations = h.hub.revocations
	// The latest configuration's drain period applies when the hub closes.
	h.hub.drainPeriod.Store(int64(h.DrainPeriod))
	h.hub.holdHistoryMemory(h, setMemory)
	if err := h.provisionWebhooks(repl); err != nil {
		return err
	}
	h.route = h.resolveRoute()
	// The latest configuration's bound applies to the hub's backlog.
	h.hub.maxLag.Store(int64(h.route.maxLag))
	h.hub.addRoute(h.route)
	return nil
}

// Validate rejects option values that cannot work, naming the option. Its
// checks are those the Caddyfile adapter runs (config_check.go), on the
// values Provision expanded.
func (h *Handler) Validate() error {
	return errors.Join(h.checkOptions(false)...)
}

// provisionHooks expands the hooks' URLs and secrets and applies their
// defaults.
func (h *Handler) provisionHooks(repl *caddy.Replacer) error {
	var errs []error
	for _, hk := range []struct {
		name string
		cfg  *HookConfig
	}{{"connect_hook", h.ConnectHook}, {"subscribe_hook", h.SubscribeHook}, {"publish_hook", h.PublishHook}} {
		c := hk.cfg
		if c == nil {
			continue
		}
		raw := c.URL
		c.URL = strings.TrimSpace(repl.ReplaceKnown(raw, ""))
		errs = append(errs, emptyExpansion(hk.name, raw, c.URL))
		raw = c.Secret
		c.Secret = repl.ReplaceKnown(raw, "")
		errs = append(errs, emptyExpansion(hk.name+" secret", raw, c.Secret))
		if c.Timeout == 0 {
			c.Timeout = caddy.Duration(defaultHookTimeout)
		}
		if c.MaxConcurrent == 0 {
			c.MaxConcurrent = defaultHookMaxConcurrent
		}
	}
	return errors.Join(errs...)
}

// provisionAuth applies the authentication defaults and loads key material.
func (h *Handler) provisionAuth(repl *caddy.Replacer) error {
	anon := h.Anonymous
	if h.JWT == nil {
		if anon == nil {
			anon = &Permissions{Subscribe: []string{"**"}, Publish: []string{"**"}}
		}
	} else {
		j := h.JWT
		var errs []error
		for _, v := range []struct {
			option string
			value  *string
		}{{"jwt secret", &j.Secret}, {"jwt public_key", &j.PublicKey}, {"jwt jwks", &j.JWKS}} {
			raw := *v.value
			*v.value = repl.ReplaceKnown(raw, "")
			errs = append(errs, emptyExpansion(v.option, raw, *v.value))
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
		j.Issuer = repl.ReplaceKnown(j.Issuer, "")
		j.Audience = repl.ReplaceKnown(j.Audience, "")
		if j.UserClaim == "" {
			j.UserClaim = defaultUserClaim
		}
		if j.SubscribeClaim == "" {
			j.SubscribeClaim = defaultSubscribeClaim
		}
		if j.PublishClaim == "" {
			j.PublishClaim = defaultPublishClaim
		}
		if j.Leeway == 0 {
			j.Leeway = caddy.Duration(defaultLeeway)
		}
		if j.Cookie == "" {
			j.Cookie = defaultTokenCookie
		}
		if j.MaxTokenSize == 0 {
			j.MaxTokenSize = defaultMaxTokenSize
		}
	}
	auth, err := newAuthenticator(h.JWT, anon, Permissions{Subscribe: h.Subscribe, Publish: h.Publish}, h.logger)
	if err != nil {
		return fmt.Errorf("chat: %w", err)
	}
	h.auth = auth
	return nil
}

// Cleanup releases the handler's hold on its hub; the last holder closes it.
func (h *Handler) Cleanup() error {
	if h.auth != nil {
		h.auth.close()
	}
	if h.route != nil {
		h.route.close()
	}
	if h.hubKey == "" {
		return nil
	}
	h.hub.removeRoute(h.route)
	h.hub.releaseHistoryMemory(h)
	_, err := hubs.Delete(h.hubKey)
	h.hubKey = ""
	// After the hub may have closed (its connections' last events recorded):
	// the last hold on a deliverer closes it, handing its backlog to the one
	// a reload started for the same URL.
	h.webhooks.release()
	return err
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
