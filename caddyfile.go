package caddychat

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterDirective("chat", parseChatDirective)
	// After encode, as Mercure does: early enough that a catch-all
	// reverse_proxy or file_server never sees the upgrade requests.
	httpcaddyfile.RegisterDirectiveOrder("chat", httpcaddyfile.After, "encode")
}

// parseChatDirective builds the chat route as a handler directive does, and
// when publish_endpoint is set, widens the route's matcher to that path too,
// so the endpoint works without a second matcher.
func parseChatDirective(h httpcaddyfile.Helper) ([]httpcaddyfile.ConfigValue, error) {
	if !h.Next() {
		return nil, h.ArgErr()
	}
	matcherSet, err := h.ExtractMatcherSet()
	if err != nil {
		return nil, err
	}
	handler := new(Handler)
	if err := handler.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	if handler.Name == "" {
		// The server API's stats tell routes apart by name: by default the
		// path the operator wrote.
		handler.Name = firstPath(matcherSet)
	}
	values := h.NewRoute(matcherSet, handler)
	if matcherSet == nil {
		return values, nil
	}
	var extra []string
	if handler.PublishEndpoint != "" {
		// The server API lives below it (api.go).
		extra = append(extra, handler.PublishEndpoint, strings.TrimSuffix(handler.PublishEndpoint, "/")+"/*")
	}
	extra = append(extra, browserAssetPaths(matcherSet)...)
	if len(extra) == 0 {
		return values, nil
	}
	for i, v := range values {
		route, ok := v.Value.(caddyhttp.Route)
		if !ok {
			continue
		}
		paths := caddy.ModuleMap{"path": caddyconfig.JSON(caddyhttp.MatchPath(extra), nil)}
		route.MatcherSetsRaw = append(route.MatcherSetsRaw, paths)
		values[i].Value = route
	}
	return values, nil
}

// firstPath is the first path of the directive's path matcher, "" without one.
func firstPath(matcherSet caddy.ModuleMap) string {
	var paths []string
	if raw, ok := matcherSet["path"]; ok && json.Unmarshal(raw, &paths) == nil && len(paths) > 0 {
		return paths[0]
	}
	return ""
}

// browserAssetPaths are the client library's paths under the directive's
// path matcher (chat /ws: /ws/caddychat.js, ...), so that pages can load it
// from the route. Only for a matcher that is exactly a list of plain paths.
func browserAssetPaths(matcherSet caddy.ModuleMap) []string {
	raw, ok := matcherSet["path"]
	if !ok || len(matcherSet) != 1 {
		return nil
	}
	var paths []string
	if err := json.Unmarshal(raw, &paths); err != nil {
		return nil
	}
	var out []string
	for _, p := range paths {
		if p == "" || strings.ContainsAny(p, "*{") {
			continue
		}
		out = append(out, assetPaths(p)...)
	}
	return out
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens:
//
//	chat [<matcher>] {
//		redis                    <url>
//		redis_sentinel           <master name> <sentinel addr...> [{
//			username          <user>
//			password          <password>
//			db                <number>
//			sentinel_username <user>
//			sentinel_password <password>
//			tls
//		}]
//		redis_cluster            <node addr...> [{
//			username <user>
//			password <password>
//			tls
//		}]
//		redis_tls {
//			ca          <PEM file>
//			cert        <PEM file>
//			key         <PEM file>
//			server_name <name>
//		}
//		channel_prefix           <prefix>
//		protocol                 json|raw
//		channel                  <name>
//		origins                  <pattern...>
//		max_message_size         <size>
//		send_queue               <size>
//		ping_interval            <duration>
//		write_timeout            <duration>
//		publish_timeout          <duration>
//		drain_period             <duration>
//		compression              off|on|context_takeover
//		max_lag                  <duration> | off
//		idempotency_window       <duration> | off
//		jwt {
//			secret          <secret>
//			public_key      <PEM file>
//			jwks            <URL>
//			issuer          <iss>
//			audience        <aud>
//			user_claim      <claim>
//			subscribe_claim <claim>
//			publish_claim   <claim>
//			leeway          <duration>
//			cookie          <name>
//			query_token     [<param>]
//			max_token_size  <size>
//			user_info_claim <claim...>
//		}
//		subscribe                <pattern...>
//		publish                  <pattern...>
//		anonymous [{
//			subscribe <pattern...>
//			publish   <pattern...>
//		}]
//		rate_limit               <per second> [<burst>] | off
//		ephemeral_rate           <per second> [<burst>] | off
//		max_connections          <n>
//		max_connections_per_user <n>
//		max_subscriptions        <n>
//		presence                 on|off
//		presence_ttl             <duration>
//		guest_names              on|off
//		history                  [<channel pattern>] <count> [<max age>]
//		max_replay               <n>
//		history_memory           <size>
//		history_new_channels     <n> [<per duration>] | off
//		publish_endpoint         <path>
//		publish_key              <key>
//		name                     <name>
//		ui                       on|off
//		connect_hook             <url> [{
//			timeout        <duration>
//			max_concurrent <n>
//			secret         <secret>
//			headers        <name...>
//			fail_open
//		}]
//		subscribe_hook           <url> [<pattern...>] [{
//			timeout        <duration>
//			max_concurrent <n>
//			secret         <secret>
//			cache          <duration>
//			fail_open
//		}]
//		publish_hook             <url> [<pattern...>] [{
//			timeout        <duration>
//			max_concurrent <n>
//			secret         <secret>
//			fail_open
//		}]
//		webhook                  <url> [{
//			events         <event...>
//			secret         <secret>
//			batch          <n>
//			max_backlog    <size>
//			timeout        <duration>
//			claim_idle     <duration>
//			stream_max_len <n>
//		}]
//	}
//
// The jwt block takes exactly one of secret, public_key and jwks. The
// options are the tables chatOptions (below) and those of the blocks;
// TestCaddyfileSyntaxComment keeps this comment in step with them.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name (the matcher, if any, was taken already)
	directive := d.Token()
	if d.NextArg() {
		return d.Errf("chat: unexpected argument %q: chat takes a matcher and a block of options, e.g. chat /ws { redis redis://127.0.0.1:6379/0 }", d.Val())
	}
	read := optionTokens{}
	d.SetContext(optionTokensKey, read)
	if err := chatOptions.parse(d, h); err != nil {
		return err
	}
	// What the whole block shows without the network, placeholders aside,
	// fails here (caddy adapt) rather than at caddy run.
	errs := h.checkConfig(true)
	for i, err := range errs {
		errs[i] = read.locate(err, directive)
	}
	return errors.Join(errs...)
}

// chatOptions are the options of the chat block, in the order of the syntax
// comment above.
var chatOptions = &optionTable[Handler]{options: []option[Handler]{
	{name: "redis", min: 1, max: 1, syntax: "<url>", takes: "one URL", example: "redis redis://127.0.0.1:6379/0",
		parse: func(h *Handler, _ *caddyfile.Dispenser, args []string) error { h.Redis = args[0]; return nil }},
	{name: "redis_sentinel", min: 2, max: -1, syntax: "<master name> <sentinel addr...>",
		takes:   "the master name and one or more sentinel addresses",
		example: "redis_sentinel mymaster 10.0.0.1:26379 10.0.0.2:26379",
		block:   redisSentinelOptions, blockOptional: true,
		parse: func(h *Handler, d *caddyfile.Dispenser, args []string) error {
			s := &RedisSentinel{Master: args[0], Addrs: args[1:]}
			if err := redisSentinelOptions.parse(d, s); err != nil {
				return err
			}
			h.RedisSentinel = s
			return nil
		}},
	{name: "redis_cluster", min: 1, max: -1, syntax: "<node addr...>",
		takes: "one or more node addresses", example: "redis_cluster 10.0.1.1:6379 10.0.1.2:6379",
		block: redisClusterOptions, blockOptional: true,
		parse: func(h *Handler, d *caddyfile.Dispenser, args []string) error {
			c := &RedisCluster{Addrs: args}
			if err := redisClusterOptions.parse(d, c); err != nil {
				return err
			}
			h.RedisCluster = c
			return nil
		}},
	{name: "redis_tls", takes: "no values, only a block", example: "redis_tls { ca /etc/chat/redis-ca.pem }",
		block: redisTLSOptions, parse: (*Handler).unmarshalRedisTLS},
	{name: "channel_prefix", min: 1, max: 1, syntax: "<prefix>", takes: "one prefix", example: "channel_prefix chat:",
		parse: func(h *Handler, _ *caddyfile.Dispenser, args []string) error { h.ChannelPrefix = &args[0]; return nil }},
	{name: "protocol", min: 1, max: 1, syntax: "json|raw", takes: "one protocol, json or raw", example: "protocol raw",
		parse: func(h *Handler, _ *caddyfile.Dispenser, args []string) error { h.Protocol = args[0]; return nil }},
	{name: "channel", min: 1, max: 1, syntax: "<name>", takes: "one channel name", example: "channel room:{http.request.uri.path.1}",
		parse: func(h *Handler, _ *caddyfile.Dispenser, args []string) error { h.Channel = args[0]; return nil }},
	patternsOption("origins", "one or more origin patterns", "origins app.example.com *.example.com", func(h *Handler) *[]string { return &h.Origins }),
	sizeOption("max_message_size", "64KiB", 1<<40, func(h *Handler, n int64) { h.MaxMessageSize = n }),
	sizeOption("send_queue", "1MiB", 1<<40, func(h *Handler, n int64) { h.SendQueue = n }),
	durationOption("ping_interval", "25s", func(h *Handler, d caddy.Duration) { h.PingInterval = d }),
	durationOption("write_timeout", "10s", func(h *Handler, d caddy.Duration) { h.WriteTimeout = d }),
	durationOption("publish_timeout", "2s", func(h *Handler, d caddy.Duration) { h.PublishTimeout = d }),
	durationOption("drain_period", "10s", func(h *Handler, d caddy.Duration) { h.DrainPeriod = d }),
	compressionOption,
	durationOrOffOption("max_lag", "5s", func(h *Handler) **caddy.Duration { return &h.MaxLag }),
	durationOrOffOption("idempotency_window", "5m", func(h *Handler) **caddy.Duration { return &h.IdempotencyWindow }),
	{name: "jwt", takes: "no values, only a block", example: "jwt { secret {env.CHAT_JWT_SECRET} }",
		block: jwtOptions,
		parse: func(h *Handler, d *caddyfile.Dispenser, _ []string) error {
			j := new(JWTConfig)
			if err := jwtOptions.parse(d, j); err != nil {
				return err
			}
			h.JWT = j
			return nil
		}},
	patternsOption("subscribe", "one or more channel patterns", "subscribe room:* user:{user}", func(h *Handler) *[]string { return &h.Subscribe }),
	patternsOption("publish", "one or more channel patterns", "publish room:*", func(h *Handler) *[]string { return &h.Publish }),
	{name: "anonymous", takes: "no values, only a block", example: "anonymous { subscribe public:* }",
		block: anonymousOptions, blockOptional: true,
		parse: func(h *Handler, d *caddyfile.Dispenser, _ []string) error {
			p := new(Permissions)
			if err := anonymousOptions.parse(d, p); err != nil {
				return err
			}
			h.Anonymous = p
			return nil
		}},
	{name: "rate_limit", min: 1, max: 2, syntax: "<per second> [<burst>] | off",
		takes: "a number of frames per second and an optional burst, or off", example: "rate_limit 50 100",
		parse: rateParser("rate_limit", "frames", func(h *Handler, rl *RateLimit) { h.RateLimit = rl })},
	{name: "ephemeral_rate", min: 1, max: 2, syntax: "<per second> [<burst>] | off",
		takes: "a number of ephemeral publishes per second and an optional burst, or off", example: "ephemeral_rate 10 20",
		parse: rateParser("ephemeral_rate", "ephemeral publishes", func(h *Handler, rl *RateLimit) { h.EphemeralRate = rl })},
	countOption("max_connections", "100000", func(h *Handler, n int) { h.MaxConnections = n }),
	countOption("max_connections_per_user", "100", func(h *Handler, n int) { h.MaxConnectionsPerUser = n }),
	countOption("max_subscriptions", "100", func(h *Handler, n int) { h.MaxSubscriptions = n }),
	onOffOption("presence", func(h *Handler, on bool) { h.Presence = on }),
	durationOption("presence_ttl", "15s", func(h *Handler, d caddy.Duration) { h.PresenceTTL = d }),
	onOffOption("guest_names", func(h *Handler, on bool) { h.GuestNames = on }),
	{name: "history", min: 1, max: 3, syntax: "[<channel pattern>] <count> [<max age>]",
		takes: "an optional channel pattern, a count and an optional max age", example: historyExample,
		parse: parseHistoryRule},
	countOption("max_replay", "1000", func(h *Handler, n int) { h.MaxReplay = n }),
	sizeOption("history_memory", "64MiB", 1<<40, func(h *Handler, n int64) { h.HistoryMemory = n }),
	{name: "history_new_channels", min: 1, max: 2, syntax: "<n> [<per duration>] | off",
		takes: "a number of channels and an optional period, or off", example: newChannelsExample,
		parse: parseNewChannelLimit},
	{name: "publish_endpoint", min: 1, max: 1, syntax: "<path>", takes: "one path", example: "publish_endpoint /chat/publish",
		parse: func(h *Handler, _ *caddyfile.Dispenser, args []string) error { h.PublishEndpoint = args[0]; return nil }},
	{name: "publish_key", min: 1, max: 1, syntax: "<key>", takes: "one key", example: "publish_key {env.CHAT_PUBLISH_KEY}",
		parse: func(h *Handler, _ *caddyfile.Dispenser, args []string) error { h.PublishKey = args[0]; return nil }},
	{name: "name", min: 1, max: 1, syntax: "<name>", takes: "one name", example: "name support-chat",
		parse: func(h *Handler, _ *caddyfile.Dispenser, args []string) error { h.Name = args[0]; return nil }},
	onOffOption("ui", func(h *Handler, on bool) { h.UI = on }),
	{name: "connect_hook", min: 1, max: 1, syntax: "<url>", takes: "one URL", example: "connect_hook http://127.0.0.1:3000/chat/connect",
		block: connectHookOptions, blockOptional: true,
		parse: func(h *Handler, d *caddyfile.Dispenser, args []string) error {
			c := &HookConfig{URL: args[0]}
			if err := connectHookOptions.parse(d, c); err != nil {
				return err
			}
			h.ConnectHook = c
			return nil
		}},
	{name: "subscribe_hook", min: 1, max: -1, syntax: "<url> [<pattern...>]", takes: "one URL and optional channel patterns",
		example: "subscribe_hook http://127.0.0.1:3000/chat/subscribe room:*",
		block:   subscribeHookOptions, blockOptional: true,
		parse: func(h *Handler, d *caddyfile.Dispenser, args []string) error {
			c := &HookConfig{URL: args[0], Channels: args[1:]}
			if err := subscribeHookOptions.parse(d, c); err != nil {
				return err
			}
			h.SubscribeHook = c
			return nil
		}},
	{name: "publish_hook", min: 1, max: -1, syntax: "<url> [<pattern...>]", takes: "one URL and optional channel patterns",
		example: "publish_hook http://127.0.0.1:3000/chat/publish room:*",
		block:   publishHookOptions, blockOptional: true,
		parse: func(h *Handler, d *caddyfile.Dispenser, args []string) error {
			c := &HookConfig{URL: args[0], Channels: args[1:]}
			if err := publishHookOptions.parse(d, c); err != nil {
				return err
			}
			h.PublishHook = c
			return nil
		}},
	{name: "webhook", min: 1, max: 1, syntax: "<url>", takes: "one URL", example: "webhook https://app.internal/chat/events { secret {env.CHAT_WEBHOOK_SECRET} }",
		block: webhookOptions, blockOptional: true,
		parse: func(h *Handler, d *caddyfile.Dispenser, args []string) error {
			w := &Webhook{URL: args[0]}
			if err := webhookOptions.parse(d, w); err != nil {
				return err
			}
			h.Webhooks = append(h.Webhooks, w)
			return nil
		}},
}}

// webhookOptions are the options of a webhook block.
var webhookOptions = &optionTable[Webhook]{block: "webhook", options: []option[Webhook]{
	{name: "events", min: 1, max: -1, syntax: "<event...>",
		takes: "one or more of connect, disconnect, subscribe, unsubscribe, publish, join, leave", example: "events publish join leave",
		parse: func(w *Webhook, _ *caddyfile.Dispenser, args []string) error {
			w.Events = append(w.Events, args...)
			return nil
		}},
	stringOption("secret", "<secret>", "{env.CHAT_WEBHOOK_SECRET}", func(w *Webhook, v string) { w.Secret = v }),
	countOption("batch", "100", func(w *Webhook, n int) { w.Batch = n }),
	sizeOption("max_backlog", "16MiB", 1<<40, func(w *Webhook, n int64) { w.MaxBacklog = n }),
	durationOption("timeout", "10s", func(w *Webhook, d caddy.Duration) { w.Timeout = d }),
	durationOption("claim_idle", "30s", func(w *Webhook, d caddy.Duration) { w.ClaimIdle = d }),
	countOption("stream_max_len", "100000", func(w *Webhook, n int) { w.StreamMaxLen = int64(n) }),
}}

// The options of the connect_hook, subscribe_hook and publish_hook blocks:
// the same, but for headers (connect only) and cache (subscribe only).
var (
	connectHookOptions   = hookOptions("connect_hook", optionHeaders)
	subscribeHookOptions = hookOptions("subscribe_hook", optionCache)
	publishHookOptions   = hookOptions("publish_hook", "")
)

const (
	optionHeaders = "headers"
	optionCache   = "cache"
)

// hookOptions is the option table of a hook's block, with extra (headers
// or cache) if set.
func hookOptions(block, extra string) *optionTable[HookConfig] {
	opts := []option[HookConfig]{
		durationOption("timeout", "2s", func(c *HookConfig, d caddy.Duration) { c.Timeout = d }),
		countOption("max_concurrent", "64", func(c *HookConfig, n int) { c.MaxConcurrent = n }),
		stringOption("secret", "<secret>", "{env.CHAT_HOOK_SECRET}", func(c *HookConfig, v string) { c.Secret = v }),
	}
	switch extra {
	case optionHeaders:
		opts = append(opts, option[HookConfig]{name: "headers", min: 1, max: -1, syntax: "<name...>",
			takes: "one or more header names", example: "headers Cookie",
			parse: func(c *HookConfig, _ *caddyfile.Dispenser, args []string) error {
				c.Headers = append(c.Headers, args...)
				return nil
			}})
	case optionCache:
		opts = append(opts, durationOption("cache", "10s", func(c *HookConfig, d caddy.Duration) { c.Cache = d }))
	}
	opts = append(opts, flagOption("fail_open", func(c *HookConfig) { c.FailOpen = true }))
	return &optionTable[HookConfig]{block: block, options: opts}
}

// jwtOptions are the options of the jwt block.
var jwtOptions = &optionTable[JWTConfig]{block: "jwt", options: []option[JWTConfig]{
	stringOption("secret", "<secret>", "{env.CHAT_JWT_SECRET}", func(j *JWTConfig, v string) { j.Secret = v }),
	stringOption("public_key", "<PEM file>", "/etc/chat/jwt.pem", func(j *JWTConfig, v string) { j.PublicKey = v }),
	stringOption("jwks", "<URL>", "https://idp.example.com/.well-known/jwks.json", func(j *JWTConfig, v string) { j.JWKS = v }),
	stringOption("issuer", "<iss>", "https://idp.example.com", func(j *JWTConfig, v string) { j.Issuer = v }),
	stringOption("audience", "<aud>", "chat", func(j *JWTConfig, v string) { j.Audience = v }),
	stringOption("user_claim", "<claim>", "sub", func(j *JWTConfig, v string) { j.UserClaim = v }),
	stringOption("subscribe_claim", "<claim>", "chat.subscribe", func(j *JWTConfig, v string) { j.SubscribeClaim = v }),
	stringOption("publish_claim", "<claim>", "chat.publish", func(j *JWTConfig, v string) { j.PublishClaim = v }),
	{name: "leeway", min: 1, max: 1, syntax: "<duration>", takes: "one duration", example: "leeway 5s",
		parse: func(j *JWTConfig, _ *caddyfile.Dispenser, args []string) error {
			dur, err := caddy.ParseDuration(args[0])
			if err != nil || dur < 0 {
				return fmt.Errorf("leeway %q: want a duration such as 5s", args[0])
			}
			j.Leeway = caddy.Duration(dur)
			return nil
		}},
	stringOption("cookie", "<name>", "chat_token", func(j *JWTConfig, v string) { j.Cookie = v }),
	{name: "query_token", max: 1, syntax: "[<param>]", takes: "at most one parameter name", example: "query_token token",
		parse: func(j *JWTConfig, _ *caddyfile.Dispenser, args []string) error {
			j.QueryParam = "token"
			if len(args) == 1 {
				j.QueryParam = args[0]
			}
			return nil
		}},
	{name: "max_token_size", min: 1, max: 1, syntax: "<size>", takes: "one size", example: "max_token_size 8KiB",
		parse: func(j *JWTConfig, _ *caddyfile.Dispenser, args []string) error {
			size, err := humanize.ParseBytes(args[0])
			if err != nil || size == 0 || size > 1<<20 {
				return fmt.Errorf("max_token_size %q: want a size such as 8KiB", args[0])
			}
			j.MaxTokenSize = int(size)
			return nil
		}},
	{name: "user_info_claim", min: 1, max: -1, syntax: "<claim...>", takes: "one or more claim names", example: "user_info_claim name picture",
		parse: func(j *JWTConfig, _ *caddyfile.Dispenser, args []string) error {
			j.UserInfoClaims = append(j.UserInfoClaims, args...)
			return nil
		}},
}, meant: map[string]string{"query_param": "query_token"}}

// anonymousOptions are the options of the anonymous block.
var anonymousOptions = &optionTable[Permissions]{block: "anonymous", options: []option[Permissions]{
	patternsOption("subscribe", "one or more channel patterns", "subscribe public:*", func(p *Permissions) *[]string { return &p.Subscribe }),
	patternsOption("publish", "one or more channel patterns", "publish public:*", func(p *Permissions) *[]string { return &p.Publish }),
}}

// redisSentinelOptions are the options of the redis_sentinel block.
var redisSentinelOptions = &optionTable[RedisSentinel]{block: "redis_sentinel", options: []option[RedisSentinel]{
	stringOption("username", "<user>", "chat", func(s *RedisSentinel, v string) { s.Username = v }),
	stringOption("password", "<password>", "{env.REDIS_PASSWORD}", func(s *RedisSentinel, v string) { s.Password = v }),
	{name: "db", min: 1, max: 1, syntax: "<number>", takes: "one database number", example: "db 0",
		parse: func(s *RedisSentinel, _ *caddyfile.Dispenser, args []string) error {
			n, err := strconv.Atoi(args[0])
			if err != nil || n < 0 {
				return fmt.Errorf("db %q: want a database number, 0 or more", args[0])
			}
			s.DB = n
			return nil
		}},
	stringOption("sentinel_username", "<user>", "watcher", func(s *RedisSentinel, v string) { s.SentinelUsername = v }),
	stringOption("sentinel_password", "<password>", "{env.SENTINEL_PASSWORD}", func(s *RedisSentinel, v string) { s.SentinelPassword = v }),
	flagOption("tls", func(s *RedisSentinel) { s.TLS = true }),
}}

// redisClusterOptions are the options of the redis_cluster block.
var redisClusterOptions = &optionTable[RedisCluster]{block: "redis_cluster", options: []option[RedisCluster]{
	stringOption("username", "<user>", "chat", func(c *RedisCluster, v string) { c.Username = v }),
	stringOption("password", "<password>", "{env.REDIS_PASSWORD}", func(c *RedisCluster, v string) { c.Password = v }),
	flagOption("tls", func(c *RedisCluster) { c.TLS = true }),
}}

const (
	historyExample     = "history room:* 100 24h"
	newChannelsExample = "history_new_channels 30 1m"
)

// parseHistoryRule parses history [<channel pattern>] <count> [<max age>];
// a first argument that is a number is the count of a rule for every channel.
func parseHistoryRule(h *Handler, _ *caddyfile.Dispenser, args []string) error {
	const usage = "history [<channel pattern>] <count> [<max age>], e.g. " + historyExample
	var rule HistoryRule
	line := strings.Join(args, " ")
	if _, err := strconv.Atoi(args[0]); err != nil {
		rule.Channels, args = args[0], args[1:]
	}
	switch {
	case len(args) == 0:
		return fmt.Errorf("history %s: want a count after the channel pattern (%s)", line, usage)
	case len(args) > 2:
		return fmt.Errorf("history %s: a first value that is a number is the count, and only a max age may follow it (%s)", line, usage)
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n < 1 {
		return fmt.Errorf("history count %q: want a positive number of messages (%s)", args[0], usage)
	}
	rule.Count = n
	if len(args) == 2 {
		dur, err := caddy.ParseDuration(args[1])
		if err != nil || dur <= 0 {
			return fmt.Errorf("history max age %q: want a positive duration such as 24h (%s)", args[1], usage)
		}
		rule.MaxAge = caddy.Duration(dur)
	}
	h.History = append(h.History, rule)
	return nil
}

// parseNewChannelLimit parses history_new_channels <n> [<per duration>] or
// history_new_channels off.
func parseNewChannelLimit(h *Handler, _ *caddyfile.Dispenser, args []string) error {
	const usage = "history_new_channels <n> [<per duration>], e.g. " + newChannelsExample + ", or off"
	if len(args) == 1 && args[0] == "off" {
		h.HistoryNewChannels = &NewChannelLimit{Count: -1}
		return nil
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n < 1 {
		return fmt.Errorf("history_new_channels %q: want a positive number of channels (%s)", args[0], usage)
	}
	l := &NewChannelLimit{Count: n}
	if len(args) == 2 {
		dur, err := caddy.ParseDuration(args[1])
		if err != nil || dur <= 0 {
			return fmt.Errorf("history_new_channels period %q: want a positive duration such as 1m (%s)", args[1], usage)
		}
		l.Per = caddy.Duration(dur)
	}
	h.HistoryNewChannels = l
	return nil
}

// rateParser parses <name> <per second> [<burst>] or <name> off (a
// negative rate), counting units, into set.
func rateParser(name, units string, set func(*Handler, *RateLimit)) func(*Handler, *caddyfile.Dispenser, []string) error {
	return func(h *Handler, _ *caddyfile.Dispenser, args []string) error {
		if len(args) == 1 && args[0] == "off" {
			set(h, &RateLimit{PerSecond: -1})
			return nil
		}
		perSecond, err := strconv.ParseFloat(args[0], 64)
		if err != nil || perSecond <= 0 || perSecond > 1e6 {
			return fmt.Errorf("%s %q: want a positive number of %s per second, or off", name, args[0], units)
		}
		rl := &RateLimit{PerSecond: perSecond}
		if len(args) == 2 {
			burst, err := strconv.Atoi(args[1])
			if err != nil || burst < 1 {
				return fmt.Errorf("%s burst %q: want a positive number of %s", name, args[1], units)
			}
			rl.Burst = burst
		}
		set(h, rl)
		return nil
	}
}

var _ caddyfile.Unmarshaler = (*Handler)(nil)
