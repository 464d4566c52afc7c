package caddychat

// permessage-deflate (RFC 7692), negotiated by coder/websocket and off by
// default. The option has three values:
//
//   - off: the extension is not offered back; frames go out as they are.
//   - on: negotiated without context takeover (server_no_context_takeover
//     and client_no_context_takeover). Each message is compressed on its
//     own, so its compressed bytes are the same for every subscriber: a
//     delivery is compressed once, on the first connection that writes it,
//     and every other subscriber's frame reuses those bytes (the node's
//     data frames bypass the library, see corkwriter.go). A connection
//     holds no deflate state between messages.
//   - context_takeover: each connection keeps its deflate window across
//     messages (the library's own writer: a 32 KiB window and a flate
//     writer per connection, over a MiB while it is in use), so that a
//     message compresses against the ones before it. Fewer bytes on the
//     wire, more memory and CPU per connection: every subscriber's copy is
//     compressed apart. Data frames then go through the library.
//
// Messages shorter than compressionThreshold go out uncompressed either
// way (the extension allows it message by message): deflate's block header
// and code table cost more than a short message saves.

import (
	"bytes"
	"compress/flate"
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"unsafe"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/coder/websocket"
)

const (
	compressionOff             = "off"
	compressionOn              = "on"
	compressionContextTakeover = "context_takeover"

	// compressionThreshold is the smallest message compressed, in bytes
	// (the library's default with context takeover; its default without,
	// 512, would leave a typical chat message of a few hundred bytes
	// uncompressed).
	compressionThreshold = 128
)

// compressionMode is the library's mode for the option's value.
func compressionMode(value string) (websocket.CompressionMode, error) {
	switch value {
	case "", compressionOff:
		return websocket.CompressionDisabled, nil
	case compressionOn:
		return websocket.CompressionNoContextTakeover, nil
	case compressionContextTakeover:
		return websocket.CompressionContextTakeover, nil
	}
	return 0, fmt.Errorf("chat: compression %q: must be off, on or context_takeover", value)
}

// checkCompression is checkOptions' check of the compression option.
func (h *Handler) checkCompression() []error {
	if _, err := compressionMode(h.Compression); err != nil {
		return []error{optionErr("compression", "", "%v", err)}
	}
	return nil
}

var compressionOption = option[Handler]{name: "compression", min: 1, max: 1,
	syntax: "off|on|context_takeover", takes: "off, on or context_takeover", example: "compression on",
	parse: func(h *Handler, _ *caddyfile.Dispenser, args []string) error {
		if _, err := compressionMode(args[0]); err != nil {
			return fmt.Errorf("compression %q: want off, on or context_takeover", args[0])
		}
		h.Compression = args[0]
		return nil
	}}

// negotiatedCompression is how a connection's data frames are written,
// read from the handshake's response headers.
func negotiatedCompression(header http.Header) (deflate, library bool) {
	ext := strings.Join(header.Values("Sec-WebSocket-Extensions"), ",")
	if !strings.Contains(ext, "permessage-deflate") {
		return false, false
	}
	if strings.Contains(ext, "server_no_context_takeover") {
		return true, false
	}
	return false, true
}

// deflated is frame compressed for a connection that negotiated
// compression without context takeover, nil when it is too short or does
// not shrink. A frame of the delivery's (its JSON or its raw form) is
// compressed once for all subscribers; a frame for one connection (a
// reply) each time.
func (d *delivery) deflated(frame []byte) []byte {
	if len(frame) < compressionThreshold {
		return nil
	}
	if d == nil || d.own != nil {
		return deflateMessage(frame)
	}
	return d.deflate.get(frame)
}

// deflateCache holds the compressed bytes of a delivery's frames: its
// JSON form and its raw form at most, told apart by their memory (the
// frames are shared by every subscriber and never change).
type deflateCache struct {
	mu      sync.Mutex
	entries []deflateEntry
}

type deflateEntry struct {
	in  *byte
	n   int
	out []byte
}

func (c *deflateCache) get(frame []byte) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.entries {
		if e.in == unsafe.SliceData(frame) && e.n == len(frame) {
			return e.out
		}
	}
	out := deflateMessage(frame)
	c.entries = append(c.entries, deflateEntry{in: unsafe.SliceData(frame), n: len(frame), out: out})
	return out
}

// deflaters are flate writers (over a MiB each) shared by every
// connection: one is in use only while a message is compressed.
var deflaters = sync.Pool{New: func() any {
	w, _ := flate.NewWriter(nil, flate.BestSpeed)
	return w
}}

// deflateTail ends every flushed deflate stream; RFC 7692 section 7.2.1
// has the sender remove it.
const deflateTail = "\x00\x00\xff\xff"

// deflateMessage compresses p as one message of permessage-deflate without
// context takeover; nil if that does not make it shorter.
func deflateMessage(p []byte) []byte {
	var buf bytes.Buffer
	buf.Grow(len(p))
	fw := deflaters.Get().(*flate.Writer)
	fw.Reset(&buf)
	_, err := fw.Write(p)
	if err == nil {
		err = fw.Flush()
	}
	deflaters.Put(fw)
	out := bytes.TrimSuffix(buf.Bytes(), []byte(deflateTail))
	if err != nil || len(out) >= len(p) {
		return nil
	}
	return out
}

// writeCompressed writes frame through the library, which compresses it
// with the connection's own context (context takeover).
func (t *wsTransport) writeCompressed(frame []byte) error {
	return t.ws.Write(context.Background(), websocket.MessageText, frame)
}
