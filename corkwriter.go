package caddychat

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"net/http"
	"sync"
	"syscall"
)

// Left to itself, the WebSocket library flushes every message to the socket:
// one write system call per frame, which is most of the CPU a busy node
// spends. A corkWriter sits between the library's buffer and the socket so that the
// writer goroutine can "cork" it, write every frame waiting in the send queue
// (they collect in memory), and "uncork" to send them all with one call.
//
// Data frames do not go through the library at all: a server's frames are
// not masked, so the bytes of a delivery are the same for every subscriber,
// and writeText frames them straight into the cork buffer (the library's
// per-message locking, header building and copying cost as much as a fifth
// of a busy node's CPU). The library still writes the control frames (ping,
// pong, close); each reaches Write whole, in one call, because the library
// flushes its buffer, larger than any control frame, after every frame.
type corkWriter struct {
	mu   sync.Mutex
	conn net.Conn
	buf  []byte
	// closeSent is set once the library has written a close frame: no data
	// frame may follow it.
	closeSent bool
	corked    bool
}

// opCloseFinal is the first byte of a close frame (FIN and opcode 8).
const opCloseFinal = 0x88

// maxCorkRetained bounds the buffers kept for reuse between batches; a
// larger one (after a burst) is dropped for the garbage collector.
const maxCorkRetained = 64 << 10

// corkBufs are the batch buffers of every connection. A connection takes one
// for a batch and gives it back once the batch is on the socket, so an idle
// connection holds none, and a busy node reuses a few warm ones.
var corkBufs sync.Pool

// takeCorkBuf is an empty buffer from corkBufs, or nil when none is free:
// append then allocates what the batch needs, and the pool keeps it grown.
func takeCorkBuf() []byte {
	if p, ok := corkBufs.Get().(*[]byte); ok {
		return (*p)[:0]
	}
	return nil
}

// releaseCorkBuf gives b back to corkBufs unless it grew past
// maxCorkRetained.
func releaseCorkBuf(b []byte) {
	if cap(b) == 0 || cap(b) > maxCorkRetained {
		return
	}
	corkBufs.Put(&b)
}

// libraryWriteBuffer is the size of the library's own write buffer when it
// carries control frames only. It must hold a whole control frame (at most
// 2+125 bytes): that is what makes each one reach Write in one call, so
// that writeText's frames never land inside one. Every idle connection
// keeps this buffer, so it is no larger.
const libraryWriteBuffer = 128

// libraryDataWriteBuffer is that buffer when the library writes data frames
// too (compression with context takeover, compression.go).
const libraryDataWriteBuffer = 1 << 10

// libraryReadBuffer is the size of the library's read buffer, which every
// idle connection keeps: enough for frame headers and a typical client
// frame (a subscribe, a short message) in one read; a larger frame's payload
// is read straight into the message.
const libraryReadBuffer = 256

func (w *corkWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(p) > 0 && p[0] == opCloseFinal {
		w.closeSent = true
	}
	if w.corked {
		if w.buf == nil {
			w.buf = takeCorkBuf()
		}
		w.buf = append(w.buf, p...)
		return len(p), nil
	}
	return w.conn.Write(p)
}

func (w *corkWriter) cork() {
	w.mu.Lock()
	w.corked = true
	w.mu.Unlock()
}

// writeText writes payload as one final, unmasked text frame (RFC 6455
// section 5.2). Uncorked, the frame goes out at once.
func (w *corkWriter) writeText(payload []byte) error { return w.writeData(opText, payload) }

// First bytes of a final text frame, plain and compressed (RSV1 set:
// permessage-deflate).
const (
	opText         = 0x81
	opTextDeflated = 0xc1
)

// writeData writes payload as one final, unmasked frame whose first byte
// (FIN, RSV1, opcode) is first.
func (w *corkWriter) writeData(first byte, payload []byte) error {
	var header [10]byte
	header[0] = first
	n := 2
	switch l := len(payload); {
	case l < 126:
		header[1] = byte(l)
	case l <= 0xffff:
		header[1] = 126
		binary.BigEndian.PutUint16(header[2:], uint16(l))
		n = 4
	default:
		header[1] = 127
		binary.BigEndian.PutUint64(header[2:], uint64(l))
		n = 10
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closeSent {
		return net.ErrClosed
	}
	if w.buf == nil {
		w.buf = takeCorkBuf()
	}
	w.buf = append(w.buf, header[:n]...)
	w.buf = append(w.buf, payload...)
	if w.corked {
		return nil
	}
	return w.flushLocked()
}

// uncork sends what collected while corked, in one write.
func (w *corkWriter) uncork() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.corked = false
	return w.flushLocked()
}

func (w *corkWriter) flushLocked() error {
	if len(w.buf) == 0 {
		return nil
	}
	_, err := w.conn.Write(w.buf)
	releaseCorkBuf(w.buf)
	w.buf = nil
	return err
}

// corkingResponseWriter hands the WebSocket library a hijacked connection
// whose writes go through a corkWriter.
type corkingResponseWriter struct {
	http.ResponseWriter
	// cork is the corkWriter Hijack gives the socket: the caller's (its
	// transport's own), or one Hijack makes.
	cork *corkWriter
	idle *idleReader // if set, Hijack gives it the socket and the read buffer
}

func (w *corkingResponseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *corkingResponseWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	// The connection is hijacked from net/http's own writer, past the
	// wrappers of Caddy's handler chain: the WebSocket outlives ServeHTTP,
	// and Caddy's access log recorder counts the bytes a hijacked connection
	// reads into a variable it reads itself when ServeHTTP returns (a data
	// race, and a count that means nothing for a connection still open).
	conn, brw, err := http.NewResponseController(innermostWriter(w.ResponseWriter)).Hijack()
	if err != nil {
		return nil, nil, err
	}
	// net/http has flushed its writer (the 101 response) before handing it
	// over; from here on writes go through the cork.
	if w.cork == nil {
		w.cork = &corkWriter{}
	}
	w.cork.conn = conn
	bw := libraryWriteBuffer
	if _, library := negotiatedCompression(w.Header()); library {
		bw = libraryDataWriteBuffer
	}
	// net/http's 4 KiB read buffer is swapped for a small one (frames larger
	// than it are read straight into the message), keeping what the client
	// may already have sent after its handshake.
	br := bufio.NewReaderSize(conn, libraryReadBuffer)
	if n := brw.Reader.Buffered(); n > 0 {
		// The early bytes must sit in the new reader's buffer: the library
		// keeps what is buffered and then reads from conn itself.
		early, _ := brw.Reader.Peek(n)
		br = bufio.NewReaderSize(io.MultiReader(bytes.NewReader(bytes.Clone(early)), conn), max(n, libraryReadBuffer))
		if _, err := br.Peek(n); err != nil {
			conn.Close()
			return nil, nil, err
		}
	}
	if w.idle != nil {
		// The library keeps br (it resets its source, not the buffer),
		// moving what br holds into that source, where awaitFrame cannot
		// see it: with early bytes, the first frame is read at once.
		w.idle.br = br
		w.idle.unseen = brw.Reader.Buffered() > 0
		if sc, ok := conn.(syscall.Conn); ok {
			w.idle.rc, _ = sc.SyscallConn()
		}
	}
	return conn, bufio.NewReadWriter(br, bufio.NewWriterSize(w.cork, bw)), nil
}

// innermostWriter unwraps w down to the writer that wraps nothing.
func innermostWriter(w http.ResponseWriter) http.ResponseWriter {
	for {
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return w
		}
		w = u.Unwrap()
	}
}
