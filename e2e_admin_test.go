package caddychat

// End-to-end: the server API of issue 19 (spec: PROTOCOL.md, "Server API"),
// on Caddy's admin endpoint (admin.api.chat, http://<admin>/chat/<op>) and
// under the site's publish endpoint (<publish_endpoint>/<op>, publish key),
// on two Caddy nodes sharing a real redis-server and on one node with the
// memory broker. Revocation is in e2e_revoke_test.go.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/caddychat/caddychat/internal/redistest"
)

const apiKey = "test-publish-key-api-0123456789ab"

// apiRoutes: users with query tokens may subscribe to room:1 and hist:*
// only (room:2 is for server-side subscribes), publish on room:* and hist:*;
// presence on; history on hist:*; the site's publish endpoint with its key.
func apiRoutes(redisURL string) string {
	if redisURL != "" {
		redisURL = "redis " + redisURL + "\n\t\t"
	}
	return fmt.Sprintf(`	chat /ws {
		%sjwt {
			secret %s
			query_token
		}
		subscribe room:1 hist:*
		publish room:* hist:*
		presence on
		history hist:* 50
		rate_limit off
		publish_endpoint /chat/publish
		publish_key %s
	}`, redisURL, testSecret, apiKey)
}

// forEachAPIBroker runs test on two nodes sharing a real Redis (once both
// report their stats) and on one node with the memory broker, in parallel.
func forEachAPIBroker(t *testing.T, test func(t *testing.T, nodes []*caddyNode)) {
	t.Run("redis", func(t *testing.T) {
		t.Parallel()
		rs := redistest.Start(t)
		a := startCaddy(t, "A", apiRoutes(rs.URL()))
		b := startCaddy(t, "B", apiRoutes(rs.URL()))
		waitNodes(t, adminOf(a), 2)
		test(t, []*caddyNode{a, b})
	})
	t.Run("memory", func(t *testing.T) {
		t.Parallel()
		test(t, []*caddyNode{startCaddy(t, "A", apiRoutes(""))})
	})
}

// chatAPI is one base of the server API: a node's admin endpoint, or its
// site's publish endpoint with a key (or a user's token).
type chatAPI struct{ name, base, key string }

func adminOf(n *caddyNode) chatAPI {
	return chatAPI{n.name + " admin", "http://" + n.admin + "/chat", ""}
}
func siteOf(n *caddyNode) chatAPI {
	return chatAPI{n.name + " site", n.httpURL("/chat/publish"), apiKey}
}

type apiResp struct {
	status int
	body   string
	header http.Header
}

// do sends method base/op (base itself when op is "") with body (none if "").
func (a chatAPI) do(t testing.TB, method, op, body string) apiResp {
	t.Helper()
	url := a.base
	if op != "" {
		url += "/" + op
	}
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if a.key != "" {
		req.Header.Set("Authorization", "Bearer "+a.key)
	}
	resp, err := adminHTTP.Do(req)
	if err != nil {
		t.Fatalf("%s: %s %s: %v", a.name, method, url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return apiResp{resp.StatusCode, string(b), resp.Header}
}

// post sends body (a string as is, else as JSON) to op, requires a 200 and
// decodes the answer into out (when not nil).
func (a chatAPI) post(t testing.TB, op string, body any, out any) string {
	t.Helper()
	s, ok := body.(string)
	if !ok {
		b, _ := json.Marshal(body)
		s = string(b)
	}
	return a.expectOK(t, a.do(t, http.MethodPost, op, s), "POST "+op+" "+s, out)
}

func (a chatAPI) get(t testing.TB, op string, out any) string {
	t.Helper()
	return a.expectOK(t, a.do(t, http.MethodGet, op, ""), "GET "+op, out)
}

func (a chatAPI) expectOK(t testing.TB, r apiResp, what string, out any) string {
	t.Helper()
	if r.status != http.StatusOK {
		t.Fatalf("%s: %s: HTTP %d %s", a.name, what, r.status, r.body)
	}
	if out != nil {
		if err := json.Unmarshal([]byte(r.body), out); err != nil {
			t.Fatalf("%s: %s: answer %s: %v", a.name, what, r.body, err)
		}
	}
	return r.body
}

// expectAPIError requires status and {"error":{"code":code,"message":…}}.
func expectAPIError(t testing.TB, what string, r apiResp, status int, code string) {
	t.Helper()
	var e struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	if r.status != status || json.Unmarshal([]byte(r.body), &e) != nil || e.Error.Code != code || e.Error.Message == "" {
		t.Errorf("%s: HTTP %d %s, want %d {\"error\":{\"code\":%q,\"message\":…}}", what, r.status, r.body, status, code)
	}
}

// cluster is what a cluster-wide op answers.
type cluster struct {
	Disconnected, Unsubscribed, Subscribed, Refused *int
	Nodes                                           int
	MissingNodes                                    int `json:"missing_nodes"`
}

func checkCluster(t testing.TB, what string, got cluster, count *int, want, nodes int) {
	t.Helper()
	if count == nil || *count != want || got.Nodes != nodes || got.MissingNodes != 0 {
		t.Fatalf("%s: answer %+v, want count %d over %d nodes", what, got, want, nodes)
	}
}

type figures struct {
	Route         string `json:"route"`
	Node          string `json:"node"`
	Connections   int    `json:"connections"`
	Users         int    `json:"users"`
	Anonymous     int    `json:"anonymous"`
	Channels      int    `json:"channels"`
	Subscriptions int    `json:"subscriptions"`
	Routes        []figures
}

type statsAnswer struct {
	figures
	Nodes []struct {
		figures
		ReportedAt int64 `json:"reported_at"`
	}
}

func waitNodes(t testing.TB, api chatAPI, n int) {
	t.Helper()
	eventually(t, 10*time.Second, api.name+": stats lists every node", func() (bool, string) {
		var s statsAnswer
		body := api.get(t, "stats", &s)
		return len(s.Nodes) == n, body
	})
}

// dialAs connects to n's /ws with token and reads the welcome.
func dialAs(t testing.TB, name string, n *caddyNode, token string) *wsClient {
	t.Helper()
	return dialJSON(t, name, n.wsURL("/ws?token="+token))
}

// nextNonPresence returns c's next frame that is not a presence event.
func nextNonPresence(t testing.TB, c *wsClient, timeout time.Duration) *serverMsg {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m, err := c.readMsg(time.Until(deadline))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if m.Type != "join" && m.Type != "leave" {
			return m
		}
	}
}

// expectFrame requires c's next frame (presence events aside) to be of typ
// on channel.
func expectFrame(t testing.TB, c *wsClient, typ, channel string) *serverMsg {
	t.Helper()
	m := nextNonPresence(t, c, 5*time.Second)
	if m.Type != typ || m.Channel != channel {
		t.Fatalf("%s: want a %s frame on %s, got %s", c.name, typ, channel, m)
	}
	return m
}

// publishVia publishes data on channel through api and returns the id.
func publishVia(t testing.TB, api chatAPI, channel string, data any) string {
	t.Helper()
	var r struct{ Channel, ID string }
	api.post(t, "publish", map[string]any{"channel": channel, "data": data}, &r)
	if r.Channel != channel || r.ID == "" {
		t.Fatalf("%s: publish on %s: answer %+v", api.name, channel, r)
	}
	return r.ID
}

// receives requires each client's next message to be the publish id.
func receives(t testing.TB, channel, id string, cs ...*wsClient) {
	t.Helper()
	for _, c := range cs {
		if m := expectFrame(t, c, "message", channel); m.MessageIDOf() != id {
			t.Fatalf("%s: got %s, want message %s", c.name, m, id)
		}
	}
}

// closed requires c to be closed with code and reason within timeout.
func closed(t testing.TB, c *wsClient, timeout time.Duration, code int, reason string) {
	t.Helper()
	if _, err := c.waitClosed(timeout); err != nil {
		t.Fatalf("%s: not closed within %v: %v", c.name, timeout, err)
	}
	if got, msg := closeOf(c); got != code || msg != reason {
		t.Fatalf("%s: closed with %d %q (%v), want %d %q", c.name, got, msg, c.readErr, code, reason)
	}
}

// TestAdminAPIDisconnect: alice with a connection on each node is
// disconnected everywhere, asked of either node (code and reason given, then
// the defaults), and one connection by its id; bob keeps receiving.
func TestAdminAPIDisconnect(t *testing.T) {
	t.Parallel()
	forEachAPIBroker(t, func(t *testing.T, nodes []*caddyNode) {
		node := func(i int) *caddyNode { return nodes[i%len(nodes)] }
		bob := dialAs(t, "bob", node(1), newToken(t, "bob").sign())
		bob.subscribe("room:1")
		aliceOnBoth := func() []*wsClient {
			return []*wsClient{dialAs(t, "alice@0", node(0), newToken(t, "alice").sign()), dialAs(t, "alice@1", node(1), newToken(t, "alice").sign())}
		}
		rounds := []struct {
			body   map[string]any
			code   int
			reason string
		}{
			{map[string]any{"user": "alice", "code": 4005, "reason": "kicked"}, 4005, "kicked"},
			{map[string]any{"user": "alice"}, 4005, "disconnected by the server"},
			{map[string]any{"user": "alice", "code": 4321, "reason": "bye"}, 4321, "bye"},
		}
		for i, r := range rounds {
			alice := aliceOnBoth()
			var got cluster
			adminOf(node(i)).post(t, "disconnect", r.body, &got)
			checkCluster(t, fmt.Sprint("disconnect ", r.body), got, got.Disconnected, 2, len(nodes))
			for _, c := range alice {
				closed(t, c, 2*time.Second, r.code, r.reason)
			}
		}
		// One connection by its id, asked of the other node.
		alice := aliceOnBoth()
		var got cluster
		adminOf(node(0)).post(t, "disconnect", map[string]any{"conn": alice[1].welcome.Conn}, &got)
		checkCluster(t, "disconnect by conn", got, got.Disconnected, 1, len(nodes))
		closed(t, alice[1], 2*time.Second, 4005, "disconnected by the server")
		if r, err := alice[0].request(map[string]any{"op": "subscribe", "channel": "room:1"}, 5*time.Second); err != nil || r.Type != "ok" {
			t.Fatalf("alice's other connection after a disconnect by conn: %v %v", r, err)
		}
		// Bob was never touched: his next frames are this message.
		id := publishVia(t, adminOf(node(1)), "room:1", "still here")
		receives(t, "room:1", id, bob)
	})
}

// TestAdminAPIUnsubscribe: alice on room:1 on both nodes is unsubscribed,
// asked of node B: both get "unsubscribed" and no more room:1 messages; bob
// (also on both nodes) still gets them; presence lists bob only.
func TestAdminAPIUnsubscribe(t *testing.T) {
	t.Parallel()
	forEachAPIBroker(t, func(t *testing.T, nodes []*caddyNode) {
		node := func(i int) *caddyNode { return nodes[i%len(nodes)] }
		var alice, bob []*wsClient
		for i := range 2 {
			a := dialAs(t, fmt.Sprint("alice@", i), node(i), newToken(t, "alice").sign())
			b := dialAs(t, fmt.Sprint("bob@", i), node(i), newToken(t, "bob").sign())
			for _, c := range []*wsClient{a, b} {
				c.subscribe("room:1")
				c.subscribe("hist:mark")
			}
			alice, bob = append(alice, a), append(bob, b)
		}
		var got cluster
		adminOf(node(1)).post(t, "unsubscribe", map[string]any{"user": "alice", "channel": "room:1"}, &got)
		checkCluster(t, "unsubscribe", got, got.Unsubscribed, 2, len(nodes))
		for _, c := range alice {
			expectFrame(t, c, "unsubscribed", "room:1")
		}
		// A room:1 message reaches bob on every node; a marker published
		// after it is alice's next frame: she got no room:1 message.
		id := publishVia(t, adminOf(node(0)), "room:1", "after")
		receives(t, "room:1", id, bob...)
		mark := publishVia(t, adminOf(node(0)), "hist:mark", "marker")
		receives(t, "hist:mark", mark, alice...)
		for _, n := range nodes {
			var p struct {
				Channel string
				Users   []struct {
					User        string
					Connections int
				}
			}
			adminOf(n).get(t, "presence?channel=room:1", &p)
			if p.Channel != "room:1" || len(p.Users) != 1 || p.Users[0].User != "bob" || p.Users[0].Connections != 2 {
				t.Fatalf("%s: presence of room:1 after alice's unsubscribe: %+v, want bob:2 only", n.name, p)
			}
		}
		// Nobody is subscribed: a second unsubscribe counts 0.
		adminOf(node(0)).post(t, "unsubscribe", map[string]any{"user": "alice", "channel": "room:1"}, &got)
		checkCluster(t, "unsubscribe again", got, got.Unsubscribed, 0, len(nodes))
	})
}

// TestAdminAPISubscribe: alice, who may not subscribe to room:2 herself, is
// subscribed server-side on both nodes and gets its messages.
func TestAdminAPISubscribe(t *testing.T) {
	t.Parallel()
	forEachAPIBroker(t, func(t *testing.T, nodes []*caddyNode) {
		node := func(i int) *caddyNode { return nodes[i%len(nodes)] }
		var alice []*wsClient
		for i := range 2 {
			alice = append(alice, dialAs(t, fmt.Sprint("alice@", i), node(i), newToken(t, "alice").sign()))
		}
		if r, err := alice[0].request(map[string]any{"op": "subscribe", "channel": "room:2"}, 5*time.Second); err != nil || r.Type != "error" || r.Code != "forbidden" {
			t.Fatalf("alice subscribing to room:2 herself: %v %v, want forbidden", r, err)
		}
		var got cluster
		adminOf(node(1)).post(t, "subscribe", map[string]any{"user": "alice", "channel": "room:2"}, &got)
		checkCluster(t, "subscribe", got, got.Subscribed, 2, len(nodes))
		for _, c := range alice {
			expectFrame(t, c, "subscribed", "room:2")
		}
		id := publishVia(t, adminOf(node(0)), "room:2", "for alice")
		receives(t, "room:2", id, alice...)
		var p struct{ Users []struct{ User string } }
		adminOf(node(0)).get(t, "presence?channel=room:2", &p)
		if len(p.Users) != 1 || p.Users[0].User != "alice" {
			t.Fatalf("presence of room:2 after the server's subscribe: %+v", p)
		}
	})
}

// TestAdminAPIIdempotentPublish: one publish with one idempotency_key, sent
// 5 times over the admin endpoints of both nodes and the site endpoint, is
// delivered once and every answer has its id; so is a repeated broadcast.
func TestAdminAPIIdempotentPublish(t *testing.T) {
	t.Parallel()
	forEachAPIBroker(t, func(t *testing.T, nodes []*caddyNode) {
		node := func(i int) *caddyNode { return nodes[i%len(nodes)] }
		var subs []*wsClient
		for i := range nodes {
			s := dialAs(t, fmt.Sprint("bob@", i), nodes[i], newToken(t, "bob").sign())
			s.subscribe("room:1")
			subs = append(subs, s)
		}
		body := `{"channel":"room:1","data":{"text":"once"},"idempotency_key":"api-key-1"}`
		sends := []struct {
			api chatAPI
			op  string
		}{{adminOf(node(0)), "publish"}, {adminOf(node(1)), "publish"}, {siteOf(node(0)), ""}, {siteOf(node(1)), "publish"}, {adminOf(node(1)), "publish"}}
		var first string
		for i, s := range sends {
			var r struct {
				Channel, ID string
				Duplicate   bool
			}
			s.api.post(t, s.op, body, &r)
			if i == 0 {
				first = r.ID
			}
			if r.Channel != "room:1" || r.ID == "" || r.ID != first || r.Duplicate != (i > 0) {
				t.Fatalf("send %d (%s /%s): %+v, want id %s, duplicate %v", i, s.api.name, s.op, r, first, i > 0)
			}
		}
		receives(t, "room:1", first, subs...)
		mark := publishVia(t, adminOf(node(0)), "room:1", "marker")
		receives(t, "room:1", mark, subs...)

		// A broadcast repeated with its key: the same ids, delivered once.
		type results struct {
			Results []struct{ Channel, ID string }
		}
		var one, two results
		bc := `{"channels":["room:1","hist:1"],"data":"all","idempotency_key":"bc-1"}`
		adminOf(node(1)).post(t, "broadcast", bc, &one)
		siteOf(node(0)).post(t, "broadcast", bc, &two)
		if len(one.Results) != 2 || one.Results[0].Channel != "room:1" || one.Results[0].ID == "" || one.Results[1].Channel != "hist:1" {
			t.Fatalf("broadcast: %+v", one)
		}
		for i := range one.Results {
			if i >= len(two.Results) || two.Results[i].ID != one.Results[i].ID {
				t.Fatalf("repeated broadcast: %+v, first %+v", two, one)
			}
		}
		receives(t, "room:1", one.Results[0].ID, subs...)
		mark = publishVia(t, adminOf(node(0)), "room:1", "marker")
		receives(t, "room:1", mark, subs...)
	})
}

// TestAdminAPIStatsAndPresence: alice (one connection per node) and bob
// (one, on B) on room:1: stats, presence and channels agree from every node.
func TestAdminAPIStatsAndPresence(t *testing.T) {
	t.Parallel()
	forEachAPIBroker(t, func(t *testing.T, nodes []*caddyNode) {
		node := func(i int) *caddyNode { return nodes[i%len(nodes)] }
		conns := []*wsClient{
			dialAs(t, "alice@0", node(0), newToken(t, "alice").sign()),
			dialAs(t, "alice@1", node(1), newToken(t, "alice").sign()),
			dialAs(t, "bob@1", node(1), newToken(t, "bob").sign()),
		}
		// What each node should report: by the node ids of the welcomes.
		want := map[string]*figures{}
		users := map[string]map[string]bool{}
		for _, c := range conns {
			c.subscribe("room:1")
			n := c.welcome.Node
			if want[n] == nil {
				want[n] = &figures{Node: n, Channels: 1}
				users[n] = map[string]bool{}
			}
			want[n].Connections++
			want[n].Subscriptions++
			users[n][*c.welcome.User] = true
			want[n].Users = len(users[n])
		}
		// A channel with subscribers on two nodes counts on each.
		total := figures{Connections: 3, Channels: len(want), Subscriptions: 3}
		for _, f := range want {
			total.Users += f.Users
			f.Routes = []figures{{Route: wantRouteName, Connections: f.Connections, Users: f.Users, Subscriptions: f.Subscriptions}}
		}
		total.Routes = []figures{{Route: wantRouteName, Connections: 3, Users: total.Users, Subscriptions: 3}}
		wantJSON, _ := json.Marshal(map[string]any{"totals": total, "nodes": want})
		for _, n := range nodes {
			eventually(t, 15*time.Second, fmt.Sprintf("%s: stats %s", n.name, wantJSON), func() (bool, string) {
				var s statsAnswer
				body := adminOf(n).get(t, "stats", &s)
				if len(s.Nodes) != len(want) || !figuresEqual(s.figures, total) {
					return false, body
				}
				for i, f := range s.Nodes {
					w := want[f.Node]
					if w == nil || !figuresEqual(f.figures, *w) || f.ReportedAt < time.Now().Add(-10*time.Second).UnixMilli() ||
						(i > 0 && s.Nodes[i-1].Node >= f.Node) {
						return false, body
					}
				}
				return true, body
			})
			var p struct {
				Channel string
				Users   []struct {
					User        string
					Connections int
				}
			}
			adminOf(n).get(t, "presence?channel=room:1", &p)
			if got := fmt.Sprint(p.Users); p.Channel != "room:1" || got != "[{alice 2} {bob 1}]" {
				t.Fatalf("%s: presence of room:1: %+v", n.name, p)
			}
			var ch struct {
				Channels []struct {
					Channel            string
					Subscribers, Nodes int
				}
				Nodes     int
				Truncated bool
			}
			adminOf(n).get(t, "channels?pattern=room:*", &ch)
			if got := fmt.Sprint(ch.Channels); got != fmt.Sprintf("[{room:1 3 %d}]", len(nodes)) || ch.Nodes != len(nodes) || ch.Truncated {
				t.Fatalf("%s: channels room:*: %+v", n.name, ch)
			}
			adminOf(n).get(t, "channels?pattern=hist:*", &ch)
			if len(ch.Channels) != 0 {
				t.Fatalf("%s: channels hist:*: %+v, want none", n.name, ch)
			}
		}
	})
}

// wantRouteName is the name stats give the route `chat /ws { … }` without a
// name option: the spec says the directive's first path matcher.
const wantRouteName = "/ws"

func figuresEqual(a, b figures) bool {
	eq := func(x, y figures) bool {
		return x.Route == y.Route && x.Connections == y.Connections && x.Users == y.Users &&
			x.Anonymous == y.Anonymous && x.Subscriptions == y.Subscriptions
	}
	return eq(a, b) && a.Channels == b.Channels && slices.EqualFunc(a.Routes, b.Routes, eq)
}

// closeOf is the close code and reason of a closed client (-1 without a
// close frame).
func closeOf(c *wsClient) (int, string) {
	var ce websocket.CloseError
	if !errors.As(c.readErr, &ce) {
		return -1, ""
	}
	return int(ce.Code), ce.Reason
}
