package caddychat

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/coder/websocket"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// Access-log redaction: a token never reaches a log.

const redactedLogMsg = "websocket request (token redacted; left out of the access log)"

// checkLogs expects exactly one info line for the request, with uri and
// status, and the token nowhere in any log entry.
func checkLogs(t *testing.T, logs *observer.ObservedLogs, token, wantURI string, wantStatus int) {
	t.Helper()
	all := logs.TakeAll()
	var infos []observer.LoggedEntry
	for _, e := range all {
		if strings.Contains(e.Message, token) || strings.Contains(fmt.Sprint(e.ContextMap()), token) {
			t.Errorf("log entry %q %v contains the token", e.Message, e.ContextMap())
		}
		if e.Level >= zapcore.InfoLevel {
			infos = append(infos, e)
		}
	}
	if wantURI == "" {
		if len(infos) != 0 {
			t.Fatalf("info log lines = %v, want none", infos)
		}
		return
	}
	if len(infos) != 1 || infos[0].Message != redactedLogMsg {
		t.Fatalf("info log lines = %+v, want one %q", infos, redactedLogMsg)
	}
	f := infos[0].ContextMap()
	if f["uri"] != wantURI || f["status"] != int64(wantStatus) || f["method"] != "GET" {
		t.Fatalf("log fields = %v, want uri %q status %d", f, wantURI, wantStatus)
	}
}

func TestRedactQueryTokenInLogs(t *testing.T) {
	n := startNode(t, &Handler{JWT: &JWTConfig{Secret: testSecret, QueryParam: "token"}, ChannelPrefix: ptr(uniquePrefix())}, observeLogs())
	logs := n.logs

	t.Run("accepted query token", func(t *testing.T) {
		tok := newToken(t, "alice").sign()
		c := dial(t, n.url("/ws?room=1&token="+tok), nil)
		if w := c.next("welcome"); w["user"] != "alice" {
			t.Fatalf("welcome = %v", w)
		}
		_ = c.ws.Close(websocket.StatusNormalClosure, "")
		if skip := n.waitDone(t); skip != true {
			t.Fatalf("log_skip = %v, want true", skip)
		}
		checkLogs(t, logs, tok, "/ws?room=1&token=REDACTED", http.StatusSwitchingProtocols)
	})
	t.Run("refused query token", func(t *testing.T) {
		tok := newToken(t, "alice").secret("another-secret-another-secret-0123456789").sign()
		r := dialRefused(t, n.url("/ws?token="+tok), nil)
		expect401(t, r, "invalid token signature", tok)
		if skip := n.waitDone(t); skip != true {
			t.Fatalf("log_skip = %v, want true", skip)
		}
		checkLogs(t, logs, tok, "/ws?token=REDACTED", http.StatusUnauthorized)
	})
	t.Run("token in subprotocol", func(t *testing.T) {
		tok := newToken(t, "alice").sign()
		c := dial(t, n.url("/ws"), &websocket.DialOptions{Subprotocols: []string{"caddychat", "bearer." + tok}})
		c.next("welcome")
		_ = c.ws.Close(websocket.StatusNormalClosure, "")
		if skip := n.waitDone(t); skip != true {
			t.Fatalf("log_skip = %v, want true", skip)
		}
		checkLogs(t, logs, tok, "/ws", http.StatusSwitchingProtocols)
	})
	t.Run("bearer subprotocol without caddychat", func(t *testing.T) {
		tok := newToken(t, "alice").sign()
		r := dialRefused(t, n.url("/ws"), &websocket.DialOptions{Subprotocols: []string{"bearer." + tok}})
		if r.status != http.StatusBadRequest {
			t.Fatalf("status = %d, want 400", r.status)
		}
		if skip := n.waitDone(t); skip != true {
			t.Fatalf("log_skip = %v, want true", skip)
		}
		checkLogs(t, logs, tok, "/ws", http.StatusBadRequest)
	})
	t.Run("header token stays in the access log", func(t *testing.T) {
		tok := newToken(t, "alice").sign()
		c := dial(t, n.url("/ws?room=1"), bearer(tok))
		c.next("welcome")
		_ = c.ws.Close(websocket.StatusNormalClosure, "")
		if skip := n.waitDone(t); skip != nil {
			t.Fatalf("log_skip = %v, want unset (Caddy redacts Authorization itself)", skip)
		}
		checkLogs(t, logs, tok, "", 0)
	})
}

func TestRedactQuery(t *testing.T) {
	h := &Handler{JWT: &JWTConfig{QueryParam: "t"}}
	for _, tc := range []struct{ in, want string }{
		{"/ws?token=abc", "/ws?token=REDACTED"},
		{"/ws?b=2&token=abc&a=1", "/ws?b=2&token=REDACTED&a=1"},
		{"/ws?token=abc&token=def", "/ws?token=REDACTED&token=REDACTED"},
		{"/ws?room=1", "/ws?room=1"},
		{"/ws", "/ws"},
		{"/ws?t=abc&x=1", "/ws?t=REDACTED&x=1"},
		{"/ws?ACCESS_TOKEN=abc;jwt=def&id%5Ftoken=ghi&token", "/ws?ACCESS_TOKEN=REDACTED;jwt=REDACTED&id%5Ftoken=REDACTED&token=REDACTED"},
		{"/ws?tokens=1&mytoken=2", "/ws?tokens=1&mytoken=2"},
	} {
		r := httptest.NewRequest(http.MethodGet, tc.in, nil)
		if got := h.redactTokenQuery(r.URL); got != tc.want {
			t.Errorf("redactTokenQuery(%q) = %q, want %q", tc.in, got, tc.want)
		}
		if carries := h.queryCarriesToken(r.URL.RawQuery); carries != strings.Contains(tc.want, "REDACTED") {
			t.Errorf("queryCarriesToken(%q) = %v", tc.in, carries)
		}
	}
}

// TestOpenRouteIgnoresForeignCredentials: a route without jwt lets in a
// request that carries credentials meant for something else.
func TestOpenRouteIgnoresForeignCredentials(t *testing.T) {
	n := startNode(t, &Handler{})
	for _, v := range []string{"Basic dXNlcjpwYXNz", "Bearer not-a-token", "Bearer "} {
		c := dial(t, n.url("/ws"), &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {v}}})
		if w := c.next("welcome"); w["user"] != "" {
			t.Fatalf("Authorization %q: welcome %v, want an anonymous user", v, w)
		}
	}
}
