package caddychat

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"time"
)

// The channel hooks: subscribe_hook asks the backend whether a connection
// may subscribe to a channel (room membership), with an optional decision
// cache; publish_hook asks before a message is fanned out, and may reject
// it or replace its data. Both run on the connection's reading side, off
// its stack (conn.offStack) like every op, so a slow backend holds back
// that connection alone; max_concurrent bounds the calls of all of them.

// channelHookRequest is the body of a subscribe or publish hook call.
type channelHookRequest struct {
	Type    string          `json:"type"`
	Route   string          `json:"route"`
	User    string          `json:"user"`
	Conn    string          `json:"conn"`
	Channel string          `json:"channel"`
	Data    json.RawMessage `json:"data,omitempty"`
	Info    json.RawMessage `json:"info,omitempty"`
	// Anonymous, Guest: a connection without a user (guest: its guest id).
	Anonymous bool   `json:"anonymous,omitempty"`
	Guest     string `json:"guest,omitempty"`
}

// maxHookReason bounds the backend's reason as the client gets it.
const maxHookReason = 200

func (c *conn) channelHookRequest(typ, channel string, data json.RawMessage) channelHookRequest {
	return channelHookRequest{Type: typ, Route: c.path, User: c.identity.user, Conn: c.id, Channel: channel,
		Data: data, Info: c.identity.info, Anonymous: c.identity.anonymous, Guest: c.identity.guest}
}

// subscribeAllowed asks the subscribe hook, if it applies to the frame's
// channel, whether the connection may subscribe (or read its history or
// presence); a refusal is replied and false returned.
func (c *conn) subscribeAllowed(f clientFrame) bool {
	hook := c.route.subscribeHook
	if !hook.applies(f.Channel) {
		return true
	}
	key := c.hookCacheKey(f.Channel)
	if d, ok := c.route.hookCache.get(key, time.Now()); ok {
		if !d.allow {
			c.subscribeError(f, errForbidden, d.reason)
		}
		return d.allow
	}
	ans, err := hook.decide(c.context(), c.channelHookRequest("subscribe", f.Channel, nil), nil)
	if err != nil {
		var hf *hookFailure
		errors.As(err, &hf)
		c.subscribeError(f, errUnavailable, "not subscribed: the application did not answer (subscribe_hook "+hf.outcome+"); retry later")
		return false
	}
	allow := ans.Result == hookAllow
	reason := ""
	if !allow {
		reason = truncate(ans.Reason, maxHookReason)
		if reason == "" {
			reason = "the application refused the subscription to " + f.Channel
		}
	}
	if !ans.failedOpen {
		c.route.hookCache.put(key, hookDecision{allow: allow, reason: reason}, time.Now())
	}
	if !allow {
		c.subscribeError(f, errForbidden, reason)
	}
	return allow
}

// subscribeError replies an error to a subscribe; one the node made for
// the connect hook's channels names the channel instead of an id.
func (c *conn) subscribeError(f clientFrame, code, message string) {
	r := reply{Type: "error", ID: f.ID, Code: code, Message: message}
	if f.initial {
		r.Channel = f.Channel
	}
	c.sendOwn(r)
}

// hookCacheKey is who asks for channel, for the decision cache: the user,
// else (anonymous) the connection alone.
func (c *conn) hookCacheKey(channel string) string {
	if c.identity.user != "" {
		return "u\x00" + c.identity.user + "\x00" + channel
	}
	return "c\x00" + c.id + "\x00" + channel
}

// publishVerdict is what the publish hook made of a message.
type publishVerdict int

const (
	publishAllowed  publishVerdict = iota // data is what goes out
	publishRejected                       // the backend rejected it; reason says why
	publishFailed                         // no decision (fail closed)
)

// checkPublish asks the publish hook, if it applies to channel, about a
// message: data is what goes out (the backend's replacement, if any).
func (c *conn) checkPublish(channel string, data json.RawMessage) (out json.RawMessage, verdict publishVerdict, reason string) {
	if !c.route.publishHook.applies(channel) {
		return data, publishAllowed, ""
	}
	return c.route.checkPublish(c.context(), c.channelHookRequest("publish", channel, data))
}

// checkPublish asks the publish hook about the message of req (a
// connection's, or a token holder's on the HTTP publish endpoint).
func (r *route) checkPublish(ctx context.Context, req channelHookRequest) (out json.RawMessage, verdict publishVerdict, reason string) {
	hook, data := r.publishHook, req.Data
	if !hook.applies(req.Channel) {
		return data, publishAllowed, ""
	}
	most := r.maxMessageSize
	ans, err := hook.decide(ctx, req, func(a *hookAnswer) error {
		if len(a.Data) == 0 {
			return nil
		}
		return checkHookData(a.Data, most)
	})
	if err != nil {
		var hf *hookFailure
		errors.As(err, &hf)
		return nil, publishFailed, "message not published: the application did not answer (publish_hook " + hf.outcome + "); retry later"
	}
	if ans.Result == hookDeny {
		reason = truncate(ans.Reason, maxHookReason)
		if reason == "" {
			reason = "the application rejected the message"
		}
		return nil, publishRejected, reason
	}
	if len(ans.Data) > 0 {
		return ans.Data, publishAllowed, ""
	}
	return data, publishAllowed, ""
}

// hookCacheEntries bounds the subscribe hook's decision cache of a route.
// An entry is a key (user id ≤ 256 bytes, channel ≤ 128) and a reason
// (≤ maxHookReason bytes): about 10,000 × 700 bytes, 7 MiB at worst.
const hookCacheEntries = 10000

type hookDecision struct {
	allow   bool
	reason  string
	expires time.Time
}

// hookCache is the subscribe hook's decision cache: per user (or, for
// anonymous connections, per connection) and channel, for ttl.
type hookCache struct {
	ttl time.Duration
	mu  sync.Mutex
	m   map[string]hookDecision
}

func newHookCache(ttl time.Duration) *hookCache {
	if ttl <= 0 {
		return nil
	}
	return &hookCache{ttl: ttl, m: map[string]hookDecision{}}
}

func (hc *hookCache) get(key string, now time.Time) (hookDecision, bool) {
	if hc == nil {
		return hookDecision{}, false
	}
	hc.mu.Lock()
	defer hc.mu.Unlock()
	d, ok := hc.m[key]
	if ok && now.After(d.expires) {
		delete(hc.m, key)
		ok = false
	}
	return d, ok
}

// put stores a decision. A full cache first drops its expired entries,
// then, if still full, arbitrary ones (a tenth of it), so that it never
// passes hookCacheEntries.
func (hc *hookCache) put(key string, d hookDecision, now time.Time) {
	if hc == nil {
		return
	}
	d.expires = now.Add(hc.ttl)
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if _, ok := hc.m[key]; !ok && len(hc.m) >= hookCacheEntries {
		for k, v := range hc.m {
			if now.After(v.expires) {
				delete(hc.m, k)
			}
		}
		for k := range hc.m {
			if len(hc.m) < hookCacheEntries-hookCacheEntries/10 {
				break
			}
			delete(hc.m, k)
		}
	}
	hc.m[key] = d
}

func (hc *hookCache) len() int {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	return len(hc.m)
}
