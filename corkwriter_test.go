package caddychat

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// countingConn records each Write as one system call would.
type countingConn struct {
	net.Conn
	writes [][]byte
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes = append(c.writes, bytes.Clone(p))
	return len(p), nil
}

func TestCorkWriterSendsABatchWithOneWrite(t *testing.T) {
	conn := &countingConn{}
	w := &corkWriter{conn: conn}

	if _, err := w.Write([]byte("a")); err != nil {
		t.Fatal(err)
	}
	if len(conn.writes) != 1 {
		t.Fatalf("uncorked write: %d socket writes, want 1", len(conn.writes))
	}

	w.cork()
	for _, s := range []string{"b", "cc", "ddd"} {
		if n, err := w.Write([]byte(s)); err != nil || n != len(s) {
			t.Fatalf("corked write %q: %d, %v", s, n, err)
		}
	}
	if len(conn.writes) != 1 {
		t.Fatalf("corked writes reached the socket: %q", conn.writes)
	}
	if err := w.uncork(); err != nil {
		t.Fatal(err)
	}
	if len(conn.writes) != 2 || string(conn.writes[1]) != "bcc"+"ddd" {
		t.Fatalf("after uncork the socket got %q, want [a bccddd]", conn.writes)
	}
	if err := w.uncork(); err != nil || len(conn.writes) != 2 {
		t.Fatalf("an empty uncork wrote: %q, %v", conn.writes, err)
	}

	// A burst's large buffer is not kept.
	w.cork()
	_, _ = w.Write(make([]byte, 2*maxCorkRetained))
	_ = w.uncork()
	if w.buf != nil {
		t.Fatalf("kept a %d-byte buffer after a burst", cap(w.buf))
	}
}

// TestWriteTextFramesReadByALibraryClient: frames built by writeText, at
// each header length, corked and uncorked, interleaved with the library's
// own ping and close frames on the same connection, are read back intact
// by a WebSocket client; after the library's close frame no data frame
// is written.
func TestWriteTextFramesReadByALibraryClient(t *testing.T) {
	sizes := []int{0, 1, 125, 126, 127, 1000, 0xffff, 0x10000, 200000}
	payloads := make([][]byte, len(sizes))
	for i, n := range sizes {
		payloads[i] = bytes.Repeat([]byte{byte('a' + i)}, n)
	}
	afterClose := make(chan error, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cw := &corkingResponseWriter{ResponseWriter: w}
		ws, err := websocket.Accept(cw, r, nil)
		if err != nil {
			t.Error(err)
			return
		}
		go func() { _, _, _ = ws.Read(context.Background()) }() // reads the pong and the client's close
		cork := cw.cork
		cork.cork()
		for _, p := range payloads[:4] {
			_ = cork.writeText(p)
		}
		if err := cork.uncork(); err != nil {
			t.Error(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := ws.Ping(ctx); err != nil {
			t.Errorf("ping between data frames: %v", err)
		}
		for _, p := range payloads[4:] {
			if err := cork.writeText(p); err != nil {
				t.Error(err)
			}
		}
		_ = ws.Close(websocket.StatusNormalClosure, "done")
		afterClose <- cork.writeText([]byte("too late"))
	}))
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer client.CloseNow()
	client.SetReadLimit(-1)
	for i, want := range payloads {
		typ, got, err := client.Read(ctx)
		if err != nil {
			t.Fatalf("frame %d (%d bytes): %v", i, sizes[i], err)
		}
		if typ != websocket.MessageText || !bytes.Equal(got, want) {
			t.Fatalf("frame %d: got %v of %d bytes, want text of %d", i, typ, len(got), len(want))
		}
	}
	if _, _, err := client.Read(ctx); websocket.CloseStatus(err) != websocket.StatusNormalClosure {
		t.Fatalf("after the data frames: %v, want the server's close 1000", err)
	}
	if err := <-afterClose; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("a data frame after the close frame: %v, want net.ErrClosed", err)
	}
}
