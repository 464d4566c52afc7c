package caddychat

import (
	"testing"
	"time"
	"unsafe"
)

// TestConnFitsSizeClass keeps the conn struct, which every connection
// holds, within its size class: a field added past it costs every idle
// connection 64 bytes more.
func TestConnFitsSizeClass(t *testing.T) {
	const class = 416
	n := unsafe.Sizeof(conn{})
	t.Logf("unsafe.Sizeof(conn{}) = %d", n)
	if n > class {
		t.Errorf("unsafe.Sizeof(conn{}) = %d, past the %d-byte size class", n, class)
	}
}

// TestAdmitReleaseAllocs: taking and giving back a connection slot holds
// no closure.
func TestAdmitReleaseAllocs(t *testing.T) {
	h := &hub{}
	allocs := testing.AllocsPerRun(100, func() {
		if err := h.admit("", 10, 10); err != nil {
			t.Fatal(err)
		}
		h.release("")
	})
	if allocs != 0 {
		t.Errorf("admit and release allocate %v times, want 0", allocs)
	}
	if err := h.admit("u", 10, 1); err != nil {
		t.Fatal(err)
	}
	if err := h.admit("u", 10, 1); err != errTooManyUserConnections {
		t.Fatalf("second admit of u: %v, want %v", err, errTooManyUserConnections)
	}
	h.release("u")
	if h.admitted != 0 || len(h.userConns) != 0 {
		t.Fatalf("after release: admitted %d, userConns %v", h.admitted, h.userConns)
	}
}

// TestSessionBuiltOnDemand: the session follows the identity (a refresh)
// and a tokenless credential counts from when the connection opened.
func TestSessionBuiltOnDemand(t *testing.T) {
	opened := time.Now()
	c := &conn{id: "c1", route: &route{name: "r"}, identity: &identity{user: "u"}, opened: opened.UnixNano()}
	c.setSession()
	s := c.session()
	if s.user != "u" || s.conn != "c1" || s.route != "r" || s.credential.tokenID != "" || s.credential.issuedAt.UnixNano() != opened.UnixNano() {
		t.Fatalf("session %+v", s)
	}
	iat := time.Unix(1000, 0)
	c.identity = &identity{user: "u", token: &credential{tokenID: "j", issuedAt: iat}}
	c.setSession()
	if s := c.session(); s.credential.tokenID != "j" || !s.credential.issuedAt.Equal(iat) {
		t.Fatalf("refreshed session %+v", s)
	}
}

// TestAwaitCloseDone: finish's wait ends whether the close handshake was
// done before it started waiting or while it waits.
func TestAwaitCloseDone(t *testing.T) {
	c := &conn{}
	c.closeDone()
	c.awaitCloseDone() // done before: returns at once
	if c.closed != nil {
		t.Fatal("a channel was made though nothing had to wait")
	}
	c = &conn{}
	waited := make(chan struct{})
	go func() {
		c.awaitCloseDone()
		close(waited)
	}()
	for {
		c.opMu.Lock()
		made := c.closed != nil
		c.opMu.Unlock()
		if made {
			break
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case <-waited:
		t.Fatal("awaitCloseDone returned before closeDone")
	case <-time.After(20 * time.Millisecond):
	}
	c.closeDone()
	<-waited
	if !c.isCloseDone() {
		t.Fatal("isCloseDone false after closeDone")
	}
}

// TestWSTransportFitsSizeClass: every idle WebSocket holds its transport
// (with its corkWriter and idleReader inside), within 128 bytes.
func TestWSTransportFitsSizeClass(t *testing.T) {
	const class = 128
	if n := unsafe.Sizeof(wsTransport{}); n > class {
		t.Errorf("unsafe.Sizeof(wsTransport{}) = %d, past the %d-byte size class", n, class)
	}
}
