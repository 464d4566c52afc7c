package caddychat

// End-to-end: the server API's history ops, its site endpoint
// (<publish_endpoint>/<op> behind the publish key), its answers to bad
// requests, and a node with Caddy's admin endpoint off. Helpers are in
// e2e_admin_test.go.

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
)

// TestAdminAPIHistory: read a channel's history (pages, from every node),
// remove it; then it is empty and a resume from an old id is not recovered.
func TestAdminAPIHistory(t *testing.T) {
	t.Parallel()
	forEachAPIBroker(t, func(t *testing.T, nodes []*caddyNode) {
		node := func(i int) *caddyNode { return nodes[i%len(nodes)] }
		var ids []string
		for i := range 3 {
			ids = append(ids, publishVia(t, adminOf(node(i)), "hist:1", map[string]int{"n": i}))
		}
		type page struct {
			Channel, Epoch string
			Messages       []struct{ Type, Channel, ID string }
			More           bool
		}
		pageIDs := func(p page) (s []string) {
			for _, m := range p.Messages {
				s = append(s, m.ID)
			}
			return s
		}
		var epoch string
		for _, n := range nodes {
			var all, last, older page
			adminOf(n).get(t, "history?channel=hist:1", &all)
			adminOf(n).get(t, "history?channel=hist:1&limit=2", &last)
			adminOf(n).get(t, "history?channel=hist:1&limit=2&before="+ids[1], &older)
			if all.Channel != "hist:1" || all.Epoch == "" || !slices.Equal(pageIDs(all), ids) || all.More ||
				!slices.Equal(pageIDs(last), ids[1:]) || !last.More || !slices.Equal(pageIDs(older), ids[:1]) || older.More {
				t.Fatalf("%s: history pages: all %+v, last 2 %+v, before %s %+v", n.name, all, last, ids[1], older)
			}
			epoch = all.Epoch
		}
		expectAPIError(t, "history of a channel without history", adminOf(node(0)).do(t, http.MethodGet, "history?channel=room:1", ""), 400, "bad_request")

		resume := func(name string) *serverMsg {
			c := dialAs(t, name, node(1), newToken(t, "bob").sign())
			m, err := c.request(map[string]any{"op": "subscribe", "channel": "hist:1", "since": ids[0], "epoch": epoch}, 10*time.Second)
			if err != nil || m.Type != "ok" || m.Recovered == nil {
				t.Fatalf("%s: resume: %v %v", name, m, err)
			}
			return m
		}
		if m := resume("before-remove"); !*m.Recovered || m.Replayed == nil || *m.Replayed != 2 {
			t.Fatalf("resume before the remove: %s, want recovered with 2 replayed", m)
		}
		var rm struct {
			Channel string
			Removed bool
		}
		adminOf(node(1)).post(t, "history/remove", map[string]any{"channel": "hist:1"}, &rm)
		if rm.Channel != "hist:1" || !rm.Removed {
			t.Fatalf("history/remove: %+v", rm)
		}
		for _, n := range nodes {
			var p page
			adminOf(n).get(t, "history?channel=hist:1", &p)
			if len(p.Messages) != 0 {
				t.Fatalf("%s: history after the remove: %+v", n.name, p)
			}
		}
		publishVia(t, adminOf(node(0)), "hist:1", "new epoch")
		if m := resume("after-remove"); *m.Recovered || m.Epoch == epoch {
			t.Fatalf("resume from an old id after the remove: %s, want recovered false in a new epoch", m)
		}
	})
}

// TestAdminAPISiteEndpoint: the ops under <publish_endpoint>/ work with the
// publish key, are refused without it (401) and to a user's token (403);
// the site listener does not serve the admin API's paths.
func TestAdminAPISiteEndpoint(t *testing.T) {
	t.Parallel()
	forEachAPIBroker(t, func(t *testing.T, nodes []*caddyNode) {
		node := func(i int) *caddyNode { return nodes[i%len(nodes)] }
		bob := dialAs(t, "bob", node(0), newToken(t, "bob").sign())
		bob.subscribe("room:1")
		alice := []*wsClient{dialAs(t, "alice@0", node(0), newToken(t, "alice").sign()), dialAs(t, "alice@1", node(1), newToken(t, "alice").sign())}
		eventually(t, 15*time.Second, "stats over the site endpoint", func() (bool, string) {
			var s statsAnswer
			body := siteOf(node(1)).get(t, "stats", &s)
			return s.Connections == 3 && s.Users == 2+len(nodes)-1 && len(s.Nodes) == len(nodes), body
		})

		// Refused: no key, a wrong key, a user's token (403 but for publish).
		tok := newToken(t, "alice").sign()
		for _, api := range []chatAPI{{"no key", siteOf(node(0)).base, ""}, {"wrong key", siteOf(node(0)).base, "wrong-publish-key-0123456789abcdef"}} {
			expectAPIError(t, api.name+": GET stats", api.do(t, http.MethodGet, "stats", ""), http.StatusUnauthorized, "unauthorized")
			expectAPIError(t, api.name+": POST disconnect", api.do(t, http.MethodPost, "disconnect", `{"user":"alice"}`), http.StatusUnauthorized, "unauthorized")
		}
		user := chatAPI{"alice's token", siteOf(node(1)).base, tok}
		expectAPIError(t, "user token: GET stats", user.do(t, http.MethodGet, "stats", ""), http.StatusForbidden, "forbidden")
		for _, op := range []string{"disconnect", "unsubscribe", "subscribe", "revoke"} {
			expectAPIError(t, "user token: POST "+op, user.do(t, http.MethodPost, op, `{"user":"bob","channel":"room:1"}`), http.StatusForbidden, "forbidden")
		}
		if r := user.do(t, http.MethodPost, "", `{"channel":"room:1","data":"from alice"}`); r.status != http.StatusOK {
			t.Fatalf("user token: POST <publish_endpoint>: HTTP %d %s, want 200", r.status, r.body)
		} else {
			expectFrame(t, bob, "message", "room:1")
		}
		// The site does not serve the admin API's own paths.
		for _, r := range []apiResp{
			(chatAPI{"site /chat", node(0).httpURL("/chat"), apiKey}).do(t, http.MethodGet, "stats", ""),
			(chatAPI{"site /chat", node(0).httpURL("/chat"), ""}).do(t, http.MethodPost, "disconnect", `{"user":"alice"}`),
		} {
			if isAPIAnswer(r) {
				t.Fatalf("the site listener answers the admin API's path: HTTP %d %s", r.status, r.body)
			}
		}

		// Nothing so far touched alice; now the publish key disconnects her.
		var got cluster
		siteOf(node(0)).post(t, "disconnect", map[string]any{"user": "alice", "reason": "site kick"}, &got)
		checkCluster(t, "disconnect over the site endpoint", got, got.Disconnected, 2, len(nodes))
		for _, c := range alice {
			closed(t, c, 2*time.Second, 4005, "site kick")
		}
		id := publishVia(t, siteOf(node(1)), "room:1", "after")
		receives(t, "room:1", id, bob)
	})
}

// isAPIAnswer: a 2xx JSON object with a figure or an answer of the API.
func isAPIAnswer(r apiResp) bool {
	var m map[string]any
	if r.status/100 != 2 || json.Unmarshal([]byte(r.body), &m) != nil {
		return false
	}
	_, stats := m["connections"]
	_, disc := m["disconnected"]
	return stats || disc
}

// TestAdminAPIBadRequests: malformed, oversized, out-of-range and unknown
// requests are refused with the right status and code, on the admin
// endpoint and the site endpoint; the client they name stays connected.
func TestAdminAPIBadRequests(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	a := startCaddy(t, "A", apiRoutes(rs.URL()))
	b := startCaddy(t, "B", apiRoutes(rs.URL()))
	waitNodes(t, adminOf(a), 2)
	alice := dialAs(t, "alice", b, newToken(t, "alice").sign())
	alice.subscribe("room:1")

	pad := strings.Repeat(" ", 65*1024) // valid JSON, over 64 KiB
	cases := []struct {
		method, op, body string
		status           int
		code             string
	}{
		{"POST", "disconnect", `{"user":"alice"`, 400, "bad_request"},
		{"POST", "disconnect", `["alice"]`, 400, "bad_request"},
		{"POST", "disconnect", `{"user":"alice","bogus":1}`, 400, "bad_request"},
		{"POST", "disconnect", `{"user":"alice"` + pad + `}`, 413, "too_large"},
		{"POST", "disconnect", `{"user":"alice","code":3999}`, 400, "bad_request"},
		{"POST", "disconnect", `{"user":"alice","code":5000}`, 400, "bad_request"},
		{"POST", "disconnect", `{"user":"alice","code":1000}`, 400, "bad_request"},
		{"POST", "disconnect", `{"user":"alice","reason":"` + strings.Repeat("r", 124) + `"}`, 400, "bad_request"},
		{"POST", "disconnect", `{}`, 400, "bad_request"},
		{"POST", "unsubscribe", `{"user":"alice","channel":"room:1","x":true}`, 400, "bad_request"},
		{"POST", "unsubscribe", `{"user":"alice"}`, 400, "bad_request"},
		{"POST", "subscribe", `{"user":"alice","channel":""}`, 400, "bad_request"},
		{"POST", "publish", `{"channel":"room:9","data":1,"extra":2}`, 400, "bad_request"},
		{"POST", "publish", `{"channel":"room:9","data":`, 400, "bad_request"},
		{"POST", "publish", `{"channel":"#control","data":{"id":"x","from":"x","op":"disconnect","user":"alice"}}`, 400, "bad_request"},
		{"POST", "broadcast", `{"channels":[],"data":1}`, 400, "bad_request"},
		{"POST", "broadcast", `{"channels":["room:9"],"data":1,"extra":2}`, 400, "bad_request"},
		{"POST", "history/remove", `{"channel":"room:1"` + pad + `}`, 413, "too_large"},
		{"GET", "channels?limit=0", "", 400, "bad_request"},
		{"GET", "channels?limit=10001", "", 400, "bad_request"},
		{"GET", "presence", "", 400, "bad_request"},
		{"GET", "nope", "", 404, "not_found"},
		{"POST", "nope", `{}`, 404, "not_found"},
		{"POST", "stats/more", `{}`, 404, "not_found"},
	}
	for _, api := range []chatAPI{adminOf(a), siteOf(b)} {
		for _, c := range cases {
			r := api.do(t, c.method, c.op, c.body)
			expectAPIError(t, fmt.Sprintf("%s: %s %s %.60s", api.name, c.method, c.op, c.body), r, c.status, c.code)
		}
		for _, c := range []struct{ method, op, allow string }{
			{"GET", "disconnect", "POST"}, {"GET", "revoke", "POST"}, {"PUT", "publish", "POST"},
			{"POST", "stats", "GET"}, {"DELETE", "revocations", "GET"},
		} {
			r := api.do(t, c.method, c.op, "")
			var e struct {
				Error struct{ Code, Message string }
			}
			if r.status != http.StatusMethodNotAllowed || !strings.Contains(r.header.Get("Allow"), c.allow) ||
				json.Unmarshal([]byte(r.body), &e) != nil || e.Error.Code == "" {
				t.Errorf("%s: %s %s: HTTP %d, Allow %q, %s; want 405, Allow %s and an error", api.name, c.method, c.op, r.status, r.header.Get("Allow"), r.body, c.allow)
			}
		}
	}
	// The control channel is no client's either.
	for _, op := range []map[string]any{
		{"op": "publish", "channel": "#control", "data": map[string]any{"op": "disconnect", "user": "alice"}},
		{"op": "subscribe", "channel": "#control"},
	} {
		if r, err := alice.request(op, 5*time.Second); err != nil || r.Type != "error" || r.Code != "bad_request" {
			t.Errorf("alice: %v: %v %v, want bad_request", op, r, err)
		}
	}
	// None of this reached alice: her next frame is this message.
	id := publishVia(t, adminOf(a), "room:1", "after the attacks")
	receives(t, "room:1", id, alice)
}

// TestAdminAPIAdminOff: with `admin off` the node serves chat, nothing
// listens on the would-be admin address, and the site does not serve the API.
func TestAdminAPIAdminOff(t *testing.T) {
	t.Parallel()
	var wouldBe string
	n := startCaddy(t, "off", apiRoutes(""), func(n *caddyNode) { wouldBe, n.admin = n.admin, "off" })
	if b, _ := os.ReadFile(n.caddyfile); !strings.Contains(string(b), "\tadmin off\n") {
		t.Fatalf("the Caddyfile does not say admin off")
	}
	alice := dialAs(t, "alice", n, newToken(t, "alice").sign())
	alice.subscribe("room:1")
	id := publishVia(t, siteOf(n), "room:1", "chat works")
	receives(t, "room:1", id, alice)

	for _, addr := range []string{wouldBe, "localhost:2019"} {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			continue // refused: nothing answers
		}
		c.Close()
		if addr == wouldBe {
			t.Fatalf("something listens on the would-be admin address %s", addr)
		}
		// Another program may own Caddy's default admin port: it must
		// not answer for this node.
		r := (chatAPI{"localhost:2019", "http://localhost:2019/chat", ""}).do(t, http.MethodGet, "stats", "")
		if strings.Contains(r.body, alice.welcome.Node) {
			t.Fatalf("localhost:2019 answers this node's stats: %s", r.body)
		}
	}
	for _, r := range []apiResp{
		(chatAPI{"site", n.httpURL("/chat"), ""}).do(t, http.MethodGet, "stats", ""),
		(chatAPI{"site", n.httpURL("/chat"), apiKey}).do(t, http.MethodGet, "stats", ""),
		(chatAPI{"site", n.httpURL("/chat"), ""}).do(t, http.MethodPost, "disconnect", `{"user":"alice"}`),
	} {
		if isAPIAnswer(r) {
			t.Fatalf("the site answers the admin API's path: HTTP %d %s", r.status, r.body)
		}
	}
	id = publishVia(t, siteOf(n), "room:1", "still connected")
	receives(t, "room:1", id, alice)
}

// TestAdminAPIPrefix: a node with two chats (channel prefixes a: and b:,
// the first with two routes) is asked with ?prefix; without it, or with a
// prefix it has not, the API says so; a node without chat has no API.
func TestAdminAPIPrefix(t *testing.T) {
	t.Parallel()
	route := func(path, prefix string) string {
		return fmt.Sprintf("\tchat %s {\n\t\tchannel_prefix %s\n\t\trate_limit off\n\t}\n", path, prefix)
	}
	n := startCaddy(t, "A", route("/a", "a:")+route("/a2", "a:")+route("/b", "b:"))
	none := startCaddy(t, "none", "\trespond \"no chat here\"")
	dialJSON(t, "a", n.wsURL("/a"))
	dialJSON(t, "a2", n.wsURL("/a2"))
	b := dialJSON(t, "b", n.wsURL("/b"))

	expectAPIError(t, "two chats, no ?prefix", adminOf(n).do(t, http.MethodGet, "stats", ""), 400, "bad_request")
	expectAPIError(t, "a prefix the node has not", adminOf(n).do(t, http.MethodGet, "stats?prefix=zz:", ""), 404, "not_found")
	expectAPIError(t, "a node without chat", adminOf(none).do(t, http.MethodGet, "stats", ""), 404, "not_found")
	for prefix, want := range map[string]string{
		"a:": `{2 0 2 [{/a 1 0 1} {/a2 1 0 1}]}`,
		"b:": `{1 0 1 [{/b 1 0 1}]}`,
	} {
		var s statsAnswer
		adminOf(n).get(t, "stats?prefix="+prefix, &s)
		var routes []string
		for _, r := range s.Routes {
			routes = append(routes, fmt.Sprintf("{%s %d %d %d}", r.Route, r.Connections, r.Users, r.Anonymous))
		}
		if got := fmt.Sprintf("{%d %d %d [%s]}", s.Connections, s.Users, s.Anonymous, strings.Join(routes, " ")); got != want {
			t.Errorf("stats?prefix=%s: connections, users, anonymous, routes %s, want %s", prefix, got, want)
		}
	}
	var got cluster
	adminOf(n).post(t, "disconnect?prefix=a:", map[string]any{"conn": b.welcome.Conn}, &got)
	checkCluster(t, "disconnect b's conn in chat a:", got, got.Disconnected, 0, 1)
	adminOf(n).post(t, "disconnect?prefix=b:", map[string]any{"conn": b.welcome.Conn}, &got)
	checkCluster(t, "disconnect b's conn in chat b:", got, got.Disconnected, 1, 1)
	closed(t, b, 2*time.Second, 4005, "disconnected by the server")
}

// TestAdminAPIMissingNode: a node that does not answer (stopped with
// SIGSTOP, still subscribed at Redis) is left out after publish_timeout and
// counted in missing_nodes; the op is done on the others.
func TestAdminAPIMissingNode(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	a := startCaddy(t, "A", apiRoutes(rs.URL()))
	b := startCaddy(t, "B", apiRoutes(rs.URL()))
	waitNodes(t, adminOf(a), 2)
	alice := dialAs(t, "alice", a, newToken(t, "alice").sign())
	if err := b.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = b.cmd.Process.Signal(syscall.SIGCONT)
		}
	}
	t.Cleanup(resume)
	start := time.Now()
	var got cluster
	adminOf(a).post(t, "disconnect", map[string]any{"user": "alice"}, &got)
	took := time.Since(start)
	resume()
	if got.Disconnected == nil || *got.Disconnected != 1 || got.Nodes != 1 || got.MissingNodes != 1 {
		t.Fatalf("disconnect with node B stopped: %+v, want disconnected 1, nodes 1, missing_nodes 1", got)
	}
	if took > 5*time.Second {
		t.Fatalf("disconnect with node B stopped took %v, want about publish_timeout (2s)", took)
	}
	closed(t, alice, 2*time.Second, 4005, "disconnected by the server")
	waitNodes(t, adminOf(b), 2) // B works again
}

// TestAdminAPISubscribeRefused: a connection at max_subscriptions is left
// out of a server-side subscribe, and the answer says so.
func TestAdminAPISubscribeRefused(t *testing.T) {
	t.Parallel()
	n := startCaddy(t, "A", strings.Replace(apiRoutes(""), "rate_limit off", "rate_limit off\n\t\tmax_subscriptions 1", 1))
	full := dialAs(t, "alice full", n, newToken(t, "alice").sign())
	full.subscribe("room:1")
	free := dialAs(t, "alice free", n, newToken(t, "alice").sign())
	var got cluster
	body := adminOf(n).post(t, "subscribe", map[string]any{"user": "alice", "channel": "room:2"}, &got)
	checkCluster(t, "subscribe", got, got.Subscribed, 1, 1)
	if got.Refused == nil || *got.Refused != 1 || !strings.Contains(body, `"message":"`) {
		t.Fatalf("subscribe with one connection at max_subscriptions: %s, want refused 1 and a message", body)
	}
	expectFrame(t, free, "subscribed", "room:2")
	id := publishVia(t, adminOf(n), "room:2", "to the free one")
	receives(t, "room:2", id, free)
	id = publishVia(t, adminOf(n), "room:1", "marker")
	receives(t, "room:1", id, full) // and no "subscribed" or room:2 before it
}
