package caddychat

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"
)

// wsAttempt dials url with opts and closes at once; the upgrade may be refused.
func wsAttempt(t testing.TB, url string, opts *websocket.DialOptions) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if opts.HTTPHeader == nil {
		opts.HTTPHeader = http.Header{}
	}
	opts.HTTPHeader.Set("Origin", "http://"+strings.Split(strings.TrimPrefix(url, "ws://"), "/")[0])
	c, resp, err := websocket.Dial(ctx, url, opts)
	if err == nil {
		_, _, _ = c.Read(ctx) // the welcome
		_ = c.Close(websocket.StatusNormalClosure, "")
		return http.StatusSwitchingProtocols
	}
	if resp == nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	return resp.StatusCode
}

// httpDo sends a request and returns its status.
func httpDo(t testing.TB, method, url string, header http.Header, body string) int {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header = header
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// logsOf reads every file under dir whose name ends in .log: the access
// log and Caddy's stdout and stderr.
func logsOf(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".log") {
			return err
		}
		b, err := os.ReadFile(p)
		out[p] = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestTokensNeverLogged: a real Caddy with an access log, tokens sent every
// way a client may send one (or mistakenly does) to the WebSocket routes and
// the publish endpoint; no token, nor its signature alone, is in any log.
func TestTokensNeverLogged(t *testing.T) {
	dir := t.TempDir()
	access := filepath.Join(dir, "access.log")
	routes := fmt.Sprintf(`	log {
		output file %s
	}
	chat /ws {
		rate_limit off
		jwt {
			secret %s
		}
		publish_endpoint /chat/publish
	}
	chat /wsq {
		rate_limit off
		jwt {
			secret %s
			query_token token
		}
	}`, access, testSecret, testSecret)
	n := startCaddy(t, "node", routes)

	tokens := map[string]string{}
	tok := func(name string) string {
		tokens[name] = newToken(t, "alice").with(jwt.MapClaims{"case": name, "chat": map[string]any{"publish": []string{"room:*"}}}).sign()
		return tokens[name]
	}
	expect := func(what string, got, want int) {
		t.Helper()
		if got != want {
			t.Errorf("%s: HTTP %d, want %d", what, got, want)
		}
	}
	ws := func(path string) string { return n.wsURL(path) }

	expect("?token= on a route without query_token", wsAttempt(t, ws("/ws?room=1&token="+tok("query-unused")), &websocket.DialOptions{}), http.StatusUnauthorized)
	expect("?access_token= on a route without query_token", wsAttempt(t, ws("/ws?access_token="+tok("access-token")), &websocket.DialOptions{}), http.StatusUnauthorized)
	expect("?a=1;token= (a pair Go's query parser drops)", wsAttempt(t, ws("/ws?a=1;token="+tok("semicolon")), &websocket.DialOptions{}), http.StatusUnauthorized)
	expect("?token= on the query_token route", wsAttempt(t, ws("/wsq?token="+tok("query")), &websocket.DialOptions{}), http.StatusSwitchingProtocols)
	expect("?token= on the query_token route, bad token", wsAttempt(t, ws("/wsq?token="+tok("query-bad")+"x"), &websocket.DialOptions{}), http.StatusUnauthorized)
	expect("bearer. subprotocol", wsAttempt(t, ws("/ws"), &websocket.DialOptions{Subprotocols: []string{"caddychat", "bearer." + tok("subprotocol")}}), http.StatusSwitchingProtocols)
	expect("bearer. subprotocol alone", wsAttempt(t, ws("/ws"), &websocket.DialOptions{Subprotocols: []string{"bearer." + tok("subprotocol-alone")}}), http.StatusBadRequest)
	expect("Authorization header", wsAttempt(t, ws("/ws"), &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer " + tok("header")}}}), http.StatusSwitchingProtocols)
	expect("cookie", wsAttempt(t, ws("/ws"), &websocket.DialOptions{HTTPHeader: http.Header{"Cookie": {"chat_token=" + tok("cookie")}}}), http.StatusSwitchingProtocols)
	expect("plain GET with ?jwt=", httpDo(t, http.MethodGet, n.httpURL("/ws?jwt="+tok("plain-get")), http.Header{}, ""), http.StatusUpgradeRequired)

	body := `{"channel":"room:a","data":1}`
	jsonHeader := func(kv ...string) http.Header {
		h := http.Header{"Content-Type": {"application/json"}}
		for i := 0; i < len(kv); i += 2 {
			h.Set(kv[i], kv[i+1])
		}
		return h
	}
	expect("publish with Authorization", httpDo(t, http.MethodPost, n.httpURL("/chat/publish"), jsonHeader("Authorization", "Bearer "+tok("publish-header")), body), http.StatusOK)
	expect("publish with ?token=", httpDo(t, http.MethodPost, n.httpURL("/chat/publish?token="+tok("publish-query")), jsonHeader("Authorization", "Bearer "+tok("publish-header-2")), body), http.StatusOK)
	expect("publish with ?Token= only", httpDo(t, http.MethodPost, n.httpURL("/chat/publish?Token="+tok("publish-query-only")), jsonHeader(), body), http.StatusUnauthorized)
	expect("publish with a bearer. subprotocol", httpDo(t, http.MethodPost, n.httpURL("/chat/publish"), jsonHeader("Sec-WebSocket-Protocol", "bearer."+tok("publish-subprotocol")), body), http.StatusUnauthorized)

	// Let the last connections end, then stop Caddy so every log is written.
	time.Sleep(200 * time.Millisecond)
	if !n.stop(10 * time.Second) {
		t.Error("caddy did not exit within 10s of SIGTERM")
	}
	logs := logsOf(t, n.dir)
	logs2 := logsOf(t, dir)
	for p, s := range logs2 {
		logs[p] = s
	}
	if !strings.Contains(logs[access], `"uri":"/ws"`) || !strings.Contains(logs[access], "handled request") {
		t.Fatalf("the access log %s does not hold the requests that may be logged (header, cookie):\n%s", access, logs[access])
	}
	if !strings.Contains(logs[n.logPath], "REDACTED") {
		t.Errorf("Caddy's log holds no redacted request line:\n%s", logs[n.logPath])
	}
	for name, token := range tokens {
		signature := token[strings.LastIndexByte(token, '.')+1:]
		for p, s := range logs {
			if strings.Contains(s, token) {
				t.Errorf("the %s token is in %s", name, p)
			} else if strings.Contains(s, signature) {
				t.Errorf("the signature of the %s token is in %s", name, p)
			}
		}
	}
	if t.Failed() {
		for p, s := range logs {
			t.Logf("%s:\n%s", p, s)
		}
	}
}

// TestLogFilterRedactsTokensOutsideTheModule: a token in the URL of a path
// the chat handler does not serve is Caddy's to log; the log filter that
// README and Caddyfile.example show keeps it out.
func TestLogFilterRedactsTokensOutsideTheModule(t *testing.T) {
	dir := t.TempDir()
	access := filepath.Join(dir, "access.log")
	routes := fmt.Sprintf(`	log {
		output file %s
		format filter {
			request>uri query {
				replace token REDACTED
				replace access_token REDACTED
			}
			request>headers>Sec-Websocket-Protocol regexp "bearer\.[^, ]+" "bearer.REDACTED"
		}
	}
	chat /ws
	respond "not the chat" 200`, access)
	n := startCaddy(t, "node", routes)
	token := newToken(t, "alice").with(jwt.MapClaims{"case": "outside", "chat": map[string]any{"publish": []string{"room:*"}}}).sign()
	other := newToken(t, "alice").with(jwt.MapClaims{"case": "outside-subprotocol", "chat": map[string]any{"publish": []string{"room:*"}}}).sign()
	if got := httpDo(t, http.MethodGet, n.httpURL("/page?x=1&token="+token+"&access_token="+token), http.Header{}, ""); got != http.StatusOK {
		t.Fatalf("GET /page: %d", got)
	}
	if got := httpDo(t, http.MethodGet, n.httpURL("/page"), http.Header{"Sec-Websocket-Protocol": {"caddychat, bearer." + other}}, ""); got != http.StatusOK {
		t.Fatalf("GET /page: %d", got)
	}
	time.Sleep(200 * time.Millisecond)
	n.stop(10 * time.Second)
	b, err := os.ReadFile(access)
	if err != nil {
		t.Fatal(err)
	}
	log := string(b)
	if !strings.Contains(log, "token=REDACTED") || !strings.Contains(log, "access_token=REDACTED") {
		t.Errorf("access log lacks the filtered URI:\n%s", log)
	}
	if !strings.Contains(log, "bearer.REDACTED") {
		t.Errorf("access log lacks the filtered subprotocol:\n%s", log)
	}
	for _, tk := range []string{token, other} {
		if strings.Contains(log, tk[strings.LastIndexByte(tk, '.')+1:]) {
			t.Errorf("a token is in the filtered access log:\n%s", log)
		}
	}
}
