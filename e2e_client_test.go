package caddychat

// The client of the e2e tests: JSON or raw protocol (PROTOCOL.md) over a
// WebSocket to a Caddy node (startCaddy), frames read in the background.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

type frame struct {
	typ  websocket.MessageType
	data []byte
	at   time.Time // when the reader goroutine got it
}

// serverMsg is any JSON-protocol server frame.
type serverMsg struct {
	Type      string          `json:"type"`
	ID        json.RawMessage `json:"id"`
	Channel   string          `json:"channel"`
	MessageID string          `json:"message_id"`
	Code      string          `json:"code"`
	Message   string          `json:"message"`
	From      *string         `json:"from"`
	TS        int64           `json:"ts"`
	Data      json.RawMessage `json:"data"`
	Conn      string          `json:"conn"`
	Node      string          `json:"node"`
	User      *string         `json:"user"`
	// History: a kept message's epoch; a resume's outcome.
	Epoch     string `json:"epoch"`
	Recovered *bool  `json:"recovered"`
	Replayed  *int   `json:"replayed"`

	raw string
	at  time.Time
}

func (m *serverMsg) String() string { return m.raw }

type wsClient struct {
	t    testing.TB
	name string
	conn *websocket.Conn

	frames  chan frame    // filled by the reader goroutine, closed when it ends
	readErr error         // why the reader ended; valid once frames is closed
	done    chan struct{} // closed by cleanup: stops the reader
	pending []frame       // frames read ahead while waiting for a reply
	nextID  int

	welcome *serverMsg
	skip    string // raw clients: frames with this prefix are ignored by next
}

// dialWS opens a WebSocket with a same-origin Origin header (as a browser
// page served by the node would send) and starts the reader.
func dialWS(t testing.TB, name, url string) (*wsClient, error) {
	t.Helper()
	host := strings.TrimPrefix(strings.TrimPrefix(url, "ws://"), "wss://")
	if i := strings.IndexByte(host, '/'); i >= 0 {
		host = host[:i]
	}
	return dialWSWith(t, name, url, &websocket.DialOptions{
		HTTPHeader: http.Header{"Origin": {"http://" + host}},
	})
}

// dialWSWith dials url with opts and starts reading its frames; the
// connection closes when the test ends.
func dialWSWith(t testing.TB, name, url string, opts *websocket.DialOptions) (*wsClient, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, resp, err := websocket.Dial(ctx, url, opts)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("%s: dial %s: %w (HTTP %s)", name, url, err, resp.Status)
		}
		return nil, fmt.Errorf("%s: dial %s: %w", name, url, err)
	}
	conn.SetReadLimit(1 << 20)
	c := &wsClient{
		t:      t,
		name:   name,
		conn:   conn,
		frames: make(chan frame, 4096),
		done:   make(chan struct{}),
	}
	go c.readLoop()
	t.Cleanup(func() {
		close(c.done)
		_ = c.conn.CloseNow()
	})
	return c, nil
}

func (c *wsClient) readLoop() {
	defer close(c.frames)
	for {
		typ, data, err := c.conn.Read(context.Background())
		if err != nil {
			c.readErr = err
			return
		}
		select {
		case c.frames <- frame{typ: typ, data: data, at: time.Now()}:
		case <-c.done:
			c.readErr = errors.New("client closed by test cleanup")
			return
		}
	}
}

// dialJSON connects to a JSON-protocol route and reads the welcome frame.
func dialJSON(t testing.TB, name, url string) *wsClient {
	t.Helper()
	c, err := dialWS(t, name, url)
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.readMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("%s: waiting for welcome: %v", name, err)
	}
	if m.Type != "welcome" || m.Conn == "" || m.Node == "" {
		t.Fatalf("%s: first frame is not a welcome with conn and node: %s", name, m)
	}
	c.welcome = m
	return c
}

// dialRaw connects to a raw-protocol route (no welcome frame).
func dialRaw(t testing.TB, name, url string) *wsClient {
	t.Helper()
	c, err := dialWS(t, name, url)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var errTimeout = errors.New("timed out")

// nextFrame returns the next frame (read-ahead frames first), skipping frames
// that start with c.skip.
func (c *wsClient) nextFrame(timeout time.Duration) (frame, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		var f frame
		if len(c.pending) > 0 {
			f, c.pending = c.pending[0], c.pending[1:]
		} else {
			var ok bool
			select {
			case f, ok = <-c.frames:
				if !ok {
					return frame{}, fmt.Errorf("%s: connection closed: %w", c.name, c.readErr)
				}
			case <-timer.C:
				return frame{}, fmt.Errorf("%s: no frame within %v: %w", c.name, timeout, errTimeout)
			}
		}
		if c.skip != "" && bytes.HasPrefix(f.data, []byte(c.skip)) {
			continue
		}
		return f, nil
	}
}

func parseMsg(f frame) (*serverMsg, error) {
	if f.typ != websocket.MessageText {
		return nil, fmt.Errorf("got a %v frame, want text: %q", f.typ, f.data)
	}
	m := &serverMsg{raw: string(f.data), at: f.at}
	if err := json.Unmarshal(f.data, m); err != nil {
		return nil, fmt.Errorf("frame is not JSON: %v: %q", err, f.data)
	}
	return m, nil
}

// readMsg returns the next JSON frame.
func (c *wsClient) readMsg(timeout time.Duration) (*serverMsg, error) {
	f, err := c.nextFrame(timeout)
	if err != nil {
		return nil, err
	}
	m, err := parseMsg(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", c.name, err)
	}
	return m, nil
}

func (c *wsClient) send(typ websocket.MessageType, p []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.conn.Write(ctx, typ, p); err != nil {
		return fmt.Errorf("%s: write: %v", c.name, err)
	}
	return nil
}

func (c *wsClient) sendText(s string) {
	c.t.Helper()
	if err := c.send(websocket.MessageText, []byte(s)); err != nil {
		c.t.Fatal(err)
	}
}

// request sends op with a fresh numeric id and returns the ok/error reply that
// carries that id. Other frames read meanwhile are kept for nextFrame.
func (c *wsClient) request(op map[string]any, timeout time.Duration) (*serverMsg, error) {
	c.nextID++
	id := c.nextID
	op["id"] = id
	b, err := json.Marshal(op)
	if err != nil {
		return nil, err
	}
	if err := c.send(websocket.MessageText, b); err != nil {
		return nil, err
	}
	want := strconv.Itoa(id)
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case f, ok := <-c.frames:
			if !ok {
				return nil, fmt.Errorf("%s: connection closed while waiting for the reply to %s: %w", c.name, b, c.readErr)
			}
			m, err := parseMsg(f)
			if err == nil && (m.Type == "ok" || m.Type == "error") && string(m.ID) == want {
				return m, nil
			}
			c.pending = append(c.pending, f)
		case <-timer.C:
			return nil, fmt.Errorf("%s: no reply to %s within %v: %w", c.name, b, timeout, errTimeout)
		}
	}
}

func (c *wsClient) subscribe(channel string) {
	c.t.Helper()
	m, err := c.request(map[string]any{"op": "subscribe", "channel": channel}, 10*time.Second)
	if err != nil {
		c.t.Fatal(err)
	}
	if m.Type != "ok" || m.Channel != channel {
		c.t.Fatalf("%s: subscribe %s: got %s", c.name, channel, m)
	}
}

// publish sends a publish op and returns the reply (ok or error).
func (c *wsClient) publish(channel string, data any) *serverMsg {
	c.t.Helper()
	m, err := c.publishErr(channel, data, 10*time.Second)
	if err != nil {
		c.t.Fatal(err)
	}
	return m
}

func (c *wsClient) publishErr(channel string, data any, timeout time.Duration) (*serverMsg, error) {
	return c.request(map[string]any{"op": "publish", "channel": channel, "data": data}, timeout)
}

// mustPublish publishes and fails unless the reply is ok with a message id.
func (c *wsClient) mustPublish(channel string, data any) *serverMsg {
	c.t.Helper()
	m := c.publish(channel, data)
	if m.Type != "ok" || m.Channel != channel || m.MessageID == "" {
		c.t.Fatalf("%s: publish to %s: want ok with channel and message_id, got %s", c.name, channel, m)
	}
	return m
}

// expectMessage requires the next frame to be a delivery on channel.
func (c *wsClient) expectMessage(channel string, timeout time.Duration) *serverMsg {
	c.t.Helper()
	m, err := c.readMsg(timeout)
	if err != nil {
		c.t.Fatal(err)
	}
	if m.Type != "message" || m.Channel != channel {
		c.t.Fatalf("%s: want a message on %s, got %s", c.name, channel, m)
	}
	return m
}

// expectText requires the next (non-skipped) frame to be the text frame want.
func (c *wsClient) expectText(want string, timeout time.Duration) {
	c.t.Helper()
	f, err := c.nextFrame(timeout)
	if err != nil {
		c.t.Fatalf("%s: waiting for text %q: %v", c.name, want, err)
	}
	if f.typ != websocket.MessageText || string(f.data) != want {
		c.t.Fatalf("%s: want text frame %q, got %v frame %q", c.name, want, f.typ, f.data)
	}
}

// waitClosed reads until the server closes the connection and returns the
// close status (-1 when the connection ended without a close frame).
func (c *wsClient) waitClosed(timeout time.Duration) (websocket.StatusCode, error) {
	deadline := time.Now().Add(timeout)
	for {
		_, err := c.nextFrame(time.Until(deadline))
		if err == nil {
			continue
		}
		if errors.Is(err, errTimeout) {
			return -1, err
		}
		return websocket.CloseStatus(c.readErr), nil
	}
}

// closeNormal performs a client-initiated close handshake (1000).
func (c *wsClient) closeNormal() {
	if err := c.conn.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		c.t.Logf("%s: close: %v", c.name, err)
	}
}

// dataN decodes {"n":N} from a delivery's data.
func dataN(m *serverMsg) (int, error) {
	var d struct {
		N *int `json:"n"`
	}
	if err := json.Unmarshal(m.Data, &d); err != nil || d.N == nil {
		return 0, fmt.Errorf("data is not {\"n\":<int>}: %s", m.Data)
	}
	return *d.N, nil
}
