package caddychat

import (
	"context"
	"errors"
	"time"
)

// errConnClosing: the connection closed while the server subscribed it.
var errConnClosing = errors.New("connection closing")

// What the server API does to a connection (control_ops.go), from the
// node's control worker rather than the connection's own reading side:
// hence the subscription set's lock, and a session that is read atomically.

// session is who a connection is, as the server API matches it.
type session struct {
	user, conn string
	// route is the route's name (its stats are counted under it).
	route      string
	credential credential
}

// credential is what a revocation is matched against: the token's id and
// issue time. A connection without a token (anonymous, or admitted by the
// connect hook alone) counts as issued when it connected.
type credential struct {
	tokenID  string
	issuedAt time.Time
}

// credentialOf is the credential of a connection of id opened at now.
func credentialOf(id *identity, now time.Time) credential {
	if id.token != nil {
		return *id.token
	}
	return credential{issuedAt: now}
}

// session is who the connection is now. The connection's id and route
// never change; its identity does, with a refresh (setSession).
func (c *conn) session() session {
	id := c.sessIdentity.Load()
	return session{user: id.user, conn: c.id, route: c.route.name, credential: credentialOf(id, time.Unix(0, c.opened))}
}

// setSession records who the connection is: at the start and after a
// refresh. A refresh's identity always comes from a token (verify), with a
// credential of its own, so opened stays the issue time of a credential
// without a token.
func (c *conn) setSession() {
	c.sessIdentity.Store(c.identity)
}

// serverSubscribe subscribes c to channel without the ACL or the hooks (the
// server decided), within max_subscriptions, and tells the client.
func (c *conn) serverSubscribe(ctx context.Context, channel string) (bool, error) {
	if c.rawChannel != "" {
		return false, nil // a raw route bridges one channel, its own
	}
	c.subMu.Lock()
	already := c.subscribed.has(channel)
	full := c.subscribed.len() >= c.route.maxSubscriptions
	c.subMu.Unlock()
	if already {
		return true, nil
	}
	if full {
		return false, nil
	}
	if err := c.joinWithin(ctx, channel); err != nil {
		return false, err
	}
	c.sendOwn(serverPush{Type: "subscribed", Channel: channel})
	return true, nil
}

// serverUnsubscribe unsubscribes c from channel and tells the client.
func (c *conn) serverUnsubscribe(channel string) bool {
	if c.rawChannel != "" || !c.isSubscribed(channel) {
		return false
	}
	c.leave(channel)
	c.sendOwn(serverPush{Type: "unsubscribed", Channel: channel})
	return true
}

// serverPush is a frame the server sends of its own accord.
type serverPush struct {
	Type    string `json:"type"`
	Channel string `json:"channel"`
}

// isSubscribed reports whether c is subscribed to channel.
func (c *conn) isSubscribed(channel string) bool {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	return c.subscribed.has(channel)
}

// subscriptions is how many channels c is subscribed to.
func (c *conn) subscriptions() int {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	return c.subscribed.len()
}

// subscribedChannels lists c's channels.
func (c *conn) subscribedChannels() []string {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	return c.subscribed.list()
}

// endSubscriptions lists c's channels for the last time: a server
// subscribe that ends after it undoes itself (join).
func (c *conn) endSubscriptions() []string {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	c.subsEnded = true
	return c.subscribed.list()
}
