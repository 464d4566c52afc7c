package caddychat

import (
	"context"
	"fmt"
	"time"

	"github.com/coder/websocket"
)

// transport is the few things a conn does to reach its client, so that the
// same conn (its queue, limits, ops, subscriptions and metrics) serves a
// WebSocket and an SSE stream alike: an SSE client is one more subscriber
// of the hub, not a second system (sse.go).
type transport interface {
	// read waits for the client's next frame; text is false for a binary
	// frame. An error ends the connection's reading side.
	read() (frame []byte, text bool, err error)
	// cork starts a batch: the frames written until uncork go out together.
	cork()
	// writeFrame adds one server frame to the batch; d is what it came
	// from (an SSE event's id names the kept messages' positions).
	writeFrame(d *delivery, frame []byte) error
	uncork() error
	// close ends the connection after what was written, telling the client
	// code and reason; only the writer calls it, once.
	close(code websocket.StatusCode, reason string)
	// closeNow cuts the connection, from any goroutine, without waiting.
	closeNow()
	// ping checks that the client is still there, without waiting for an
	// answer: an error means it is not (a WebSocket: the previous ping, a
	// ping_interval ago, got no pong).
	ping() error
	// name labels the transport in logs and the welcome.
	name() string
}

// wsTransport is a WebSocket whose data frames go through a corkWriter.
// The corkWriter is part of it, not one more allocation per connection:
// every idle connection holds its transport, which fits 128 bytes so.
type wsTransport struct {
	ws *websocket.Conn
	cw corkWriter
	idleReader
	// Negotiated compression (compression.go): deflate, without context
	// takeover, frames compressed once per delivery; library, with it,
	// frames written and compressed by the library.
	deflate, library bool
}

var _ transport = (*wsTransport)(nil)

func (t *wsTransport) read() ([]byte, bool, error) {
	// Not tied to the connection's context: closing goes through the
	// writer's close handshake, which ends this read once the peer answers
	// or times out.
	typ, frame, err := t.ws.Read((*readContext)(t))
	return frame, typ == websocket.MessageText, err
}

// readContext is the context of a wsTransport's reads: Background's,
// carrying the transport, so that one function (pongRead) serves every
// connection's pongs instead of a closure per connection. Its own type, not
// context.WithValue: no allocation per connection or per read.
type readContext wsTransport

// transportKey is the readContext's value key.
type transportKey struct{}

func (*readContext) Deadline() (time.Time, bool) { return time.Time{}, false }
func (*readContext) Done() <-chan struct{}       { return nil }
func (*readContext) Err() error                  { return nil }

func (r *readContext) Value(key any) any {
	if key == (transportKey{}) {
		return (*wsTransport)(r)
	}
	return nil
}

// pongRead is the library's OnPongReceived: a pong it read answers the
// ping. A pong read outside the transport's reads (the close handshake)
// carries no transport, and the connection is ending anyway.
func pongRead(ctx context.Context, _ []byte) {
	if t, ok := ctx.Value(transportKey{}).(*wsTransport); ok {
		t.pongReceived()
	}
}

func (t *wsTransport) cork() { t.cw.cork() }

func (t *wsTransport) writeFrame(d *delivery, frame []byte) error {
	switch {
	case t.library:
		return t.writeCompressed(frame)
	case t.deflate:
		if z := d.deflated(frame); z != nil {
			return t.cw.writeData(opTextDeflated, z)
		}
	}
	return t.cw.writeText(frame)
}

func (t *wsTransport) uncork() error { return t.cw.uncork() }

func (t *wsTransport) close(code websocket.StatusCode, reason string) {
	t.startClosing()
	_ = t.ws.Close(code, reason)
}

func (t *wsTransport) closeNow() { _ = t.ws.CloseNow() }

// ping sends a ping and returns: its pong is awaited until the next ping,
// ping_interval later, and taken by awaitFrame or the library
// (pongRead), so no goroutine waits for it.
func (t *wsTransport) ping() error {
	if t.awaitingPong.Swap(true) {
		return errPingTimeout
	}
	if err := t.cw.writeData(opPing, nil); err != nil {
		return fmt.Errorf("sending a ping: %w", err)
	}
	return nil
}

func (t *wsTransport) name() string { return "websocket" }
