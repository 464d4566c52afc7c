package caddychat

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// sseEvent is one server-sent event as a browser's EventSource would see it.
type sseEvent struct {
	id    string // "" when the event had none
	data  map[string]any
	raw   string
	ended bool // the stream ended (no more events)
}

// sseClient follows one SSE stream with a plain HTTP client, as curl -N does.
type sseClient struct {
	t        *testing.T
	url      string // the route: where the stream was opened and POSTs go
	resp     *http.Response
	cancel   context.CancelFunc
	events   chan sseEvent
	session  string
	lastID   string
	comments atomic.Int64 // keep-alives seen
	postURL  string       // where POSTs go (another node's route, for hand-off)
}

// openSSE opens a stream on url (channels etc. in its query) and reads
// the welcome; the stream must be admitted.
func openSSE(t *testing.T, url string, hdr http.Header) *sseClient {
	t.Helper()
	c, status, body := tryOpenSSE(t, url, hdr)
	if c == nil {
		t.Fatalf("SSE GET %s: %d %s", url, status, body)
	}
	w := c.next("welcome")
	if w["transport"] != "sse" || w["session"] == nil {
		t.Fatalf("welcome = %v", w)
	}
	c.session = w["session"].(string)
	return c
}

// tryOpenSSE opens a stream; a refused one gives its status and body.
func tryOpenSSE(t *testing.T, url string, hdr http.Header) (*sseClient, int, string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("SSE GET %s: %v", url, err)
	}
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		cancel()
		return nil, resp.StatusCode, string(b)
	}
	base, _, _ := strings.Cut(url, "?")
	c := &sseClient{t: t, url: base, postURL: base, resp: resp, cancel: cancel, events: make(chan sseEvent, 100000)}
	t.Cleanup(c.close)
	go c.readAll(bufio.NewReaderSize(resp.Body, 64<<10))
	return c, resp.StatusCode, ""
}

func (c *sseClient) readAll(r *bufio.Reader) {
	defer close(c.events)
	var id string
	var data []string
	hasID := false
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimRight(line, "\r\n")
		switch {
		case line == "":
			if data != nil {
				raw := strings.Join(data, "\n")
				ev := sseEvent{raw: raw}
				if hasID {
					ev.id = id
				}
				_ = json.Unmarshal([]byte(raw), &ev.data)
				c.events <- ev
			}
			data, hasID = nil, false
		case strings.HasPrefix(line, ":"):
			c.comments.Add(1)
		case strings.HasPrefix(line, "data: "):
			data = append(data, strings.TrimPrefix(line, "data: "))
		case strings.HasPrefix(line, "id: "):
			id, hasID = strings.TrimPrefix(line, "id: "), true
		}
	}
}

func (c *sseClient) close() {
	c.cancel()
	c.resp.Body.Close()
}

// nextEvent is the next event, ended when the stream ended.
func (c *sseClient) nextEvent(timeout time.Duration) sseEvent {
	c.t.Helper()
	select {
	case ev, ok := <-c.events:
		if !ok {
			return sseEvent{ended: true}
		}
		if ev.id != "" {
			c.lastID = ev.id
		}
		return ev
	case <-time.After(timeout):
		c.t.Fatalf("no SSE event within %v", timeout)
	}
	return sseEvent{}
}

// nextMatching skips events until one matches.
func (c *sseClient) nextMatching(what string, match func(m map[string]any) bool) map[string]any {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if time.Now().After(deadline) {
			c.t.Fatalf("no %s within 10s", what)
		}
		ev := c.nextEvent(time.Until(deadline))
		if ev.ended {
			c.t.Fatalf("stream ended waiting for %s", what)
		}
		if match(ev.data) {
			return ev.data
		}
		c.t.Logf("skipped while waiting for %s: %s", what, ev.raw)
	}
}

func (c *sseClient) next(typ string) map[string]any {
	c.t.Helper()
	return c.nextMatching(fmt.Sprintf("%q event", typ), func(m map[string]any) bool { return m["type"] == typ })
}

func (c *sseClient) reply(id float64) map[string]any {
	c.t.Helper()
	return c.nextMatching(fmt.Sprintf("reply to id %v", id), func(m map[string]any) bool {
		return (m["type"] == "ok" || m["type"] == "error") && m["id"] == id
	})
}

// closeEvent reads up to the stream's close event and returns it.
func (c *sseClient) closeEvent() map[string]any {
	c.t.Helper()
	return c.nextMatching("close event", func(m map[string]any) bool { return m["type"] == "close" })
}

// post POSTs v (a frame, or raw bytes) for the stream to c.postURL.
func (c *sseClient) post(v any) (int, string) {
	c.t.Helper()
	return postFrame(c.t, c.postURL, c.session, v)
}

// mustPost posts a frame that must be accepted.
func (c *sseClient) mustPost(v any) {
	c.t.Helper()
	if status, body := c.post(v); status != http.StatusAccepted {
		c.t.Fatalf("POST %v: %d %s", v, status, body)
	}
}

func postFrame(t testing.TB, url, session string, v any) (int, string) {
	t.Helper()
	var body []byte
	switch b := v.(type) {
	case []byte:
		body = b
	case string:
		body = []byte(b)
	default:
		var err error
		if body, err = json.Marshal(v); err != nil {
			t.Fatal(err)
		}
	}
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if session != "" {
		req.Header.Set(sessionHeader, session)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// httpURL is the node's http:// URL of path.
func (n *testNode) httpURL(path string) string { return n.srv.URL + path }
