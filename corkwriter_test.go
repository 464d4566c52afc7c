package caddychat

import (
	"bytes"
	"net"
	"testing"
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
