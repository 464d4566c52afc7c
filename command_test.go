package caddychat

// `caddy chat token` and `caddy chat ping`: in process (the cobra commands,
// and ping against fake servers that misbehave), then as operators run them,
// the real Caddy binary against a real node.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"
	"github.com/spf13/cobra"
)

// runChatCommand runs `chat args…` in process, as Caddy's registry builds it.
func runChatCommand(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	reg, ok := caddycmd.Commands()["chat"]
	if !ok {
		t.Fatal("the chat command is not registered with Caddy")
	}
	cmd := &cobra.Command{Use: "chat", Short: reg.Short, SilenceUsage: true}
	reg.CobraFunc(cmd)
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs(args)
	err = cmd.Execute()
	return out.String(), errOut.String(), err
}

func TestChatCommandRegistered(t *testing.T) {
	t.Parallel()
	reg, ok := caddycmd.Commands()["chat"]
	if !ok {
		t.Fatal("no chat command in Caddy's registry")
	}
	cmd := &cobra.Command{Use: "chat"}
	reg.CobraFunc(cmd)
	var names []string
	for _, c := range cmd.Commands() {
		names = append(names, c.Name())
	}
	want := "broadcast,channels,disconnect,history,history-remove,ping,presence,publish,revocations,revoke,stats,subscribe,token,unsubscribe"
	if strings.Join(names, ",") != want {
		t.Errorf("chat subcommands = %v, want %s", names, want)
	}
}

func TestChatTokenMintHS256WithPermissions(t *testing.T) {
	t.Parallel()
	secret := "0123456789abcdef0123456789abcdef"
	before := time.Now().Unix()
	out, _, err := runChatCommand(t, "token", "--secret", secret, "--kid", "k1", "--sub", "alice",
		"--iss", "https://idp", "--aud", "chat", "--subscribe", "room:*, user:{user}", "--publish", "room:eng")
	if err != nil {
		t.Fatal(err)
	}
	token := strings.TrimSpace(out)
	got := jwt.MapClaims{}
	parsed, err := jwt.NewParser(jwt.WithValidMethods([]string{"HS256"}), jwt.WithIssuer("https://idp"), jwt.WithAudience("chat")).
		ParseWithClaims(token, got, func(*jwt.Token) (any, error) { return []byte(secret), nil })
	if err != nil {
		t.Fatalf("the minted token %q does not verify: %v", token, err)
	}
	if parsed.Header["kid"] != "k1" || got["sub"] != "alice" {
		t.Errorf("header %v, claims %v", parsed.Header, got)
	}
	chat := got["chat"].(map[string]any)
	if sub := chat["subscribe"].([]any); len(sub) != 2 || sub[0] != "room:*" || sub[1] != "user:{user}" {
		t.Errorf("chat.subscribe = %v", chat["subscribe"])
	}
	if pub := chat["publish"].([]any); len(pub) != 1 || pub[0] != "room:eng" {
		t.Errorf("chat.publish = %v", chat["publish"])
	}
	exp, _ := got.GetExpirationTime()
	if exp == nil || exp.Unix() < before+3600 || exp.Unix() > time.Now().Unix()+3600 {
		t.Errorf("exp = %v, want an hour from now (the default --ttl)", exp)
	}
}

func TestChatTokenTTLAndNoPermissions(t *testing.T) {
	t.Parallel()
	out, _, err := runChatCommand(t, "token", "--secret", "s", "--sub", "bob", "--ttl", "90s")
	if err != nil {
		t.Fatal(err)
	}
	got := jwt.MapClaims{}
	if _, err := jwt.ParseWithClaims(strings.TrimSpace(out), got, func(*jwt.Token) (any, error) { return []byte("s"), nil }); err != nil {
		t.Fatal(err)
	}
	iat, _ := got.GetIssuedAt()
	exp, _ := got.GetExpirationTime()
	if iat == nil || exp == nil || exp.Sub(iat.Time) != 90*time.Second {
		t.Errorf("iat %v exp %v, want 90s apart", iat, exp)
	}
	if _, ok := got["chat"]; ok {
		t.Errorf("a token without --subscribe or --publish has a chat claim: %v", got)
	}
}

func TestChatTokenWithECDSAKeyFile(t *testing.T) {
	t.Parallel()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	out, _, err := runChatCommand(t, "token", "--key", path, "--sub", "bob", "--ttl", "1m")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwt.Parse(strings.TrimSpace(out), func(*jwt.Token) (any, error) { return &key.PublicKey, nil }, jwt.WithValidMethods([]string{"ES256"})); err != nil {
		t.Fatalf("ES256 token does not verify with the public key: %v", err)
	}
}

func TestChatTokenRefusals(t *testing.T) {
	t.Parallel()
	notPEM := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(notPEM, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--sub", "x", "--secret", ""}, "give --secret (or set CHAT_JWT_SECRET) or --key"},
		{[]string{"--secret", "s"}, "--sub is required"},
		{[]string{"--sub", "x", "--secret", "s", "--ttl", "-1m"}, "expired already"},
		{[]string{"--sub", "x", "--key", notPEM}, "holds no PEM block"},
		{[]string{"--sub", "x", "--key", filepath.Join(t.TempDir(), "missing.pem")}, "no such file"},
		{[]string{"--sub", "x", "--secret", "s", "extra"}, "unknown command"},
	} {
		out, _, err := runChatCommand(t, append([]string{"token"}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("token %q: err %v, want one containing %q", tc.args, err, tc.want)
		}
		if out != "" {
			t.Errorf("token %q printed %q despite failing", tc.args, out)
		}
	}
}

func TestChatPingUsageErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{}, "accepts 1 arg"},
		{[]string{"ftp://x/ws"}, "the scheme must be ws, wss, http or https"},
		{[]string{"--token-in", "cookie", "ws://127.0.0.1:1/ws"}, "--token-in \"cookie\""},
		{[]string{"--channel", "room:*", "ws://127.0.0.1:1/ws"}, "--channel"},
		{[]string{"--timeout", "0s", "ws://127.0.0.1:1/ws"}, "--timeout"},
	} {
		_, _, err := runChatCommand(t, append([]string{"ping"}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ping %q: err %v, want one containing %q", tc.args, err, tc.want)
		}
	}
}

// fakeChatServer is a JSON-protocol server that welcomes, acknowledges
// subscribe and publish, and delivers each publish through deliver (which
// may change or drop it): the failures a real node should never show.
func fakeChatServer(t *testing.T, deliver func(msg map[string]any) map[string]any) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		ctx := r.Context()
		write := func(v any) {
			b, _ := json.Marshal(v)
			_ = c.Write(ctx, websocket.MessageText, b)
		}
		write(map[string]any{"type": "welcome", "conn": "fake-1", "node": "fake", "user": "", "max_message_size": 65536})
		for {
			_, data, err := c.Read(ctx)
			if err != nil {
				return
			}
			var f map[string]any
			_ = json.Unmarshal(data, &f)
			switch f["op"] {
			case "subscribe":
				write(map[string]any{"type": "ok", "id": f["id"], "channel": f["channel"]})
			case "publish":
				write(map[string]any{"type": "ok", "id": f["id"], "channel": f["channel"], "message_id": "1-0"})
				msg := map[string]any{"type": "message", "channel": f["channel"], "id": "1-0", "from": "", "anonymous": true, "data": f["data"]}
				if m := deliver(msg); m != nil {
					write(m)
				}
			}
		}
	}))
	t.Cleanup(srv.Close)
	return "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
}

func TestChatPingFailsOnMismatchAndSilence(t *testing.T) {
	t.Parallel()
	t.Run("passes against a faithful server", func(t *testing.T) {
		t.Parallel()
		url := fakeChatServer(t, func(m map[string]any) map[string]any { return m })
		out, _, err := runChatCommand(t, "ping", "--timeout", "2s", url)
		if err != nil {
			t.Fatalf("ping failed: %v\n%s", err, out)
		}
		// What the welcome announces besides conn, node and user is shown.
		if !strings.Contains(out, "node fake, conn fake-1, anonymous, max_message_size=65536") {
			t.Errorf("the welcome line does not show what the server announced:\n%s", out)
		}
	})
	t.Run("other data", func(t *testing.T) {
		t.Parallel()
		url := fakeChatServer(t, func(m map[string]any) map[string]any {
			m["data"] = map[string]any{"ping": "someone else's"}
			return m
		})
		out, stderr, err := runChatCommand(t, "ping", "--timeout", "2s", url)
		if err == nil || !strings.Contains(stderr, "receive failed: the message's data is") ||
			!strings.Contains(out, "FAIL receive") {
			t.Errorf("err %v, stdout:\n%s\nstderr:\n%s", err, out, stderr)
		}
	})
	t.Run("another sender", func(t *testing.T) {
		t.Parallel()
		url := fakeChatServer(t, func(m map[string]any) map[string]any {
			m["from"], m["anonymous"] = "mallory", false
			return m
		})
		_, stderr, err := runChatCommand(t, "ping", "--timeout", "2s", url)
		if err == nil || !strings.Contains(stderr, `receive failed: the message is stamped from "mallory"`) {
			t.Errorf("err %v, stderr:\n%s", err, stderr)
		}
	})
	t.Run("no delivery", func(t *testing.T) {
		t.Parallel()
		url := fakeChatServer(t, func(map[string]any) map[string]any { return nil })
		start := time.Now()
		out, stderr, err := runChatCommand(t, "ping", "--timeout", "300ms", "--json", url)
		if err == nil || !strings.Contains(stderr, "receive failed: timed out after 300ms") {
			t.Errorf("err %v, stderr:\n%s", err, stderr)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("the ping took %v with --timeout 300ms", d)
		}
		var rep pingReport
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("--json output: %v\n%s", err, out)
		}
		if rep.OK || rep.FailedStep != "receive" || len(rep.Steps) != 5 || rep.Steps[3].Step != "publish" || !rep.Steps[3].OK {
			t.Errorf("report %+v", rep)
		}
	})
}

// ---------------------------------------------------------------------------
// The real binary against a real node.

// runCaddyCLI runs the Caddy binary with args and env, and returns its
// output and exit status.
func runCaddyCLI(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBinary(t), args...)
	home := t.TempDir()
	cmd.Env = append(os.Environ(), "HOME="+home, "XDG_DATA_HOME="+home, "XDG_CONFIG_HOME="+home,
		"CHAT_TOKEN=", "CHAT_JWT_SECRET=")
	cmd.Env = append(cmd.Env, env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("caddy %s: %v", strings.Join(args, " "), err)
	}
	return out.String(), errOut.String(), code
}

// chatCommandRoutes: a route with history on ping:**, a jwt route that reads
// tokens from the query too, and a raw route; the memory broker.
const chatCommandRoutes = `	chat /ws {
		history ping:** 10 1h
		rate_limit off
	}
	chat /jwt {
		jwt {
			secret ` + testSecret + `
			query_token token
		}
	}
	chat /raw/* {
		protocol raw
		channel room:{http.request.uri.path.1}
	}`

func TestChatCommandsAgainstANode(t *testing.T) {
	t.Parallel()
	node := startCaddy(t, "node", chatCommandRoutes)

	t.Run("ping passes, with history and resume", func(t *testing.T) {
		t.Parallel()
		out, stderr, code := runCaddyCLI(t, nil, "chat", "ping", node.wsURL("/ws"))
		if code != 0 {
			t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out, stderr)
		}
		for _, step := range []string{"connect", "welcome", "subscribe", "publish", "receive", "history", "resume"} {
			if !strings.Contains(out, "ok   "+step+" ") {
				t.Errorf("no passed %s step in:\n%s", step, out)
			}
		}
		if !strings.Contains(out, "ok: 7 steps in ") || !strings.Contains(out, "recovered since") {
			t.Errorf("stdout:\n%s", out)
		}
	})
	t.Run("ping --json over http://", func(t *testing.T) {
		t.Parallel()
		out, stderr, code := runCaddyCLI(t, nil, "chat", "ping", "--json", "--channel", "ping:json", node.httpURL("/ws"))
		if code != 0 {
			t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out, stderr)
		}
		var rep pingReport
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("not one JSON report: %v\n%s", err, out)
		}
		if !rep.OK || rep.Channel != "ping:json" || rep.Node == "" || !strings.HasPrefix(rep.Conn, rep.Node) ||
			rep.User == nil || *rep.User != "" || !rep.History || rep.Epoch == "" || len(rep.Steps) != 7 {
			t.Errorf("report: %s", out)
		}
		for _, s := range rep.Steps {
			if !s.OK || s.Millis <= 0 {
				t.Errorf("step %+v", s)
			}
		}
	})
	t.Run("a channel without history has no history step", func(t *testing.T) {
		t.Parallel()
		out, _, code := runCaddyCLI(t, nil, "chat", "ping", "--channel", "room:nohistory", node.wsURL("/ws"))
		if code != 0 || !strings.Contains(out, "ok: 5 steps") || !strings.Contains(out, "keeps no history") {
			t.Errorf("exit %d, stdout:\n%s", code, out)
		}
	})
	t.Run("wrong path", func(t *testing.T) {
		t.Parallel()
		out, stderr, code := runCaddyCLI(t, nil, "chat", "ping", node.wsURL("/nope"))
		if code == 0 || !strings.Contains(stderr, "connect failed: HTTP 200 OK (not a WebSocket upgrade: is this the path of a chat route?)") ||
			!strings.Contains(out, "FAIL connect") {
			t.Errorf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out, stderr)
		}
	})
	t.Run("missing token on a jwt route", func(t *testing.T) {
		t.Parallel()
		out, stderr, code := runCaddyCLI(t, nil, "chat", "ping", "--json", node.wsURL("/jwt"))
		if code == 0 || !strings.Contains(stderr, "connect failed: HTTP 401 Unauthorized: unauthorized: missing token") {
			t.Errorf("exit %d\nstderr:\n%s", code, stderr)
		}
		var rep pingReport
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("not one JSON report: %v\n%s", err, out)
		}
		if rep.OK || rep.FailedStep != "connect" || rep.HTTPStatus != 401 || !strings.Contains(rep.HTTPBody, "missing token") {
			t.Errorf("report: %s", out)
		}
	})
	t.Run("a token from another secret", func(t *testing.T) {
		t.Parallel()
		bad := newToken(t, "alice").secret("another-secret-0123456789abcdef0123").sign()
		_, stderr, code := runCaddyCLI(t, []string{"CHAT_TOKEN=" + bad}, "chat", "ping", node.wsURL("/jwt"))
		if code == 0 || !strings.Contains(stderr, "connect failed: HTTP 401 Unauthorized: unauthorized: invalid token signature") {
			t.Errorf("exit %d\nstderr:\n%s", code, stderr)
		}
	})
	t.Run("a raw route", func(t *testing.T) {
		t.Parallel()
		_, stderr, code := runCaddyCLI(t, nil, "chat", "ping", "--timeout", "1s", node.wsURL("/raw/x"))
		if code == 0 || !strings.Contains(stderr, "welcome failed: no frame within 1s: is this a raw-protocol route?") {
			t.Errorf("exit %d\nstderr:\n%s", code, stderr)
		}
	})
	t.Run("unreachable port", func(t *testing.T) {
		t.Parallel()
		_, stderr, code := runCaddyCLI(t, nil, "chat", "ping", "ws://"+freeAddr(t)+"/ws")
		if code == 0 || !strings.Contains(stderr, "connect failed: ") || !strings.Contains(stderr, "connection refused") {
			t.Errorf("exit %d\nstderr:\n%s", code, stderr)
		}
	})

	// caddy chat token, from $CHAT_JWT_SECRET: the node accepts what it
	// mints, as the user and with the permissions it names, whichever way
	// the token is sent.
	t.Run("token", func(t *testing.T) {
		t.Parallel()
		out, stderr, code := runCaddyCLI(t, []string{"CHAT_JWT_SECRET=" + testSecret},
			"chat", "token", "--sub", "alice", "--subscribe", "ping:*", "--publish", "ping:*", "--ttl", "10m")
		if code != 0 {
			t.Fatalf("caddy chat token: exit %d: %s", code, stderr)
		}
		token := strings.TrimSpace(out)

		c, err := dialWSWith(t, "alice", node.wsURL("/jwt"), &websocket.DialOptions{
			HTTPHeader: http.Header{"Authorization": {"Bearer " + token}},
		})
		if err != nil {
			t.Fatalf("the node refuses the minted token: %v", err)
		}
		m, err := c.readMsg(10 * time.Second)
		if err != nil || m.Type != "welcome" || m.User == nil || *m.User != "alice" {
			t.Fatalf("welcome %v, %v: want user alice", m, err)
		}

		for _, in := range []string{"header", "query", "subprotocol"} {
			out, stderr, code := runCaddyCLI(t, []string{"CHAT_TOKEN=" + token}, "chat", "ping", "--token-in", in, node.wsURL("/jwt"))
			if code != 0 || !strings.Contains(out, "user alice") || !strings.Contains(out, "from alice") {
				t.Errorf("ping with the token in the %s: exit %d\nstdout:\n%s\nstderr:\n%s", in, code, out, stderr)
			}
			if strings.Contains(out+stderr, token) {
				t.Errorf("ping with the token in the %s printed the token", in)
			}
		}
		// Its permissions hold: ping:* only.
		_, stderr, code = runCaddyCLI(t, nil, "chat", "ping", "--token", token, "--channel", "room:x", node.wsURL("/jwt"))
		if code == 0 || !strings.Contains(stderr, "subscribe failed: the server answered forbidden") {
			t.Errorf("ping on a channel the token does not allow: exit %d\nstderr:\n%s", code, stderr)
		}
	})
}
