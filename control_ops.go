package caddychat

import (
	"context"
	"slices"
	"strings"

	"github.com/coder/websocket"
)

// What a node does on a control request (control.go): to its own
// connections, which it alone can touch.

// managed is what the server API can do to a local connection
// (conn_server.go).
type managed interface {
	subscriber
	// session is who the connection is, read from any goroutine.
	session() session
	// serverSubscribe subscribes the connection to channel on the server's
	// behalf; ok false: it may not have more (or is raw, or closing).
	serverSubscribe(ctx context.Context, channel string) (ok bool, err error)
	// serverUnsubscribe unsubscribes it; false when it was not subscribed.
	serverUnsubscribe(channel string) bool
	// subscriptions is how many channels it is subscribed to.
	subscriptions() int
}

// closeDisconnected and closeRevoked close the connections the server API
// disconnects and those whose token it revoked.
const (
	closeDisconnected websocket.StatusCode = 4005
	closeRevoked      websocket.StatusCode = 4006
)

// act runs req on this node's connections.
func (h *hub) act(req controlRequest) controlReply {
	var rep controlReply
	switch req.Op {
	case "disconnect":
		for _, m := range h.managedWhere(func(s session) bool {
			return (req.User != "" && s.user == req.User) || (req.Conn != "" && s.conn == req.Conn)
		}) {
			m.fail(websocket.StatusCode(req.Code), req.Reason)
			rep.Count++
		}
	case "unsubscribe":
		for _, m := range h.managedWhere(func(s session) bool { return s.user == req.User }) {
			if m.serverUnsubscribe(req.Channel) {
				rep.Count++
			}
		}
	case "subscribe":
		for _, m := range h.managedWhere(func(s session) bool { return s.user == req.User }) {
			ctx, cancel := context.WithTimeout(context.Background(), h.brokerTimeout)
			ok, err := m.serverSubscribe(ctx, req.Channel)
			cancel()
			if ok && err == nil {
				rep.Count++
			} else {
				rep.Refused++
			}
		}
	case "revoke":
		if req.Revocation == nil {
			break
		}
		rv := *req.Revocation
		h.revocations.add(rv)
		for _, m := range h.managedWhere(func(s session) bool { return rv.covers(s.user, s.credential) }) {
			m.fail(closeRevoked, "token revoked")
			rep.Count++
		}
	case "sse_frame":
		rep.Count, rep.Refused = h.streams.feedCounts(h.node, req.Session, req.Frame)
	case "channels":
		rep.Channels, rep.Truncated = h.localChannels(req.Pattern, req.Limit)
	default:
		h.log.Warn("unknown control request; ignored (a node of another version?)")
	}
	return rep
}

// managedWhere are the local connections whose session matches.
func (h *hub) managedWhere(match func(session) bool) []managed {
	h.mu.RLock()
	defer h.mu.RUnlock()
	var out []managed
	for s := range h.subscribers {
		if m, ok := s.(managed); ok && match(m.session()) {
			out = append(out, m)
		}
	}
	return out
}

// localChannels lists the node's channels matching pattern (the ACL
// syntax, acl.go) with their local subscribers, sorted, at most limit;
// truncated when more matched.
func (h *hub) localChannels(pattern string, limit int) (out []channelCount, truncated bool) {
	acl := compileACL([]string{pattern}, "")
	h.mu.RLock()
	for name, cs := range h.channels {
		if cs.members.len() == 0 || !acl.allows(name) {
			continue
		}
		out = append(out, channelCount{Channel: name, Subscribers: cs.members.len()})
	}
	h.mu.RUnlock()
	slices.SortFunc(out, func(a, b channelCount) int { return strings.Compare(a.Channel, b.Channel) })
	if len(out) > limit {
		return out[:limit], true
	}
	return out, false
}
