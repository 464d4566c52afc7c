package caddychat

// The admin subcommands without a node: command lines to requests, usage
// errors, time flags, the summaries of the spec's answers, and the failures
// a real node cannot easily be made to show (a node missing from a
// cluster-wide answer, a stalled server). command_admin_e2e_test.go runs the
// real binary against a real node.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// adminNow is the time the tests' durations count from.
var adminNow = time.Unix(1767225600, 0) // 2026-01-01T00:00:00Z

// adminCommandLine reads a command line of an admin subcommand as the
// command does (cobra's flag parsing and argument checks, then
// prepareAdmin), without sending: the URL, the request and the target.
func adminCommandLine(env map[string]string, stdin string, args ...string) (string, adminRequest, cliTarget, error) {
	var c *adminCommand
	for _, ac := range adminCommands() {
		if ac.name == args[0] {
			c = &ac
		}
	}
	if c == nil {
		return "", adminRequest{}, cliTarget{}, fmt.Errorf("no admin command %q", args[0])
	}
	cmd := newAdminCommand(*c)
	if err := cmd.ParseFlags(args[1:]); err != nil {
		return "", adminRequest{}, cliTarget{}, err
	}
	pos := cmd.Flags().Args()
	if err := cmd.ValidateArgs(pos); err != nil {
		return "", adminRequest{}, cliTarget{}, err
	}
	getenv := func(k string) string { return env[k] }
	t, req, err := prepareAdmin(*c, cmd.Flags(), pos, strings.NewReader(stdin), getenv, adminNow)
	if err != nil {
		return "", req, t, err
	}
	u, _, err := t.endpoint(req)
	return u, req, t, err
}

func TestAdminCommandRequests(t *testing.T) {
	t.Parallel()
	const admin = "http://localhost:2019/chat/"
	for _, tc := range []struct {
		args   []string
		env    map[string]string
		stdin  string
		method string
		url    string
		body   string // the POST body as JSON (keys sorted)
	}{
		{args: []string{"stats"}, method: "GET", url: admin + "stats"},
		{args: []string{"stats"}, env: map[string]string{"CADDY_ADMIN": "127.0.0.1:3000"}, method: "GET", url: "http://127.0.0.1:3000/chat/stats"},
		{args: []string{"stats", "--admin", "http://10.0.0.1:2019/"}, env: map[string]string{"CADDY_ADMIN": "127.0.0.1:3000"},
			method: "GET", url: "http://10.0.0.1:2019/chat/stats"},
		{args: []string{"stats", "--prefix", "chat:"}, method: "GET", url: admin + "stats?prefix=chat%3A"},
		{args: []string{"stats", "--admin", "unix//run/caddy-admin.sock"}, method: "GET", url: "http://127.0.0.1/chat/stats"},
		{args: []string{"channels", "--pattern", "room:*", "--limit", "5"}, method: "GET", url: admin + "channels?limit=5&pattern=room%3A%2A"},
		{args: []string{"channels"}, method: "GET", url: admin + "channels"},
		{args: []string{"presence", "room:1"}, method: "GET", url: admin + "presence?channel=room%3A1"},
		{args: []string{"history", "room:1", "--limit", "10", "--before", "1767225600123-0"}, method: "GET",
			url: admin + "history?before=1767225600123-0&channel=room%3A1&limit=10"},
		{args: []string{"history-remove", "room:1"}, method: "POST", url: admin + "history/remove", body: `{"channel":"room:1"}`},
		{args: []string{"publish", "room:1", `{"text": "hi", "n": 1.50}`, "--idempotency-key", "k1"}, method: "POST", url: admin + "publish",
			body: `{"channel":"room:1","data":{"text":"hi","n":1.50},"idempotency_key":"k1"}`},
		{args: []string{"publish", "room:1", "-"}, stdin: " \"from stdin\"\n", method: "POST", url: admin + "publish",
			body: `{"channel":"room:1","data":"from stdin"}`},
		{args: []string{"broadcast", `{"t":1}`, "a", "b"}, method: "POST", url: admin + "broadcast",
			body: `{"channels":["a","b"],"data":{"t":1}}`},
		{args: []string{"disconnect", "alice", "--code", "4010", "--reason", "kicked"}, method: "POST", url: admin + "disconnect",
			body: `{"code":4010,"reason":"kicked","user":"alice"}`},
		{args: []string{"disconnect", "alice"}, method: "POST", url: admin + "disconnect", body: `{"user":"alice"}`},
		{args: []string{"disconnect", "--conn", "9f2c41d0-7"}, method: "POST", url: admin + "disconnect", body: `{"conn":"9f2c41d0-7"}`},
		{args: []string{"unsubscribe", "alice", "room:1"}, method: "POST", url: admin + "unsubscribe", body: `{"channel":"room:1","user":"alice"}`},
		{args: []string{"subscribe", "alice", "room:1"}, method: "POST", url: admin + "subscribe", body: `{"channel":"room:1","user":"alice"}`},
		{args: []string{"revoke", "--jti", "t-1"}, method: "POST", url: admin + "revoke", body: `{"jti":"t-1"}`},
		{args: []string{"revoke", "--jti", "t-1", "--until", "2026-01-02T00:00:00+01:00"}, method: "POST", url: admin + "revoke",
			body: `{"jti":"t-1","until":1767308400}`},
		{args: []string{"revoke", "--user", "alice", "--issued-before", "1767225000", "--until", "24h"}, method: "POST", url: admin + "revoke",
			body: `{"issued_before":1767225000,"until":1767312000,"user":"alice"}`},
		{args: []string{"revoke", "--user", "alice", "--issued-before", "-1h", "--until", "7d"}, method: "POST", url: admin + "revoke",
			body: `{"issued_before":1767222000,"until":1767830400,"user":"alice"}`},
		{args: []string{"revocations", "--prefix", "a:"}, method: "GET", url: admin + "revocations?prefix=a%3A"},
		// The site's publish endpoint: the same paths under its URL.
		{args: []string{"stats", "--url", "https://site.example/chat/publish/", "--key", "k"}, method: "GET", url: "https://site.example/chat/publish/stats"},
		{args: []string{"history-remove", "x", "--url", "http://127.0.0.1:8080/p"}, env: map[string]string{"CHAT_PUBLISH_KEY": "k"},
			method: "POST", url: "http://127.0.0.1:8080/p/history/remove", body: `{"channel":"x"}`},
	} {
		u, req, _, err := adminCommandLine(tc.env, tc.stdin, tc.args...)
		if err != nil {
			t.Errorf("%q: %v", tc.args, err)
			continue
		}
		if req.method != tc.method || u != tc.url {
			t.Errorf("%q: %s %s, want %s %s", tc.args, req.method, u, tc.method, tc.url)
		}
		var body string
		if req.body != nil {
			b, err := json.Marshal(req.body)
			if err != nil {
				t.Fatal(err)
			}
			body = string(b)
		}
		if body != tc.body {
			t.Errorf("%q: body %s, want %s", tc.args, body, tc.body)
		}
	}
}

func TestAdminCommandTarget(t *testing.T) {
	t.Parallel()
	_, _, target, err := adminCommandLine(map[string]string{"CHAT_PUBLISH_KEY": "from-env"}, "", "stats", "--url", "http://x/p")
	if err != nil || target.key != "from-env" || target.timeout != 30*time.Second {
		t.Errorf("target %+v, %v: want the key of $CHAT_PUBLISH_KEY and a 30s timeout", target, err)
	}
	_, _, target, err = adminCommandLine(map[string]string{"CHAT_PUBLISH_KEY": "from-env"}, "", "stats", "--url", "http://x/p", "--key", "flag", "--timeout", "2s")
	if err != nil || target.key != "flag" || target.timeout != 2*time.Second {
		t.Errorf("target %+v, %v: want --key over the environment", target, err)
	}
	// Without --url the publish key is not the admin endpoint's business.
	_, _, target, err = adminCommandLine(map[string]string{"CHAT_PUBLISH_KEY": "from-env"}, "", "stats")
	if err != nil || target.key != "" || target.url != "" {
		t.Errorf("target %+v, %v: the admin endpoint got a key", target, err)
	}
}

func TestAdminCommandUsageErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"presence"}, nil, "accepts 1 arg"},
		{[]string{"stats", "extra"}, nil, "unknown command"},
		{[]string{"unsubscribe", "alice"}, nil, "accepts 2 arg"},
		{[]string{"publish", "room:1", "hello"}, nil, "is not one JSON value"},
		{[]string{"publish", "room:1", "-"}, nil, "(standard input) is not one JSON value"},
		{[]string{"broadcast", "{}"}, nil, "requires at least 2 arg"},
		{[]string{"disconnect"}, nil, "give the user to disconnect, or --conn"},
		{[]string{"disconnect", "alice", "--conn", "c1"}, nil, "not both"},
		{[]string{"disconnect", "alice", "--code", "x"}, nil, "invalid argument"},
		{[]string{"revoke"}, nil, "give --jti <token id> or --user <user>"},
		{[]string{"revoke", "--jti", "a", "--user", "b"}, nil, "not both"},
		{[]string{"revoke", "--jti", "a", "--issued-before", "now"}, nil, "--issued-before goes with --user"},
		{[]string{"revoke", "--user", "a", "--until", "tomorrow"}, nil, `--until: "tomorrow": give Unix seconds`},
		{[]string{"revoke", "--user", "a", "--issued-before", "1767225600000"}, nil, "looks like milliseconds"},
		{[]string{"stats", "--key", "k"}, nil, "--key goes with --url"},
		{[]string{"stats", "--url", "http://x/p", "--key", "k", "--prefix", "chat:"}, nil, "--admin and --prefix do not go with it"},
		{[]string{"stats", "--url", "http://x/p", "--key", "k", "--admin", "localhost:2019"}, nil, "--admin and --prefix do not go with it"},
		{[]string{"stats", "--url", "ws://x/p", "--key", "k"}, nil, "http:// or https://"},
		{[]string{"stats", "--url", "http://x/p?a=1", "--key", "k"}, nil, "takes no query"},
		{[]string{"stats", "--url", "http://x/p"}, nil, "give --key or set CHAT_PUBLISH_KEY"},
		{[]string{"stats", "--timeout", "0s"}, nil, "--timeout 0s: must be positive"},
		{[]string{"stats", "--admin", "localhost:2019-2021"}, nil, "is not an admin address"},
	} {
		_, _, _, err := adminCommandLine(tc.env, "", tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: err %v, want one containing %q", tc.args, err, tc.want)
		}
	}
	// Through Caddy's registry as `caddy chat` runs them: nothing printed on
	// stdout, the error returned (cobra prints it).
	for _, args := range [][]string{{"revoke"}, {"presence"}, {"publish", "room:1", "{"}} {
		out, _, err := runChatCommand(t, args...)
		if err == nil || out != "" {
			t.Errorf("chat %q: err %v, stdout %q", args, err, out)
		}
	}
}

func TestAdminCommandParseTime(t *testing.T) {
	t.Parallel()
	now := adminNow.Unix()
	for _, tc := range []struct {
		in   string
		want int64
	}{
		{"now", now},
		{"1767312000", 1767312000},
		{"0", 0},
		{"2026-01-02T00:00:00Z", 1767312000},
		{"2026-01-01T12:00:00-03:00", now + 15*3600},
		{"24h", now + 86400},
		{"90m", now + 5400},
		{"-1h", now - 3600},
		{"30d", now + 30*86400},
		{" 1h ", now + 3600},
	} {
		got, err := parseTimeFlag(tc.in, adminNow)
		if err != nil || got != tc.want {
			t.Errorf("parseTimeFlag(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{"", "tomorrow", "2026-01-02", "1767312000123", "1.5d", "24"} {
		got, err := parseTimeFlag(in, adminNow)
		if in == "24" {
			// Digits alone are Unix seconds, however small: 24 is 1970.
			if err != nil || got != 24 {
				t.Errorf("parseTimeFlag(%q) = %d, %v", in, got, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("parseTimeFlag(%q) = %d, want an error", in, got)
		}
	}
}

// TestAdminCommandSummaries reads the spec's answers: the human lines, and
// which answers fail the command.
func TestAdminCommandSummaries(t *testing.T) {
	t.Parallel()
	cmds := map[string]adminCommand{}
	for _, c := range adminCommands() {
		cmds[c.name] = c
	}
	revokeUser := adminRequest{body: map[string]any{"user": "alice", "issued_before": int64(1767225600)}}
	for _, tc := range []struct {
		cmd     string
		req     adminRequest
		answer  string
		want    []string // lines, in order
		partial string   // the failure the answer means, if any
	}{
		{cmd: "stats", answer: `{"nodes":[{"node":"9f2c41d0","reported_at":1767225598500,"connections":2,"users":1,"anonymous":0,
			"channels":2,"subscriptions":3,"routes":[{"route":"/chat","connections":2,"users":1,"anonymous":0,"subscriptions":3}]},
			{"node":"a0","reported_at":1767225599000,"connections":1,"users":0,"anonymous":1,"channels":1,"subscriptions":1,"routes":[]}],
			"connections":3,"users":1,"anonymous":1,"channels":2,"subscriptions":4,
			"routes":[{"route":"/chat","connections":3,"users":1,"anonymous":1,"subscriptions":4}]}`,
			want: []string{
				"node 9f2c41d0: 2 connections, 1 user, 0 anonymous, 2 channels, 3 subscriptions (reported 1.5s ago)",
				"node a0: 1 connection, 0 users, 1 anonymous, 1 channel, 1 subscription (reported 1s ago)",
				"total (2 nodes): 3 connections, 1 user, 1 anonymous, 2 channels, 4 subscriptions",
				"route /chat: 3 connections, 1 user, 1 anonymous, 4 subscriptions",
			}},
		{cmd: "channels", answer: `{"channels":[{"channel":"room:1","subscribers":3,"nodes":2},{"channel":"room:2","subscribers":1,"nodes":1}],"nodes":2,"truncated":true}`,
			want: []string{"room:1: 3 subscribers on 2 nodes", "room:2: 1 subscriber on 1 node",
				"2 channels (2 nodes answered); more match: raise --limit or narrow --pattern"}},
		{cmd: "channels", answer: `{"channels":[],"nodes":1,"truncated":false,"missing_nodes":2}`,
			want: []string{"0 channels (1 node answered)"}, partial: "2 nodes did not answer within publish_timeout"},
		{cmd: "presence", answer: `{"channel":"room:1","users":[{"user":"alice","connections":2},{"user":"","guest":"g1","name":"Bo","connections":1}]}`,
			want: []string{"alice: 2 connections", `guest "Bo" (g1): 1 connection`, "2 users on room:1"}},
		{cmd: "history", answer: `{"channel":"room:1","epoch":"9f2c41d07a3b","more":true,"messages":[
			{"type":"message","channel":"room:1","id":"1767225600123-0","ts":1767225600123,"from":"alice","data":{"text": "hi"}},
			{"type":"message","channel":"room:1","id":"1767225600124-0","ts":1767225600124,"from":"","server":true,"data":"note"}]}`,
			want: []string{`1767225600123-0  2026-01-01T00:00:00.123Z  alice  {"text":"hi"}`,
				`1767225600124-0  2026-01-01T00:00:00.124Z  (server)  "note"`,
				"2 messages of room:1 (epoch 9f2c41d07a3b); older ones: --before 1767225600123-0"}},
		{cmd: "history-remove", answer: `{"channel":"room:1","removed":true}`,
			want: []string{"removed the history of room:1: its next message starts a new epoch"}},
		{cmd: "history-remove", answer: `{"channel":"room:1","removed":false}`, want: []string{"room:1 kept no messages: nothing removed"}},
		{cmd: "publish", answer: `{"channel":"room:1","id":"1-0","duplicate":true}`,
			want: []string{"room:1: published, message id 1-0 (a repeat of an earlier publish with this idempotency key: nothing delivered again)"}},
		{cmd: "broadcast", answer: `{"results":[{"channel":"a","id":"1-0"},{"channel":"b","error":{"code":"bad_request","message":"bad channel name"}}]}`,
			want:    []string{"a: published, message id 1-0", "b: not published: bad_request: bad channel name", "published on 1 of 2 channels"},
			partial: "1 of 2 channels not published"},
		{cmd: "disconnect", answer: `{"disconnected":3,"nodes":2}`, want: []string{"disconnected 3 connections on 2 nodes"}},
		{cmd: "disconnect", answer: `{"disconnected":1,"nodes":1,"missing_nodes":1}`, want: []string{"disconnected 1 connection on 1 node"},
			partial: "1 node did not answer within publish_timeout"},
		{cmd: "unsubscribe", answer: `{"unsubscribed":0,"nodes":2}`, want: []string{"unsubscribed 0 connections on 2 nodes"}},
		{cmd: "subscribe", answer: `{"subscribed":2,"nodes":2,"refused":1,"message":"at max_subscriptions"}`,
			want: []string{"subscribed 2 connections on 2 nodes; 1 connection refused: at max_subscriptions"}, partial: "1 connection refused"},
		{cmd: "revoke", req: adminRequest{body: map[string]any{"jti": "t-1"}}, answer: `{"revoked":"jti","disconnected":1,"nodes":2,"until":1767312000}`,
			want: []string{"revoked the token t-1 until 2026-01-02T00:00:00Z; disconnected 1 connection on 2 nodes"}},
		{cmd: "revoke", req: revokeUser, answer: `{"revoked":"user","disconnected":0,"nodes":1,"until":1767312000}`,
			want: []string{"revoked the tokens of alice issued before 2026-01-01T00:00:00Z until 2026-01-02T00:00:00Z; disconnected 0 connections on 1 node"}},
		{cmd: "revocations", answer: `{"revocations":[{"jti":"t-1","until":1767312000},{"user":"alice","issued_before":1767225600,"until":1767312000}]}`,
			want: []string{"token t-1 until 2026-01-02T00:00:00Z",
				"user alice: tokens issued before 2026-01-01T00:00:00Z, until 2026-01-02T00:00:00Z", "2 revocations"}},
	} {
		text, err := cmds[tc.cmd].summarize(tc.req, []byte(tc.answer), adminNow)
		if got := strings.Split(strings.TrimSuffix(text, "\n"), "\n"); strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
			t.Errorf("%s summary:\n%s\nwant:\n%s", tc.cmd, text, strings.Join(tc.want, "\n"))
		}
		var partial *adminPartialError
		switch {
		case tc.partial == "" && err != nil:
			t.Errorf("%s: %v, want no failure", tc.cmd, err)
		case tc.partial != "" && (!errors.As(err, &partial) || !strings.Contains(err.Error(), tc.partial)):
			t.Errorf("%s: failure %v, want one containing %q", tc.cmd, err, tc.partial)
		}
	}
	// An answer of another shape is said, not summarized as zeros.
	if _, err := cmds["disconnect"].summarize(adminRequest{}, []byte(`{"closed":3}`), adminNow); err == nil || !strings.Contains(err.Error(), `has no "disconnected"`) {
		t.Errorf("an answer without the count: %v", err)
	}
	if _, err := cmds["stats"].summarize(adminRequest{}, []byte(`[]`), adminNow); err == nil || !strings.Contains(err.Error(), "not what this command expects") {
		t.Errorf("an answer that is not an object: %v", err)
	}
}

// TestAdminCommandUnreachable: no server at the address, as when Caddy is
// not running or runs with "admin off".
func TestAdminCommandUnreachable(t *testing.T) {
	t.Parallel()
	addr := freeAddr(t)
	out, stderr, err := runChatCommand(t, "stats", "--admin", addr)
	if err == nil || out != "" || !strings.Contains(stderr, "caddy chat stats: Caddy's admin endpoint is not reachable at "+addr+" (") ||
		!strings.Contains(stderr, "connection refused") || !strings.Contains(stderr, `Is "admin off" in its config?`) {
		t.Errorf("err %v\nstdout %q\nstderr %q", err, out, stderr)
	}
	_, stderr, err = runChatCommand(t, "revocations", "--admin", "unix/"+t.TempDir()+"/no.sock")
	if err == nil || !strings.Contains(stderr, "Caddy's admin endpoint is not reachable at unix/") {
		t.Errorf("a missing unix socket: err %v, stderr %q", err, stderr)
	}
	_, stderr, err = runChatCommand(t, "stats", "--url", "http://"+addr+"/chat/publish", "--key", "k")
	if err == nil || !strings.Contains(stderr, "caddy chat stats: GET http://"+addr+"/chat/publish/stats: the site is not reachable: ") {
		t.Errorf("an unreachable site: err %v, stderr %q", err, stderr)
	}
}

// TestAdminCommandOddServers: what a real node does not readily answer (a
// cluster-wide answer with a node missing, a stall, an admin endpoint without
// the chat API), from a stand-in server.
func TestAdminCommandOddServers(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/chat/disconnect":
			_, _ = w.Write([]byte(`{"disconnected":2,"nodes":2,"missing_nodes":1}`))
		case "/chat/stats":
			select { // a stall, until the client gives up
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
		case "/chat/revocations":
			w.WriteHeader(http.StatusForbidden)
			_, _ = w.Write([]byte(`{"error":"client is not authorized"}`)) // Caddy's admin refusals
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	addr := strings.TrimPrefix(srv.URL, "http://")

	// A missing node: the answer is printed (as is with --json) and the
	// command fails.
	for _, asJSON := range []bool{false, true} {
		args := []string{"disconnect", "alice", "--admin", addr}
		want := "disconnected 2 connections on 2 nodes\n"
		if asJSON {
			args, want = append(args, "--json"), `{"disconnected":2,"nodes":2,"missing_nodes":1}`+"\n"
		}
		out, stderr, err := runChatCommand(t, args...)
		if err == nil || out != want || !strings.Contains(stderr, "caddy chat disconnect: 1 node did not answer within publish_timeout") {
			t.Errorf("%q: err %v\nstdout %q\nstderr %q", args, err, out, stderr)
		}
	}
	start := time.Now()
	_, stderr, err := runChatCommand(t, "stats", "--admin", addr, "--timeout", "200ms")
	if err == nil || !strings.Contains(stderr, "caddy chat stats: GET http://"+addr+"/chat/stats: no answer within --timeout 200ms") || time.Since(start) > 1500*time.Millisecond {
		t.Errorf("a stalled server: err %v after %v, stderr %q", err, time.Since(start), stderr)
	}
	_, stderr, err = runChatCommand(t, "revocations", "--admin", addr)
	if err == nil || !strings.Contains(stderr, "caddy chat revocations: GET http://"+addr+"/chat/revocations: HTTP 403 Forbidden: client is not authorized\n") {
		t.Errorf("Caddy's own refusal: err %v, stderr %q", err, stderr)
	}
	_, stderr, err = runChatCommand(t, "channels", "--admin", addr)
	if err == nil || !strings.Contains(stderr, "HTTP 404 Not Found: 404 page not found (no chat API on this admin endpoint") {
		t.Errorf("no chat API: err %v, stderr %q", err, stderr)
	}
}
