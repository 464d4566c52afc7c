package caddychat

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/coder/websocket"
	"go.uber.org/zap"
	"golang.org/x/time/rate"
)

// ServeHTTP upgrades the request to a WebSocket and serves it until it closes.
// Authentication, origin and connection limits are all checked before the
// upgrade, so a refused client gets a plain HTTP status.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	// A token in the URL or in Sec-WebSocket-Protocol would reach Caddy's
	// access log (which redacts only Authorization and Cookie): such requests
	// (upgrades, publishes and plain GETs alike) are logged here instead,
	// without the token. See tokenlog.go.
	if h.carriesLoggableToken(r) {
		caddyhttp.SetVar(r.Context(), caddyhttp.LogSkipVar, true)
		status := http.StatusOK
		defer func() { h.logRedactedUpgrade(r, status) }()
		w = &statusRecorder{ResponseWriter: w, status: &status}
	}
	if h.PublishEndpoint != "" && r.URL.Path == h.PublishEndpoint {
		h.servePublish(w, r)
		return nil
	}
	if !isWebSocketUpgrade(r) {
		h.serveBrowser(w, r)
		return nil
	}

	if _, ok := subprotocolToken(r.Header); ok && !offersAppSubprotocol(r.Header) {
		http.Error(w, "a bearer.<token> subprotocol must come with the "+appSubprotocol+" subprotocol", http.StatusBadRequest)
		return nil
	}
	id, err := h.auth.authenticate(r)
	if err != nil {
		moduleMetrics().authFailures.WithLabelValues(authFailureLabel(err)).Inc()
		h.logger.Debug("authentication failed", zap.String("reason", err.Error()), zap.String("remote", r.RemoteAddr))
		w.Header().Set("WWW-Authenticate", `Bearer realm="chat", error="invalid_token"`)
		http.Error(w, "unauthorized: "+err.Error(), http.StatusUnauthorized)
		return nil
	}

	var rawChannel string
	if h.Protocol == protocolRaw {
		repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
		rawChannel = h.Channel
		if repl != nil {
			rawChannel = repl.ReplaceAll(h.Channel, "")
		}
		if err := validateChannel(rawChannel); err != nil {
			http.Error(w, "bad channel: "+err.Error(), http.StatusBadRequest)
			return nil
		}
		if !id.subscribe.allows(rawChannel) {
			http.Error(w, "forbidden: may not subscribe to "+rawChannel, http.StatusForbidden)
			return nil
		}
	}

	release, err := h.hub.admit(id.user, h.MaxConnections, h.MaxConnectionsPerUser)
	if err != nil {
		status := http.StatusServiceUnavailable
		if err == errTooManyUserConnections {
			status = http.StatusTooManyRequests
		}
		w.Header().Set("Retry-After", "5")
		http.Error(w, err.Error(), status)
		return nil
	}

	cw := &corkingResponseWriter{ResponseWriter: w}
	ws, err := websocket.Accept(cw, r, &h.acceptOptions)
	if err != nil || cw.cork == nil {
		// Accept has answered the request (403 for a foreign origin, 400 for a
		// malformed handshake).
		if err == nil {
			_ = ws.CloseNow()
		}
		release()
		h.logger.Debug("websocket upgrade refused", zap.Error(err))
		return nil
	}
	// From here on w belongs to the WebSocket, and r's context ends with
	// ServeHTTP: the connection runs on contexts of its own, on a goroutine
	// of its own. Returning lets net/http's goroutine end, and with it the
	// stack that Caddy's handler chain grew: an idle connection then costs
	// two small goroutine stacks, not a large one.
	ws.SetReadLimit(h.MaxMessageSize)
	c := newConn(h, ws, rawChannel, id)
	c.cork = cw.cork
	go func() {
		defer release()
		c.serve()
	}()
	return nil
}

// carriesLoggableToken reports whether r has a token where Caddy's access
// log would record it.
func (h *Handler) carriesLoggableToken(r *http.Request) bool {
	if _, ok := subprotocolToken(r.Header); ok {
		return true
	}
	return r.URL.RawQuery != "" && h.queryCarriesToken(r.URL.RawQuery)
}

func (h *Handler) logRedactedUpgrade(r *http.Request, status int) {
	msg := "websocket request (token redacted; left out of the access log)"
	if !isWebSocketUpgrade(r) {
		msg = "http request (token redacted; left out of the access log)"
	}
	h.logger.Info(msg,
		zap.String("remote", r.RemoteAddr), zap.String("host", r.Host),
		zap.String("method", r.Method), zap.String("uri", h.redactTokenQuery(r.URL)),
		zap.String("origin", r.Header.Get("Origin")), zap.Int("status", status))
}

// statusRecorder notes the status written before an upgrade. It passes
// Hijack and Unwrap through, so the WebSocket upgrade still works.
type statusRecorder struct {
	http.ResponseWriter
	status *int
}

func (s *statusRecorder) WriteHeader(code int) {
	*s.status = code
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (s *statusRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(s.ResponseWriter).Hijack()
}

func isWebSocketUpgrade(r *http.Request) bool {
	return headerHasToken(r.Header, "Connection", "upgrade") && headerHasToken(r.Header, "Upgrade", "websocket")
}

func headerHasToken(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// conn is one client connection. The goroutine that runs serve reads frames;
// a second goroutine is its only writer, draining the bounded send queue.
type conn struct {
	id         string
	h          *Handler
	hub        *hub
	ws         *websocket.Conn
	rawChannel string // the bridged channel in raw mode; empty in JSON mode

	// send is the queue of frames for the writer, bounded by send_queue bytes.
	send sendQueue
	// writeTimer bounds each write: it cuts the connection when a write
	// takes longer than write_timeout. One timer per connection, reset per
	// write, instead of a context (and its allocations) per write.
	writeTimer *time.Timer
	ctx        context.Context // ends when the connection starts closing
	cancel     context.CancelFunc
	closeOnce  sync.Once
	closeCode  websocket.StatusCode
	closeWhy   string
	cork       *corkWriter // batches queued frames into one socket write
	// writing is true while a writer goroutine runs. A writer exists only
	// while there is something to write (or a close to perform), so an idle
	// connection costs one goroutine, not two.
	writing atomic.Bool
	// closed is closed by the writer once the close handshake is done.
	closed chan struct{}
	// pingTimer is set once serve starts; the timer's own callback reads it.
	pingTimer atomic.Pointer[time.Timer]
	pinging   atomic.Bool

	// Only touched by the reading goroutine: subscriptions, the identity
	// (replaced by a refresh) and the rate limiter's state.
	subscribed map[string]struct{}
	identity   *identity
	expiry     *time.Timer
	limiter    *rate.Limiter // nil: no rate limit
	// overLimit grows by one per frame refused by the limiter and shrinks by
	// one per frame let through: a client that keeps sending faster than
	// allowed reaches the close threshold, a brief burst does not.
	overLimit int

	// catchingUp counts channels whose history is being read (resume.go);
	// while it is zero, deliveries skip catchMu altogether.
	catchingUp atomic.Int32
	catchMu    sync.Mutex
	catchUps   map[string]*catchUp
	// heldBytes is what the catch-ups hold: it counts against send_queue.
	heldBytes atomic.Int64
}

func newConn(h *Handler, ws *websocket.Conn, rawChannel string, id *identity) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	var limiter *rate.Limiter
	if h.RateLimit.PerSecond > 0 {
		limiter = rate.NewLimiter(rate.Limit(h.RateLimit.PerSecond), h.RateLimit.Burst)
	}
	c := &conn{
		identity:   id,
		limiter:    limiter,
		id:         h.hub.nextConnID(),
		h:          h,
		hub:        h.hub,
		ws:         ws,
		rawChannel: rawChannel,
		ctx:        ctx,
		cancel:     cancel,
		closed:     make(chan struct{}),
		subscribed: make(map[string]struct{}),
	}
	c.writeTimer = time.AfterFunc(time.Hour, c.writeTimedOut)
	c.writeTimer.Stop()
	return c
}

// fail starts closing the connection with code; the first call wins.
func (c *conn) fail(code websocket.StatusCode, why string) {
	c.closeOnce.Do(func() {
		c.closeCode, c.closeWhy = code, why
		c.cancel()
		// The writer performs the close handshake.
		c.kickWriter()
	})
}

// kickWriter starts the writer unless one is running.
func (c *conn) kickWriter() {
	if c.writing.CompareAndSwap(false, true) {
		go c.writeLoop()
	}
}

// enqueue queues f without blocking. A full queue means the client does not
// keep up: it is disconnected so that it never holds anyone else back.
func (c *conn) enqueue(d *delivery) bool {
	if d.own == nil && c.catchingUp.Load() > 0 {
		if held, ok := c.holdForCatchUp(d); held {
			return ok
		}
	}
	if !c.send.push(d, c.h.SendQueue-c.heldBytes.Load()) {
		c.fail(closeSlowConsumer, "send queue full")
		return false
	}
	c.kickWriter()
	return true
}

func (c *conn) serve() {
	// No per-connection logger (With copies the encoder): fields per entry.
	log := c.h.logger
	if err := c.hub.register(c); err != nil {
		_ = c.ws.Close(closeGoingAway, "node shutting down")
		return
	}
	m := moduleMetrics()
	m.connections.Inc()
	m.connectionsOpened.Inc()
	defer func() {
		m.connections.Dec()
		m.connectionsClosed.WithLabelValues(closeReason(c.closeCode)).Inc()
		if c.closeCode == closeSlowConsumer {
			m.slowConsumers.Inc()
		}
	}()
	log.Debug("connection opened", zap.String("conn", c.id), zap.String("user", c.identity.user))
	pingTimer := time.AfterFunc(time.Duration(c.h.PingInterval), c.pingDue)
	c.pingTimer.Store(pingTimer)
	defer pingTimer.Stop()
	c.armExpiry()
	defer func() {
		if c.expiry != nil {
			c.expiry.Stop()
		}
	}()

	if c.rawChannel != "" {
		var err error
		c.offStack(func() { err = c.join(c.rawChannel) })
		if err != nil {
			log.Debug("raw channel subscription failed", zap.String("conn", c.id), zap.String("channel", c.rawChannel), zap.Error(err))
			c.fail(closeTryAgainLater, "broker unavailable")
		}
	} else {
		c.offStack(func() { c.sendOwn(welcome{Type: "welcome", Conn: c.id, Node: c.hub.node, User: c.identity.user}) })
	}
	if c.ctx.Err() == nil {
		c.protect("read", c.readLoop)
	}
	c.fail(closeNormal, "")

	channels := make([]string, 0, len(c.subscribed))
	for ch := range c.subscribed {
		channels = append(channels, ch)
	}
	c.hub.unregister(c, channels)
	<-c.closed
	log.Debug("connection closed", zap.String("conn", c.id), zap.Int("code", int(c.closeCode)), zap.String("reason", c.closeWhy))
}

func (c *conn) readLoop() {
	for {
		// The read is not tied to c.ctx: closing goes through the writer's close
		// handshake, which ends this read once the peer answers or times out.
		typ, frame, err := c.ws.Read(context.Background())
		if err != nil {
			return
		}
		moduleMetrics().received.Inc()
		if typ != websocket.MessageText {
			c.fail(closeUnsupported, "binary frames are not supported")
			return
		}
		if !utf8.Valid(frame) {
			c.fail(closeInvalidPayload, "text frame is not valid UTF-8")
			return
		}
		if !c.withinRateLimit(frame) {
			if c.ctx.Err() != nil {
				return
			}
			continue
		}
		if c.rawChannel != "" {
			published := false
			c.offStack(func() { published = c.publishRaw(frame) })
			if !published {
				return
			}
			continue
		}
		c.offStack(func() { c.handleFrame(frame) })
		if c.ctx.Err() != nil {
			return
		}
	}
}

// offStack runs f on a short-lived goroutine and waits for it. Decoding
// frames and calling the broker take deep stacks; done on the reading
// goroutine, they would grow its stack for good (Go shrinks a stack only
// when most of it is unused), and an idle connection would carry that
// stack while it waits in Read.
func (c *conn) offStack(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.protect("op", f)
	}()
	<-done
}

func (c *conn) brokerContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(c.ctx, time.Duration(c.h.PublishTimeout))
}

func (c *conn) join(channel string) error {
	ctx, cancel := c.brokerContext()
	defer cancel()
	if err := c.hub.subscribe(ctx, c, channel); err != nil {
		return err
	}
	c.subscribed[channel] = struct{}{}
	c.hub.presence.join(c, channel)
	return nil
}

// armExpiry closes the connection when its token expires.
func (c *conn) armExpiry() {
	if c.expiry != nil {
		c.expiry.Stop()
		c.expiry = nil
	}
	if c.identity.expires.IsZero() {
		return
	}
	// The leeway that let the token in also keeps it valid that much longer.
	deadline := c.identity.expires.Add(time.Duration(c.h.JWT.Leeway))
	c.expiry = time.AfterFunc(time.Until(deadline), func() {
		defer c.recoverPanic("expiry")
		c.fail(closeTokenExpired, "token expired")
	})
}

// withinRateLimit applies the connection's token bucket to one frame. A
// refused frame gets a rate_limited reply (JSON) or is dropped (raw); a
// client that keeps going is closed.
func (c *conn) withinRateLimit(frame []byte) bool {
	if c.limiter == nil {
		return true
	}
	if c.limiter.Allow() {
		if c.overLimit > 0 {
			c.overLimit--
		}
		return true
	}
	c.overLimit++
	if c.overLimit > 2*c.h.RateLimit.Burst {
		c.fail(closeRateLimited, "rate limit exceeded")
		return false
	}
	if c.rawChannel == "" {
		f, _ := decodeClientFrame(frame)
		c.replyError(f.ID, errRateLimited, fmt.Sprintf("more than %g frames per second; slow down", c.h.RateLimit.PerSecond))
	}
	return false
}

func (c *conn) publishRaw(frame []byte) bool {
	if !c.identity.publish.allows(c.rawChannel) {
		c.fail(closePolicyViolation, "may not publish on "+c.rawChannel)
		return false
	}
	ctx, cancel := c.brokerContext()
	defer cancel()
	if _, err := c.h.publish(ctx, c.publisher(), Publication{Channel: c.rawChannel, From: c.identity.user, Origin: originOf(c.identity), Raw: frame}); err != nil {
		if errors.Is(err, errNewHistoryLimited) {
			c.fail(closeRateLimited, "creating history channels too fast")
			return false
		}
		c.h.logger.Debug("raw publish failed", zap.String("conn", c.id), zap.Error(err))
		c.fail(closeTryAgainLater, "broker unavailable")
		return false
	}
	return true
}

// handleFrame answers one JSON-protocol frame. Every error here is the
// client's alone and leaves the connection open.
func (c *conn) handleFrame(frame []byte) {
	f, err := decodeClientFrame(frame)
	if err != nil {
		c.replyError(f.ID, errBadRequest, err.Error())
		return
	}
	runTestHookOp(f.Op, f.Channel)
	switch f.Op {
	case "subscribe", "unsubscribe", "publish", "history", "presence":
	case "refresh":
		c.refresh(f)
		return
	case "":
		c.replyError(f.ID, errBadRequest, `missing "op"`)
		return
	default:
		c.replyError(f.ID, errBadRequest, fmt.Sprintf("unknown op %q", truncate(f.Op, 32)))
		return
	}
	if err := validateChannel(f.Channel); err != nil {
		c.replyError(f.ID, errBadRequest, err.Error())
		return
	}

	switch f.Op {
	case "subscribe":
		if !c.identity.subscribe.allows(f.Channel) {
			c.replyError(f.ID, errForbidden, "may not subscribe to "+f.Channel)
			return
		}
		if _, ok := c.subscribed[f.Channel]; !ok && len(c.subscribed) >= c.h.MaxSubscriptions {
			c.replyError(f.ID, errLimitExceeded, fmt.Sprintf("at most %d subscriptions per connection", c.h.MaxSubscriptions))
			return
		}
		if f.Since != "" || f.History != 0 {
			c.subscribeWithHistory(f)
			return
		}
		if err := c.join(f.Channel); err != nil {
			c.replyUnavailableSubscribe(f, err)
			return
		}
		c.sendOwn(reply{Type: "ok", ID: f.ID, Channel: f.Channel})
	case "unsubscribe":
		c.leave(f.Channel)
		c.sendOwn(reply{Type: "ok", ID: f.ID, Channel: f.Channel})
	case "history":
		c.historyQuery(f)
	case "publish":
		if len(f.Data) == 0 {
			c.replyError(f.ID, errBadRequest, `publish needs "data"`)
			return
		}
		if !c.identity.publish.allows(f.Channel) {
			c.replyError(f.ID, errForbidden, "may not publish on "+f.Channel)
			return
		}
		ctx, cancel := c.brokerContext()
		id, err := c.h.publish(ctx, c.publisher(), Publication{Channel: f.Channel, From: c.identity.user, Origin: originOf(c.identity), Data: f.Data})
		cancel()
		if errors.Is(err, errNewHistoryLimited) {
			c.replyError(f.ID, errLimitExceeded, c.h.newChannelsRefusal(f.Channel))
			return
		}
		if err != nil {
			c.h.logger.Debug("publish failed", zap.String("conn", c.id), zap.String("channel", f.Channel), zap.Error(err))
			c.replyError(f.ID, errUnavailable, "message not published: the broker did not accept it within publish_timeout (down or overloaded); retry later")
			return
		}
		c.sendOwn(reply{Type: "ok", ID: f.ID, Channel: f.Channel, MessageID: id})
	case "presence":
		c.queryPresence(f)
	}
}

// refresh replaces the connection's token before it expires. The new token
// must be valid and name the same user; its permissions apply from now on
// (subscriptions it no longer allows are dropped).
func (c *conn) refresh(f clientFrame) {
	if c.h.JWT == nil {
		c.replyError(f.ID, errBadRequest, "this route does not use tokens")
		return
	}
	if f.Token == "" {
		c.replyError(f.ID, errBadRequest, `refresh needs "token"`)
		return
	}
	id, err := c.h.auth.verify(f.Token)
	if err != nil {
		c.replyError(f.ID, errUnauthorized, err.Error())
		return
	}
	if !c.identity.anonymous && id.user != c.identity.user {
		c.replyError(f.ID, errForbidden, "the new token is for another user")
		return
	}
	if c.identity.anonymous {
		c.replyError(f.ID, errForbidden, "an anonymous connection cannot become a user; reconnect with the token")
		return
	}
	c.identity = id
	c.armExpiry()
	for ch := range c.subscribed {
		if !id.subscribe.allows(ch) {
			c.leave(ch) // ends a catch-up on ch too
		}
	}
	c.sendOwn(reply{Type: "ok", ID: f.ID})
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

func (c *conn) replyError(id json.RawMessage, code, message string) {
	c.sendOwn(reply{Type: "error", ID: id, Code: code, Message: message})
}

func (c *conn) sendOwn(v any) {
	if d, err := c.encodeOwn(v); err == nil {
		c.enqueue(d)
	}
}

// encodeOwn encodes a reply for this connection alone; a reply that cannot
// be encoded is a bug, and closes the connection with 1011.
func (c *conn) encodeOwn(v any) (*delivery, error) {
	b, err := json.Marshal(v)
	if err != nil {
		c.h.logger.Error("encoding reply", zap.Error(err))
		c.fail(closeInternal, "internal error")
		return nil, err
	}
	return &delivery{own: b}, nil
}

// leave unsubscribes the connection from channel.
func (c *conn) leave(channel string) {
	if _, ok := c.subscribed[channel]; ok {
		delete(c.subscribed, channel)
		c.hub.unsubscribe(c, channel)
	}
	// Only now: until the hub stopped delivering, a catch-up must keep
	// holding the channel's messages, or they would go out unordered.
	c.cancelCatchUp(channel)
}

// writeLoop is the connection's only writer while it runs: it drains the
// send queue and ends when the queue is empty. Once the connection starts
// closing it performs the close handshake instead, and stays the writer.
func (c *conn) writeLoop() {
	defer c.recoverWriter()
	for {
		// Closing wins over queued frames.
		if c.ctx.Err() != nil {
			c.closeHandshake()
			return
		}
		if d := c.send.pop(); d != nil {
			if err := c.writeBatch(d); err != nil {
				if errors.Is(err, net.ErrClosed) {
					// A close frame is already out: the WebSocket library sent
					// one itself (1009 for an oversized frame, 1002) or answered
					// the peer's. The read fails too and ends c.ctx; then finish
					// the close handshake, since closing the socket now could
					// reset it before the peer has read that close frame.
					<-c.ctx.Done()
					c.closeHandshake()
					return
				}
				c.fail(closeInternal, "write failed")
				_ = c.ws.CloseNow()
				c.closeHandshake()
				return
			}
			continue
		}
		// Queue empty: stop, unless a frame or a close slipped in between the
		// check and giving up the writer role (its enqueue or fail saw
		// writing == true and started no writer).
		c.writing.Store(false)
		if c.send.len() == 0 && c.ctx.Err() == nil {
			return
		}
		if !c.writing.CompareAndSwap(false, true) {
			return
		}
	}
}

// closeHandshake closes the WebSocket with the connection's close code. Only
// the writer calls it, once: the writing flag stays set, so no other writer
// starts after it.
func (c *conn) closeHandshake() {
	c.writeTimer.Stop()
	_ = c.ws.Close(c.closeCode, c.closeWhy)
	close(c.closed)
}

// maxBatch bounds the frames sent with one socket write.
const maxBatch = 64

// writeBatch writes d and whatever else is queued (up to maxBatch frames)
// with the socket corked, then sends them with one write.
func (c *conn) writeBatch(d *delivery) error {
	// context.Background in the writes, not c.ctx: a write cut short by
	// closing would tear the connection down before the close frame could be
	// sent. The timer bounds the whole batch instead: corked writes can
	// still wait for the library's lock behind a pong on a full socket.
	c.writeTimer.Reset(time.Duration(c.h.WriteTimeout))
	defer c.writeTimer.Stop()
	c.cork.cork()
	err := c.write(d)
	for n := 1; err == nil && n < maxBatch; n++ {
		next := c.send.pop()
		if next == nil {
			break
		}
		err = c.write(next)
	}
	if uncorkErr := c.cork.uncork(); err == nil {
		err = uncorkErr
	}
	return err
}

func (c *conn) write(d *delivery) error {
	frame := d.own
	if frame == nil {
		if c.rawChannel != "" {
			frame = d.rawForm()
		} else {
			frame = d.jsonForm()
		}
	}
	return c.cork.writeText(frame)
}

// writeTimedOut runs when a write took longer than write_timeout: the peer
// is not reading, so the connection is cut without a close handshake.
func (c *conn) writeTimedOut() {
	defer c.recoverPanic("write timer")
	c.fail(closeSlowConsumer, "write timed out")
	_ = c.ws.CloseNow()
}

// pingDue runs every ping_interval on a timer (no goroutine waits for it)
// and starts a ping unless one is in flight.
func (c *conn) pingDue() {
	defer c.recoverPanic("ping timer")
	if c.ctx.Err() != nil {
		return
	}
	if c.pinging.CompareAndSwap(false, true) {
		go c.ping()
	}
	if t := c.pingTimer.Load(); t != nil {
		t.Reset(time.Duration(c.h.PingInterval))
	}
}

// ping runs outside the writer so that waiting for the pong never delays
// deliveries; at most one ping per connection is in flight.
func (c *conn) ping() {
	defer c.pinging.Store(false)
	defer c.recoverPanic("ping")
	ctx, cancel := context.WithTimeout(c.ctx, time.Duration(c.h.PingInterval))
	defer cancel()
	if err := c.ws.Ping(ctx); err != nil && c.ctx.Err() == nil {
		c.fail(closePingTimeout, "ping timeout")
	}
}
