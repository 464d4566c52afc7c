package caddychat

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

// rawGet sends "GET <target> HTTP/1.1" exactly as given (no client
// normalises it) and returns the response and its body.
func rawGet(t *testing.T, addr, target string) (*http.Response, string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", target, addr)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("GET %s: %v", target, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(body)
}

var pageURLAttr = regexp.MustCompile(`(?:content|href|src)="([^"]*)"`)

// TestChatPageBaseIsCleanPath: the chat page refers to its assets by the
// request's path; that path is cleaned first, so that it can only name a
// path of this site: never "//host/..." (a protocol-relative URL, which
// would load the page's script from another host), never a backslash that
// browsers read as a slash, never dot segments.
func TestChatPageBaseIsCleanPath(t *testing.T) {
	n := startNode(t, &Handler{UI: true})
	addr := strings.TrimPrefix(n.srv.URL, "http://")
	for _, tc := range []struct{ target, base string }{
		{"//ws", "/ws"},
		{"//evil.example/ws", "/evil.example/ws"},
		{"///evil.example", "/evil.example"},
		{"/ws/../x", "/x"},
		{"/ws/./", "/ws"},
		{"/../../ws", "/ws"},
		{"/%2F%2Fevil.example", "/evil.example"},
		{"/%2fevil.example/ws", "/evil.example/ws"},
		{"/ws/%2E%2E/x", "/x"},
		{"/%5Cevil.example", "/evil.example"},
		{"/%5C%5Cevil.example/ws", "/evil.example/ws"},
		{"/", ""},
		{"/chat/", "/chat"},
	} {
		resp, body := rawGet(t, addr, tc.target)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s: %d", tc.target, resp.StatusCode)
			continue
		}
		attrs := pageURLAttr.FindAllStringSubmatch(body, -1)
		if len(attrs) < 3 {
			t.Fatalf("GET %s: page has %d URL attributes:\n%s", tc.target, len(attrs), body)
		}
		for _, a := range attrs {
			v := a[1]
			if strings.HasPrefix(v, "//") || strings.Contains(v, `\`) || strings.Contains(v, "%5C") || strings.Contains(v, "%5c") || strings.Contains(v, "..") {
				t.Errorf("GET %s: page holds %q", tc.target, a[0])
			}
		}
		for _, want := range []string{
			`content="` + tc.base + `"`,
			`href="` + tc.base + `/chat-ui.css"`,
			`src="` + tc.base + `/chat-ui.js"`,
		} {
			if !strings.Contains(body, want) {
				t.Errorf("GET %s: page lacks %s", tc.target, want)
			}
		}
	}
}
