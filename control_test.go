package caddychat

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"
)

// adminCall runs one server API request through the admin module's handler
// for the chat of prefix, as Caddy's admin endpoint would.
func adminCall(t testing.TB, prefix, method, op, body string) (int, map[string]any) {
	t.Helper()
	r := httptest.NewRequest(method, "/chat/"+op+"?prefix="+prefix, strings.NewReader(body))
	if body != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	w := httptest.NewRecorder()
	if err := serveAdminAPI(w, r); err != nil {
		t.Fatalf("%s %s: %v", method, op, err)
	}
	var out map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &out); err != nil {
		t.Fatalf("%s %s: answer is not JSON: %q", method, op, w.Body.String())
	}
	return w.Code, out
}

// TestServerAPIActsOnLocalConnections: the control channel's round trip,
// from the API to a node's connections and back, on both brokers.
func TestServerAPIActsOnLocalConnections(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		n := startNode(t, h)
		prefix := *h.ChannelPrefix
		alice := dial(t, n.url("/"), nil)
		alice.next("welcome")
		other := dial(t, n.url("/"), nil)
		other.next("welcome")
		alice.subscribe("room:1", 1)

		// Anonymous connections have no user: subscribe by user "" is refused.
		if code, out := adminCall(t, prefix, "POST", "subscribe", `{"user":"","channel":"room:2"}`); code != 400 {
			t.Fatalf("subscribe of user \"\": %d %v", code, out)
		}
		code, out := adminCall(t, prefix, "GET", "channels", "")
		if code != 200 || fmt.Sprint(out["channels"]) != "[map[channel:room:1 nodes:1 subscribers:1]]" {
			t.Fatalf("channels: %d %v", code, out)
		}
		code, out = adminCall(t, prefix, "GET", "stats", "")
		if code != 200 || out["connections"] != float64(2) || out["anonymous"] != float64(2) || out["subscriptions"] != float64(1) {
			t.Fatalf("stats: %d %v", code, out)
		}
		code, out = adminCall(t, prefix, "POST", "disconnect", `{"conn":"`+connWithOneSubscription(t, n)+`","code":4100,"reason":"bye"}`)
		if code != 200 || out["disconnected"] != float64(1) || out["nodes"] != float64(1) {
			t.Fatalf("disconnect: %d %v", code, out)
		}
		if got := alice.closeCode(); got != 4100 {
			t.Fatalf("alice closed with %d, want 4100", got)
		}
		other.send(map[string]any{"op": "subscribe", "channel": "room:9", "id": 1})
		if r := other.reply(1); r["type"] != "ok" {
			t.Fatalf("the other connection was touched: %v", r)
		}
	})
}

// connWithOneSubscription is the id of the node's one connection that is
// subscribed to one channel.
func connWithOneSubscription(t *testing.T, n *testNode) string {
	t.Helper()
	var ids []string
	for _, m := range n.h.hub.managedWhere(func(session) bool { return true }) {
		if m.subscriptions() == 1 {
			ids = append(ids, m.session().conn)
		}
	}
	if len(ids) != 1 {
		t.Fatalf("want one connection with one subscription, got %v", ids)
	}
	return ids[0]
}

// TestServerSubscribeRacesClose: a server subscribe that ends while its
// connection closes must not leave the closed connection a member of the
// channel (the hub would then hold the channel, and the connection, for
// good).
func TestServerSubscribeRacesClose(t *testing.T) {
	h := &Handler{ChannelPrefix: ptr(uniquePrefix()), JWT: &JWTConfig{Secret: testSecret}, Subscribe: []string{"**"}}
	n := startNode(t, h)
	prefix := *h.ChannelPrefix
	for round := range 20 {
		c := dial(t, n.url("/"), &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer " + newToken(t, "alice").sign()}}})
		c.next("welcome")
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			adminCall(t, prefix, "POST", "subscribe", fmt.Sprintf(`{"user":"alice","channel":"room:%d"}`, round))
		}()
		_ = c.ws.Close(websocket.StatusNormalClosure, "")
		wg.Wait()
	}
	eventually(t, 5*time.Second, "the hub lets go of every channel and connection", func() (bool, string) {
		h.hub.mu.RLock()
		defer h.hub.mu.RUnlock()
		return len(h.hub.channels) == 0 && len(h.hub.subscribers) == 0,
			fmt.Sprintf("%d channels, %d connections", len(h.hub.channels), len(h.hub.subscribers))
	})
}

// TestClientsCannotReachControlChannels: '#' is no channel byte, so the
// control channels are out of any client's reach.
func TestClientsCannotReachControlChannels(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix())})
	c := dial(t, n.url("/"), nil)
	c.next("welcome")
	for i, frame := range []map[string]any{
		{"op": "subscribe", "channel": "#control"},
		{"op": "publish", "channel": "#control", "data": map[string]any{"id": "x", "from": "y", "op": "disconnect"}},
		{"op": "subscribe", "channel": "#reply:" + n.h.hub.node},
	} {
		frame["id"] = float64(i + 1)
		c.send(frame)
		if r := c.reply(float64(i + 1)); r["code"] != errBadRequest {
			t.Fatalf("%v: %v, want bad_request", frame, r)
		}
	}
}

// TestControlChannelSurvivesGarbage: whoever can write to Redis can write
// to the control channel; what is not a request (malformed, oversized, an
// unknown op, a reply nobody waits for, a flood) is dropped, and clients'
// messages keep flowing.
func TestControlChannelSurvivesGarbage(t *testing.T) {
	rs := redistest.Start(t)
	h := &Handler{Redis: rs.URL(), ChannelPrefix: ptr(uniquePrefix())}
	n := startNode(t, h)
	prefix := *h.ChannelPrefix
	c := dial(t, n.url("/"), nil)
	c.next("welcome")
	c.subscribe("room:1", 1)
	eventually(t, 5*time.Second, "the control channel subscribed", func() (bool, string) {
		return numSub(t, rs, prefix+controlChannel) == 1, "not yet"
	})
	for _, payload := range []string{
		"not json", `{"op":"disconnect"}`, `{"id":"1","from":"x","op":"explode"}`,
		`[1,2,3]`, strings.Repeat("x", maxControlMessage+1),
	} {
		redisPublish(t, rs, prefix+controlChannel, payload)
	}
	redisPublish(t, rs, prefix+replyChannelPrefix+h.hub.node, `{"id":"nobody-waits","node":"x","count":5}`)
	redisPublish(t, rs, prefix+replyChannelPrefix+h.hub.node, `{{{`)
	// A flood of requests for a user who is not here: the queue holds
	// controlQueue, the rest are dropped.
	for i := range 3 * controlQueue {
		redisPublish(t, rs, prefix+controlChannel, fmt.Sprintf(`{"id":"f%d","from":"nowhere","op":"unsubscribe","user":"nobody","channel":"room:1"}`, i))
	}
	redisPublish(t, rs, prefix+"room:1", `"still here"`)
	if m := c.next("message"); m["data"] != "still here" {
		t.Fatalf("message after the garbage: %v", m)
	}
	code, out := adminCall(t, prefix, "GET", "channels", "")
	if code != 200 || out["nodes"] != float64(1) {
		t.Fatalf("the API after the garbage: %d %v", code, out)
	}
}

// TestServerAPIRefusesBadRequests: every malformed request gets a 4xx with
// a reason, and changes nothing.
func TestServerAPIRefusesBadRequests(t *testing.T) {
	h := &Handler{ChannelPrefix: ptr(uniquePrefix())}
	startNode(t, h)
	prefix := *h.ChannelPrefix
	long := strings.Repeat("a", 300)
	for _, tc := range []struct {
		method, op, body string
		status           int
	}{
		{"GET", "nope", "", 404},
		{"GET", "disconnect", "", 405},
		{"POST", "stats", "", 405},
		{"POST", "disconnect", `{"user":"a","conn":"b"}`, 400},
		{"POST", "disconnect", `{}`, 400},
		{"POST", "disconnect", `{"user":"a","code":1000}`, 400},
		{"POST", "disconnect", `{"user":"a","code":5000}`, 400},
		{"POST", "disconnect", `{"user":"a","reason":"` + long + `"}`, 400},
		{"POST", "disconnect", `{"user":"` + long + `"}`, 400},
		{"POST", "disconnect", `{"user":"a","extra":1}`, 400},
		{"POST", "disconnect", `{"user":"a"} {}`, 400},
		{"POST", "disconnect", `not json`, 400},
		{"POST", "disconnect", `{"user":"` + strings.Repeat("a", maxAPIBody) + `"}`, 413},
		{"POST", "subscribe", `{"user":"a","channel":"bad channel"}`, 400},
		{"POST", "subscribe", `{"user":"a","channel":"#control"}`, 400},
		{"POST", "unsubscribe", `{"channel":"room:1"}`, 400},
		{"POST", "revoke", `{}`, 400},
		{"POST", "revoke", `{"jti":"a","user":"b"}`, 400},
		{"POST", "revoke", `{"jti":"` + long + `"}`, 400},
		{"POST", "revoke", `{"jti":"a","issued_before":1}`, 400},
		{"POST", "revoke", `{"jti":"a","until":1}`, 400},
		{"POST", "revoke", fmt.Sprintf(`{"jti":"a","until":%d}`, time.Now().Add(40*24*time.Hour).Unix()), 400},
		{"GET", "channels?pattern=a**", "", 400},
		{"GET", "channels?limit=0", "", 400},
		{"GET", "channels?limit=10001", "", 400},
		{"GET", "channels?limit=1x", "", 400},
		{"GET", "presence?channel=room:1", "", 400}, // presence is off
		{"GET", "history?channel=room:1", "", 400},  // no history
		{"GET", "history?channel=", "", 400},
		{"POST", "history/remove", `{"channel":""}`, 400},
		{"POST", "broadcast", `{"channels":[],"data":1}`, 400},
		{"POST", "publish", `{"channel":"#control","data":1}`, 400},
	} {
		target := "/chat/" + tc.op + "?prefix=" + prefix
		if strings.Contains(tc.op, "?") {
			target = "/chat/" + tc.op + "&prefix=" + prefix
		}
		r := httptest.NewRequest(tc.method, target, strings.NewReader(tc.body))
		w := httptest.NewRecorder()
		_ = serveAdminAPI(w, r)
		var out struct {
			Error *publishError `json:"error"`
		}
		if w.Code != tc.status || json.Unmarshal(w.Body.Bytes(), &out) != nil || out.Error == nil || out.Error.Message == "" {
			t.Errorf("%s %s %.60s: %d %s, want %d with an error", tc.method, tc.op, tc.body, w.Code, w.Body.String(), tc.status)
		}
	}
	if got := h.hub.revocations.list(time.Now()); len(got) != 0 {
		t.Fatalf("refused revokes were kept: %v", got)
	}
}

// TestAdminAPIChoosesTheChat: with several chats on a node, the request
// names one by its channel prefix.
func TestAdminAPIChoosesTheChat(t *testing.T) {
	startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix())})
	startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix())})
	r := httptest.NewRequest("GET", "/chat/stats", nil)
	w := httptest.NewRecorder()
	_ = serveAdminAPI(w, r)
	if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "?prefix=") {
		t.Fatalf("stats without a prefix on a node of several chats: %d %s", w.Code, w.Body.String())
	}
	if code, out := adminCall(t, "nosuch:", "GET", "stats", ""); code != 404 {
		t.Fatalf("stats of an unknown prefix: %d %v", code, out)
	}
}

// apiCall runs one server API request on node n's chat, as its admin
// endpoint or publish endpoint would.
func apiCall(t testing.TB, n *testNode, method, op, body string) (int, map[string]any) {
	t.Helper()
	r := httptest.NewRequest(method, "/chat/"+op, strings.NewReader(body))
	w := httptest.NewRecorder()
	serveAPI(w, r, apiTarget{hub: n.h.hub, routes: []*route{n.h.route}, path: "test"}, op)
	var out map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &out); err != nil {
		t.Fatalf("%s %s: answer is not JSON: %q", method, op, w.Body.String())
	}
	return w.Code, out
}

// TestServerAPIOnRedisCluster: the control channel travels with sharded
// pub/sub; two nodes (hubs of different publish_timeout, so two in one
// process) of one chat act on each other's connections.
func TestServerAPIOnRedisCluster(t *testing.T) {
	cluster := redistest.StartCluster(t, 3, 0)
	prefix := uniquePrefix()
	newNode := func(timeout time.Duration) *testNode {
		return startNode(t, &Handler{RedisCluster: &RedisCluster{Addrs: cluster.Addrs()}, ChannelPrefix: ptr(prefix),
			PublishTimeout: caddy.Duration(timeout), JWT: &JWTConfig{Secret: testSecret}, Subscribe: []string{"**"}})
	}
	a, b := newNode(2*time.Second), newNode(3*time.Second)
	bearer := func(user string) *websocket.DialOptions {
		return &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer " + newToken(t, user).sign()}}}
	}
	onA, onB, bob := dial(t, a.url("/"), bearer("alice")), dial(t, b.url("/"), bearer("alice")), dial(t, b.url("/"), bearer("bob"))
	for _, c := range []*testClient{onA, onB, bob} {
		c.next("welcome")
	}
	eventually(t, 10*time.Second, "both nodes on the control channel", func() (bool, string) {
		_, out := apiCall(t, a, "GET", "channels", "")
		return out["nodes"] == float64(2), fmt.Sprint(out)
	})
	if code, out := apiCall(t, b, "POST", "subscribe", `{"user":"alice","channel":"room:7"}`); code != 200 || out["subscribed"] != float64(2) {
		t.Fatalf("subscribe: %d %v", code, out)
	}
	onA.next("subscribed")
	onB.next("subscribed")
	if code, out := apiCall(t, a, "POST", "publish", `{"channel":"room:7","data":"hello"}`); code != 200 {
		t.Fatalf("publish: %d %v", code, out)
	}
	for _, c := range []*testClient{onA, onB} {
		if m := c.next("message"); m["data"] != "hello" || m["server"] != true {
			t.Fatalf("message: %v", m)
		}
	}
	if code, out := apiCall(t, a, "POST", "disconnect", `{"user":"alice"}`); code != 200 || out["disconnected"] != float64(2) || out["nodes"] != float64(2) {
		t.Fatalf("disconnect: %d %v", code, out)
	}
	for _, c := range []*testClient{onA, onB} {
		if got := c.closeCode(); got != closeDisconnected {
			t.Fatalf("closed with %d, want 4005", got)
		}
	}
	bob.subscribe("room:8", 1)
}
