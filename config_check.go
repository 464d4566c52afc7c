package caddychat

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/redis/go-redis/v9"
)

// Configuration checks. A mistake is reported as early as it can be seen:
//
//   - at `caddy adapt`: everything the Caddyfile alone shows, that is, the
//     option names and value counts (caddyfile_options.go) and then, once the
//     whole chat block is read, the checks of this file on every value that
//     holds no placeholder (sizes, durations, counts, patterns, channel
//     names, options that conflict or need one another, the Redis URL, a
//     literal jwt secret that is too short);
//   - at `caddy validate` (and `caddy run`), after placeholders are expanded:
//     the same checks again, on the expanded values, with the same messages;
//     an option that needs a value and whose placeholders expanded to
//     nothing (emptyExpansion); the files (jwt public_key, redis_tls);
//   - at `caddy run` only: what needs the network (the JWKS, Redis).
//
// The checks skip a zero value: it is the option's default (applied by
// Provision before Validate runs them again).

// configError is a mistake in one option, named by its path in the
// Caddyfile ("history", "jwt secret") and, for an option given several
// times or with several values, the value it is about, so that the
// Caddyfile adapter can point at its line. Its message is the same at adapt
// and at validate time.
type configError struct {
	option, value string
	err           error
}

func (e configError) Error() string { return e.err.Error() }
func (e configError) Unwrap() error { return e.err }

func optionErr(option, value string, format string, args ...any) error {
	return configError{option: option, value: value, err: fmt.Errorf(format, args...)}
}

// hasPlaceholder reports whether s holds a placeholder that Provision or a
// request expands, such as {env.CHAT_JWT_SECRET} or
// {http.request.uri.path.1}: braces around a dotted name. ({user} in a
// pattern and the braces of a hash tag are no placeholders.)
func hasPlaceholder(s string) bool {
	for {
		open := strings.IndexByte(s, '{')
		if open < 0 {
			return false
		}
		end := strings.IndexByte(s[open:], '}')
		if end < 0 {
			return false
		}
		name := s[open+1 : open+end]
		if strings.Contains(name, ".") && !strings.ContainsAny(name, " \t{") {
			return true
		}
		s = s[open+1:]
	}
}

// emptyExpansion is the error for an option whose value, raw before
// placeholders were expanded, expanded to nothing; nil if it did not. It
// names the placeholder, the usual cause being an environment variable not
// set in Caddy's environment.
func emptyExpansion(option, raw, expanded string) error {
	if strings.TrimSpace(expanded) != "" || strings.TrimSpace(raw) == "" {
		return nil
	}
	msg := fmt.Sprintf("chat: %s is empty: %s expanded to nothing", option, raw)
	var vars, files []string
	for rest := raw; ; {
		open := strings.Index(rest, "{")
		if open < 0 {
			break
		}
		end := strings.Index(rest[open:], "}")
		if end < 0 {
			break
		}
		name := rest[open+1 : open+end]
		if v, ok := strings.CutPrefix(name, "env."); ok {
			vars = append(vars, v)
		} else if f, ok := strings.CutPrefix(name, "file."); ok {
			files = append(files, f)
		}
		rest = rest[open+end:]
	}
	switch {
	case len(vars) == 1:
		msg += fmt.Sprintf(" (is %s set in the environment of caddy?)", vars[0])
	case len(vars) > 1:
		msg += fmt.Sprintf(" (are %s set in the environment of caddy?)", strings.Join(vars, " and "))
	case len(files) > 0:
		msg += fmt.Sprintf(" (does %s exist, readable by caddy, and hold the value?)", strings.Join(files, " and "))
	}
	return configError{option: option, err: errors.New(msg)}
}

// checkConfig is every check of the configuration that needs neither the
// network nor a file: the Caddyfile adapter runs it on the values as written
// (static: values holding placeholders are left to Provision), Provision and
// Validate run its parts on the expanded values.
func (h *Handler) checkConfig(static bool) []error {
	errs := h.checkBroker(static)
	errs = append(errs, h.checkJWT(static)...)
	return append(errs, h.checkOptions(static)...)
}

// checkBroker checks the Redis options: one topology at most, and each
// one's values. Provision runs it before it builds a hub.
func (h *Handler) checkBroker(static bool) []error {
	literal := func(s string) bool { return !static || !hasPlaceholder(s) }
	var errs []error
	var set []string
	if h.Redis != "" {
		set = append(set, "redis")
	}
	if s := h.RedisSentinel; s != nil {
		set = append(set, "redis_sentinel")
		if s.Master == "" {
			errs = append(errs, optionErr("redis_sentinel", "", "chat: redis_sentinel: needs the name the sentinels monitor the master under"))
		}
		if s.DB < 0 {
			errs = append(errs, optionErr("redis_sentinel db", "", "chat: redis_sentinel db %d: must be 0 or more", s.DB))
		}
		errs = append(errs, checkAddrs("redis_sentinel", s.Addrs, literal)...)
	}
	if c := h.RedisCluster; c != nil {
		set = append(set, "redis_cluster")
		errs = append(errs, checkAddrs("redis_cluster", c.Addrs, literal)...)
		if p := h.ChannelPrefix; p != nil && literal(*p) && strings.ContainsAny(*p, "{}") {
			errs = append(errs, optionErr("channel_prefix", "", "chat: channel_prefix %q: no { or } with redis_cluster (history and presence keys use {<prefix><channel>} as their hash tag, which must hash to the slot of the channel)", *p))
		}
	}
	if len(set) > 1 {
		list := strings.Join(set[:len(set)-1], ", ") + " and " + set[len(set)-1]
		errs = append(errs, optionErr(set[1], "", "chat: %s are alternatives, set one of them (standalone Redis, Sentinel or Cluster)", list))
	}
	if h.Redis != "" && literal(h.Redis) {
		if err := checkRedisURL(h.Redis); err != nil {
			errs = append(errs, err)
		}
	}
	if t := h.RedisTLS; t != nil {
		switch {
		case h.Redis == "" && h.RedisSentinel == nil && h.RedisCluster == nil:
			errs = append(errs, optionErr("redis_tls", "", "chat: redis_tls applies to redis (rediss://), redis_sentinel or redis_cluster, and none is set"))
		case h.Redis != "" && literal(h.Redis) && !strings.HasPrefix(strings.ToLower(h.Redis), "rediss://"):
			errs = append(errs, optionErr("redis_tls", "", "chat: redis_tls needs a rediss:// URL in redis (redis:// is plaintext)"))
		}
		if (t.Cert == "") != (t.Key == "") {
			errs = append(errs, optionErr("redis_tls", "", "chat: redis_tls: cert and key go together (cert %q, key %q): the client certificate needs its private key", t.Cert, t.Key))
		}
		if literal(t.ServerName) && strings.ContainsAny(t.ServerName, " \t/:") {
			errs = append(errs, optionErr("redis_tls server_name", "", "chat: redis_tls server_name %q: want a host name or IP address, without port", t.ServerName))
		}
	}
	return errs
}

// checkRedisURL checks the redis option's URL as go-redis will parse it.
// The URL is shown without its password.
func checkRedisURL(s string) error {
	if _, err := redis.ParseURL(s); err != nil {
		msg := strings.TrimPrefix(err.Error(), "redis: ")
		return optionErr("redis", "", "chat: redis %s: %s (want redis://[user:password@]host:port/db or rediss://...)", redactURL(s), msg)
	}
	return nil
}

// redactURL is s without the password it may hold, for messages.
func redactURL(s string) string {
	if u, err := url.Parse(s); err == nil {
		return strconv.Quote(u.Redacted())
	}
	if at := strings.LastIndex(s, "@"); at >= 0 {
		if scheme := strings.Index(s, "://"); scheme >= 0 && scheme < at {
			return strconv.Quote(s[:scheme+3] + "xxxxx" + s[at:])
		}
	}
	return strconv.Quote(s)
}

// checkAddrs checks that each of addrs is host:port.
func checkAddrs(option string, addrs []string, literal func(string) bool) []error {
	if len(addrs) == 0 {
		return []error{optionErr(option, "", "chat: %s: needs at least one address, host:port", option)}
	}
	var errs []error
	for _, a := range addrs {
		if !literal(a) {
			continue
		}
		host, port, err := net.SplitHostPort(a)
		if n, perr := strconv.Atoi(port); err != nil || host == "" || perr != nil || n < 1 || n > 65535 {
			errs = append(errs, optionErr(option, a, "chat: %s address %q: want host:port", option, a))
		}
	}
	return errs
}

// checkJWT checks that the jwt block names one source of keys, and the
// JWKS URL. Provision runs these checks through newAuthenticator.
func (h *Handler) checkJWT(static bool) []error {
	j := h.JWT
	if j == nil {
		return nil
	}
	var errs []error
	if err := jwtSourcesError(j); err != nil {
		errs = append(errs, configError{option: "jwt", err: fmt.Errorf("chat: %w", err)})
	}
	if j.JWKS != "" && (!static || !hasPlaceholder(j.JWKS)) {
		if err := checkJWKSURL(j.JWKS); err != nil {
			errs = append(errs, configError{option: "jwt jwks", err: fmt.Errorf("chat: %w", err)})
		}
	}
	return errs
}

// jwtSourcesError says what is wrong unless exactly one of secret,
// public_key and jwks is set.
func jwtSourcesError(j *JWTConfig) error {
	var set []string
	for _, s := range []struct{ name, v string }{{"secret", j.Secret}, {"public_key", j.PublicKey}, {"jwks", j.JWKS}} {
		if s.v != "" {
			set = append(set, s.name)
		}
	}
	switch len(set) {
	case 0:
		return errors.New("jwt needs exactly one of secret, public_key and jwks; got none (e.g. secret {env.CHAT_JWT_SECRET})")
	case 1:
		return nil
	}
	return fmt.Errorf("jwt needs exactly one of secret, public_key and jwks; got %s", strings.Join(set, " and "))
}

func checkJWKSURL(s string) error {
	if u, err := url.Parse(s); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return fmt.Errorf("jwt jwks %q: want an http(s) URL, e.g. https://idp.example.com/.well-known/jwks.json", s)
	}
	return nil
}

// checkOptions checks the values of the other options and the options
// that conflict or need one another. Validate runs it after Provision.
func (h *Handler) checkOptions(static bool) []error {
	literal := func(s string) bool { return !static || !hasPlaceholder(s) }
	var errs []error
	add := func(option, value, format string, args ...any) {
		errs = append(errs, optionErr(option, value, format, args...))
	}
	switch h.Protocol {
	case protocolJSON, "":
		if h.Channel != "" {
			add("channel", "", "chat: channel applies to protocol raw only (JSON clients choose channels themselves); add protocol raw or remove channel")
		}
	case protocolRaw:
		if h.Channel == "" {
			add("protocol", "", "chat: protocol raw needs a channel, e.g. channel room:{http.request.uri.path.1}")
		} else if !strings.Contains(h.Channel, "{") {
			if err := validateChannel(h.Channel); err != nil {
				add("channel", "", "chat: channel %q: %v", h.Channel, err)
			}
		}
	default:
		add("protocol", "", "chat: protocol %q: must be json or raw", h.Protocol)
	}
	errs = append(errs, h.checkCompression()...)
	if h.ChannelPrefix != nil {
		if p := *h.ChannelPrefix; literal(p) {
			if len(p) > 64 || strings.ContainsAny(p, " \t\r\n*?[]") {
				add("channel_prefix", "", "chat: channel_prefix %q: at most 64 bytes, no white space or * ? [ ]", p)
			}
			if h.Presence && strings.ContainsAny(p, "{}") {
				add("channel_prefix", "", "chat: channel_prefix %q: no { or } with presence on (presence keys use {<prefix><channel>} as their Redis Cluster hash tag)", p)
			}
		}
	}
	if n := h.MaxMessageSize; n != 0 && (n < 1 || n > 16<<20) {
		add("max_message_size", "", "chat: max_message_size %s: must be between 1 byte and 16MiB", formatSize(n))
	}
	if n := h.SendQueue; n != 0 && (n < minSendQueue || n > maxSendQueue) {
		add("send_queue", "", "chat: send_queue %s: must be a size between %s and %s (bytes that may wait for one client, e.g. 1MiB)",
			formatSize(n), formatSize(minSendQueue), formatSize(maxSendQueue))
	}
	for _, d := range []struct {
		name     string
		v        time.Duration
		min, max time.Duration
	}{
		{"ping_interval", time.Duration(h.PingInterval), 100 * time.Millisecond, time.Hour},
		{"write_timeout", time.Duration(h.WriteTimeout), 10 * time.Millisecond, time.Hour},
		{"publish_timeout", time.Duration(h.PublishTimeout), 10 * time.Millisecond, time.Hour},
		{"drain_period", time.Duration(h.DrainPeriod), time.Millisecond, time.Hour},
		{"presence_ttl", time.Duration(h.PresenceTTL), minPresenceTTL, time.Hour},
	} {
		if d.v != 0 && (d.v < d.min || d.v > d.max) {
			add(d.name, "", "chat: %s %s: must be between %v and 1h", d.name, formatDuration(d.v), d.min)
		}
	}
	if l := h.MaxLag; l != nil && (*l < 0 || (*l > 0 && (time.Duration(*l) < minMaxLag || time.Duration(*l) > time.Hour))) {
		add("max_lag", "", "chat: max_lag %s: must be off (0) or between %v and 1h", formatDuration(time.Duration(*l)), minMaxLag)
	}
	if w := h.IdempotencyWindow; w != nil && (*w < 0 || time.Duration(*w) > maxIdempotencyWindow || (*w > 0 && time.Duration(*w) < time.Second)) {
		add("idempotency_window", "", "chat: idempotency_window %s: must be off (0) or between 1s and 24h", formatDuration(time.Duration(*w)))
	}
	for _, o := range h.Origins {
		if o == "" {
			add("origins", "", "chat: origins: empty pattern")
		}
	}
	errs = append(errs, h.checkAccess(static)...)
	errs = append(errs, h.checkHooks(static)...)
	errs = append(errs, validateHistoryRules(h.History)...)
	if n := h.HistoryMemory; n != 0 && (n < minHistoryMemory || n > maxHistoryMemory) {
		add("history_memory", "", "chat: history_memory %s: must be between 1MiB and 1TiB", formatSize(n))
	}
	errs = append(errs, validateNewChannelLimit(h.HistoryNewChannels)...)
	if n := h.MaxReplay; n != 0 && (n < 1 || n > 100000) {
		add("max_replay", "", "chat: max_replay %d: must be between 1 and 100000", n)
	}
	errs = append(errs, h.checkWebhooks(static)...)
	return errs
}

// checkWebhooks checks each webhook's URL, events and bounds.
func (h *Handler) checkWebhooks(static bool) []error {
	literal := func(s string) bool { return !static || !hasPlaceholder(s) }
	var errs []error
	add := func(option, value, format string, args ...any) {
		errs = append(errs, optionErr(option, value, format, args...))
	}
	seen := make(map[string]bool)
	for _, w := range h.Webhooks {
		if w.URL == "" {
			add("webhook", "", "chat: webhook: needs a URL, e.g. webhook https://app.internal/chat/events")
		} else if literal(w.URL) {
			if u, err := url.Parse(w.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				add("webhook", w.URL, "chat: webhook %s: want an http:// or https:// URL, e.g. https://app.internal/chat/events", redactURL(w.URL))
			} else if seen[w.URL] {
				add("webhook", w.URL, "chat: webhook %s: named twice; list every event in one webhook block", redactURL(w.URL))
			}
			seen[w.URL] = true
		}
		for _, e := range w.Events {
			if webhookEventBit(e) == 0 {
				add("webhook events", e, "chat: webhook events %q: want connect, disconnect, subscribe, unsubscribe, publish, join or leave", e)
			}
		}
		if n := w.Batch; n != 0 && (n < 1 || n > maxWebhookBatch) {
			add("webhook batch", "", "chat: webhook batch %d: must be between 1 and %d", n, maxWebhookBatch)
		}
		if n := w.MaxBacklog; n != 0 && (n < 64<<10 || n > 1<<30) {
			add("webhook max_backlog", "", "chat: webhook max_backlog %s: must be between 64KiB and 1GiB", formatSize(n))
		}
		if d := time.Duration(w.Timeout); d != 0 && (d < 10*time.Millisecond || d > 5*time.Minute) {
			add("webhook timeout", "", "chat: webhook timeout %s: must be between 10ms and 5m", formatDuration(d))
		}
		if d := time.Duration(w.ClaimIdle); d != 0 && (d < time.Second || d > time.Hour) {
			add("webhook claim_idle", "", "chat: webhook claim_idle %s: must be between 1s and 1h", formatDuration(d))
		} else if d != 0 && w.Timeout != 0 && d < 2*time.Duration(w.Timeout) {
			add("webhook claim_idle", "", "chat: webhook claim_idle %s: must be at least twice the webhook timeout (%s), or events in flight would be claimed by another node", formatDuration(d), formatDuration(time.Duration(w.Timeout)))
		}
		if n := w.StreamMaxLen; n != 0 && (n < 1000 || n > 100000000) {
			add("webhook stream_max_len", "", "chat: webhook stream_max_len %d: must be between 1000 and 100000000", n)
		}
	}
	return errs
}

// checkAccess checks the authentication, authorization and limit options.
func (h *Handler) checkAccess(static bool) []error {
	literal := func(s string) bool { return !static || !hasPlaceholder(s) }
	var errs []error
	add := func(option, value, format string, args ...any) {
		errs = append(errs, optionErr(option, value, format, args...))
	}
	patterns := func(option string, list []string) {
		for _, p := range list {
			if err := validatePattern(p); err != nil {
				add(option, p, "chat: %s: %v", option, err)
			}
		}
	}
	patterns("subscribe", h.Subscribe)
	patterns("publish", h.Publish)
	if h.Anonymous != nil {
		patterns("anonymous subscribe", h.Anonymous.Subscribe)
		patterns("anonymous publish", h.Anonymous.Publish)
	}
	if j := h.JWT; j != nil {
		if j.Leeway < 0 || time.Duration(j.Leeway) > 5*time.Minute {
			add("jwt leeway", "", "chat: jwt leeway %s: must be between 0 and 5m", formatDuration(time.Duration(j.Leeway)))
		}
		if n := j.MaxTokenSize; n != 0 && (n < 256 || n > 64<<10) {
			add("jwt max_token_size", "", "chat: jwt max_token_size %s: must be between 256 bytes and 64KiB", formatSize(int64(n)))
		}
		if j.Secret != "" && literal(j.Secret) && len(j.Secret) < 32 {
			add("jwt secret", "", "chat: jwt secret: must be at least 32 bytes, got %d (HS256 keys shorter than the hash are guessable; e.g. openssl rand -base64 48)", len(j.Secret))
		}
	} else if h.ConnectHook == nil && (len(h.Subscribe) > 0 || len(h.Publish) > 0) {
		option := "subscribe"
		if len(h.Subscribe) == 0 {
			option = "publish"
		}
		add(option, "", "chat: subscribe and publish rules apply to authenticated users and need a jwt block or a connect_hook; use anonymous { ... } for a route without tokens")
	}
	if rl := h.RateLimit; rl != nil && rl.PerSecond > 0 && rl.Burst != 0 && (rl.Burst < 1 || rl.Burst > 100000) {
		add("rate_limit", "", "chat: rate_limit burst %d: must be between 1 and 100000", rl.Burst)
	}
	if rl := h.EphemeralRate; rl != nil && rl.PerSecond > 0 && rl.Burst != 0 && (rl.Burst < 1 || rl.Burst > 100000) {
		add("ephemeral_rate", "", "chat: ephemeral_rate burst %d: must be between 1 and 100000", rl.Burst)
	}
	for _, c := range []struct {
		name string
		n    int
	}{{"max_connections", h.MaxConnections}, {"max_connections_per_user", h.MaxConnectionsPerUser}, {"max_subscriptions", h.MaxSubscriptions}} {
		if c.n < 0 {
			add(c.name, "", "chat: %s %d: must be at least 1", c.name, c.n)
		}
	}
	if h.PublishEndpoint != "" && !strings.HasPrefix(h.PublishEndpoint, "/") {
		add("publish_endpoint", "", "chat: publish_endpoint %q: must be a path starting with /, e.g. /chat/publish", h.PublishEndpoint)
	}
	if h.PublishEndpoint != "" && h.PublishKey == "" && h.JWT == nil {
		add("publish_endpoint", "", "chat: publish_endpoint needs publish_key or a jwt block to authenticate backends")
	}
	if h.PublishKey != "" && literal(h.PublishKey) && len(h.PublishKey) < 16 {
		add("publish_key", "", "chat: publish_key: must be at least 16 bytes, got %d (e.g. openssl rand -base64 32)", len(h.PublishKey))
	}
	return errs
}

// checkHooks checks the connect, subscribe and publish hooks.
func (h *Handler) checkHooks(static bool) []error {
	literal := func(s string) bool { return !static || !hasPlaceholder(s) }
	var errs []error
	add := func(option, value, format string, args ...any) {
		errs = append(errs, optionErr(option, value, format, args...))
	}
	for _, hk := range []struct {
		name string
		cfg  *HookConfig
	}{{"connect_hook", h.ConnectHook}, {"subscribe_hook", h.SubscribeHook}, {"publish_hook", h.PublishHook}} {
		c, name := hk.cfg, hk.name
		if c == nil {
			continue
		}
		if c.URL == "" {
			add(name, "", "chat: %s: needs the URL of the backend, e.g. http://127.0.0.1:3000/chat/%s", name, strings.TrimSuffix(name, "_hook"))
		} else if literal(c.URL) {
			if u, err := url.Parse(c.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				add(name, c.URL, "chat: %s %s: want an http:// or https:// URL, e.g. http://127.0.0.1:3000/chat/%s", name, redactURL(c.URL), strings.TrimSuffix(name, "_hook"))
			}
		}
		if d := time.Duration(c.Timeout); d != 0 && (d < time.Millisecond || d > time.Minute) {
			add(name+" timeout", "", "chat: %s timeout %s: must be between 1ms and 1m", name, formatDuration(d))
		}
		if n := c.MaxConcurrent; n < 0 || n > 100000 {
			add(name+" max_concurrent", "", "chat: %s max_concurrent %d: must be between 1 and 100000", name, n)
		}
		if d := time.Duration(c.Cache); d != 0 {
			if name != "subscribe_hook" {
				add(name, "", "chat: %s: cache applies to subscribe_hook only", name)
			} else if d < 0 || d > time.Hour {
				add(name+" cache", "", "chat: %s cache %s: must be between 0 and 1h", name, formatDuration(d))
			}
		}
		if len(c.Headers) > 0 && name != "connect_hook" {
			add(name, "", "chat: %s: headers applies to connect_hook only", name)
		}
		for _, hd := range c.Headers {
			if hd == "" || strings.ContainsFunc(hd, func(r rune) bool { return r <= ' ' || r >= 0x7f || strings.ContainsRune("()<>@,;:\\\"/[]?={}", r) }) {
				add(name+" headers", hd, "chat: %s headers %q: want a header name such as Cookie", name, hd)
			}
		}
		if len(c.Channels) > 0 && name == "connect_hook" {
			add(name, "", "chat: connect_hook takes no channel patterns (it is asked about every connection)")
		}
		for _, p := range c.Channels {
			if strings.Contains(p, "{user}") {
				add(name, p, "chat: %s: pattern %q: {user} has no meaning here (the hook is asked for every user; it decides per user)", name, p)
			} else if err := validatePattern(p); err != nil {
				add(name, p, "chat: %s: %v", name, err)
			}
		}
	}
	if h.SubscribeHook != nil && h.Protocol == protocolRaw {
		add("subscribe_hook", "", "chat: subscribe_hook applies to protocol json (a raw route's channel is set by the route; use connect_hook to decide who may open it)")
	}
	return errs
}

// formatSize writes a number of bytes as the Caddyfile does: 64KiB, 1MiB,
// else in bytes.
func formatSize(n int64) string {
	for _, u := range []struct {
		name string
		size int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n >= u.size && n%u.size == 0 {
			return strconv.FormatInt(n/u.size, 10) + u.name
		}
	}
	if n == 1 {
		return "1 byte"
	}
	return strconv.FormatInt(n, 10) + " bytes"
}

// formatDuration writes d as the Caddyfile does: 2h, 10m, 1h30m, 1.5s.
func formatDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// Locating the errors of checkConfig in the Caddyfile.

// optionTokensKey is the dispenser context key under which
// optionTable.parse records the token of each option it reads.
const optionTokensKey = "caddychat.optionTokens"

// optionTokens are the tokens of the options read, by path ("history",
// "jwt secret"), each with its values, in the order read.
type optionTokens map[string][]optionAt

type optionAt struct {
	tok  caddyfile.Token
	args []string
}

func (ot optionTokens) add(path string, tok caddyfile.Token, args []string) {
	ot[path] = append(ot[path], optionAt{tok, args})
}

// locate puts err at the line of the option it is about: the line that
// holds its value if it names one, else the option's first line, else the
// line of the directive (dir).
func (ot optionTokens) locate(err error, dir caddyfile.Token) error {
	tok := dir
	var ce configError
	if errors.As(err, &ce) {
		for path := ce.option; path != ""; {
			if at := ot[path]; len(at) > 0 {
				tok = at[0].tok
				if ce.value != "" {
				find:
					for _, a := range at {
						for _, v := range a.args {
							if v == ce.value {
								tok = a.tok
								break find
							}
						}
					}
				}
				break
			}
			// "jwt secret" not written: point at the jwt block.
			i := strings.LastIndexByte(path, ' ')
			if i < 0 {
				break
			}
			path = path[:i]
		}
	}
	d := caddyfile.NewDispenser([]caddyfile.Token{tok})
	d.Next()
	return d.WrapErr(err)
}
