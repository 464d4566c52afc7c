package caddychat

import (
	"bufio"
	"compress/gzip"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go/http3"
)

// TestSSEThroughEncode: a site that compresses its responses (Caddy's
// encode) and serves HTTP/2 and HTTP/3 over TLS still delivers each event
// at once: the stream is flushed through the compressor, not held until a
// buffer fills. The client asks for gzip itself, so it sees what the wire
// carries.
func TestSSEThroughEncode(t *testing.T) {
	n := startCaddy(t, "node", "\tencode gzip zstd\n\tchat /ws", overTLS())
	roots := n.localCA(t)
	for _, tc := range []struct {
		proto     string
		transport http.RoundTripper
	}{
		{"HTTP/2.0", &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: true}},
		{"HTTP/3.0", &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}},
	} {
		t.Run(tc.proto, func(t *testing.T) {
			client := &http.Client{Transport: tc.transport}
			t.Cleanup(client.CloseIdleConnections)
			sseThroughEncode(t, client, "https://"+n.addr+"/ws", tc.proto)
		})
	}
}

func sseThroughEncode(t *testing.T, client *http.Client, base, proto string) {

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"?channel=room:1", nil)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Accept-Encoding", "gzip")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Proto != proto {
		t.Fatalf("stream: %s over %s, want %s", resp.Status, resp.Proto, proto)
	}
	var body io.Reader = resp.Body
	if enc := resp.Header.Get("Content-Encoding"); enc == "gzip" {
		zr, err := gzip.NewReader(resp.Body)
		if err != nil {
			t.Fatalf("gzip stream: %v", err)
		}
		body = zr
	} else if enc != "" {
		t.Fatalf("Content-Encoding %q, asked for gzip", enc)
	}
	t.Logf("stream over %s, Content-Encoding %q", resp.Proto, resp.Header.Get("Content-Encoding"))

	events := make(chan map[string]any, 100)
	go func() {
		defer close(events)
		r := bufio.NewReader(body)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if data, ok := strings.CutPrefix(strings.TrimRight(line, "\r\n"), "data: "); ok {
				var m map[string]any
				if json.Unmarshal([]byte(data), &m) == nil {
					events <- m
				}
			}
		}
	}()
	next := func(typ string) map[string]any {
		t.Helper()
		deadline := time.After(3 * time.Second)
		for {
			select {
			case m, ok := <-events:
				if !ok {
					t.Fatalf("stream ended waiting for %s", typ)
				}
				if m["type"] == typ {
					return m
				}
			case <-deadline:
				t.Fatalf("no %s event within 3s: events are held back", typ)
			}
		}
	}
	session, _ := next("welcome")["session"].(string)
	next("ok") // the query channel's subscribe

	post, _ := http.NewRequest(http.MethodPost, base, strings.NewReader(`{"op":"publish","channel":"room:1","data":"hi","id":1}`))
	post.Header.Set("Content-Type", "application/json")
	post.Header.Set(sessionHeader, session)
	presp, err := client.Do(post)
	if err != nil {
		t.Fatal(err)
	}
	presp.Body.Close()
	if presp.StatusCode != http.StatusAccepted {
		t.Fatalf("POST: %s", presp.Status)
	}
	if m := next("message"); m["data"] != "hi" {
		t.Fatalf("message: %v", m)
	}
}
