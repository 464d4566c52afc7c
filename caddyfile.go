package caddychat

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("chat", parseCaddyfile)
	// After encode, as Mercure does: early enough that a catch-all
	// reverse_proxy or file_server never sees the upgrade requests.
	httpcaddyfile.RegisterDirectiveOrder("chat", httpcaddyfile.After, "encode")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens:
//
//	chat [<matcher>] {
//		redis            <url>
//		channel_prefix   <prefix>
//		protocol         json|raw
//		channel          <name>
//		origins          <pattern...>
//		max_message_size <size>
//		send_queue       <frames>
//		ping_interval    <duration>
//		write_timeout    <duration>
//		publish_timeout  <duration>
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
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
			n, err := strconv.Atoi(value)
			if err != nil || n < 1 {
				return d.Errf("send_queue %q: want a positive number of frames", value)
			}
			h.SendQueue = n
		case "ping_interval", "write_timeout", "publish_timeout":
			dur, err := caddy.ParseDuration(value)
			if err != nil || dur <= 0 {
				return d.Errf("%s %q: want a positive duration such as 10s", option, value)
			}
			switch option {
			case "ping_interval":
				h.PingInterval = caddy.Duration(dur)
			case "write_timeout":
				h.WriteTimeout = caddy.Duration(dur)
			default:
				h.PublishTimeout = caddy.Duration(dur)
			}
		default:
			return d.Errf("unknown chat option %q", option)
		}
	}
	return nil
}

var _ caddyfile.Unmarshaler = (*Handler)(nil)
