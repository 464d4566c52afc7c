package caddychat

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"

	"github.com/caddychat/caddychat/internal/redistest"
)

const (
	testPublishPath = "/chat/publish"
	testPublishKey  = "test-publish-key-0123456789"
)

// publishResponse is one answer of the publish endpoint.
type publishResponse struct {
	status int
	header http.Header
	raw    string
	body   map[string]any
}

func (r publishResponse) String() string {
	return fmt.Sprintf("HTTP %d %s", r.status, strings.TrimSpace(r.raw))
}

// postPublish sends a request to the publish endpoint of n. auth is the whole
// Authorization header ("" for none); contentType "" sends none.
func postPublish(t *testing.T, n *testNode, method, auth, contentType, body string) publishResponse {
	t.Helper()
	req, err := http.NewRequest(method, n.srv.URL+testPublishPath, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, testPublishPath, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	r := publishResponse{status: resp.StatusCode, header: resp.Header, raw: string(raw)}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("%s: Content-Type = %q, want application/json", r, ct)
	}
	if err := json.Unmarshal(raw, &r.body); err != nil {
		t.Fatalf("%s: body is not a JSON object: %v", r, err)
	}
	return r
}

// post is postPublish with POST and application/json.
func post(t *testing.T, n *testNode, auth, body string) publishResponse {
	t.Helper()
	return postPublish(t, n, http.MethodPost, auth, "application/json", body)
}

func bearerHeader(token string) string { return "Bearer " + token }

func keys(m map[string]any) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// wantError requires r to be exactly {"error":{"code":code,"message":"..."}}
// with the given status.
func wantError(t *testing.T, what string, r publishResponse, status int, code string) {
	t.Helper()
	if r.status != status {
		t.Errorf("%s: got %s, want HTTP %d %s", what, r, status, code)
		return
	}
	if got := keys(r.body); !reflect.DeepEqual(got, []string{"error"}) {
		t.Errorf("%s: body keys = %v, want [error]: %s", what, got, r)
		return
	}
	checkErrorObject(t, what, r.body["error"], code)
}

func checkErrorObject(t *testing.T, what string, v any, code string) {
	t.Helper()
	e, _ := v.(map[string]any)
	if got := keys(e); !reflect.DeepEqual(got, []string{"code", "message"}) {
		t.Errorf("%s: error = %v, want an object with code and message", what, v)
		return
	}
	if e["code"] != code {
		t.Errorf("%s: error code = %v, want %q (message %v)", what, e["code"], code, e["message"])
	}
	if msg, _ := e["message"].(string); msg == "" {
		t.Errorf("%s: error message is empty", what)
	}
}

// wantPublished requires r to be exactly 200 {"channel":channel,"id":"<id>"}
// and returns the id.
func wantPublished(t *testing.T, r publishResponse, channel string) string {
	t.Helper()
	if r.status != http.StatusOK {
		t.Fatalf("publish on %s: got %s, want 200", channel, r)
	}
	if got := keys(r.body); !reflect.DeepEqual(got, []string{"channel", "id"}) || r.body["channel"] != channel {
		t.Fatalf("publish on %s: body = %s, want {\"channel\":%q,\"id\":...}", channel, r, channel)
	}
	id, _ := r.body["id"].(string)
	if id == "" {
		t.Fatalf("publish on %s: empty id: %s", channel, r)
	}
	return id
}

// wantDelivery requires m to be exactly the delivery of a message: type,
// channel, id, from, ts and data (compared as JSON).
//
// An empty from is the publish key's: the server's own message, which says
// "server":true.
func wantDelivery(t *testing.T, m map[string]any, channel, id, from, data string) {
	t.Helper()
	wantKeys := []string{"channel", "data", "from", "id", "ts", "type"}
	if from == "" {
		wantKeys = []string{"channel", "data", "from", "id", "server", "ts", "type"}
		if m["server"] != true {
			t.Fatalf("a publish-key message without server:true: %v", m)
		}
	}
	if got := keys(m); !reflect.DeepEqual(got, wantKeys) {
		t.Fatalf("delivery keys = %v, want %v: %v", got, wantKeys, m)
	}
	var wantData any
	if err := json.Unmarshal([]byte(data), &wantData); err != nil {
		t.Fatal(err)
	}
	if m["type"] != "message" || m["channel"] != channel || m["id"] != id || m["from"] != from || !reflect.DeepEqual(m["data"], wantData) {
		t.Fatalf("delivery = %v, want type message, channel %q, id %q, from %q, data %s", m, channel, id, from, data)
	}
	if ts, _ := m["ts"].(float64); time.Since(time.UnixMilli(int64(ts))).Abs() > time.Minute {
		t.Fatalf("delivery ts = %v", m["ts"])
	}
}

// expectNoMessageBefore publishes a marker on channel with the publish key
// and requires it to be the next delivery c gets: nothing else was delivered
// before it.
func expectNoMessageBefore(t *testing.T, n *testNode, c *testClient, channel string) {
	t.Helper()
	id := wantPublished(t, post(t, n, bearerHeader(testPublishKey), `{"channel":"`+channel+`","data":"marker"}`), channel)
	m := c.next("message")
	if m["id"] != id || m["data"] != "marker" {
		t.Fatalf("got delivery %v before the marker %s", m, id)
	}
}

// dialWithToken opens a JSON-protocol WebSocket authenticated by token.
func dialWithToken(t *testing.T, n *testNode, token string) *testClient {
	t.Helper()
	c := dial(t, n.url("/ws"), &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {bearerHeader(token)}}})
	c.next("welcome")
	return c
}

func keyNode(t *testing.T, h *Handler) *testNode {
	t.Helper()
	h.PublishEndpoint = testPublishPath
	h.PublishKey = testPublishKey
	return startNode(t, h)
}

func TestPublishEndpointKeyPublishReachesSubscriber(t *testing.T) {
	n := keyNode(t, &Handler{})
	sub := dial(t, n.url("/ws"), nil)
	sub.next("welcome")
	sub.subscribe("room:a", 1)

	r := post(t, n, bearerHeader(testPublishKey), `{"channel":"room:a","data":{"x":1}}`)
	id := wantPublished(t, r, "room:a")
	if cc := r.header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("Cache-Control = %q, want no-store", cc)
	}
	wantDelivery(t, sub.next("message"), "room:a", id, "", `{"x":1}`)

	// A Content-Type with parameters is still JSON; the scheme is case-blind;
	// no Content-Type at all is accepted too.
	r = postPublish(t, n, http.MethodPost, "bearer "+testPublishKey, "application/json; charset=utf-8", `{"channel":"room:a","data":"two"}`)
	wantDelivery(t, sub.next("message"), "room:a", wantPublished(t, r, "room:a"), "", `"two"`)
	r = postPublish(t, n, http.MethodPost, bearerHeader(testPublishKey), "", `{"channel":"room:a","data":[3]}`)
	wantDelivery(t, sub.next("message"), "room:a", wantPublished(t, r, "room:a"), "", `[3]`)
	// White space around the object (curl -d @file sends a final newline).
	r = post(t, n, bearerHeader(testPublishKey), " \n{\"channel\":\"room:a\",\"data\":4}\r\n\t ")
	wantDelivery(t, sub.next("message"), "room:a", wantPublished(t, r, "room:a"), "", `4`)

	// A channel nobody listens to still gets an id; the subscriber of room:a
	// sees nothing of it.
	wantPublished(t, post(t, n, bearerHeader(testPublishKey), `{"channel":"room:b","data":1}`), "room:b")
	expectNoMessageBefore(t, n, sub, "room:a")
}

func TestPublishEndpointUnauthorized(t *testing.T) {
	n := keyNode(t, &Handler{})
	sub := dial(t, n.url("/ws"), nil)
	sub.next("welcome")
	sub.subscribe("room:a", 1)
	body := `{"channel":"room:a","data":{"x":1}}`
	cases := []struct{ name, auth string }{
		{"missing Authorization", ""},
		{"wrong key", bearerHeader("test-publish-key-0123456780")},
		{"key prefix", bearerHeader(testPublishKey[:20])},
		{"key with suffix", bearerHeader(testPublishKey + "x")},
		{"Basic scheme", "Basic " + testPublishKey},
		{"key without scheme", testPublishKey},
		{"empty bearer", "Bearer "},
		{"a JWT on a route without jwt", bearerHeader(newToken(t, "alice").ttl(time.Minute).with(jwt.MapClaims{"chat": map[string]any{"publish": "**"}}).sign())},
	}
	for _, tc := range cases {
		r := post(t, n, tc.auth, body)
		wantError(t, tc.name, r, http.StatusUnauthorized, "unauthorized")
		if got := r.header.Get("WWW-Authenticate"); !strings.HasPrefix(got, "Bearer ") {
			t.Errorf("%s: WWW-Authenticate = %q, want a Bearer challenge", tc.name, got)
		}
	}
	expectNoMessageBefore(t, n, sub, "room:a")
}

func TestPublishEndpointJWT(t *testing.T) {
	n := startNode(t, &Handler{
		PublishEndpoint: testPublishPath,
		PublishKey:      testPublishKey, // only for expectNoMessageBefore
		JWT:             &JWTConfig{Secret: testSecret},
	})
	sub := dialWithToken(t, n, newToken(t, "watcher").ttl(time.Minute).with(jwt.MapClaims{"chat": map[string]any{"subscribe": []string{"**"}}}).sign())
	sub.subscribe("room:a", 1)
	sub.subscribe("other:x", 2)

	backend := newToken(t, "backend-1").ttl(time.Minute).with(jwt.MapClaims{"chat": map[string]any{"publish": []string{"room:*"}}}).sign()
	r := post(t, n, bearerHeader(backend), `{"channel":"room:a","data":{"x":1}}`)
	wantDelivery(t, sub.next("message"), "room:a", wantPublished(t, r, "room:a"), "backend-1", `{"x":1}`)

	wantError(t, "publish outside the token's rights", post(t, n, bearerHeader(backend), `{"channel":"other:x","data":1}`), http.StatusForbidden, "forbidden")
	// "room:*" is one segment: room:a:b is not granted.
	wantError(t, "publish on a deeper channel", post(t, n, bearerHeader(backend), `{"channel":"room:a:b","data":1}`), http.StatusForbidden, "forbidden")
	subscriber := newToken(t, "watcher").ttl(time.Minute).with(jwt.MapClaims{"chat": map[string]any{"subscribe": []string{"**"}}}).sign()
	wantError(t, "token without publish rights", post(t, n, bearerHeader(subscriber), `{"channel":"room:a","data":1}`), http.StatusForbidden, "forbidden")

	now := time.Now()
	unauthorized := []struct{ name, auth string }{
		{"expired token", bearerHeader(newToken(t, "backend-1").with(jwt.MapClaims{
			"iat": now.Add(-2 * time.Hour).Unix(), "exp": now.Add(-time.Hour).Unix(),
			"chat": map[string]any{"publish": []string{"room:*"}},
		}).sign())},
		{"token without exp", bearerHeader(newToken(t, "backend-1").with(jwt.MapClaims{
			"iat": nil, "exp": nil, "chat": map[string]any{"publish": []string{"room:*"}},
		}).sign())},
		{"token signed with another secret", bearerHeader(newToken(t, "backend-1").ttl(time.Minute).with(jwt.MapClaims{
			"iat": nil, "chat": map[string]any{"publish": []string{"room:*"}},
		}).secret(strings.Repeat("z", 32)).sign())},
		{"not a token", bearerHeader("not-a-token")},
		{"missing Authorization", ""},
	}
	for _, tc := range unauthorized {
		r := post(t, n, tc.auth, `{"channel":"room:a","data":1}`)
		wantError(t, tc.name, r, http.StatusUnauthorized, "unauthorized")
		if r.header.Get("WWW-Authenticate") == "" {
			t.Errorf("%s: no WWW-Authenticate header", tc.name)
		}
	}
	expectNoMessageBefore(t, n, sub, "room:a")
	expectNoMessageBefore(t, n, sub, "other:x")
}

func TestPublishEndpointBadRequests(t *testing.T) {
	n := keyNode(t, &Handler{MaxMessageSize: 1024})
	sub := dial(t, n.url("/ws"), nil)
	sub.next("welcome")
	sub.subscribe("room:a", 1)
	auth := bearerHeader(testPublishKey)

	// The method is checked first, even before authentication.
	for _, method := range []string{http.MethodGet, http.MethodPut, http.MethodDelete} {
		for _, a := range []string{"", auth} {
			r := postPublish(t, n, method, a, "application/json", `{"channel":"room:a","data":1}`)
			wantError(t, method, r, http.StatusMethodNotAllowed, "bad_request")
			if allow := r.header.Get("Allow"); allow != "POST" {
				t.Errorf("%s: Allow = %q, want POST", method, allow)
			}
		}
	}

	for _, ct := range []string{"text/plain", "application/x-www-form-urlencoded", "application/jsonx", "not a media type"} {
		r := postPublish(t, n, http.MethodPost, auth, ct, `{"channel":"room:a","data":1}`)
		wantError(t, "Content-Type "+ct, r, http.StatusUnsupportedMediaType, "bad_request")
	}

	big := strings.Repeat("x", 1024) // as a JSON string: 1026 bytes of data
	cases := []struct {
		name, body string
		status     int
		code       string
	}{
		{"empty body", ``, 400, "bad_request"},
		{"malformed JSON", `{"channel":"room:a","data":`, 400, "bad_request"},
		{"JSON array", `[{"channel":"room:a","data":1}]`, 400, "bad_request"},
		{"JSON string", `"room:a"`, 400, "bad_request"},
		{"two objects", `{"channel":"room:a","data":1}{"channel":"room:a","data":2}`, 400, "bad_request"},
		{"trailing garbage", `{"channel":"room:a","data":1} x`, 400, "bad_request"},
		{"trailing ]", `{"channel":"room:a","data":1}]`, 400, "bad_request"},
		{"trailing }", `{"channel":"room:a","data":1}}`, 400, "bad_request"},
		{"empty object", `{}`, 400, "bad_request"},
		{"missing data", `{"channel":"room:a"}`, 400, "bad_request"},
		{"missing channel", `{"data":1}`, 400, "bad_request"},
		{"channel is a number", `{"channel":5,"data":1}`, 400, "bad_request"},
		{"channel with a space", `{"channel":"a b","data":1}`, 400, "bad_request"},
		{"channel pattern", `{"channel":"room:*","data":1}`, 400, "bad_request"},
		{"channel glob", `{"channel":"room:?","data":1}`, 400, "bad_request"},
		{"channel too long", `{"channel":"` + strings.Repeat("a", 129) + `","data":1}`, 400, "bad_request"},
		{"channel and messages", `{"channel":"room:a","data":1,"messages":[{"channel":"room:a","data":2}]}`, 400, "bad_request"},
		{"data and messages", `{"data":1,"messages":[{"channel":"room:a","data":2}]}`, 400, "bad_request"},
		{"messages is not a list", `{"messages":{"channel":"room:a","data":1}}`, 400, "bad_request"},
		{"data over max_message_size", `{"channel":"room:a","data":"` + big + `"}`, 413, "too_large"},
		{"body over the total limit", `{"channel":"room:a","data":"` + strings.Repeat("y", 100*1024+1) + `"}`, 413, "too_large"},
	}
	for _, tc := range cases {
		wantError(t, tc.name, post(t, n, auth, tc.body), tc.status, tc.code)
	}

	// Exactly max_message_size bytes of data are fine.
	exact := `"` + strings.Repeat("z", 1022) + `"`
	r := post(t, n, auth, `{"channel":"room:a","data":`+exact+`}`)
	wantDelivery(t, sub.next("message"), "room:a", wantPublished(t, r, "room:a"), "", exact)
	expectNoMessageBefore(t, n, sub, "room:a")
}

func TestPublishEndpointBatch(t *testing.T) {
	n := startNode(t, &Handler{
		PublishEndpoint: testPublishPath,
		PublishKey:      testPublishKey,
		JWT:             &JWTConfig{Secret: testSecret},
		MaxMessageSize:  1024,
	})
	sub := dialWithToken(t, n, newToken(t, "watcher").ttl(time.Minute).with(jwt.MapClaims{"chat": map[string]any{"subscribe": []string{"**"}}}).sign())
	sub.subscribe("room:b", 1)
	sub.subscribe("other:x", 2)
	backend := bearerHeader(newToken(t, "backend-2").ttl(time.Minute).with(jwt.MapClaims{"chat": map[string]any{"publish": []string{"room:*"}}}).sign())

	r := post(t, n, backend, `{"messages":[
		{"channel":"room:b","data":{"n":1}},
		{"channel":"other:x","data":{"n":2}},
		{"channel":"a b","data":{"n":3}},
		{"channel":"room:b"},
		{"channel":"room:b","data":"`+strings.Repeat("x", 1024)+`"},
		{"channel":"room:b","data":{"n":6}}
	]}`)
	if r.status != http.StatusOK || !reflect.DeepEqual(keys(r.body), []string{"results"}) {
		t.Fatalf("batch: got %s, want 200 with results", r)
	}
	results, _ := r.body["results"].([]any)
	if len(results) != 6 {
		t.Fatalf("batch: %d results, want 6: %s", len(results), r)
	}
	res := make([]map[string]any, len(results))
	for i, v := range results {
		res[i], _ = v.(map[string]any)
	}
	for i, want := range []struct {
		channel string
		code    string // "" for published
	}{
		{"room:b", ""},
		{"other:x", "forbidden"},
		{"a b", "bad_request"},
		{"room:b", "bad_request"},
		{"room:b", "too_large"},
		{"room:b", ""},
	} {
		what := fmt.Sprintf("result %d", i)
		if res[i]["channel"] != want.channel {
			t.Errorf("%s: channel = %v, want %q: %v", what, res[i]["channel"], want.channel, res[i])
		}
		if want.code == "" {
			if id, _ := res[i]["id"].(string); id == "" || !reflect.DeepEqual(keys(res[i]), []string{"channel", "id"}) {
				t.Errorf("%s: %v, want channel and a non-empty id", what, res[i])
			}
			continue
		}
		if !reflect.DeepEqual(keys(res[i]), []string{"channel", "error"}) {
			t.Errorf("%s: %v, want channel and error", what, res[i])
			continue
		}
		checkErrorObject(t, what, res[i]["error"], want.code)
	}
	if t.Failed() {
		t.FailNow()
	}
	// Only the published ones are delivered, in order, from the token's user.
	wantDelivery(t, sub.next("message"), "room:b", res[0]["id"].(string), "backend-2", `{"n":1}`)
	wantDelivery(t, sub.next("message"), "room:b", res[5]["id"].(string), "backend-2", `{"n":6}`)
	expectNoMessageBefore(t, n, sub, "other:x")
	expectNoMessageBefore(t, n, sub, "room:b")

	item := `{"channel":"room:b","data":1}`
	tooMany := strings.TrimSuffix(strings.Repeat(item+",", 101), ",")
	for _, tc := range []struct{ name, body string }{
		{"empty messages", `{"messages":[]}`},
		{"null messages", `{"messages":null}`},
		{"101 messages", `{"messages":[` + tooMany + `]}`},
	} {
		wantError(t, tc.name, post(t, n, backend, tc.body), http.StatusBadRequest, "bad_request")
	}
	// The whole batch is refused: nothing of the 101 was delivered.
	expectNoMessageBefore(t, n, sub, "room:b")

	// 100 messages is the maximum, each delivered once.
	hundred := strings.TrimSuffix(strings.Repeat(item+",", 100), ",")
	r = post(t, n, bearerHeader(testPublishKey), `{"messages":[`+hundred+`]}`)
	if r.status != http.StatusOK {
		t.Fatalf("100 messages: got %s", r)
	}
	results, _ = r.body["results"].([]any)
	if len(results) != 100 {
		t.Fatalf("100 messages: %d results", len(results))
	}
	for i, v := range results {
		m, _ := v.(map[string]any)
		got := sub.next("message")
		if m["id"] == nil || got["id"] != m["id"] {
			t.Fatalf("message %d: result %v, delivery %v", i, m, got)
		}
	}
	expectNoMessageBefore(t, n, sub, "room:b")
}

func TestPublishEndpointBrokerUnavailable(t *testing.T) {
	rs := redistest.Start(t)
	const timeout = 500 * time.Millisecond
	n := keyNode(t, &Handler{Redis: rs.URL(), PublishTimeout: caddy.Duration(timeout)})
	sub := dial(t, n.url("/ws"), nil)
	sub.next("welcome")
	sub.subscribe("room:r", 1)
	auth := bearerHeader(testPublishKey)

	// Through Redis while it runs.
	r := post(t, n, auth, `{"channel":"room:r","data":{"up":true}}`)
	wantDelivery(t, sub.next("message"), "room:r", wantPublished(t, r, "room:r"), "", `{"up":true}`)

	rs.Kill()
	start := time.Now()
	r = post(t, n, auth, `{"channel":"room:r","data":{"up":false}}`)
	elapsed := time.Since(start)
	wantError(t, "publish with Redis down", r, http.StatusServiceUnavailable, "unavailable")
	t.Logf("503 after %v", elapsed.Round(time.Millisecond))
	if elapsed > timeout+time.Second {
		t.Errorf("the 503 took %v, want about publish_timeout (%v) at most", elapsed, timeout)
	}

	// In a batch, each message fails on its own, and the request still
	// answers 200.
	r = post(t, n, auth, `{"messages":[{"channel":"room:r","data":1},{"channel":"room:r","data":2}]}`)
	results, _ := r.body["results"].([]any)
	if r.status != http.StatusOK || len(results) != 2 {
		t.Fatalf("batch with Redis down: got %s, want 200 with 2 results", r)
	}
	for i, v := range results {
		m, _ := v.(map[string]any)
		if m["id"] != nil {
			t.Errorf("result %d has an id with Redis down: %v", i, m)
		}
		checkErrorObject(t, fmt.Sprintf("result %d", i), m["error"], "unavailable")
	}
}
