package caddychat

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// The server API's reach into every node of a chat (api.go asks, this file
// carries, control_ops.go acts). A request goes out on the broker's control
// channel to every node, each node acts on its own connections and answers
// on the asking node's reply channel; the asker waits for as many answers
// as the broker says nodes got the request. The channels' names start with
// '#', which no client's channel may hold (protocol.go), so a client can
// neither subscribe to them nor publish on them.

const (
	controlChannel     = "#control"
	replyChannelPrefix = "#reply:"

	// controlQueue bounds the requests waiting for a node's control
	// worker; more are dropped (and logged): the API's callers are
	// operators and backends, and a flood of them must not hold memory.
	controlQueue = 256
	// maxReplies bounds the answers one call collects (one per node).
	maxReplies = 1024
	// maxControlMessage bounds a control message a node decodes, in bytes.
	maxControlMessage = 4 << 20
)

// controlRequest is one server API request to every node.
type controlRequest struct {
	ID   string `json:"id"`
	From string `json:"from"` // the asking node, whose reply channel gets the answers
	Op   string `json:"op"`

	User    string `json:"user,omitempty"`
	Conn    string `json:"conn,omitempty"`
	Channel string `json:"channel,omitempty"`
	// Code and Reason close a disconnected connection.
	Code   int    `json:"code,omitempty"`
	Reason string `json:"reason,omitempty"`
	// Revocation is what a revoke adds (revoke.go).
	Revocation *revocation `json:"revocation,omitempty"`
	// Pattern and Limit select the channels a channels request lists.
	Pattern string `json:"pattern,omitempty"`
	Limit   int    `json:"limit,omitempty"`
	// Session and Frame: a frame POSTed for an SSE stream held by another
	// node (sse_session.go).
	Session string          `json:"session,omitempty"`
	Frame   json.RawMessage `json:"frame,omitempty"`
}

// controlReply is one node's answer.
type controlReply struct {
	ID   string `json:"id"`
	Node string `json:"node"`
	// Count is the connections the request acted on.
	Count int `json:"count"`
	// Refused counts connections a subscribe left out (max_subscriptions,
	// raw routes, a broker that did not answer).
	Refused   int            `json:"refused,omitempty"`
	Channels  []channelCount `json:"channels,omitempty"`
	Truncated bool           `json:"truncated,omitempty"`
}

// channelCount is a channel with its local subscribers.
type channelCount struct {
	Channel     string `json:"channel"`
	Subscribers int    `json:"subscribers"`
}

// control is a hub's end of the control channel.
type control struct {
	hub   *hub
	queue chan controlRequest
	seq   atomic.Uint64
	// subscribed is closed once the node receives the control channel.
	subscribed chan struct{}
	stop       chan struct{}
	done       sync.WaitGroup

	mu      sync.Mutex
	pending map[string]*pendingCall

	// drops counts requests dropped since the last warning, and
	// lastDropWarning (Unix ns) is when it was given: a flood makes one
	// warning per dropWarningEvery, not one per request.
	drops           atomic.Int64
	lastDropWarning atomic.Int64
}

const dropWarningEvery = 10 * time.Second

// dropped notes a request the full queue refused.
func (c *control) dropped(req controlRequest) {
	n := c.drops.Add(1)
	last := c.lastDropWarning.Load()
	now := time.Now().UnixNano()
	if now-last < int64(dropWarningEvery) || !c.lastDropWarning.CompareAndSwap(last, now) {
		return
	}
	c.drops.Add(-n)
	c.hub.log.Warn("control requests arrive faster than this node acts on them; dropped",
		zap.Int64("dropped", n), zap.String("op", req.Op), zap.String("from", truncate(req.From, 64)))
}

// pendingCall collects the answers to one request.
type pendingCall struct {
	replies []controlReply
	arrived chan struct{} // 1-buffered: a reply came
}

func newControl(h *hub) *control {
	return &control{
		hub:        h,
		queue:      make(chan controlRequest, controlQueue),
		subscribed: make(chan struct{}),
		stop:       make(chan struct{}),
		pending:    make(map[string]*pendingCall),
	}
}

// start subscribes the node to its control channels, at once when the broker
// answers within timeout, else in the background until it does, and runs
// the worker and then (after the subscription: a revocation made in between
// is in what it reads) ready, once.
func (c *control) start(timeout time.Duration, ready func(context.Context)) {
	subscribe := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		if err := c.hub.broker.Subscribe(ctx, controlChannel); err != nil {
			return err
		}
		return c.hub.broker.Subscribe(ctx, replyChannelPrefix+c.hub.node)
	}
	c.done.Add(1)
	go func() {
		defer c.done.Done()
		c.work()
	}()
	subscribed := func() {
		close(c.subscribed)
		if ready != nil {
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			ready(ctx)
			cancel()
		}
	}
	if subscribe() == nil {
		subscribed()
		return
	}
	c.done.Add(1)
	go func() {
		defer c.done.Done()
		for {
			select {
			case <-c.stop:
				return
			case <-time.After(time.Second):
			}
			if err := subscribe(); err != nil {
				c.hub.log.Debug("subscribing the control channel", zap.Error(err))
				continue
			}
			subscribed()
			return
		}
	}()
}

// close stops the worker; requests still queued are dropped.
func (c *control) close() {
	close(c.stop)
	c.done.Wait()
}

// receive takes a message of a control channel from the broker: a request
// for the worker, or an answer for a waiting call. It never blocks.
func (c *control) receive(channel string, payload []byte) {
	if len(payload) > maxControlMessage {
		c.hub.log.Warn("control message too large; dropped", zap.String("channel", channel), zap.Int("bytes", len(payload)))
		return
	}
	if channel == controlChannel {
		var req controlRequest
		if err := json.Unmarshal(payload, &req); err != nil || req.ID == "" || req.From == "" {
			c.hub.log.Warn("malformed control request; dropped", zap.Error(err))
			return
		}
		select {
		case c.queue <- req:
		default:
			c.dropped(req)
		}
		return
	}
	var rep controlReply
	if err := json.Unmarshal(payload, &rep); err != nil {
		c.hub.log.Warn("malformed control reply; dropped", zap.Error(err))
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.pending[rep.ID]
	if p == nil || len(p.replies) >= maxReplies {
		return // a late answer to a call that gave up
	}
	p.replies = append(p.replies, rep)
	select {
	case p.arrived <- struct{}{}:
	default:
	}
}

// call sends req to every node and collects their answers until each node
// that got it has answered or ctx ends. nodes is how many got it.
func (c *control) call(ctx context.Context, req controlRequest) (replies []controlReply, nodes int, err error) {
	select {
	case <-c.subscribed:
	default:
		return nil, 0, fmt.Errorf("this node is not yet subscribed to the control channel (broker unreachable)")
	}
	req.ID = fmt.Sprintf("%s-%d", c.hub.node, c.seq.Add(1))
	req.From = c.hub.node
	payload, err := json.Marshal(req)
	if err != nil {
		return nil, 0, fmt.Errorf("encoding control request: %w", err)
	}
	p := &pendingCall{arrived: make(chan struct{}, 1)}
	c.mu.Lock()
	c.pending[req.ID] = p
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, req.ID)
		c.mu.Unlock()
	}()
	n, err := c.hub.broker.signal(ctx, controlChannel, payload)
	if err != nil {
		return nil, 0, err
	}
	for {
		c.mu.Lock()
		got := len(p.replies)
		c.mu.Unlock()
		if got >= int(n) {
			break
		}
		select {
		case <-p.arrived:
		case <-ctx.Done():
			c.mu.Lock()
			replies = append([]controlReply(nil), p.replies...)
			c.mu.Unlock()
			return replies, int(n), nil
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]controlReply(nil), p.replies...), int(n), nil
}

// work acts on the node's control requests, one at a time.
func (c *control) work() {
	for {
		select {
		case <-c.stop:
			return
		case req := <-c.queue:
			c.answer(req)
		}
	}
}

// answer acts on req and sends this node's answer to the asking node.
func (c *control) answer(req controlRequest) {
	defer func() {
		if v := recover(); v != nil {
			moduleMetrics().panics.Inc()
			c.hub.log.Error("panic acting on a control request", zap.String("op", req.Op), zap.Any("panic", v), zap.Stack("stack"))
		}
	}()
	rep := c.hub.act(req)
	rep.ID, rep.Node = req.ID, c.hub.node
	payload, err := json.Marshal(rep)
	if err != nil {
		c.hub.log.Error("encoding control reply", zap.Error(err))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.hub.brokerTimeout)
	defer cancel()
	if _, err := c.hub.broker.signal(ctx, replyChannelPrefix+req.From, payload); err != nil {
		c.hub.log.Debug("answering a control request", zap.String("op", req.Op), zap.Error(err))
	}
}

// startControl starts the hub's end of the control channel and, once it
// receives it, reads the revocations (so that none made meanwhile is
// missed) and, with Redis, keeps reading them and reports the node's stats.
func (h *hub) startControl() {
	h.control.start(h.brokerTimeout, func(ctx context.Context) {
		if err := h.revocations.load(ctx); err != nil {
			h.log.Warn("reading the revoked tokens; retrying every 30s", zap.Error(err))
		}
		if h.redis == nil {
			return
		}
		h.control.spawn(func(stop <-chan struct{}) { h.revocations.keepLoading(stop, h.brokerTimeout) })
		h.control.spawn(h.reportStats)
	})
}

// spawn runs f until the control stops.
func (c *control) spawn(f func(stop <-chan struct{})) {
	c.done.Add(1)
	go func() {
		defer c.done.Done()
		f(c.stop)
	}()
}

// addRoute and removeRoute keep the routes the admin API acts for.
func (h *hub) addRoute(r *route) {
	h.routesMu.Lock()
	defer h.routesMu.Unlock()
	h.routes = append(h.routes, r)
}

func (h *hub) removeRoute(r *route) {
	h.routesMu.Lock()
	defer h.routesMu.Unlock()
	h.routes = slices.DeleteFunc(h.routes, func(x *route) bool { return x == r })
}

// liveRoutes are the routes using the hub, in the order they were provisioned.
func (h *hub) liveRoutes() []*route {
	h.routesMu.Lock()
	defer h.routesMu.Unlock()
	return slices.Clone(h.routes)
}
