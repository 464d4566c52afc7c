package caddychat

// Webhooks (issue 18): events reach the backend once per cluster, at least
// once, through a node's SIGKILL, a backend outage, reloads; the backlog is
// bounded.

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// webhookBackend is a real HTTP backend that records the events it gets,
// by id; down makes it answer 503; slow delays each answer.
type webhookBackend struct {
	srv    *httptest.Server
	secret string

	mu       sync.Mutex
	byID     map[string]int // deliveries of each event id
	events   map[string]webhookEvent
	requests int
	badSig   int
	down     atomic.Bool
	slow     atomic.Int64 // ns
}

func newWebhookBackend(t testing.TB, secret string) *webhookBackend {
	b := &webhookBackend{secret: secret, byID: make(map[string]int), events: make(map[string]webhookEvent)}
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Read first: the request's context ends when its connection does
		// only once the body is read.
		body, _ := io.ReadAll(r.Body)
		if d := b.slow.Load(); d > 0 {
			time.Sleep(time.Duration(d))
			if r.Context().Err() != nil {
				return // the node is gone: nothing is taken (a SIGKILLed node's batch in flight)
			}
		}
		if b.down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		var batch struct {
			Events []webhookEvent `json:"events"`
		}
		if err := json.Unmarshal(body, &batch); err != nil || r.Header.Get("User-Agent") != "caddychat" {
			http.Error(w, "bad body", http.StatusBadRequest)
			return
		}
		b.mu.Lock()
		defer b.mu.Unlock()
		b.requests++
		if secret != "" {
			sig := r.Header.Get(signatureHeader)
			var ts int64
			fmt.Sscanf(sig, "t=%d,", &ts)
			if sig != signature([]byte(secret), body, time.Unix(ts, 0)) {
				b.badSig++
			}
		}
		for _, e := range batch.Events {
			b.byID[e.ID]++
			b.events[e.ID] = e
		}
	}))
	t.Cleanup(b.srv.Close)
	return b
}

// counts: distinct events of kind, and deliveries beyond the first.
func (b *webhookBackend) counts(kind string) (distinct, dups int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for id, n := range b.byID {
		if b.events[id].Type == kind {
			distinct++
			dups += n - 1
		}
	}
	return
}

// messageIDs are the message ids of the publish events received.
func (b *webhookBackend) messageIDs() map[string]bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make(map[string]bool)
	for _, e := range b.events {
		if e.Type == "publish" {
			out[e.MessageID] = true
		}
	}
	return out
}

// publishBatches publishes n messages on channel through the publish
// endpoint of each node in turn, in batches of 25, and returns their ids.
func publishBatches(t testing.TB, urls []string, key string, n int) []string {
	t.Helper()
	var ids []string
	for i, k := 0, 0; i < n; k++ {
		var items []string
		for j := 0; j < 25 && i < n; j, i = j+1, i+1 {
			items = append(items, fmt.Sprintf(`{"channel":"room:wh","data":{"n":%d}}`, i))
		}
		status, body := httpPublish(t, urls[k%len(urls)], key, `{"messages":[`+strings.Join(items, ",")+`]}`)
		if status != http.StatusOK {
			t.Fatalf("publish: %d %s", status, body)
		}
		var res struct {
			Results []publishResult `json:"results"`
		}
		if err := json.Unmarshal([]byte(body), &res); err != nil {
			t.Fatalf("publish answer %s: %v", body, err)
		}
		for _, r := range res.Results {
			if r.Error != nil {
				t.Fatalf("publish: %+v", r.Error)
			}
			ids = append(ids, r.ID)
		}
	}
	return ids
}

const webhookTestKey = "test-publish-key-0123456789"

func webhookRoutes(redisURL, prefix, backend, extra string) string {
	redis := ""
	if redisURL != "" {
		redis = "redis " + redisURL
	}
	return fmt.Sprintf(`	chat /ws {
		%s
		channel_prefix %s
		rate_limit off
		publish_endpoint /chat/publish
		publish_key %s
		webhook %s {
			secret webhook-test-secret
			timeout 1s
			claim_idle 2s
			%s
		}
	}`, redis, prefix, webhookTestKey, backend, extra)
}

// waitPublishEvents waits until the backend has n distinct publish events.
func waitPublishEvents(t testing.TB, b *webhookBackend, n int, within time.Duration) {
	t.Helper()
	eventually(t, within, fmt.Sprintf("%d publish events at the backend", n), func() (bool, string) {
		got, dups := b.counts("publish")
		return got == n, fmt.Sprintf("%d distinct, %d duplicates", got, dups)
	})
}

// TestWebhookOncePerClusterRedis: 1,000 publishes spread over two nodes
// reach the backend exactly once each, by event id, signed, each with the
// message id the publisher got.
func TestWebhookOncePerClusterRedis(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	b := newWebhookBackend(t, "webhook-test-secret")
	routes := webhookRoutes(rs.URL(), "wh1:", b.srv.URL, "events publish\n\t\t\tbatch 50")
	na := startCaddy(t, "A", routes)
	nb := startCaddy(t, "B", routes)
	ids := publishBatches(t, []string{na.httpURL("/chat/publish"), nb.httpURL("/chat/publish")}, webhookTestKey, 1000)
	waitPublishEvents(t, b, 1000, 30*time.Second)
	time.Sleep(500 * time.Millisecond) // room for a duplicate to show
	if _, dups := b.counts("publish"); dups != 0 {
		t.Errorf("%d duplicate deliveries without any failure: not once per cluster", dups)
	}
	got := b.messageIDs()
	for _, id := range ids {
		if !got[id] {
			t.Fatalf("message %s has no publish event", id)
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.badSig != 0 {
		t.Errorf("%d requests with a wrong signature", b.badSig)
	}
	nodes := map[string]int{}
	for _, e := range b.events {
		nodes[e.Node]++
	}
	if len(nodes) != 2 {
		t.Errorf("events recorded by %d nodes, want 2: %v", len(nodes), nodes)
	}
}

// TestWebhookSurvivesNodeKill: node B is SIGKILLed while the (slow) backend
// still has B's events to take: B's pending entries are claimed by A after
// claim_idle, so every event arrives (at least once; once after dedup).
func TestWebhookSurvivesNodeKill(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	b := newWebhookBackend(t, "webhook-test-secret")
	// A second per batch of 10: however long the 1,000 publishes take on a
	// loaded machine, most events are still to deliver when B is killed.
	b.slow.Store(int64(time.Second))
	routes := webhookRoutes(rs.URL(), "wh2:", b.srv.URL, "events publish\n\t\t\tbatch 10")
	na := startCaddy(t, "A", routes)
	nb := startCaddy(t, "B", routes)
	publishBatches(t, []string{na.httpURL("/chat/publish"), nb.httpURL("/chat/publish")}, webhookTestKey, 1000)
	// B's writer puts its events in the stream within milliseconds.
	time.Sleep(300 * time.Millisecond)
	before, _ := b.counts("publish")
	nb.kill()
	if before >= 900 {
		t.Fatalf("%d of 1000 delivered before the kill: the test proves nothing", before)
	}
	b.slow.Store(0)
	waitPublishEvents(t, b, 1000, 30*time.Second)
	_, dups := b.counts("publish")
	t.Logf("%d delivered before B was killed; %d duplicates (at least once)", before, dups)
}

// TestWebhookBackendOutage: the backend answers 503 for 10 s; every event
// recorded meanwhile is delivered once it is back.
func TestWebhookBackendOutage(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	b := newWebhookBackend(t, "webhook-test-secret")
	b.down.Store(true)
	routes := webhookRoutes(rs.URL(), "wh3:", b.srv.URL, "events publish")
	na := startCaddy(t, "A", routes)
	nb := startCaddy(t, "B", routes)
	publishBatches(t, []string{na.httpURL("/chat/publish"), nb.httpURL("/chat/publish")}, webhookTestKey, 300)
	time.Sleep(10 * time.Second)
	if n, _ := b.counts("publish"); n != 0 {
		t.Fatalf("%d events delivered while the backend was down", n)
	}
	b.down.Store(false)
	waitPublishEvents(t, b, 300, 20*time.Second)
}

// TestWebhookMemoryBroker: the in-process broker, one node: connect,
// subscribe, publish, unsubscribe and disconnect events, each once, with
// retries through a backend outage.
func TestWebhookMemoryBroker(t *testing.T) {
	t.Parallel()
	b := newWebhookBackend(t, "s3cret")
	b.down.Store(true)
	h := &Handler{ChannelPrefix: ptr(uniquePrefix()), RateLimit: &RateLimit{}, Webhooks: []*Webhook{{URL: b.srv.URL, Secret: "s3cret", Batch: 7, Timeout: caddy.Duration(time.Second)}}}
	n := startNode(t, h)
	c := dialJSON(t, "c", n.url("/ws"))
	c.subscribe("room:m")
	for i := range 200 {
		c.mustPublish("room:m", map[string]int{"n": i})
	}
	if m, err := c.request(map[string]any{"op": "unsubscribe", "channel": "room:m"}, 5*time.Second); err != nil || m.Type != "ok" {
		t.Fatalf("unsubscribe: %v %v", m, err)
	}
	c.closeNormal()
	time.Sleep(time.Second)
	b.down.Store(false)
	waitPublishEvents(t, b, 200, 20*time.Second)
	eventually(t, 10*time.Second, "connect, subscribe, unsubscribe, disconnect", func() (bool, string) {
		var got []string
		ok := true
		for _, k := range []string{"connect", "subscribe", "unsubscribe", "disconnect"} {
			d, dups := b.counts(k)
			got = append(got, fmt.Sprintf("%s %d+%d", k, d, dups))
			ok = ok && d == 1 && dups == 0
		}
		return ok, strings.Join(got, ", ")
	})
	if _, dups := b.counts("publish"); dups != 0 {
		t.Errorf("%d duplicate publish events with a single node", dups)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.badSig != 0 {
		t.Errorf("%d requests with a wrong signature", b.badSig)
	}
	for _, e := range b.events {
		if e.Route != "/ws" || e.Conn == "" || e.ID == "" || e.TS == 0 {
			t.Fatalf("event lacks route, conn, id or ts: %+v", e)
		}
	}
}

// TestWebhookOverflow: with the backend down, a tiny max_backlog holds at
// most its bytes; the rest is dropped and counted.
func TestWebhookOverflow(t *testing.T) {
	b := newWebhookBackend(t, "")
	b.down.Store(true)
	const backlog = 64 << 10
	h := &Handler{ChannelPrefix: ptr(uniquePrefix()), RateLimit: &RateLimit{}, Webhooks: []*Webhook{{URL: b.srv.URL, Events: []string{"publish"}, MaxBacklog: backlog, Timeout: caddy.Duration(time.Second)}}}
	n := startNode(t, h)
	dropped := func() float64 { return testutil.ToFloat64(moduleMetrics().webhookEvents.WithLabelValues("dropped")) }
	before := dropped()
	c := dialJSON(t, "c", n.url("/ws"))
	pad := strings.Repeat("x", 200)
	for i := range 2000 {
		c.mustPublish("room:o", map[string]any{"n": i, "pad": pad})
	}
	d := h.webhooks.sinks[0].d
	eventually(t, 10*time.Second, "drops counted", func() (bool, string) {
		return dropped()-before > 1000, fmt.Sprintf("%v dropped", dropped()-before)
	})
	d.mu.Lock()
	queued, events := d.queued, len(d.queue)
	d.mu.Unlock()
	if queued > backlog || events == 0 {
		t.Fatalf("backlog %d bytes in %d events; want at most %d, more than none", queued, events, backlog)
	}
	b.down.Store(false)
	waitPublishEvents(t, b, events, 10*time.Second)
}

// TestWebhookReload: reloads that change a webhook's settings close the old
// deliverer and start the new one, leaking no goroutine; events recorded
// on either side of a reload arrive.
func TestWebhookReload(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	b := newWebhookBackend(t, "webhook-test-secret")
	node := startCaddy(t, "A", webhookRoutes(rs.URL(), "wh4:", b.srv.URL, "events publish\n\t\t\tbatch 10"))
	url := []string{node.httpURL("/chat/publish")}
	publishBatches(t, url, webhookTestKey, 50)
	waitPublishEvents(t, b, 50, 10*time.Second)
	node.reload(t, webhookRoutes(rs.URL(), "wh4:", b.srv.URL, "events publish\n\t\t\tbatch 11"))
	time.Sleep(time.Second)
	base := node.goroutines(t)
	for i := range 5 {
		node.reload(t, webhookRoutes(rs.URL(), "wh4:", b.srv.URL, fmt.Sprintf("events publish\n\t\t\tbatch %d", 20+i)))
		publishBatches(t, url, webhookTestKey, 50)
	}
	node.reload(t, webhookRoutes(rs.URL(), "wh4:", b.srv.URL, "events publish\n\t\t\tbatch 11"))
	waitPublishEvents(t, b, 300, 15*time.Second)
	eventually(t, 10*time.Second, "goroutines back to their count", func() (bool, string) {
		g := node.goroutines(t)
		return g <= base+3, fmt.Sprintf("%d goroutines, %d after the first reload", g, base)
	})
	if _, dups := b.counts("publish"); dups != 0 {
		t.Errorf("%d duplicates across reloads", dups)
	}
}

// TestWebhookPresenceJoinLeaveOncePerCluster: alice subscribes to one
// channel from two connections on two nodes, bob from one; the backend
// gets one join per user, and one leave per user once its last connection
// is gone, whatever the node: the node whose presence call published the
// event records it. On the in-process broker the same, within one node.
func TestWebhookPresenceJoinLeaveOncePerCluster(t *testing.T) {
	t.Parallel()
	forEachBroker(t, func(t *testing.T, _ func() *Handler, rs *redistest.Server) {
		redisURL := ""
		if rs != nil {
			redisURL = rs.URL()
		}
		b := newWebhookBackend(t, "webhook-test-secret")
		routes := webhookRoutes(redisURL, uniquePrefix(), b.srv.URL, "events join leave")
		routes = strings.Replace(routes, "rate_limit off", "rate_limit off\n\t\tpresence on\n\t\tsubscribe room:*\n\t\tjwt {\n\t\t\tsecret "+testSecret+"\n\t\t}", 1)
		a := startCaddy(t, "A", routes)
		second := a
		if redisURL != "" {
			second = startCaddy(t, "B", routes)
		}
		alice1 := dialUser(t, "alice@A", a.wsURL("/ws"), "alice")
		alice2 := dialUser(t, "alice@B", second.wsURL("/ws"), "alice")
		bob := dialUser(t, "bob@B", second.wsURL("/ws"), "bob")
		for _, c := range []*wsClient{alice1, alice2, bob} {
			c.subscribe("room:p")
		}
		eventually(t, 20*time.Second, "a join per user", func() (bool, string) {
			d, dups := b.counts("join")
			return d == 2 && dups == 0, fmt.Sprintf("%d joins, %d duplicates", d, dups)
		})
		alice1.closeNormal()
		time.Sleep(time.Second) // alice still has a connection: no leave
		if d, _ := b.counts("leave"); d != 0 {
			t.Fatalf("%d leave events while alice and bob are still on the channel", d)
		}
		alice2.closeNormal()
		bob.closeNormal()
		eventually(t, 20*time.Second, "a leave per user", func() (bool, string) {
			d, dups := b.counts("leave")
			return d == 2 && dups == 0, fmt.Sprintf("%d leaves, %d duplicates", d, dups)
		})
		b.mu.Lock()
		defer b.mu.Unlock()
		users := map[string]int{}
		for _, e := range b.events {
			if e.Channel != "room:p" || e.Route != "/ws" {
				t.Errorf("event %+v: want channel room:p on route /ws", e)
			}
			users[e.Type+" "+e.User]++
		}
		if fmt.Sprint(users) != "map[join alice:1 join bob:1 leave alice:1 leave bob:1]" {
			t.Errorf("events by user: %v", users)
		}
		if b.badSig != 0 {
			t.Errorf("%d requests with a wrong signature", b.badSig)
		}
	})
}
