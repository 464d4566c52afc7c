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
	"github.com/redis/go-redis/v9"
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
	defaultMaxMessageSize = 64 << 10
	defaultSendQueue      = 256
	defaultPingInterval   = 25 * time.Second
	defaultWriteTimeout   = 10 * time.Second
	defaultPublishTimeout = 2 * time.Second
)

// Handler serves WebSocket clients of a chat and pub/sub gateway. Every node
// configured with the same Redis forms one service: a message published on
// any node reaches the channel's subscribers on all of them.
type Handler struct {
	// Redis URL (redis:// or rediss://, with user, password and database) of
	// the Redis that the nodes share. Empty: an in-process broker that serves
	// this node alone. Placeholders such as {env.REDIS_URL} are expanded.
	Redis string `json:"redis,omitempty"`

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

	// Frames that may wait for one client. A client whose queue is full is
	// disconnected with 4000 (slow consumer). Default: 256.
	SendQueue int `json:"send_queue,omitempty"`

	// Interval between pings; a peer that does not answer within one interval
	// is dropped. Default: 25s.
	PingInterval caddy.Duration `json:"ping_interval,omitempty"`

	// Longest a single frame write may take before the connection is
	// dropped. Default: 10s.
	WriteTimeout caddy.Duration `json:"write_timeout,omitempty"`

	// Longest a publish or subscribe waits for the broker before the client is
	// told "unavailable". Default: 2s.
	PublishTimeout caddy.Duration `json:"publish_timeout,omitempty"`

	hub           *hub
	hubKey        string
	acceptOptions websocket.AcceptOptions
	logger        *zap.Logger
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
	repl := caddy.NewReplacer()
	h.Redis = strings.TrimSpace(repl.ReplaceKnown(h.Redis, ""))
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
		if h.Origins[i] == "*" {
			h.acceptOptions.InsecureSkipVerify = true
		}
	}
	h.acceptOptions.OriginPatterns = h.Origins

	if h.Redis != "" {
		if _, err := redis.ParseURL(h.Redis); err != nil {
			return fmt.Errorf("chat: redis: %v (want redis://[user:password@]host:port/db or rediss://...)", err)
		}
	}
	cfg := hubConfig{redisURL: h.Redis, channelPrefix: *h.ChannelPrefix, brokerTimeouts: time.Duration(h.PublishTimeout)}
	key := cfg.key()
	value, _, err := hubs.LoadOrNew(key, func() (caddy.Destructor, error) { return newHub(cfg) })
	if err != nil {
		return fmt.Errorf("chat: starting hub: %w", err)
	}
	h.hub, h.hubKey = value.(*hub), key
	return nil
}

// Validate rejects option values that cannot work, naming the option.
func (h *Handler) Validate() error {
	var errs []error
	switch h.Protocol {
	case protocolJSON:
		if h.Channel != "" {
			errs = append(errs, errors.New("chat: channel applies to protocol raw only (JSON clients choose channels themselves)"))
		}
	case protocolRaw:
		if h.Channel == "" {
			errs = append(errs, errors.New("chat: protocol raw needs a channel, e.g. channel room:{http.request.uri.path.1}"))
		} else if !strings.Contains(h.Channel, "{") {
			if err := validateChannel(h.Channel); err != nil {
				errs = append(errs, fmt.Errorf("chat: channel %q: %v", h.Channel, err))
			}
		}
	default:
		errs = append(errs, fmt.Errorf("chat: protocol %q: must be json or raw", h.Protocol))
	}
	if p := *h.ChannelPrefix; len(p) > 64 || strings.ContainsAny(p, " \t\r\n*?[]") {
		errs = append(errs, fmt.Errorf("chat: channel_prefix %q: at most 64 bytes, no white space or * ? [ ]", p))
	}
	if h.MaxMessageSize < 1 || h.MaxMessageSize > 16<<20 {
		errs = append(errs, fmt.Errorf("chat: max_message_size %d: must be between 1 byte and 16MiB", h.MaxMessageSize))
	}
	if h.SendQueue < 1 || h.SendQueue > 65536 {
		errs = append(errs, fmt.Errorf("chat: send_queue %d: must be between 1 and 65536", h.SendQueue))
	}
	for _, d := range []struct {
		name string
		v    caddy.Duration
		min  time.Duration
	}{
		{"ping_interval", h.PingInterval, 100 * time.Millisecond},
		{"write_timeout", h.WriteTimeout, 10 * time.Millisecond},
		{"publish_timeout", h.PublishTimeout, 10 * time.Millisecond},
	} {
		if time.Duration(d.v) < d.min || time.Duration(d.v) > time.Hour {
			errs = append(errs, fmt.Errorf("chat: %s %v: must be between %v and 1h", d.name, time.Duration(d.v), d.min))
		}
	}
	for _, o := range h.Origins {
		if o == "" {
			errs = append(errs, errors.New("chat: origins: empty pattern"))
		}
	}
	return errors.Join(errs...)
}

// Cleanup releases the handler's hold on its hub; the last holder closes it.
func (h *Handler) Cleanup() error {
	if h.hubKey == "" {
		return nil
	}
	_, err := hubs.Delete(h.hubKey)
	h.hubKey = ""
	return err
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
