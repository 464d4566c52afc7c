package caddychat

import (
	"encoding/json"
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
	values := h.NewRoute(matcherSet, handler)
	if matcherSet == nil {
		return values, nil
	}
	var extra []string
	if handler.PublishEndpoint != "" {
		extra = append(extra, handler.PublishEndpoint)
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
//		redis            <url>
//		redis_sentinel   <master name> <sentinel addr...> [{ ... }]
//		redis_cluster    <node addr...> [{ ... }]
//		redis_tls        { ca <file>; cert <file>; key <file>; server_name <name> }
//		channel_prefix   <prefix>
//		protocol         json|raw
//		channel          <name>
//		origins          <pattern...>
//		max_message_size <size>
//		send_queue       <size>
//		ping_interval    <duration>
//		write_timeout    <duration>
//		publish_timeout  <duration>
//		drain_period     <duration>
//		history          [<channel pattern>] <count> [<max age>]
//		max_replay       <messages>
//		history_memory   <size>
//		history_new_channels <n> [<per duration>] | off
//		ui               on|off
//		presence         on|off
//		presence_ttl     <duration>
//		guest_names      on|off
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name (the matcher, if any, was taken already)
	if d.NextArg() {
		return d.Errf("chat takes no arguments besides a matcher; options go in its block")
	}
	for d.NextBlock(0) {
		option := d.Val()
		switch option {
		case "origins":
			h.Origins = append(h.Origins, d.RemainingArgs()...)
			if len(h.Origins) == 0 {
				return d.Errf("origins needs at least one pattern")
			}
			continue
		case "subscribe", "publish":
			patterns := d.RemainingArgs()
			if len(patterns) == 0 {
				return d.Errf("%s needs at least one channel pattern", option)
			}
			if option == "subscribe" {
				h.Subscribe = append(h.Subscribe, patterns...)
			} else {
				h.Publish = append(h.Publish, patterns...)
			}
			continue
		case "jwt":
			if err := h.unmarshalJWT(d); err != nil {
				return err
			}
			continue
		case "anonymous":
			if err := h.unmarshalAnonymous(d); err != nil {
				return err
			}
			continue
		case "rate_limit":
			if err := h.unmarshalRateLimit(d); err != nil {
				return err
			}
			continue
		case "redis_sentinel":
			if err := h.unmarshalRedisSentinel(d); err != nil {
				return err
			}
			continue
		case "redis_cluster":
			if err := h.unmarshalRedisCluster(d); err != nil {
				return err
			}
			continue
		case "redis_tls":
			if err := h.unmarshalRedisTLS(d); err != nil {
				return err
			}
			continue
		case "guest_names":
			// Self-contained (guest.go): guest_names on|off.
			if args := d.RemainingArgs(); len(args) != 1 || (args[0] != "on" && args[0] != "off") {
				return d.Errf("guest_names takes on or off")
			} else {
				h.GuestNames = args[0] == "on"
			}
			continue
		case "history_new_channels":
			l, err := unmarshalNewChannelLimit(d)
			if err != nil {
				return err
			}
			h.HistoryNewChannels = l
			continue
		case "history":
			rule, err := unmarshalHistoryRule(d)
			if err != nil {
				return err
			}
			h.History = append(h.History, rule)
			continue
		}

		var value string
		if !d.Args(&value) {
			return d.Errf("%s needs exactly one value", option)
		}
		if d.NextArg() {
			return d.Errf("%s takes one value, got more: %q", option, d.Val())
		}
		switch option {
		case "redis":
			h.Redis = value
		case "channel_prefix":
			h.ChannelPrefix = &value
		case "protocol":
			h.Protocol = value
		case "channel":
			h.Channel = value
		case "max_message_size":
			size, err := humanize.ParseBytes(value)
			if err != nil || size == 0 || size > 1<<40 {
				return d.Errf("max_message_size %q: want a size such as 65536, 64KiB or 1MB", value)
			}
			h.MaxMessageSize = int64(size)
		case "send_queue":
			size, err := humanize.ParseBytes(value)
			if err != nil || size == 0 || size > 1<<40 {
				return d.Errf("send_queue %q: want a size in bytes such as 1MiB or 512KiB", value)
			}
			h.SendQueue = int64(size)
		case "history_memory":
			size, err := humanize.ParseBytes(value)
			if err != nil || size == 0 || size > 1<<40 {
				return d.Errf("history_memory %q: want a size such as 64MiB or 1GiB", value)
			}
			h.HistoryMemory = int64(size)
		case "max_connections", "max_connections_per_user", "max_subscriptions", "max_replay":
			n, err := strconv.Atoi(value)
			if err != nil || n < 1 {
				return d.Errf("%s %q: want a positive number", option, value)
			}
			switch option {
			case "max_connections":
				h.MaxConnections = n
			case "max_connections_per_user":
				h.MaxConnectionsPerUser = n
			case "max_replay":
				h.MaxReplay = n
			default:
				h.MaxSubscriptions = n
			}
		case "publish_endpoint":
			h.PublishEndpoint = value
		case "publish_key":
			h.PublishKey = value
		case "presence", "ui":
			if value != "on" && value != "off" {
				return d.Errf("%s %q: want on or off", option, value)
			}
			if option == "ui" {
				h.UI = value == "on"
			} else {
				h.Presence = value == "on"
			}
		case "presence_ttl":
			dur, err := caddy.ParseDuration(value)
			if err != nil || dur <= 0 {
				return d.Errf("presence_ttl %q: want a duration such as 15s", value)
			}
			h.PresenceTTL = caddy.Duration(dur)
		case "ping_interval", "write_timeout", "publish_timeout", "drain_period":
			dur, err := caddy.ParseDuration(value)
			if err != nil || dur <= 0 {
				return d.Errf("%s %q: want a positive duration such as 10s", option, value)
			}
			switch option {
			case "ping_interval":
				h.PingInterval = caddy.Duration(dur)
			case "write_timeout":
				h.WriteTimeout = caddy.Duration(dur)
			case "drain_period":
				h.DrainPeriod = caddy.Duration(dur)
			default:
				h.PublishTimeout = caddy.Duration(dur)
			}
		default:
			return d.Errf("unknown chat option %q", option)
		}
	}
	return nil
}

// unmarshalHistoryRule parses history [<channel pattern>] <count> [<max age>];
// a first argument that is a number is the count of a rule for every channel.
func unmarshalHistoryRule(d *caddyfile.Dispenser) (HistoryRule, error) {
	const usage = "history [<channel pattern>] <count> [<max age>], e.g. history room:* 100 24h"
	args := d.RemainingArgs()
	var rule HistoryRule
	if len(args) > 0 {
		if _, err := strconv.Atoi(args[0]); err != nil {
			rule.Channels, args = args[0], args[1:]
		}
	}
	if len(args) < 1 || len(args) > 2 {
		return rule, d.Errf("%s", usage)
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n < 1 {
		return rule, d.Errf("history count %q: want a positive number of messages (%s)", args[0], usage)
	}
	rule.Count = n
	if len(args) == 2 {
		dur, err := caddy.ParseDuration(args[1])
		if err != nil || dur <= 0 {
			return rule, d.Errf("history max age %q: want a positive duration such as 24h (%s)", args[1], usage)
		}
		rule.MaxAge = caddy.Duration(dur)
	}
	return rule, nil
}

// unmarshalNewChannelLimit parses history_new_channels <n> [<per duration>]
// or history_new_channels off.
func unmarshalNewChannelLimit(d *caddyfile.Dispenser) (*NewChannelLimit, error) {
	const usage = "history_new_channels <n> [<per duration>], e.g. history_new_channels 30 1m, or off"
	args := d.RemainingArgs()
	if len(args) == 1 && args[0] == "off" {
		return &NewChannelLimit{Count: -1}, nil
	}
	if len(args) < 1 || len(args) > 2 {
		return nil, d.Errf("%s", usage)
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n < 1 {
		return nil, d.Errf("history_new_channels %q: want a positive number of channels (%s)", args[0], usage)
	}
	l := &NewChannelLimit{Count: n}
	if len(args) == 2 {
		dur, err := caddy.ParseDuration(args[1])
		if err != nil || dur <= 0 {
			return nil, d.Errf("history_new_channels period %q: want a positive duration such as 1m (%s)", args[1], usage)
		}
		l.Per = caddy.Duration(dur)
	}
	return l, nil
}

// unmarshalRedisSentinel parses
//
//	redis_sentinel <master name> <sentinel addr...> {
//		username <user>
//		password <password>
//		db <number>
//		sentinel_username <user>
//		sentinel_password <password>
//		tls
//	}
func (h *Handler) unmarshalRedisSentinel(d *caddyfile.Dispenser) error {
	const usage = "redis_sentinel <master name> <sentinel host:port...>"
	args := d.RemainingArgs()
	if len(args) < 2 {
		return d.Errf("%s: want the master name and at least one sentinel address", usage)
	}
	s := &RedisSentinel{Master: args[0], Addrs: args[1:]}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if option == "tls" {
			if d.NextArg() {
				return d.Errf("redis_sentinel tls takes no value")
			}
			s.TLS = true
			continue
		}
		value, err := redisOptionValue(d, "redis_sentinel")
		if err != nil {
			return err
		}
		switch option {
		case "username":
			s.Username = value
		case "password":
			s.Password = value
		case "sentinel_username":
			s.SentinelUsername = value
		case "sentinel_password":
			s.SentinelPassword = value
		case "db":
			n, err := strconv.Atoi(value)
			if err != nil || n < 0 {
				return d.Errf("redis_sentinel db %q: want a database number, 0 or more", value)
			}
			s.DB = n
		default:
			return d.Errf("unknown redis_sentinel option %q (want username, password, db, sentinel_username, sentinel_password or tls)", option)
		}
	}
	h.RedisSentinel = s
	return nil
}

// unmarshalRedisCluster parses
//
//	redis_cluster <node addr...> {
//		username <user>
//		password <password>
//		tls
//	}
func (h *Handler) unmarshalRedisCluster(d *caddyfile.Dispenser) error {
	addrs := d.RemainingArgs()
	if len(addrs) == 0 {
		return d.Errf("redis_cluster <node host:port...>: want at least one node address")
	}
	c := &RedisCluster{Addrs: addrs}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if option == "tls" {
			if d.NextArg() {
				return d.Errf("redis_cluster tls takes no value")
			}
			c.TLS = true
			continue
		}
		value, err := redisOptionValue(d, "redis_cluster")
		if err != nil {
			return err
		}
		switch option {
		case "username":
			c.Username = value
		case "password":
			c.Password = value
		default:
			return d.Errf("unknown redis_cluster option %q (want username, password or tls)", option)
		}
	}
	h.RedisCluster = c
	return nil
}

// redisOptionValue reads the one value of an option in a redis_* block.
func redisOptionValue(d *caddyfile.Dispenser, directive string) (string, error) {
	option := d.Val()
	args := d.RemainingArgs()
	if len(args) != 1 {
		return "", d.Errf("%s %s needs exactly one value", directive, option)
	}
	return args[0], nil
}

// unmarshalJWT parses
//
//	jwt {
//		secret|public_key|jwks <value>
//		issuer <iss>
//		audience <aud>
//		user_claim <claim>
//		subscribe_claim <claim>
//		publish_claim <claim>
//		leeway <duration>
//		cookie <name>
//		query_token [<param>]
//		max_token_size <size>
//	}
func (h *Handler) unmarshalJWT(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.Errf("jwt takes its options in a block")
	}
	j := new(JWTConfig)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		args := d.RemainingArgs()
		if option == "query_token" {
			switch len(args) {
			case 0:
				j.QueryParam = "token"
			case 1:
				j.QueryParam = args[0]
			default:
				return d.Errf("jwt query_token takes at most one parameter name")
			}
			continue
		}
		if len(args) != 1 {
			return d.Errf("jwt %s needs exactly one value", option)
		}
		value := args[0]
		switch option {
		case "secret":
			j.Secret = value
		case "public_key":
			j.PublicKey = value
		case "jwks":
			j.JWKS = value
		case "issuer":
			j.Issuer = value
		case "audience":
			j.Audience = value
		case "user_claim":
			j.UserClaim = value
		case "subscribe_claim":
			j.SubscribeClaim = value
		case "publish_claim":
			j.PublishClaim = value
		case "cookie":
			j.Cookie = value
		case "leeway":
			dur, err := caddy.ParseDuration(value)
			if err != nil || dur < 0 {
				return d.Errf("jwt leeway %q: want a duration such as 5s", value)
			}
			j.Leeway = caddy.Duration(dur)
		case "max_token_size":
			size, err := humanize.ParseBytes(value)
			if err != nil || size == 0 || size > 1<<20 {
				return d.Errf("jwt max_token_size %q: want a size such as 8KiB", value)
			}
			j.MaxTokenSize = int(size)
		default:
			return d.Errf("unknown jwt option %q", option)
		}
	}
	h.JWT = j
	return nil
}

// unmarshalAnonymous parses `anonymous` or
//
//	anonymous {
//		subscribe <pattern...>
//		publish <pattern...>
//	}
func (h *Handler) unmarshalAnonymous(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.Errf("anonymous takes its permissions in a block")
	}
	p := new(Permissions)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		patterns := d.RemainingArgs()
		if len(patterns) == 0 {
			return d.Errf("anonymous %s needs at least one channel pattern", option)
		}
		switch option {
		case "subscribe":
			p.Subscribe = append(p.Subscribe, patterns...)
		case "publish":
			p.Publish = append(p.Publish, patterns...)
		default:
			return d.Errf("unknown anonymous option %q (want subscribe or publish)", option)
		}
	}
	h.Anonymous = p
	return nil
}

// unmarshalRateLimit parses `rate_limit <per second> [<burst>]` or `rate_limit off`.
func (h *Handler) unmarshalRateLimit(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) == 1 && args[0] == "off" {
		h.RateLimit = &RateLimit{PerSecond: -1}
		return nil
	}
	if len(args) < 1 || len(args) > 2 {
		return d.Errf("rate_limit needs <frames per second> [<burst>], or off")
	}
	perSecond, err := strconv.ParseFloat(args[0], 64)
	if err != nil || perSecond <= 0 || perSecond > 1e6 {
		return d.Errf("rate_limit %q: want a positive number of frames per second, or off", args[0])
	}
	rl := &RateLimit{PerSecond: perSecond}
	if len(args) == 2 {
		burst, err := strconv.Atoi(args[1])
		if err != nil || burst < 1 {
			return d.Errf("rate_limit burst %q: want a positive number of frames", args[1])
		}
		rl.Burst = burst
	}
	h.RateLimit = rl
	return nil
}

var _ caddyfile.Unmarshaler = (*Handler)(nil)
