package caddychat

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/coder/websocket"
)

// wireCountingConn counts the bytes read from the connection: what arrived on
// the wire, frames and all.
type wireCountingConn struct {
	net.Conn
	read *atomic.Int64
}

func (c wireCountingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.read.Add(int64(n))
	return n, err
}

// dialCompressed dials url offering permessage-deflate in mode (disabled:
// not offering it), and returns the client, the extensions the server
// answered and the counter of bytes received.
func dialCompressed(t *testing.T, url string, mode websocket.CompressionMode) (*testClient, string, *atomic.Int64) {
	t.Helper()
	read := new(atomic.Int64)
	transport := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := new(net.Dialer).DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return wireCountingConn{Conn: c, read: read}, nil
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: transport}, CompressionMode: mode})
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	ws.SetReadLimit(-1)
	c := &testClient{t: t, ws: ws, frames: make(chan map[string]any, 1000), closed: make(chan error, 1)}
	go c.readAll()
	t.Cleanup(func() { _ = ws.CloseNow() })
	return c, resp.Header.Get("Sec-WebSocket-Extensions"), read
}

func TestCompressionNegotiated(t *testing.T) {
	cases := []struct {
		option string
		offer  websocket.CompressionMode
		want   string // "": not negotiated
	}{
		{"", websocket.CompressionNoContextTakeover, ""},
		{compressionOff, websocket.CompressionContextTakeover, ""},
		{compressionOn, websocket.CompressionNoContextTakeover, "permessage-deflate; client_no_context_takeover; server_no_context_takeover"},
		// on: no context takeover even for a client that would keep it.
		{compressionOn, websocket.CompressionContextTakeover, "permessage-deflate; client_no_context_takeover; server_no_context_takeover"},
		{compressionContextTakeover, websocket.CompressionContextTakeover, "permessage-deflate"},
		{compressionOn, websocket.CompressionDisabled, ""},
	}
	for _, tc := range cases {
		n := startNode(t, &Handler{Compression: tc.option})
		c, ext, _ := dialCompressed(t, n.url("/ws"), tc.offer)
		if ext != tc.want {
			t.Errorf("compression %q, client offering mode %d: Sec-WebSocket-Extensions %q, want %q", tc.option, tc.offer, ext, tc.want)
		}
		c.subscribe("room:a", 1) // the connection works
	}
}

// chatText is a chat message of about 200 bytes of text.
const chatText = "Thanks, that makes sense. I'll push the fix for the login redirect tonight and ping you when the preview build is up, so you can check it on your phone before tomorrow's standup. Sounds good?"

// TestCompressionRoundTrips: with compression on or context_takeover, small
// and large messages reach a compressing subscriber, a plain one and the
// publisher unchanged, and the compressing subscriber receives fewer bytes
// than the plain one.
func TestCompressionRoundTrips(t *testing.T) {
	large := strings.Repeat(chatText+" ", 400) // ~80 KB
	for _, option := range []string{compressionOn, compressionContextTakeover} {
		t.Run(option, func(t *testing.T) {
			n := startNode(t, &Handler{Compression: option, MaxMessageSize: 1 << 20})
			pub, _, _ := dialCompressed(t, n.url("/ws"), websocket.CompressionContextTakeover)
			z, _, zRead := dialCompressed(t, n.url("/ws"), websocket.CompressionContextTakeover)
			plain, _, plainRead := dialCompressed(t, n.url("/ws"), websocket.CompressionDisabled)
			for i, c := range []*testClient{pub, z, plain} {
				c.subscribe("room:a", float64(i+1))
			}
			zBefore, plainBefore := zRead.Load(), plainRead.Load()
			sent := []any{"hi", chatText, large, map[string]any{"text": chatText, "n": 3.0}, "ok"}
			for i, data := range sent {
				pub.publishOK("room:a", data, float64(10+i))
			}
			for name, c := range map[string]*testClient{"compressing": z, "plain": plain} {
				got, _ := c.messages("room:a", len(sent))
				for i := range sent {
					g, _ := json.Marshal(got[i])
					w, _ := json.Marshal(sent[i])
					if string(g) != string(w) {
						t.Fatalf("%s subscriber: message %d = %.80s, want %.80s", name, i, g, w)
					}
				}
			}
			zBytes, plainBytes := zRead.Load()-zBefore, plainRead.Load()-plainBefore
			if zBytes*5 > plainBytes {
				t.Errorf("compressing subscriber received %d bytes, plain one %d: want at most a fifth", zBytes, plainBytes)
			}
		})
	}
}

func TestCompressionRawRoute(t *testing.T) {
	n := startNode(t, &Handler{Compression: compressionOn, Protocol: protocolRaw, Channel: "room:lobby"})
	z, ext, zRead := dialCompressed(t, n.url("/raw"), websocket.CompressionNoContextTakeover)
	plain, _, plainRead := dialCompressed(t, n.url("/raw"), websocket.CompressionDisabled)
	if ext == "" {
		t.Fatal("raw route: compression not negotiated")
	}
	waitFor(t, func() bool { return n.h.hub.members("room:lobby") == 2 })
	zBefore, plainBefore := zRead.Load(), plainRead.Load()
	texts := []string{"short", strings.Repeat(chatText, 20), chatText}
	for _, text := range texts {
		plain.sendText(text)
		for _, c := range []*testClient{z, plain} {
			if m := c.next("<raw>"); m["text"] != text {
				t.Fatalf("raw delivery %.40q, want %.40q", m["text"], text)
			}
		}
	}
	if zBytes, plainBytes := zRead.Load()-zBefore, plainRead.Load()-plainBefore; zBytes*2 > plainBytes {
		t.Errorf("compressing raw subscriber received %d bytes, plain one %d: want at most half", zBytes, plainBytes)
	}
}

func TestCompressionRejectsBadValue(t *testing.T) {
	h := Handler{Compression: "gzip"}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	defer func() { _ = h.Cleanup() }()
	if err := h.Validate(); err == nil || !strings.Contains(err.Error(), `compression "gzip": must be off, on or context_takeover`) {
		t.Errorf("Validate: %v, want the bad compression value named", err)
	}
	for _, block := range []string{"compression yes", "compression", "compression on off"} {
		d := caddyfile.NewTestDispenser("chat {\n" + block + "\n}")
		err := new(Handler).UnmarshalCaddyfile(d)
		if err == nil || !strings.Contains(err.Error(), "compression") {
			t.Errorf("%q: error %v, want one about compression", block, err)
		}
	}
}
