package caddychat

// End-to-end: the synchronous hooks of issue 18 (connect_hook,
// subscribe_hook, publish_hook) on real Caddy nodes, a real redis-server and
// a real HTTP backend (httptest.Server).

import (
	"context"
	"crypto/hmac"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/caddychat/caddychat/internal/redistest"
)

const hookTestSecret = "hook-test-secret-0123456789"

// hookBackend is a backend serving the hooks with answer, which gets the
// decoded request; every request's signature is checked.
func hookBackend(t *testing.T, answer func(w http.ResponseWriter, req map[string]any)) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if sig := r.Header.Get(signatureHeader); sig != "" {
			ts, _, _ := strings.Cut(strings.TrimPrefix(sig, "t="), ",")
			var sec int64
			fmt.Sscan(ts, &sec)
			if want := signature([]byte(hookTestSecret), body, time.Unix(sec, 0)); !hmac.Equal([]byte(sig), []byte(want)) {
				t.Errorf("hook request with a bad signature %q", sig)
				http.Error(w, "bad signature", http.StatusUnauthorized)
				return
			}
		}
		if r.Header.Get("User-Agent") != "caddychat" || r.Header.Get("Content-Type") != "application/json" {
			t.Errorf("hook request headers: %v", r.Header)
		}
		var req map[string]any
		if err := json.Unmarshal(body, &req); err != nil {
			t.Errorf("hook request is not JSON: %q", body)
		}
		answer(w, req)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func hookAnswerJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// dialHooked dials url with header (and a same-origin Origin).
func dialHooked(t *testing.T, name, url string, header http.Header) (*wsClient, error) {
	t.Helper()
	host := strings.TrimPrefix(url, "ws://")
	host, _, _ = strings.Cut(host, "/")
	if header == nil {
		header = http.Header{}
	}
	header.Set("Origin", "http://"+host)
	return dialWSWith(t, name, url, &websocket.DialOptions{HTTPHeader: header})
}

// closedWith waits for the server's close and returns its code and reason.
func closedWith(t *testing.T, c *wsClient) (websocket.StatusCode, string) {
	t.Helper()
	if _, err := c.waitClosed(10 * time.Second); err != nil {
		t.Fatalf("%s: not closed: %v", c.name, err)
	}
	var ce websocket.CloseError
	if !errors.As(c.readErr, &ce) {
		t.Fatalf("%s: ended without a close frame: %v", c.name, c.readErr)
	}
	return ce.Code, ce.Reason
}

// TestHookConnectByCookie: a cookie session, no JWT: the connect hook gets
// the Cookie header (and no other), answers the user, patterns, info,
// channels; the welcome carries user and info, the channel is subscribed
// at once, the patterns apply, messages carry info. Without the cookie
// the backend refuses and the reason reaches the client in the close
// frame (4004), cut to 123 bytes when longer.
func TestHookConnectByCookie(t *testing.T) {
	t.Parallel()
	longReason := strings.Repeat("é", 100) // 200 bytes
	backend := hookBackend(t, func(w http.ResponseWriter, req map[string]any) {
		headers, _ := req["headers"].(map[string]any)
		if _, ok := headers["X-Other"]; ok {
			t.Errorf("connect hook got a header it was not allowed: %v", headers)
		}
		if req["type"] != "connect" || req["route"] != "/ws" || req["remote"] == "" {
			t.Errorf("connect request: %v", req)
		}
		cookie := fmt.Sprint(headers["Cookie"])
		switch {
		case strings.Contains(cookie, "session=alice"):
			hookAnswerJSON(w, map[string]any{"result": "allow", "user": "alice",
				"subscribe": []string{"room:*", "user:alice"}, "publish": []string{"room:*"},
				"info":     map[string]any{"name": "Alice", "avatar": "https://example.com/a.png"},
				"channels": []string{"user:alice", "other:x"}, "expires_in": "1h"})
		case strings.Contains(cookie, "session=long"):
			hookAnswerJSON(w, map[string]any{"result": "deny", "reason": longReason})
		default:
			hookAnswerJSON(w, map[string]any{"result": "deny", "reason": "please log in"})
		}
	})
	n := startCaddy(t, "node", fmt.Sprintf(`	chat /ws {
		rate_limit off
		connect_hook %s {
			secret %s
			headers Cookie
		}
	}`, backend.URL, hookTestSecret))

	c, err := dialHooked(t, "alice", n.wsURL("/ws"), http.Header{"Cookie": {"session=alice"}, "X-Other": {"x"}})
	if err != nil {
		t.Fatal(err)
	}
	w, err := c.readMsg(5 * time.Second)
	if err != nil || w.Type != "welcome" || w.User == nil || *w.User != "alice" || !strings.Contains(w.raw, `"info":{"avatar":"https://example.com/a.png","name":"Alice"}`) {
		t.Fatalf("welcome: %v %v", w, err)
	}
	// The channels of the answer: user:alice subscribed, other:x refused by
	// the answer's own patterns; replies name the channel, no id.
	m, err := c.readMsg(5 * time.Second)
	if err != nil || m.Type != "ok" || m.Channel != "user:alice" || m.ID != nil {
		t.Fatalf("initial subscribe of user:alice: %v %v", m, err)
	}
	m, err = c.readMsg(5 * time.Second)
	if err != nil || m.Type != "error" || m.Code != errForbidden || m.Channel != "other:x" {
		t.Fatalf("initial subscribe of other:x: want forbidden naming the channel, got %v %v", m, err)
	}
	c.subscribe("room:a")
	if r, _ := c.request(map[string]any{"op": "subscribe", "channel": "elsewhere"}, 5*time.Second); r == nil || r.Code != errForbidden {
		t.Fatalf("subscribe outside the answered patterns: %v", r)
	}
	c.mustPublish("room:a", "hi")
	got := c.expectMessage("room:a", 5*time.Second)
	if *got.From != "alice" || !strings.Contains(got.raw, `"info":{"avatar":"https://example.com/a.png","name":"Alice"}`) {
		t.Fatalf("message: %s", got.raw)
	}

	anon, err := dialHooked(t, "anon", n.wsURL("/ws"), nil)
	if err != nil {
		t.Fatalf("a refused connection must still be upgraded (the reason goes in the close frame): %v", err)
	}
	if code, reason := closedWith(t, anon); code != closeRefused || reason != "please log in" {
		t.Fatalf("refused: got close %d %q, want %d %q", code, reason, closeRefused, "please log in")
	}
	long, err := dialHooked(t, "long", n.wsURL("/ws"), http.Header{"Cookie": {"session=long"}})
	if err != nil {
		t.Fatal(err)
	}
	code, reason := closedWith(t, long)
	if code != closeRefused || len(reason) > maxCloseReason || !strings.HasPrefix(longReason, strings.TrimSuffix(reason, "…")) || !strings.HasSuffix(reason, "…") {
		t.Fatalf("long reason: got close %d %q (%d bytes), want 4004 and the reason cut to 123 bytes", code, reason, len(reason))
	}
}

// TestHookConnectFailure: a backend slower than the timeout refuses the
// connection (1013, fail closed); with fail_open the connection is let in
// with what the node knows (here: anonymous); a bad token is still 401
// before the hook; a valid token's claims reach the hook.
func TestHookConnectFailure(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	var gotClaims atomic.Value
	backend := hookBackend(t, func(w http.ResponseWriter, req map[string]any) {
		calls.Add(1)
		if req["route"] == "/token" {
			gotClaims.Store(fmt.Sprint(req["user"], " ", req["claims"]))
			hookAnswerJSON(w, map[string]any{"result": "allow"})
			return
		}
		time.Sleep(1500 * time.Millisecond)
		hookAnswerJSON(w, map[string]any{"result": "allow", "user": "late"})
	})
	hook := fmt.Sprintf("connect_hook %s {\n\t\t\ttimeout 200ms\n\t\t\tsecret %s\n", backend.URL, hookTestSecret)
	n := startCaddy(t, "node", fmt.Sprintf(`	chat /closed {
		%s		}
	}
	chat /open {
		anonymous {
			subscribe public:*
		}
		%s			fail_open
		}
	}
	chat /token {
		jwt {
			secret %s
		}
		%s		}
	}`, hook, hook, testSecret, hook))

	start := time.Now()
	c, err := dialHooked(t, "closed", n.wsURL("/closed"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if code, reason := closedWith(t, c); code != closeTryAgainLater || !strings.Contains(reason, "connect_hook timeout") {
		t.Fatalf("fail closed: got close %d %q, want 1013 naming the timeout", code, reason)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("refusal took %v; the hook's timeout is 200ms", d)
	}
	open, err := dialHooked(t, "open", n.wsURL("/open"), nil)
	if err != nil {
		t.Fatal(err)
	}
	w, err := open.readMsg(5 * time.Second)
	if err != nil || w.Type != "welcome" || *w.User != "" {
		t.Fatalf("fail_open: want an anonymous welcome, got %v %v", w, err)
	}
	open.subscribe("public:a")
	if r, _ := open.request(map[string]any{"op": "subscribe", "channel": "room:a"}, 5*time.Second); r == nil || r.Code != errForbidden {
		t.Fatalf("fail_open admits with the anonymous permissions only: %v", r)
	}

	before := calls.Load()
	_, err = dialHooked(t, "badtoken", n.wsURL("/token"), http.Header{"Authorization": {"Bearer not.a.token"}})
	if err == nil || !strings.Contains(err.Error(), "401") || calls.Load() != before {
		t.Fatalf("bad token: want 401 without a hook call, got %v (calls %d→%d)", err, before, calls.Load())
	}
	tok := newToken(t, "bob").with(map[string]any{"chat": map[string]any{"subscribe": []string{"room:*"}}}).sign()
	tc, err := dialHooked(t, "token", n.wsURL("/token"), http.Header{"Authorization": {"Bearer " + tok}})
	if err != nil {
		t.Fatal(err)
	}
	if w, err := tc.readMsg(5 * time.Second); err != nil || *w.User != "bob" {
		t.Fatalf("token + hook: welcome %v %v", w, err)
	}
	tc.subscribe("room:x") // the token's patterns, the answer named none
	if s, _ := gotClaims.Load().(string); !strings.HasPrefix(s, "bob map[") || !strings.Contains(s, "sub:bob") {
		t.Fatalf("the hook did not get the token's user and claims: %q", s)
	}
}

// TestHookChannelsTwoNodes: subscribe and publish hooks on two nodes
// sharing Redis. A denied channel gets forbidden with the backend's reason;
// a rejected message gets rejected and never reaches Redis (a raw
// PSUBSCRIBE on the channel prefix) nor a subscriber of either node; a
// replaced message reaches everyone with the backend's data.
func TestHookChannelsTwoNodes(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	var subscribeCalls atomic.Int32
	backend := hookBackend(t, func(w http.ResponseWriter, req map[string]any) {
		switch req["type"] {
		case "subscribe":
			subscribeCalls.Add(1)
			if req["channel"] == "room:secret" {
				hookAnswerJSON(w, map[string]any{"result": "deny", "reason": "members only"})
				return
			}
			hookAnswerJSON(w, map[string]any{"result": "allow"})
		case "publish":
			text := fmt.Sprint(req["data"])
			switch {
			case strings.Contains(text, "badword"):
				hookAnswerJSON(w, map[string]any{"result": "deny", "reason": "no bad words"})
			case strings.Contains(text, "replace me"):
				hookAnswerJSON(w, map[string]any{"result": "allow", "data": map[string]any{"text": "replaced", "id": 42}})
			default:
				hookAnswerJSON(w, map[string]any{"result": "allow"})
			}
		default:
			t.Errorf("unexpected hook request %v", req)
		}
	})
	routes := fmt.Sprintf(`	chat /ws {
		redis %s
		rate_limit off
		jwt {
			secret %s
		}
		subscribe room:*
		publish room:*
		publish_endpoint /chat/publish
		subscribe_hook %s room:* {
			secret %s
			cache 1m
		}
		publish_hook %s room:* {
			secret %s
		}
	}`, rs.URL(), testSecret, backend.URL, hookTestSecret, backend.URL, hookTestSecret)
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)
	dial := func(name, url, user string) *wsClient {
		c, err := dialHooked(t, name, url, http.Header{"Authorization": {"Bearer " + newToken(t, user).sign()}})
		if err != nil {
			t.Fatal(err)
		}
		if w, err := c.readMsg(5 * time.Second); err != nil || w.Type != "welcome" {
			t.Fatalf("%s: welcome %v %v", name, w, err)
		}
		return c
	}
	pub := dial("alice@A", a.wsURL("/ws"), "alice")
	sub := dial("bob@B", b.wsURL("/ws"), "bob")

	r, err := sub.request(map[string]any{"op": "subscribe", "channel": "room:secret"}, 5*time.Second)
	if err != nil || r.Type != "error" || r.Code != errForbidden || r.Message != "members only" {
		t.Fatalf("denied subscribe: %v %v", r, err)
	}
	calls := subscribeCalls.Load()
	r, _ = sub.request(map[string]any{"op": "subscribe", "channel": "room:secret"}, 5*time.Second)
	if r.Code != errForbidden || subscribeCalls.Load() != calls {
		t.Fatalf("a cached deny must be answered without asking again: %v, calls %d→%d", r, calls, subscribeCalls.Load())
	}
	sub.subscribe("room:a")
	pub.subscribe("room:a")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ps := rs.Client().PSubscribe(ctx, "chat:*")
	defer ps.Close()
	if _, err := ps.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	var raw []string
	var rawMu sync.Mutex
	go func() {
		for m := range ps.Channel() {
			rawMu.Lock()
			raw = append(raw, m.Channel+" "+m.Payload)
			rawMu.Unlock()
		}
	}()

	r = pub.publish("room:a", map[string]any{"text": "a badword here"})
	if r.Type != "error" || r.Code != errRejected || r.Message != "no bad words" {
		t.Fatalf("rejected publish: %v", r)
	}
	pub.mustPublish("room:a", map[string]any{"text": "replace me"})
	pub.mustPublish("room:a", map[string]any{"text": "marker"})
	for _, c := range []*wsClient{sub, pub} {
		m := c.expectMessage("room:a", 5*time.Second)
		if string(m.Data) != `{"id":42,"text":"replaced"}` {
			t.Fatalf("%s: first message: want the replaced data, got %s", c.name, m.raw)
		}
		if m = c.expectMessage("room:a", 5*time.Second); string(m.Data) != `{"text":"marker"}` {
			t.Fatalf("%s: second message: want the marker (the rejected one never comes), got %s", c.name, m.raw)
		}
	}
	eventually(t, 5*time.Second, "Redis sees the replaced message and the marker", func() (bool, string) {
		rawMu.Lock()
		defer rawMu.Unlock()
		return len(raw) >= 2 && strings.Contains(raw[len(raw)-1], "marker"), strings.Join(raw, "\n")
	})
	rawMu.Lock()
	defer rawMu.Unlock()
	for _, p := range raw {
		if strings.Contains(p, "badword") {
			t.Fatalf("the rejected message reached Redis: %s", p)
		}
	}
	if len(raw) != 2 || !strings.Contains(raw[0], "replaced") {
		t.Fatalf("Redis saw %d messages, want the replaced one and the marker:\n%s", len(raw), strings.Join(raw, "\n"))
	}

	// The HTTP publish endpoint: a token holder's messages go by the hook.
	token := newToken(t, "carol").sign()
	if status, body := httpPublish(t, b.httpURL("/chat/publish"), token, `{"channel":"room:a","data":{"text":"badword"}}`); status != http.StatusForbidden || !strings.Contains(body, `"code":"rejected"`) || !strings.Contains(body, "no bad words") {
		t.Fatalf("HTTP publish of a rejected message: HTTP %d %s", status, body)
	}
	if status, body := httpPublish(t, b.httpURL("/chat/publish"), token, `{"channel":"room:a","data":{"text":"replace me"}}`); status != http.StatusOK {
		t.Fatalf("HTTP publish: HTTP %d %s", status, body)
	}
	if m := sub.expectMessage("room:a", 5*time.Second); string(m.Data) != `{"id":42,"text":"replaced"}` || *m.From != "carol" {
		t.Fatalf("HTTP publish: want carol's replaced message next (the rejected one never comes), got %s", m.raw)
	}
}

// TestHookBadAnswers: whatever the backend answers, the node neither
// crashes nor admits: garbage, a 10 MiB body, a body that trickles past
// the timeout, invalid patterns, an oversized info, a wrong status, an
// unknown result are each refused with 1013 (fail closed), and logged at
// warn with the hook's name. The body over 64 KiB is refused as too large
// without being read to its end.
func TestHookBadAnswers(t *testing.T) {
	t.Parallel()
	backend := hookBackend(t, func(w http.ResponseWriter, req map[string]any) {
		headers, _ := req["headers"].(map[string]any)
		switch kind := fmt.Sprint(headers["X-Kind"]); kind {
		case "[garbage]":
			_, _ = w.Write([]byte("<html>oops</html>"))
		case "[huge]":
			// 10 MiB and on (up to 1 GiB): only a node that stops reading
			// at 64 KiB refuses it as too large rather than at the timeout.
			chunk := strings.Repeat("x", 1<<20)
			_, _ = w.Write([]byte(`{"result":"allow","user":"`))
			for i := 0; i < 1024; i++ {
				if _, err := w.Write([]byte(chunk)); err != nil {
					return
				}
			}
			_, _ = w.Write([]byte(`"}`))
		case "[slow]":
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write([]byte(`{"result":`))
			w.(http.Flusher).Flush()
			time.Sleep(2 * time.Second)
			_, _ = w.Write([]byte(`"allow"}`))
		case "[pattern]":
			hookAnswerJSON(w, map[string]any{"result": "allow", "user": "u", "subscribe": []string{"room:x*"}})
		case "[info]":
			hookAnswerJSON(w, map[string]any{"result": "allow", "user": "u", "info": map[string]any{"bio": strings.Repeat("b", 2000)}})
		case "[status]":
			http.Error(w, "boom", http.StatusInternalServerError)
		case "[result]":
			hookAnswerJSON(w, map[string]any{"result": "maybe"})
		default:
			hookAnswerJSON(w, map[string]any{"result": "allow", "user": "fine"})
		}
	})
	n := startCaddy(t, "node", fmt.Sprintf(`	chat /ws {
		connect_hook %s {
			timeout 500ms
			headers X-Kind
		}
	}`, backend.URL))
	for _, kind := range []string{"garbage", "huge", "slow", "pattern", "info", "status", "result"} {
		start := time.Now()
		c, err := dialHooked(t, kind, n.wsURL("/ws"), http.Header{"X-Kind": {kind}})
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		if code, reason := closedWith(t, c); code != closeTryAgainLater || !strings.Contains(reason, "connect_hook") {
			t.Errorf("%s: got close %d %q, want 1013 (fail closed)", kind, code, reason)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("%s: refused after %v", kind, d)
		}
	}
	// The node still serves, and said what was wrong.
	c, err := dialHooked(t, "fine", n.wsURL("/ws"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if w, err := c.readMsg(5 * time.Second); err != nil || *w.User != "fine" {
		t.Fatalf("after the bad answers: %v %v", w, err)
	}
	log := n.logTail(200)
	for _, want := range []string{`"hook": "connect"`, `"kind": "not_json"`, `"kind": "too_large"`, `"kind": "timeout"`, `"kind": "answer"`, `"kind": "status"`, `"kind": "result"`} {
		if !strings.Contains(strings.ReplaceAll(log, `":"`, `": "`), want) {
			t.Errorf("the log does not say %s:\n%s", want, log)
		}
	}
	samples := n.scrapeMetrics(t)
	if v := samples[`caddy_chat_hook_outcomes_total{hook="connect",outcome="error"}`]; v != 6 {
		t.Errorf("hook_outcomes_total error = %v, want 6", v)
	}
	if v := samples[`caddy_chat_hook_outcomes_total{hook="connect",outcome="timeout"}`]; v != 1 {
		t.Errorf("hook_outcomes_total timeout = %v, want 1", v)
	}
}

// TestHookOverloaded: with max_concurrent 1, a second call while one is in
// flight fails at once (overloaded: refused, never queued), and is
// counted; once the first answers, calls go through again.
func TestHookOverloaded(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	// Registered after the backend's own cleanup, so it runs first: a
	// failing test never leaves the backend's handler waiting.
	defer unblock()
	var first atomic.Bool
	entered := make(chan struct{})
	backend := hookBackend(t, func(w http.ResponseWriter, req map[string]any) {
		if first.CompareAndSwap(false, true) {
			close(entered)
			<-release
		}
		hookAnswerJSON(w, map[string]any{"result": "allow", "user": "u"})
	})
	n := startCaddy(t, "node", fmt.Sprintf(`	chat /ws {
		connect_hook %s {
			timeout 10s
			max_concurrent 1
		}
	}`, backend.URL))
	firstDone := make(chan *wsClient, 1)
	go func() {
		c, err := dialHooked(t, "first", n.wsURL("/ws"), nil)
		if err != nil {
			t.Error(err)
		}
		firstDone <- c
	}()
	<-entered
	start := time.Now()
	c, err := dialHooked(t, "second", n.wsURL("/ws"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if code, reason := closedWith(t, c); code != closeTryAgainLater || !strings.Contains(reason, "overloaded") {
		t.Fatalf("over max_concurrent: got close %d %q, want 1013 overloaded", code, reason)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("the overloaded call waited %v; it must fail at once", d)
	}
	unblock()
	if fc := <-firstDone; fc == nil {
		t.Fatal("first connection failed")
	} else if w, err := fc.readMsg(5 * time.Second); err != nil || w.Type != "welcome" {
		t.Fatalf("first: %v %v", w, err)
	}
	if v := n.scrapeMetrics(t)[`caddy_chat_hook_outcomes_total{hook="connect",outcome="overloaded"}`]; v != 1 {
		t.Errorf("hook_outcomes_total overloaded = %v, want 1", v)
	}
}
