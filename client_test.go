package caddychat

// The client of the in-process tests: JSON protocol over a WebSocket to a
// testNode (startNode), frames read in the background.

import (
	"context"
	"encoding/json"
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

// next returns the next frame of the given type, skipping others.
func (c *testClient) next(typ string) map[string]any {
	c.t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m, ok := <-c.frames:
			if !ok {
				c.t.Fatalf("connection closed while waiting for %q: %v", typ, <-c.closed)
			}
			if m["type"] == typ {
				return m
			}
		case <-deadline:
			c.t.Fatalf("no %q frame within 5s", typ)
		}
	}
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
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m, ok := <-c.frames:
			if !ok {
				c.t.Fatalf("connection closed while waiting for reply %v: %v", id, <-c.closed)
			}
			if (m["type"] == "ok" || m["type"] == "error") && m["id"] == id {
				return m
			}
		case <-deadline:
			c.t.Fatalf("no reply to id %v within 5s", id)
		}
	}
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
