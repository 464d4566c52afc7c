package caddychat

import (
	"sync/atomic"

	"go.uber.org/zap"
)

// A panic on a goroutine that nothing recovers ends the whole process: one
// connection's bug would take down Caddy and every other connection with
// it. Every goroutine that runs a connection's code (the frame handler, the
// reader, the writer, the ping and the timers) and the broker's delivering
// goroutine therefore recover: a connection's panic closes that connection
// with 1011, a delivery's panic drops that one message; either is logged at
// error level with its stack and counted in caddy_chat_panics_total, and the
// node goes on.
//
// A panic can still leave shared state behind (a lock taken without defer,
// a reference count half updated); recovering keeps the node serving, the
// log and the metric say that a bug needs fixing.

// Test hooks, nil in production (one atomic load each). testHookOp runs at
// the start of each JSON op's handling, testHookDeliver at the start of
// each broker message's delivery; tests make them panic.
var (
	testHookOp      atomic.Pointer[func(op, channel string)]
	testHookDeliver atomic.Pointer[func(channel string)]
)

func runTestHookOp(op, channel string) {
	if f := testHookOp.Load(); f != nil {
		(*f)(op, channel)
	}
}

// recoverPanic, deferred on a connection's goroutine, turns a panic into a
// 1011 close of that connection.
func (c *conn) recoverPanic(where string) {
	if v := recover(); v != nil {
		c.panicked(where, v)
	}
}

// protect runs f, recovering a panic as recoverPanic does.
func (c *conn) protect(where string, f func()) {
	defer c.recoverPanic(where)
	f()
}

func (c *conn) panicked(where string, v any) {
	moduleMetrics().panics.Inc()
	c.route.log.Error("panic in a connection; closing it with 1011",
		zap.String("in", where), zap.String("conn", c.id),
		zap.Any("panic", v), zap.Stack("stack"))
	c.fail(closeInternal, "internal error")
}

// recoverWriter, deferred by writeLoop, closes the connection after a panic
// of the writer. The writer is the only one to finish the close handshake
// (closeDone), and the writing flag stays set, so no other writer starts.
func (c *conn) recoverWriter() {
	v := recover()
	if v == nil {
		return
	}
	c.writing.Store(true)
	c.panicked("writer", v)
	if c.isCloseDone() {
		return // the panic came after the close handshake
	}
	func() {
		defer func() {
			if recover() != nil {
				// The WebSocket is beyond a close handshake: drop it.
				c.tr.closeNow()
				c.closeDone()
			}
		}()
		// Frames left in the cork buffer are whole; send them before the
		// close frame.
		_ = c.tr.uncork()
		c.closeHandshake()
	}()
}

// deliverRecovering is the hub's deliverFunc as the memory broker sees it
// (and the inbox's for control messages): a panic while delivering one
// message drops that message, and the delivering goroutine goes on with
// the next.
func (h *hub) deliverRecovering(channel string, payload []byte) {
	h.deliverReceivedRecovering(channel, payload, 0)
}

// deliverReceivedRecovering is deliverReceived with the same protection:
// how the inbox delivers what it received from the broker at received.
func (h *hub) deliverReceivedRecovering(channel string, payload []byte, received int64) {
	defer h.recoverDelivery(channel)
	if f := testHookDeliver.Load(); f != nil {
		(*f)(channel)
	}
	h.deliverReceived(channel, payload, received)
}

func (h *hub) recoverDelivery(channel string) {
	if v := recover(); v != nil {
		moduleMetrics().panics.Inc()
		h.log.Error("panic delivering a message; the message is dropped",
			zap.String("channel", channel), zap.Any("panic", v), zap.Stack("stack"))
	}
}

// resyncRecovering runs resync, which the broker calls on its delivering
// goroutine, with the same protection.
func (h *hub) resyncRecovering() {
	defer h.recoverDelivery("")
	h.resync()
}
