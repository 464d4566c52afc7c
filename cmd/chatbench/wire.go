package main

// Bytes on the wire and compression: every connection chatbench dials
// counts the bytes it reads (frames, headers and handshakes included), so
// that a phase reports what its deliveries cost on the wire; -compression
// makes the WebSocket clients offer permessage-deflate.

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"

	"github.com/coder/websocket"
)

// chatText fills the payloads' pad: no character JSON escapes.
const chatText = "Thanks, that makes sense. I will push the fix for the login redirect tonight and ping you when the preview build is up, so you can check it on your phone before the standup tomorrow. Sounds good? "

// wireRead is the bytes read by every connection of this process.
var wireRead atomic.Int64

// countingConn counts the bytes read from the connection into wireRead.
type countingConn struct{ net.Conn }

func (c countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	wireRead.Add(int64(n))
	return n, err
}

// counted wraps a dial's connection in a countingConn.
func counted(c net.Conn, err error) (net.Conn, error) {
	if err != nil {
		return nil, err
	}
	return countingConn{c}, nil
}

// countedDial is nd's DialContext, counting what its connections read.
func countedDial(nd *net.Dialer) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		return counted(nd.DialContext(ctx, network, addr))
	}
}

// compressionModes are -compression's values: what the clients offer.
var compressionModes = map[string]websocket.CompressionMode{
	"off":              websocket.CompressionDisabled,
	"on":               websocket.CompressionNoContextTakeover,
	"context_takeover": websocket.CompressionContextTakeover,
}

func parseCompression(s string) (websocket.CompressionMode, error) {
	m, ok := compressionModes[s]
	if !ok {
		return 0, fmt.Errorf("-compression: %q is none of off, on, context_takeover", s)
	}
	return m, nil
}

// perDelivery is x divided by the phase's deliveries (0 without any).
func perDelivery(x float64, deliveries int64) float64 {
	if deliveries == 0 {
		return 0
	}
	return x / float64(deliveries)
}
