package caddychat

// The admin subcommands as operators run them: the real Caddy binary
// (`caddy chat stats …`) against a real node's admin endpoint and its site's
// publish endpoint, with real WebSocket clients that see what the commands
// do (messages, server-side subscriptions, closes, refused tokens).

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"
)

// adminPublishKey is the publish key of the node of TestAdminCommandAgainstANode.
const adminPublishKey = "admin-cli-publish-key-0123456789"

// adminCommandRoutes: an anonymous route with history, and a jwt route with
// presence (anonymous connections are never listed) and the publish
// endpoint (where a token holder, unlike the publish key, may only
// publish); they share one chat (the memory broker, the default channel
// prefix).
const adminCommandRoutes = `	chat /ws {
		name ws
		history room:** 50 1h
		rate_limit off
	}
	chat /jwt {
		name jwt
		jwt {
			secret ` + testSecret + `
		}
		subscribe room:**
		publish room:**
		presence on
		publish_endpoint /chat/publish
		publish_key ` + adminPublishKey + `
	}`

// dialToken connects to a JSON route with a bearer token and reads the
// welcome.
func dialToken(t *testing.T, name, url, token string) *wsClient {
	t.Helper()
	c, err := dialWSWith(t, name, url, &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer " + token}}})
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.readMsg(10 * time.Second)
	if err != nil || m.Type != "welcome" {
		t.Fatalf("%s: want a welcome, got %v %v", name, m, err)
	}
	c.welcome = m
	return c
}

// waitFrame reads c's frames until one of type typ on channel comes (the
// broadcasts and presence events before it are passed over).
func waitFrame(t *testing.T, c *wsClient, typ, channel string) *serverMsg {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, err := c.readMsg(time.Until(deadline))
		if err != nil {
			t.Fatalf("%s: waiting for a %s frame on %s: %v", c.name, typ, channel, err)
		}
		if m.Type == typ && m.Channel == channel {
			return m
		}
	}
}

// expectClose waits for the server's close of c and checks its code and reason.
func expectClose(t *testing.T, c *wsClient, code websocket.StatusCode, reason string) {
	t.Helper()
	got, err := c.waitClosed(10 * time.Second)
	var ce websocket.CloseError
	errors.As(c.readErr, &ce)
	if err != nil || got != code || (reason != "" && ce.Reason != reason) {
		t.Fatalf("%s: closed with %d %q (%v), want %d %q", c.name, got, ce.Reason, err, code, reason)
	}
}

// dialStatus is the HTTP status of a handshake with token: 101 when admitted.
func dialStatus(t *testing.T, url, token string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer " + token}}})
	if err == nil {
		_ = c.CloseNow()
		return http.StatusSwitchingProtocols, ""
	}
	if resp == nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	return resp.StatusCode, err.Error()
}

func TestAdminCommandAgainstANode(t *testing.T) {
	t.Parallel()
	node := startCaddy(t, "admin", adminCommandRoutes)
	// The test's own environment must not choose the target.
	noEnv := []string{"CADDY_ADMIN=", "CHAT_PUBLISH_KEY="}
	// chat runs `caddy chat args… --admin <the node's>` and wants exit 0.
	chat := func(args ...string) string {
		t.Helper()
		out, stderr, code := runCaddyCLI(t, noEnv, append(append([]string{"chat"}, args...), "--admin", node.admin)...)
		if code != 0 {
			t.Fatalf("caddy chat %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, out, stderr)
		}
		return out
	}
	// chatFails runs a command that must fail and returns its stderr.
	chatFails := func(env []string, args ...string) string {
		t.Helper()
		out, stderr, code := runCaddyCLI(t, append(noEnv, env...), append([]string{"chat"}, args...)...)
		if code != 1 {
			t.Fatalf("caddy chat %s: exit %d, want 1\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, out, stderr)
		}
		return stderr
	}
	wantLines := func(what, out string, lines ...string) {
		t.Helper()
		for _, l := range lines {
			if !strings.Contains("\n"+out, "\n"+l) {
				t.Errorf("%s: no line %q in:\n%s", what, l, out)
			}
		}
	}

	// alice on /jwt with two tokens (issued a minute ago, see revoke --user
	// below), bob anonymous on /ws; all on room:1.
	iat := time.Now().Add(-time.Minute).Unix()
	tokenA1 := newToken(t, "alice").with(jwt.MapClaims{"jti": "a-1", "iat": iat}).sign()
	tokenA2 := newToken(t, "alice").with(jwt.MapClaims{"jti": "a-2", "iat": iat}).sign()
	alice1 := dialToken(t, "alice1", node.wsURL("/jwt"), tokenA1)
	alice2 := dialToken(t, "alice2", node.wsURL("/jwt"), tokenA2)
	bob := dialJSON(t, "bob", node.wsURL("/ws"))
	for _, c := range []*wsClient{alice1, alice2, bob} {
		c.subscribe("room:1")
	}

	// stats: the node's line, the totals, the routes; --json as the server
	// answered, also through $CADDY_ADMIN.
	out := chat("stats")
	wantLines("stats", out,
		"node "+bob.welcome.Node+": 3 connections, 1 user, 1 anonymous, 1 channel, 3 subscriptions",
		"total (1 node): 3 connections, 1 user, 1 anonymous, 1 channel, 3 subscriptions",
		"route ws: 1 connection, 0 users, 1 anonymous, 1 subscription",
		"route jwt: 2 connections, 1 user, 0 anonymous, 2 subscriptions")
	out, stderr, code := runCaddyCLI(t, []string{"CADDY_ADMIN=" + node.admin, "CHAT_PUBLISH_KEY="}, "chat", "stats", "--json")
	var stats struct {
		Nodes       []struct{ Node string } `json:"nodes"`
		Connections int                     `json:"connections"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &stats) != nil || len(stats.Nodes) != 1 || stats.Nodes[0].Node != bob.welcome.Node || stats.Connections != 3 {
		t.Errorf("stats --json from $CADDY_ADMIN: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, stderr)
	}
	wantLines("stats --prefix chat:", chat("stats", "--prefix", "chat:"), "total (1 node): 3 connections")

	wantLines("channels", chat("channels", "--pattern", "room:*"), "room:1: 3 subscribers on 1 node", "1 channel (1 node answered)")
	wantLines("presence", chat("presence", "room:1"), "alice: 2 connections")

	// publish: as the server, delivered to the subscribers, kept in history.
	out = chat("publish", "room:1", `{"text":"from ops"}`)
	if !strings.HasPrefix(out, "room:1: published, message id ") {
		t.Fatalf("publish: %s", out)
	}
	id := strings.TrimSpace(strings.TrimPrefix(out, "room:1: published, message id "))
	for _, c := range []*wsClient{alice1, bob} {
		m := waitFrame(t, c, "message", "room:1")
		if m.ID == nil || unquote(m.ID) != id || string(m.Data) != `{"text":"from ops"}` || !strings.Contains(m.raw, `"server":true`) {
			t.Errorf("%s got %s, want message %s from the server", c.name, m, id)
		}
	}
	wantLines("history", chat("history", "room:1", "--limit", "5"), id+"  ", "1 message of room:1 (epoch ")
	if out := chat("history", "room:1"); !strings.Contains(out, `(server)  {"text":"from ops"}`) {
		t.Errorf("history: %s", out)
	}

	wantLines("broadcast", chat("broadcast", `"hello"`, "room:1", "room:2"),
		"room:1: published, message id ", "room:2: published, message id ", "published on 2 of 2 channels")

	// subscribe / unsubscribe: both of alice's connections, told so, and
	// the subscription is real.
	wantLines("subscribe", chat("subscribe", "alice", "room:3"), "subscribed 2 connections on 1 node")
	waitFrame(t, alice1, "subscribed", "room:3")
	waitFrame(t, alice2, "subscribed", "room:3")
	chat("publish", "room:3", `{"n":3}`)
	if m := waitFrame(t, alice2, "message", "room:3"); string(m.Data) != `{"n":3}` {
		t.Errorf("alice2 on room:3 got %s", m)
	}
	wantLines("unsubscribe", chat("unsubscribe", "alice", "room:3"), "unsubscribed 2 connections on 1 node")
	waitFrame(t, alice1, "unsubscribed", "room:3")

	// disconnect: alice's connections closed with 4005 and the reason.
	wantLines("disconnect", chat("disconnect", "alice", "--reason", "kicked"), "disconnected 2 connections on 1 node")
	expectClose(t, alice1, 4005, "kicked")
	expectClose(t, alice2, 4005, "kicked")
	wantLines("disconnect --conn", chat("disconnect", "--conn", bob.welcome.Conn, "--code", "4010"), "disconnected 1 connection on 1 node")
	expectClose(t, bob, 4010, "")

	// revoke --jti: the connection holding it closed with 4006, the token
	// refused from then on, alice's other token still good.
	alice3 := dialToken(t, "alice3", node.wsURL("/jwt"), tokenA1)
	out = chat("revoke", "--jti", "a-1", "--until", "2h")
	wantLines("revoke --jti", out, "revoked the token a-1 until ")
	// The until the node keeps is the one --until 2h asked for.
	until, _, _ := strings.Cut(strings.TrimPrefix(out, "revoked the token a-1 until "), ";")
	if u, err := time.Parse(time.RFC3339, until); err != nil || u.Sub(time.Now().Add(2*time.Hour)).Abs() > time.Minute {
		t.Errorf("revoke --until 2h: the answer says until %q (%v)", until, err)
	}
	expectClose(t, alice3, 4006, "")
	if status, msg := dialStatus(t, node.wsURL("/jwt"), tokenA1); status != http.StatusUnauthorized {
		t.Errorf("a revoked token: HTTP %d %s, want 401", status, msg)
	}
	alice4 := dialToken(t, "alice4", node.wsURL("/jwt"), tokenA2)

	// revoke --user: the tokens issued before --issued-before; a token
	// issued later still gets in.
	wantLines("revoke --user", chat("revoke", "--user", "alice", "--issued-before", "-30s"),
		"revoked the tokens of alice issued before ")
	expectClose(t, alice4, 4006, "")
	if status, _ := dialStatus(t, node.wsURL("/jwt"), tokenA2); status != http.StatusUnauthorized {
		t.Errorf("a token issued before the user's revocation: HTTP %d, want 401", status)
	}
	if status, msg := dialStatus(t, node.wsURL("/jwt"), newToken(t, "alice").sign()); status != http.StatusSwitchingProtocols {
		t.Errorf("a token issued after the user's revocation: HTTP %d %s, want admitted", status, msg)
	}
	wantLines("revocations", chat("revocations"), "token a-1 until ", "user alice: tokens issued before ", "2 revocations")

	wantLines("history-remove", chat("history-remove", "room:1"), "removed the history of room:1")
	wantLines("history after remove", chat("history", "room:1"), "0 messages of room:1")

	// The site's publish endpoint: the same ops under its URL, with the key.
	site := node.httpURL("/chat/publish")
	out, stderr, code = runCaddyCLI(t, []string{"CADDY_ADMIN=", "CHAT_PUBLISH_KEY=" + adminPublishKey}, "chat", "stats", "--url", site)
	if code != 0 || !strings.Contains(out, "total (1 node): ") {
		t.Errorf("stats --url: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, stderr)
	}
	out, stderr, code = runCaddyCLI(t, noEnv, "chat", "publish", "room:9", "1", "--url", site, "--key", adminPublishKey)
	if code != 0 || !strings.HasPrefix(out, "room:9: published, message id ") {
		t.Errorf("publish --url: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, stderr)
	}

	// Failures: exit 1, the op, the status and the server's message.
	stderr = chatFails(nil, "stats", "--url", site, "--key", "not-the-key-0123456789")
	if !strings.Contains(stderr, "caddy chat stats: GET "+site+"/stats: HTTP 401 Unauthorized: unauthorized: ") {
		t.Errorf("a wrong key: %s", stderr)
	}
	stderr = chatFails(nil, "channels", "--url", site, "--key", newToken(t, "alice").sign())
	if !strings.Contains(stderr, "HTTP 403 Forbidden: forbidden: ") || !strings.Contains(stderr, "needs the publish key") {
		t.Errorf("a JWT instead of the publish key: %s", stderr)
	}
	stderr = chatFails(nil, "history", "nohist:1", "--admin", node.admin)
	if !strings.Contains(stderr, "caddy chat history: GET http://"+node.admin+"/chat/history?channel=nohist%3A1: HTTP 400 Bad Request: bad_request: ") {
		t.Errorf("history of a channel without: %s", stderr)
	}
	stderr = chatFails(nil, "stats", "--admin", node.admin, "--prefix", "nope:")
	if !strings.Contains(stderr, "HTTP 404 Not Found: not_found: ") {
		t.Errorf("an unknown chat: %s", stderr)
	}
	stderr = chatFails(nil, "disconnect", "alice", "--code", "1000", "--admin", node.admin)
	if !strings.Contains(stderr, "caddy chat disconnect: POST http://"+node.admin+"/chat/disconnect: HTTP 400 Bad Request: bad_request: ") {
		t.Errorf("a close code out of range: %s", stderr)
	}
	unused := freeAddr(t)
	stderr = chatFails([]string{"CADDY_ADMIN=" + unused}, "stats")
	if !strings.Contains(stderr, "caddy chat stats: Caddy's admin endpoint is not reachable at "+unused+" (") ||
		!strings.Contains(stderr, "connection refused") || !strings.Contains(stderr, `"admin off"`) {
		t.Errorf("no Caddy at $CADDY_ADMIN: %s", stderr)
	}
}
