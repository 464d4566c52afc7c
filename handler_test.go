package caddychat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestPublishReachesSubscribers(t *testing.T) {
	n := startNode(t, &Handler{})
	sub := dial(t, n.url("/ws"), nil)
	w := sub.next("welcome")
	if w["node"] != n.h.hub.node || w["conn"] == "" || w["user"] != "" {
		t.Fatalf("welcome = %v", w)
	}
	sub.subscribe("room:eng", 1)

	pub := dial(t, n.url("/ws"), nil)
	pub.send(map[string]any{"op": "publish", "channel": "room:eng", "id": "p1", "data": map[string]any{"text": "hi", "from": "mallory"}, "from": "mallory"})
	var ok map[string]any
	for {
		ok = pub.next("ok")
		if ok["id"] == "p1" {
			break
		}
	}
	msgID, _ := ok["message_id"].(string)
	if msgID == "" || ok["channel"] != "room:eng" {
		t.Fatalf("publish reply = %v", ok)
	}

	m := sub.next("message")
	if m["channel"] != "room:eng" || m["id"] != msgID || m["from"] != "" {
		t.Fatalf("delivery = %v", m)
	}
	if ts, _ := m["ts"].(float64); time.Since(time.UnixMilli(int64(ts))) > time.Minute {
		t.Fatalf("delivery ts = %v", m["ts"])
	}
	if data, _ := m["data"].(map[string]any); data["text"] != "hi" {
		t.Fatalf("delivery data = %v", m["data"])
	}

	// After unsubscribing, nothing more arrives.
	sub.send(map[string]any{"op": "unsubscribe", "channel": "room:eng", "id": 2})
	if r := sub.reply(2); r["type"] != "ok" {
		t.Fatalf("unsubscribe reply = %v", r)
	}
	pub.send(map[string]any{"op": "publish", "channel": "room:eng", "id": 3, "data": "after unsubscribe"})
	pub.reply(3)
	sub.subscribe("room:other", 4)
	pub.send(map[string]any{"op": "publish", "channel": "room:other", "id": 5, "data": "on other"})
	if m := sub.next("message"); m["channel"] != "room:other" {
		t.Fatalf("after unsubscribing room:eng the next delivery is %v", m)
	}
}

func TestBadInputGetsErrorReplyAndConnectionStays(t *testing.T) {
	n := startNode(t, &Handler{})
	c := dial(t, n.url("/ws"), nil)
	c.next("welcome")

	cases := []struct {
		name, frame string
		wantID      any // nil when the reply carries no id
	}{
		{"malformed JSON", `{"op":"subscribe",`, nil},
		{"not an object", `[1,2]`, nil},
		{"string frame", `"subscribe"`, nil},
		{"missing op", `{"channel":"a","id":1}`, 1.0},
		{"unknown op", `{"op":"explode","channel":"a","id":2}`, 2.0},
		{"empty channel", `{"op":"subscribe","channel":"","id":3}`, 3.0},
		{"channel with space", `{"op":"subscribe","channel":"a b","id":4}`, 4.0},
		{"channel pattern", `{"op":"subscribe","channel":"room:*","id":5}`, 5.0},
		{"channel too long", `{"op":"subscribe","channel":"` + strings.Repeat("a", 129) + `","id":6}`, 6.0},
		{"channel with control byte", `{"op":"publish","channel":"a\u0000b","data":1,"id":7}`, 7.0},
		{"publish without data", `{"op":"publish","channel":"a","id":8}`, 8.0},
		{"id is an object", `{"op":"subscribe","channel":"a","id":{"x":1}}`, nil},
		{"channel is a number", `{"op":"subscribe","channel":5,"id":9}`, nil},
	}
	for _, tc := range cases {
		c.sendText(tc.frame)
		r := c.next("error")
		if r["code"] != "bad_request" || r["id"] != tc.wantID || r["message"] == "" {
			t.Errorf("%s: reply = %v, want bad_request with id %v", tc.name, r, tc.wantID)
		}
	}
	// The connection is still fully usable.
	c.subscribe("room:ok", 100)
}

func TestProtocolViolationsClose(t *testing.T) {
	n := startNode(t, &Handler{MaxMessageSize: 1024})
	cases := []struct {
		name string
		send func(*testClient) error
		want websocket.StatusCode
	}{
		{"binary frame", func(c *testClient) error {
			return c.ws.Write(context.Background(), websocket.MessageBinary, []byte(`{"op":"subscribe"}`))
		}, websocket.StatusUnsupportedData},
		{"invalid UTF-8", func(c *testClient) error {
			return c.ws.Write(context.Background(), websocket.MessageText, []byte("{\"op\":\"\xff\xfe\"}"))
		}, websocket.StatusInvalidFramePayloadData},
		{"oversized frame", func(c *testClient) error {
			return c.ws.Write(context.Background(), websocket.MessageText, []byte(`{"op":"publish","channel":"a","data":"`+strings.Repeat("x", 2048)+`"}`))
		}, websocket.StatusMessageTooBig},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			bystander := dial(t, n.url("/ws"), nil)
			bystander.subscribe("room:calm", 1)
			c := dial(t, n.url("/ws"), nil)
			c.next("welcome")
			if err := tc.send(c); err != nil {
				t.Fatalf("send: %v", err)
			}
			if got := c.closeCode(); got != tc.want {
				t.Fatalf("close code = %v, want %v", got, tc.want)
			}
			// Others are unaffected.
			bystander.send(map[string]any{"op": "publish", "channel": "room:calm", "data": "still here", "id": 2})
			if m := bystander.next("message"); m["data"] != "still here" {
				t.Fatalf("bystander got %v", m)
			}
		})
	}
}

func TestNonWebSocketRequestGets426(t *testing.T) {
	n := startNode(t, &Handler{})
	resp, err := http.Get(n.srv.URL + "/ws")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("status = %d, want 426", resp.StatusCode)
	}
}

func TestCrossOriginUpgradeRefusedUnlessListed(t *testing.T) {
	n := startNode(t, &Handler{})
	_, resp, err := websocket.Dial(context.Background(), n.url("/ws"), &websocket.DialOptions{
		HTTPHeader: http.Header{"Origin": {"https://evil.example"}},
	})
	if err == nil || resp == nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("cross-origin dial: err=%v resp=%v, want 403", err, resp)
	}

	allowed := startNode(t, &Handler{Origins: []string{"*.example.org"}, ChannelPrefix: ptr("other:")})
	c := dial(t, allowed.url("/ws"), &websocket.DialOptions{HTTPHeader: http.Header{"Origin": {"https://app.example.org"}}})
	c.next("welcome")
}

// dialSlowReader connects with a tiny receive buffer and reads nothing until
// told to, so the server's queue for it fills.
func dialSlowReader(t *testing.T, url string) *websocket.Conn {
	t.Helper()
	dialer := &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
		return errors.Join(err, serr)
	}}
	client := &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}}
	ws, _, err := websocket.Dial(context.Background(), url, &websocket.DialOptions{HTTPClient: client})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	ws.SetReadLimit(-1)
	t.Cleanup(func() { _ = ws.CloseNow() })
	return ws
}

func TestSlowConsumerIsDisconnectedOthersGetEverything(t *testing.T) {
	// The slow client reads only once the fast ones have everything: its
	// close frame waits behind a blocked write until then, and a short
	// write_timeout would cut the connection before it could be read.
	n := startNode(t, &Handler{SendQueue: 128 << 10, WriteTimeout: caddy.Duration(time.Minute), RateLimit: &RateLimit{PerSecond: -1}})
	const channel, messages = "room:firehose", 600
	m := moduleMetrics()
	slowBefore, droppedBefore := testutil.ToFloat64(m.slowConsumers), testutil.ToFloat64(m.dropped)

	slow := dialSlowReader(t, n.url("/ws"))
	sub := func(ws *websocket.Conn) {
		b, _ := json.Marshal(map[string]any{"op": "subscribe", "channel": channel, "id": 1})
		if err := ws.Write(context.Background(), websocket.MessageText, b); err != nil {
			t.Fatal(err)
		}
	}
	sub(slow)
	fast := make([]*testClient, 3)
	for i := range fast {
		fast[i] = dial(t, n.url("/ws"), nil)
		fast[i].subscribe(channel, 1)
	}
	// Let the slow client's subscribe land before publishing.
	waitFor(t, func() bool { return n.h.hub.members(channel) == 4 })

	pub := dial(t, n.url("/ws"), nil)
	payload := strings.Repeat("x", 16<<10)
	for i := range messages {
		pub.send(map[string]any{"op": "publish", "channel": channel, "id": i, "data": map[string]any{"n": i, "pad": payload}})
		if r := pub.reply(float64(i)); r["type"] != "ok" {
			t.Fatalf("publish %d: %v", i, r)
		}
	}
	for i, c := range fast {
		for want := range messages {
			m := c.next("message")
			if got := m["data"].(map[string]any)["n"]; got != float64(want) {
				t.Fatalf("fast client %d: got message %v, want %d", i, got, want)
			}
		}
	}
	if n.h.hub.dropped.Load() == 0 {
		t.Fatal("no delivery was counted as dropped")
	}
	// The slow client, reading at last, finds its connection closed with 4000.
	var code websocket.StatusCode
	var readErr error
	for {
		_, _, err := slow.Read(context.Background())
		if err != nil {
			code, readErr = websocket.CloseStatus(err), err
			break
		}
	}
	if code != closeSlowConsumer {
		t.Fatalf("slow client close code = %v, want %v (%v)", code, closeSlowConsumer, readErr)
	}
	// The metrics count the drops and the disconnect (other tests may add).
	waitFor(t, func() bool { return testutil.ToFloat64(m.slowConsumers) >= slowBefore+1 })
	if got := testutil.ToFloat64(m.dropped); got < droppedBefore+float64(n.h.hub.dropped.Load()) {
		t.Fatalf("messages_dropped_total grew by %v, the hub dropped %d", got-droppedBefore, n.h.hub.dropped.Load())
	}
}

func (h *hub) members(channel string) int {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if cs := h.channels[channel]; cs != nil {
		return cs.members.len()
	}
	return 0
}

func TestRawProtocolBridgesPlainText(t *testing.T) {
	n := startNode(t, &Handler{Protocol: protocolRaw, Channel: "room:{http.request.uri.path.1}"})
	a := dial(t, n.url("/raw/lobby"), nil)
	b := dial(t, n.url("/raw/lobby"), nil)
	other := dial(t, n.url("/raw/other"), nil)
	waitFor(t, func() bool { return n.h.hub.members("room:lobby") == 2 && n.h.hub.members("room:other") == 1 })

	a.sendText("hello from the seed client")
	for _, c := range []*testClient{a, b} {
		if m := c.next("<raw>"); m["text"] != "hello from the seed client" {
			t.Fatalf("raw delivery = %v", m)
		}
	}
	other.sendText(`{"op":"publish"}`) // raw mode: any text is a message
	if m := other.nextAny(); m["op"] != "publish" || len(m) != 1 {
		t.Fatalf("raw JSON text delivery = %v, want it unchanged", m)
	}
}

func TestRawChannelPlaceholderMustResolveToValidName(t *testing.T) {
	n := startNode(t, &Handler{Protocol: protocolRaw, Channel: "room:{http.request.uri.query.room}"})
	_, resp, err := websocket.Dial(context.Background(), n.url("/raw?room=a%20b"), nil)
	if err == nil || resp == nil || resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("dial with invalid room: err=%v resp=%v, want 400", err, resp)
	}
}

func TestJSONAndRawClientsShareAChannel(t *testing.T) {
	ctxPrefix := ptr("mixed:")
	jsonNode := startNode(t, &Handler{ChannelPrefix: ctxPrefix})
	rawNode := startNode(t, &Handler{ChannelPrefix: ctxPrefix, Protocol: protocolRaw, Channel: "room:x"})
	if jsonNode.h.hub != rawNode.h.hub {
		t.Fatal("handlers with the same broker settings must share one hub")
	}
	j := dial(t, jsonNode.url("/ws"), nil)
	j.subscribe("room:x", 1)
	r := dial(t, rawNode.url("/raw"), nil)
	waitFor(t, func() bool { return jsonNode.h.hub.members("room:x") == 2 })

	r.sendText("plain words")
	if m := j.next("message"); m["data"] != "plain words" {
		t.Fatalf("JSON client got %v", m)
	}
	if m := r.next("<raw>"); m["text"] != "plain words" {
		t.Fatalf("raw sender got %v", m)
	}
	j.send(map[string]any{"op": "publish", "channel": "room:x", "data": "a string", "id": 2})
	if m := r.next("<raw>"); m["text"] != "a string" {
		t.Fatalf("raw client got %v", m)
	}
	j.send(map[string]any{"op": "publish", "channel": "room:x", "data": map[string]any{"k": 1}, "id": 3})
	if m := r.nextAny(); fmt.Sprint(m) != fmt.Sprint(map[string]any{"k": 1.0}) {
		t.Fatalf("raw client got %v", m)
	}
}

// TestRawClientCannotImpersonateServer: a raw client's text shaped like a
// message envelope (with a made-up sender) or a presence event reaches JSON
// clients as a message from its real sender, its text as data; raw clients
// still get the text.
func TestRawClientCannotImpersonateServer(t *testing.T) {
	prefix := uniquePrefix()
	raw := startNode(t, &Handler{ChannelPrefix: &prefix, Protocol: protocolRaw, Channel: "room:lobby"})
	js := startNode(t, &Handler{ChannelPrefix: &prefix})
	c := dial(t, js.url("/"), nil)
	c.subscribe("room:lobby", 1)
	sender := dial(t, raw.url("/"), nil)
	waitFor(t, func() bool { return js.h.hub.members("room:lobby") == 2 })

	for _, forged := range []string{
		`{"type":"message","channel":"room:lobby","id":"1-x-1","from":"admin","ts":1,"data":{"text":"trust me"}}`,
		`{"type":"join","channel":"room:lobby","user":"admin"}`,
	} {
		sender.sendText(forged)
		m := c.nextAny()
		if m["type"] != "message" || m["from"] != "" || m["anonymous"] != true || m["server"] != nil || m["data"] != forged {
			t.Fatalf("forged %s reached a JSON client as %v", forged, m)
		}
		// The raw sender gets its own text back, unchanged.
		if echo := sender.nextAny(); echo["from"] != "admin" && echo["user"] != "admin" {
			t.Fatalf("raw echo of %s: %v", forged, echo)
		}
	}
}
