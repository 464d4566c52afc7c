package caddychat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
	"go.uber.org/zap"
	"golang.org/x/time/rate"
)

// conn is one client connection. The goroutine that runs serve reads frames;
// a second goroutine is its only writer, draining the bounded send queue.
type conn struct {
	id         string
	route      *route
	hub        *hub
	tr         transport // the WebSocket or SSE stream (transport.go)
	rawChannel string    // the bridged channel in raw mode; empty in JSON mode
	path       string    // the upgrade request's path: hook requests and webhook events name it

	// send is the queue of frames for the writer, bounded by send_queue bytes.
	send sendQueue
	// timer bounds each write by write_timeout, pings every ping_interval
	// and ends the connection when its token expires (conntimer.go): one
	// runtime timer for the three, instead of a context (and its
	// allocations) per write.
	timer connTimer
	// ctx is made on first use (context), and ends once closing is set
	// (fail): for a hook call, a publish pipeline, a writer waiting for the
	// read to end. An idle connection holds none: a cancelable context and
	// its cancel function per connection would be two more allocations
	// each. One pointer, not the context and its cancel function: 16 bytes
	// less keep conn within its size class (conn_mem_test.go).
	ctx *cancelableContext
	// ops are the cancels of the broker calls under way (brokerContext), a
	// list through the ops themselves: no slice for the connection to keep.
	// opMu also guards ctx, closed, handshakeDone and the timer's arming.
	ops *brokerOp
	// closeWith is the code and reason the connection closes with, made by
	// the first fail: an open connection keeps no room for them.
	closeWith *closeStatus
	// handshakeDone is set by the writer once the close handshake is done
	// (closeDone); closed, made only when finish has to wait for that, is
	// closed then. An idle connection holds no channel for it.
	closed chan struct{}

	// The small fields side by side, so that no padding is spent on them.
	opMu      sync.Mutex
	closeOnce sync.Once
	// closing is set when the connection starts closing (fail).
	closing atomic.Bool
	// writing is true while a writer goroutine runs. A writer exists only
	// while there is something to write (or a close to perform), so an idle
	// connection costs one goroutine, not two.
	writing atomic.Bool
	pinging atomic.Bool
	// catchingUp counts channels whose history is being read (resume.go);
	// while it is zero, deliveries skip catchMu altogether.
	catchingUp atomic.Int32
	// subMu guards subscribed and subsEnded, catchMu catchUps.
	subMu   sync.Mutex
	catchMu sync.Mutex
	// admitted: the connection holds a slot of the hub (hub.admit, a
	// WebSocket's), given back once it has ended. The slot is its user's,
	// identity.user, which a refresh cannot change (opRefresh).
	admitted      bool
	handshakeDone bool
	subsEnded     bool
	// pipeline holds the connection's publishes waiting for Redis, made
	// with the first (pipeline.go); only the reading goroutine sets it.
	pipeline chan pendingPublish
	// owed counts, per channel, the messages the connection missed (late)
	// and has not been told of yet; the writer's alone, nil when none (late.go).
	owed map[string]int

	// subscribed are the connection's channels. The reading goroutine and
	// the server API (conn_server.go) change them, under subMu; subsEnded
	// is set when the closing connection lists them for the last time.
	subscribed channelSet
	// sessIdentity is the identity the server API sees (conn_server.go):
	// the reading goroutine's, published atomically. opened is when the
	// connection opened (Unix nanoseconds), the issue time of a credential
	// without a token. No session value is kept: built on demand, it is not
	// one more allocation held by every idle connection.
	sessIdentity atomic.Pointer[identity]
	opened       int64

	// Only touched by the reading goroutine: the identity (replaced by a
	// refresh) and the rate limiter's state.
	identity *identity
	limiter  *rate.Limiter // nil: no rate limit
	// overLimit grows by one per frame refused by the limiter and shrinks by
	// one per frame let through: a client that keeps sending faster than
	// allowed reaches the close threshold, a brief burst does not.
	overLimit int
	// ephemeralLimiter bounds ephemeral publishes (ephemeral.go); nil
	// until the first one.
	ephemeralLimiter *rate.Limiter

	catchUps map[string]*catchUp
	// heldBytes is what the catch-ups hold: it counts against send_queue.
	heldBytes atomic.Int64
}

// newConn makes the connection of a request on urlPath, which it keeps
// as the route's shared copy (route.connPath), not the request's.
func newConn(rt *route, tr transport, urlPath, rawChannel string, id *identity) *conn {
	var limiter *rate.Limiter
	if rt.rate > 0 {
		limiter = rate.NewLimiter(rate.Limit(rt.rate), rt.rateBurst)
	}
	c := &conn{
		identity:   id,
		limiter:    limiter,
		id:         rt.hub.nextConnID(),
		route:      rt,
		hub:        rt.hub,
		tr:         tr,
		rawChannel: rawChannel,
		path:       rt.connPath(urlPath),
	}
	c.opened = time.Now().UnixNano()
	c.setSession()
	return c
}

// fail starts closing the connection with code; the first call wins.
func (c *conn) fail(code websocket.StatusCode, why string) {
	c.closeOnce.Do(func() {
		c.closeWith = &closeStatus{code, why}
		c.closing.Store(true)
		c.cancelOps()
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
	if !c.send.push(d, c.route.sendQueue-c.heldBytes.Load()) {
		c.fail(closeSlowConsumer, "send queue full")
		return false
	}
	c.kickWriter()
	return true
}

// queuedBytes is what waits to be sent: the queue and what catch-ups hold.
func (c *conn) queuedBytes() int64 {
	return c.send.queuedBytes() + c.heldBytes.Load()
}

// wantsPresence reports whether c gets join and leave events: JSON clients
// on routes with presence on. Raw clients get message text only.
func (c *conn) wantsPresence() bool {
	return c.rawChannel == "" && c.route.presence
}

// presenceInfo lists c under its user on a route with presence on.
func (c *conn) presenceInfo() (presenceInfo, bool) {
	if !c.route.presence {
		return presenceInfo{}, false
	}
	return presenceInfo{user: c.identity.presenceKey(), conn: c.id, info: c.identity.info, ttl: c.route.presenceTTL, timeout: c.route.publishTimeout}, true
}

var _ subscriber = (*conn)(nil)

// recordEvent records a webhook event of the connection: the route's
// webhooks that take kind get it.
func (c *conn) recordEvent(kind, channel string) {
	if c.route.webhooks.wants(kind) {
		c.route.webhooks.record(webhookEvent{Type: kind, Route: c.path, User: c.identity.user, Conn: c.id, Channel: channel})
	}
}

// serve sets the connection up and reads its frames. A WebSocket that can
// wait on its socket reads on goroutines of its own (readIdle) and serve
// returns at once; otherwise serve returns when the connection has ended.
func (c *conn) serve() {
	if !c.open() {
		return
	}
	if !c.closing.Load() {
		if w, ok := c.tr.(frameWaiter); ok && w.canWait() {
			go c.readIdle(w)
			return
		}
		c.protect("read", c.readLoop)
	}
	c.finish()
}

// open registers the connection, welcomes it and subscribes what its request
// named; false when the hub refused it.
func (c *conn) open() bool {
	if err := c.hub.register(c); err != nil {
		c.tr.close(closeGoingAway, "node shutting down")
		c.releaseSlot()
		return false
	}
	m := moduleMetrics()
	m.connections.Inc()
	m.connectionsOpened.Inc()
	// No per-connection logger (With copies the encoder): fields per entry.
	log := c.route.log
	log.Debug("connection opened", zap.String("conn", c.id), zap.String("user", c.identity.user))
	c.recordEvent("connect", "")
	c.startPings()
	c.armExpiry()

	if c.rawChannel != "" {
		var err error
		c.offStack(func() { err = c.join(c.rawChannel) })
		if err != nil {
			log.Debug("raw channel subscription failed", zap.String("conn", c.id), zap.String("channel", c.rawChannel), zap.Error(err))
			c.fail(closeTryAgainLater, "broker unavailable")
		}
	} else {
		c.offStack(func() {
			w := welcome{Type: "welcome", Conn: c.id, Node: c.hub.node, User: c.identity.user, Guest: c.identity.guest, Name: c.identity.name, Info: c.identity.info}
			if t := c.stream(); t != nil && t.streamSession != "" {
				w.Transport, w.Session = c.tr.name(), t.streamSession
			}
			c.sendOwn(w)
			c.joinInitial()
			c.joinStream()
		})
	}
	return true
}

// finish ends an open connection once its reading has ended: it leaves the
// hub and waits for the writer's close handshake.
func (c *conn) finish() {
	c.fail(closeNormal, "")
	c.hub.unregister(c, c.endSubscriptions())
	c.recordEvent("disconnect", "")
	c.awaitCloseDone()
	code, why := c.closeCode()
	c.route.log.Debug("connection closed", zap.String("conn", c.id), zap.Int("code", int(code)), zap.String("reason", why))
	c.stopTimer()
	m := moduleMetrics()
	m.connections.Dec()
	m.connectionsClosed.WithLabelValues(closeReason(code)).Inc()
	if code == closeSlowConsumer {
		m.slowConsumers.Inc()
	}
	c.releaseSlot()
}

// releaseSlot gives back the connection's slot of the hub, if it holds one;
// it runs once, when the connection has ended.
func (c *conn) releaseSlot() {
	if c.admitted {
		c.hub.release(c.identity.user)
	}
}

// frameWaiter is a transport that can wait for the client's next frame on
// a small stack (idleread.go).
type frameWaiter interface {
	canWait() bool
	// awaitFrame returns once a frame waits to be read, or reading fails.
	awaitFrame()
}

// readIdle waits for the client's next frame, reads it, and hands the wait
// on to a new goroutine: the library's read path grows a goroutine's stack
// for good, so an idle connection holds only the small stack of a waiting
// goroutine that has read nothing yet.
func (c *conn) readIdle(w frameWaiter) {
	more := false
	c.protect("read", func() {
		w.awaitFrame()
		more = c.readFrame()
	})
	if more && !c.closing.Load() {
		go c.readIdle(w)
		return
	}
	c.finish()
}

func (c *conn) readLoop() {
	for c.readFrame() {
	}
}

// readFrame reads and handles one frame of the client; false when reading
// has ended.
func (c *conn) readFrame() bool {
	frame, text, err := c.tr.read()
	if err != nil {
		return false
	}
	moduleMetrics().received.Inc()
	if !text {
		c.fail(closeUnsupported, "binary frames are not supported")
		return false
	}
	if !utf8.Valid(frame) {
		c.fail(closeInvalidPayload, "text frame is not valid UTF-8")
		return false
	}
	if !c.withinRateLimit(frame) {
		return !c.closing.Load()
	}
	if c.rawChannel != "" {
		published := false
		c.offStack(func() { published = c.publishRaw(frame) })
		return published
	}
	c.offStack(func() { c.handleFrame(frame) })
	return !c.closing.Load()
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

// cancelableContext is a context with its cancel function.
type cancelableContext struct {
	context.Context
	cancel context.CancelFunc
}

// context is ctx, made on first use: it ends when the connection starts
// closing.
func (c *conn) context() context.Context {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	if c.ctx == nil {
		ctx, cancel := context.WithCancel(context.Background())
		c.ctx = &cancelableContext{Context: ctx, cancel: cancel}
		if c.closing.Load() {
			cancel()
		}
	}
	return c.ctx.Context
}

// brokerContext bounds a broker call by publish_timeout, and ends it when
// the connection starts closing. It is not derived from c.ctx: a derived
// context leaves c.ctx a map of children and a done channel for the rest of
// the connection's life, and an idle connection would keep them.
func (c *conn) brokerContext() (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), c.route.publishTimeout)
	op := &brokerOp{cancel: cancel}
	c.opMu.Lock()
	if c.closing.Load() {
		c.opMu.Unlock()
		cancel()
		return ctx, cancel
	}
	op.next = c.ops
	c.ops = op
	c.opMu.Unlock()
	return ctx, func() {
		c.opMu.Lock()
		for p := &c.ops; *p != nil; p = &(*p).next {
			if *p == op {
				*p = op.next
				break
			}
		}
		c.opMu.Unlock()
		cancel()
	}
}

// brokerOp is a broker call under way, one of the list c.ops.
type brokerOp struct {
	cancel context.CancelFunc
	next   *brokerOp
}

// closeStatus is what a closing connection tells its client.
type closeStatus struct {
	code websocket.StatusCode
	why  string
}

// closeCode is the code and reason the connection closes with; 0 until it
// starts closing.
func (c *conn) closeCode() (websocket.StatusCode, string) {
	if s := c.closeWith; s != nil {
		return s.code, s.why
	}
	return 0, ""
}

// cancelOps ends the broker calls under way, and ctx if it was made; fail
// calls it after setting closing, so a brokerContext or a ctx made later
// starts ended.
func (c *conn) cancelOps() {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	if c.ctx != nil {
		c.ctx.cancel()
	}
	for op := c.ops; op != nil; op = op.next {
		op.cancel()
	}
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
	if c.overLimit > 2*c.route.rateBurst {
		c.fail(closeRateLimited, "rate limit exceeded")
		return false
	}
	if c.rawChannel == "" {
		f, _ := decodeClientFrame(frame)
		c.replyError(f.ID, errRateLimited, fmt.Sprintf("more than %g frames per second; slow down", c.route.rate))
	}
	return false
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
		c.route.log.Error("encoding reply", zap.Error(err))
		c.fail(closeInternal, "internal error")
		return nil, err
	}
	return &delivery{own: b}, nil
}

// writeLoop is the connection's only writer while it runs: it drains the
// send queue and ends when the queue is empty. Once the connection starts
// closing it performs the close handshake instead, and stays the writer.
func (c *conn) writeLoop() {
	defer c.recoverWriter()
	for {
		// Closing wins over queued frames.
		if c.closing.Load() {
			c.closeHandshake()
			return
		}
		// A frame to write, or only gap frames owed (late.go).
		if d := c.send.pop(); d != nil || len(c.owed) > 0 {
			if err := c.writeBatch(d); err != nil {
				if errors.Is(err, net.ErrClosed) {
					// A close frame is already out: the WebSocket library sent
					// one itself (1009 for an oversized frame, 1002) or answered
					// the peer's. The read fails too and ends c.ctx; then finish
					// the close handshake, since closing the socket now could
					// reset it before the peer has read that close frame.
					<-c.context().Done()
					c.closeHandshake()
					return
				}
				c.fail(closeInternal, "write failed")
				c.tr.closeNow()
				c.closeHandshake()
				return
			}
			continue
		}
		// Queue empty: stop, unless a frame or a close slipped in between the
		// check and giving up the writer role (its enqueue or fail saw
		// writing == true and started no writer).
		c.writing.Store(false)
		if c.send.len() == 0 && !c.closing.Load() {
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
	c.endWriteDeadline()
	c.tr.close(c.closeCode())
	c.closeDone()
}

// closeDone records that the close handshake is done, and wakes finish if
// it waits for that; the writer calls it once.
func (c *conn) closeDone() {
	c.opMu.Lock()
	c.handshakeDone = true
	closed := c.closed
	c.opMu.Unlock()
	if closed != nil {
		close(closed)
	}
}

// isCloseDone reports whether the close handshake is done.
func (c *conn) isCloseDone() bool {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	return c.handshakeDone
}

// awaitCloseDone returns once the close handshake is done.
func (c *conn) awaitCloseDone() {
	c.opMu.Lock()
	if c.handshakeDone {
		c.opMu.Unlock()
		return
	}
	if c.closed == nil {
		c.closed = make(chan struct{})
	}
	closed := c.closed
	c.opMu.Unlock()
	<-closed
}

// maxBatch bounds the frames sent with one socket write.
const maxBatch = 64

// writeBatch writes d (if not nil) and whatever else is queued (up to
// maxBatch frames) with the socket corked, then sends them with one write;
// when the queue runs empty, the gap frames owed too (late.go).
func (c *conn) writeBatch(d *delivery) error {
	// context.Background in the writes, not c.ctx: a write cut short by
	// closing would tear the connection down before the close frame could be
	// sent. The timer bounds the whole batch instead: corked writes can
	// still wait for the library's lock behind a pong on a full socket.
	c.startWriteDeadline()
	defer c.endWriteDeadline()
	c.tr.cork()
	now := time.Now().UnixNano()
	var err error
	if d != nil {
		err = c.writeScreened(d, now)
	}
	for n := 1; err == nil && n < maxBatch; n++ {
		next := c.send.pop()
		if next == nil {
			if len(c.owed) > 0 {
				err = c.writeOwedGaps()
			}
			break
		}
		err = c.writeScreened(next, now)
	}
	if uncorkErr := c.tr.uncork(); err == nil {
		err = uncorkErr
	}
	return err
}

func (c *conn) writeScreened(d *delivery, now int64) error {
	if write, err := c.screen(d, now); !write || err != nil {
		return err
	}
	return c.write(d)
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
	return c.tr.writeFrame(d, frame)
}
