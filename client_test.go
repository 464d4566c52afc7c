package caddychat

// The client of the in-process tests: JSON protocol over a WebSocket to a
// testNode (startNode), frames read in the background.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// testClient is a JSON-protocol client whose frames are read in the background.
type testClient struct {
	t      *testing.T
	ws     *websocket.Conn
	frames chan map[string]any
	closed chan error // the error that ended reading
}

func dial(t *testing.T, url string, opts *websocket.DialOptions) *testClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, url, opts)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	ws.SetReadLimit(-1)
	c := &testClient{t: t, ws: ws, frames: make(chan map[string]any, 100000), closed: make(chan error, 1)}
	go c.readAll()
	t.Cleanup(func() { _ = ws.CloseNow() })
	return c
}

func (c *testClient) readAll() {
	for {
		_, b, err := c.ws.Read(context.Background())
		if err != nil {
			c.closed <- err
			close(c.frames)
			return
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			m = map[string]any{"type": "<raw>", "text": string(b)}
		}
		c.frames <- m
	}
}

func (c *testClient) sendText(s string) {
	c.t.Helper()
	if err := c.ws.Write(context.Background(), websocket.MessageText, []byte(s)); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *testClient) send(v any) {
	c.t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		c.t.Fatal(err)
	}
	c.sendText(string(b))
}

// nextMatching returns the next frame match accepts, skipping the others;
// the test fails if none comes within 5s.
func (c *testClient) nextMatching(what string, match func(m map[string]any) bool) map[string]any {
	c.t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m, ok := <-c.frames:
			if !ok {
				c.t.Fatalf("connection closed while waiting for %s: %v", what, <-c.closed)
			}
			if match(m) {
				return m
			}
		case <-deadline:
			c.t.Fatalf("no %s within 5s", what)
		}
	}
}

// next returns the next frame of the given type, skipping others.
func (c *testClient) next(typ string) map[string]any {
	c.t.Helper()
	return c.nextMatching(fmt.Sprintf("%q frame", typ), func(m map[string]any) bool { return m["type"] == typ })
}

// nextAny returns the next frame, whatever it is.
func (c *testClient) nextAny() map[string]any {
	c.t.Helper()
	select {
	case m, ok := <-c.frames:
		if !ok {
			c.t.Fatalf("connection closed: %v", <-c.closed)
		}
		return m
	case <-time.After(5 * time.Second):
		c.t.Fatal("no frame within 5s")
	}
	return nil
}

// reply waits for the ok or error reply to the request with correlation id.
func (c *testClient) reply(id float64) map[string]any {
	c.t.Helper()
	return c.nextMatching(fmt.Sprintf("reply to id %v", id), func(m map[string]any) bool {
		return (m["type"] == "ok" || m["type"] == "error") && m["id"] == id
	})
}

func (c *testClient) subscribe(channel string, id float64) {
	c.t.Helper()
	c.send(map[string]any{"op": "subscribe", "channel": channel, "id": id})
	if r := c.reply(id); r["type"] != "ok" {
		c.t.Fatalf("subscribe %s: %v", channel, r)
	}
}

// closeCode waits for the connection to end and returns the close code the
// server sent.
func (c *testClient) closeCode() websocket.StatusCode {
	c.t.Helper()
	for {
		select {
		case _, ok := <-c.frames:
			if !ok {
				return websocket.CloseStatus(<-c.closed)
			}
		case <-time.After(15 * time.Second):
			c.t.Fatal("connection not closed within 15s")
		}
	}
}

func bearer(token string) *websocket.DialOptions {
	return &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer " + token}}}
}

// refusal is an upgrade the server answered with a plain HTTP status.
type refusal struct {
	status int
	body   string
	header http.Header
}

// dialRefused dials url and expects the upgrade to be refused.
func dialRefused(t *testing.T, url string, opts *websocket.DialOptions) refusal {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, resp, err := websocket.Dial(ctx, url, opts)
	if err == nil {
		_ = ws.CloseNow()
		t.Fatalf("dial %s succeeded, want it refused", url)
	}
	if resp == nil {
		t.Fatalf("dial %s: no HTTP response: %v", url, err)
	}
	var body []byte
	if resp.Body != nil {
		body, _ = io.ReadAll(resp.Body)
	}
	return refusal{status: resp.StatusCode, body: string(body), header: resp.Header}
}

func expectError(t *testing.T, c *testClient, id float64, code, channel string) {
	t.Helper()
	r := c.reply(id)
	if r["type"] != "error" || r["code"] != code {
		t.Fatalf("reply %v = %v, want error %s", id, r, code)
	}
	if msg, _ := r["message"].(string); channel != "" && !strings.Contains(msg, channel) {
		t.Fatalf("reply %v message %q does not name %s", id, msg, channel)
	}
}

func expectOK(t *testing.T, c *testClient, id float64) map[string]any {
	t.Helper()
	r := c.reply(id)
	if r["type"] != "ok" {
		t.Fatalf("reply %v = %v, want ok", id, r)
	}
	return r
}

// publishOK publishes data on channel and waits for the ok reply. A publisher
// subscribed to the channel may get the delivery before the reply (reply()
// would skip it): the first delivery seen is returned, or nil.
func publishOK(t *testing.T, c *testClient, channel string, data any, id float64) (ok, first map[string]any) {
	t.Helper()
	c.send(map[string]any{"op": "publish", "channel": channel, "data": data, "id": id})
	return awaitOK(t, c, id)
}

// awaitOK waits for the ok reply to id, keeping the first delivery seen.
func awaitOK(t *testing.T, c *testClient, id float64) (ok, first map[string]any) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m, open := <-c.frames:
			if !open {
				t.Fatalf("connection closed while waiting for reply %v: %v", id, <-c.closed)
			}
			switch {
			case m["type"] == "message" && first == nil:
				first = m
			case (m["type"] == "ok" || m["type"] == "error") && m["id"] == id:
				if m["type"] != "ok" {
					t.Fatalf("reply %v = %v, want ok", id, m)
				}
				return m, first
			}
		case <-deadline:
			t.Fatalf("no reply to id %v within 5s", id)
		}
	}
}

// ownDelivery publishes on a channel c is subscribed to and returns the
// first delivery c gets after the publish.
func ownDelivery(t *testing.T, c *testClient, channel string, data any, id float64) (ok, delivery map[string]any) {
	t.Helper()
	ok, first := publishOK(t, c, channel, data, id)
	if first == nil {
		first = c.next("message")
	}
	return ok, first
}

// request sends op and waits for the frame answering its id (ok, error or
// history), skipping the rest.
func (c *testClient) request(op map[string]any) map[string]any {
	c.t.Helper()
	c.send(op)
	id := fmt.Sprint(op["id"]) // numbers come back as float64
	return c.nextMatching(fmt.Sprintf("answer to %v", op), func(m map[string]any) bool {
		return m["id"] != nil && fmt.Sprint(m["id"]) == id && m["type"] != "message"
	})
}

func (c *testClient) publishOK(channel string, data any, id float64) string {
	c.t.Helper()
	r := c.request(map[string]any{"op": "publish", "channel": channel, "data": data, "id": id})
	if r["type"] != "ok" {
		c.t.Fatalf("publish %v: %v", data, r)
	}
	return r["message_id"].(string)
}

// messages reads the next n frames, which must all be messages of channel,
// and returns their data values and ids.
func (c *testClient) messages(channel string, n int) (data []any, ids []string) {
	c.t.Helper()
	for range n {
		m := c.nextAny()
		if m["type"] != "message" || m["channel"] != channel {
			c.t.Fatalf("want a message of %s, got %v (after %d of %d)", channel, m, len(data), n)
		}
		data = append(data, m["data"])
		ids = append(ids, m["id"].(string))
	}
	return data, ids
}

func (c *testClient) expectQuiet(d time.Duration) {
	c.t.Helper()
	select {
	case m, ok := <-c.frames:
		if ok {
			c.t.Fatalf("unexpected frame %v", m)
		}
	case <-time.After(d):
	}
}
