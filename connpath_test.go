package caddychat

import (
	"net/http/httptest"
	"strings"
	"testing"
	"unsafe"
)

// A connection keeps the path its hooks and webhooks name, not the request
// line it was cut from: a substring of r.URL.Path would keep the whole
// request URI alive, ?token=… included, for as long as the connection lives.
func TestConnPathDoesNotKeepTheRequestLine(t *testing.T) {
	rt := &route{}
	token := strings.Repeat("t", 2048)
	var first string
	for i := range 3 {
		r := httptest.NewRequest("GET", "/ws?token="+token, nil)
		got := rt.connPath(r.URL.Path)
		if got != "/ws" {
			t.Fatalf("connPath = %q, want /ws", got)
		}
		if unsafe.StringData(got) == unsafe.StringData(r.URL.Path) {
			t.Fatalf("connection %d shares the request's path, and with it the request line", i)
		}
		if i == 0 {
			first = got
		} else if unsafe.StringData(got) != unsafe.StringData(first) {
			t.Fatalf("connection %d holds a copy of its own; connections on one path share one", i)
		}
	}
	// A route matched by several paths keeps each one right.
	r := httptest.NewRequest("GET", "/chat/b?token="+token, nil)
	if got := rt.connPath(r.URL.Path); got != "/chat/b" || unsafe.StringData(got) == unsafe.StringData(r.URL.Path) {
		t.Fatalf("connPath(/chat/b) = %q, shared with the request: %v", got, unsafe.StringData(got) == unsafe.StringData(r.URL.Path))
	}
}
