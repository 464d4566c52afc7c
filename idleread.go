package caddychat

import (
	"bufio"
	"errors"
	"sync"
	"sync/atomic"
	"syscall"
)

// An idle WebSocket would otherwise cost a goroutine parked deep in the
// library's read path (about 2.7 KiB of frames, so a 4 KiB stack that never
// shrinks). Instead, between frames the connection waits for its socket to
// become readable on a fresh goroutine with a shallow stack (2 KiB), and only
// the frame that wakes it is read through the library, on that goroutine,
// which then hands the wait to a new one and ends (conn.readIdle).
//
// Pongs are what wakes an idle connection most: read through the library,
// one would leave the goroutine parked deep in Read until the next data
// frame. So the connection sends its own pings (with no payload) and takes
// the client's answers off the socket itself; the library still handles
// everything else, pongs it happens to read included (pongRead).

// errPingTimeout: the previous ping got no pong.
var errPingTimeout = errors.New("no pong to the previous ping")

// opPing is the first byte of a final ping frame.
const opPing = 0x89

// idleReader is the waiting side of a wsTransport that reads frames from a
// socket it can wait on.
type idleReader struct {
	rc syscall.RawConn // nil: the socket cannot be waited on (TLS); no idle wait
	br *bufio.Reader   // the library's read buffer

	// mu orders awaitFrame's look into br with close: once closing, the
	// library's close handshake reads br, and awaitFrame leaves it alone.
	mu      sync.Mutex
	closing atomic.Bool

	// unseen: bytes the client sent with its handshake wait where br does
	// not show them (corkingResponseWriter.Hijack); read them first.
	unseen bool

	takeFn func(fd uintptr) bool // take, bound once

	// awaitingPong is set by a ping and cleared by any pong.
	awaitingPong atomic.Bool
}

func (r *idleReader) canWait() bool { return canPeekSocket && r.rc != nil }

// startClosing hands br over to the library's close handshake.
func (r *idleReader) startClosing() {
	r.mu.Lock()
	r.closing.Store(true)
	r.mu.Unlock()
}

func (r *idleReader) pongReceived() { r.awaitingPong.Store(false) }

// awaitFrame returns once a frame other than a pong waits to be read (or the
// socket fails, or the connection is closing): the library reads it then.
// Pongs at the head of what waits are taken and counted here.
func (r *idleReader) awaitFrame() {
	if r.unseen {
		r.unseen = false
		return
	}
	r.mu.Lock()
	if r.closing.Load() {
		r.mu.Unlock()
		return
	}
	if n := r.br.Buffered(); n > 0 {
		head, _ := r.br.Peek(n) // buffered: no read
		k := pongFrames(head)
		if k > 0 {
			_, _ = r.br.Discard(k)
			r.pongReceived()
		}
		r.mu.Unlock()
		if k < n {
			return
		}
	} else {
		r.mu.Unlock()
	}
	// br is empty, and the socket is at a frame boundary: wait on it. The
	// callback runs under the socket's read lock, so the library (a close
	// handshake) cannot read while it takes pongs.
	if r.takeFn == nil {
		r.takeFn = r.take // one closure per connection, not one per wait
	}
	_ = r.rc.Read(r.takeFn)
}

// take is the callback of the socket's wait: true once something other than
// pongs waits (or the socket failed, or the connection is closing).
func (r *idleReader) take(fd uintptr) bool {
	for {
		if r.closing.Load() {
			return true
		}
		k, again := takePongs(fd)
		if k == 0 {
			return !again
		}
		r.pongReceived()
	}
}

// pongFrames is the length of the complete masked pong frames at the head
// of b (a client's frames are masked: RFC 6455 section 5.3).
func pongFrames(b []byte) int {
	n := 0
	for len(b) >= 6 && b[0] == 0x8a && b[1]&0x80 != 0 {
		size := 6 + int(b[1]&0x7f)
		if b[1]&0x7f > 125 || len(b) < size {
			break
		}
		n += size
		b = b[size:]
	}
	return n
}
