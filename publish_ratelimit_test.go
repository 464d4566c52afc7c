package caddychat

import (
	"fmt"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestPublishEndpointRateLimitPerUser: a route's rate_limit bounds the HTTP
// publishes of each token holder (every message of a batch counts); over it
// the request gets 429 with Retry-After and publishes nothing. The publish
// key is not limited, and users do not share a bucket.
func TestPublishEndpointRateLimitPerUser(t *testing.T) {
	n := startNode(t, &Handler{
		PublishEndpoint: testPublishPath,
		PublishKey:      testPublishKey,
		JWT:             &JWTConfig{Secret: testSecret},
		ChannelPrefix:   ptr(uniquePrefix()),
		// One message every 20 s, bursts of 3: the test runs well inside
		// one refill, however loaded the machine.
		RateLimit: &RateLimit{PerSecond: 0.05, Burst: 3},
	})
	sub := dialWithToken(t, n, newToken(t, "watcher").ttl(time.Minute).with(jwt.MapClaims{"chat": map[string]any{"subscribe": []string{"**"}}}).sign())
	sub.subscribe("room:a", 1)
	rights := map[string]any{"publish": []string{"room:*"}}
	limited := testutil.ToFloat64(moduleMetrics().httpPublishes.WithLabelValues(errRateLimited))

	alice := bearerHeader(newToken(t, "alice").ttl(time.Minute).with(jwt.MapClaims{"chat": rights}).sign())
	for i := range 3 {
		wantPublished(t, post(t, n, alice, fmt.Sprintf(`{"channel":"room:a","data":%d}`, i)), "room:a")
		sub.next("message")
	}
	r := post(t, n, alice, `{"channel":"room:a","data":"over"}`)
	wantError(t, "alice's 4th publish", r, http.StatusTooManyRequests, errRateLimited)
	if s, err := strconv.Atoi(r.header.Get("Retry-After")); err != nil || s < 1 || s > 20 {
		t.Errorf("Retry-After = %q, want 1 to 20 seconds", r.header.Get("Retry-After"))
	}
	// A new token of the same user shares the bucket.
	wantError(t, "alice with another token", post(t, n, bearerHeader(newToken(t, "alice").ttl(time.Minute).with(jwt.MapClaims{"chat": rights}).sign()), `{"channel":"room:a","data":"over"}`), http.StatusTooManyRequests, errRateLimited)

	// The publish key is not limited.
	for i := range 10 {
		wantPublished(t, post(t, n, bearerHeader(testPublishKey), fmt.Sprintf(`{"channel":"room:b","data":%d}`, i)), "room:b")
	}

	// Each message of a batch counts: bob's batch of 2 leaves him 1.
	bob := bearerHeader(newToken(t, "bob").ttl(time.Minute).with(jwt.MapClaims{"chat": rights}).sign())
	r = post(t, n, bob, `{"messages":[{"channel":"room:a","data":"b1"},{"channel":"room:a","data":"b2"}]}`)
	if r.status != http.StatusOK || len(r.body["results"].([]any)) != 2 {
		t.Fatalf("bob's batch: %s", r)
	}
	sub.next("message")
	sub.next("message")
	r = post(t, n, bob, `{"messages":[{"channel":"room:a","data":"b3"},{"channel":"room:a","data":"b4"}]}`)
	wantError(t, "bob's second batch, one token left", r, http.StatusTooManyRequests, errRateLimited)
	wantPublished(t, post(t, n, bob, `{"channel":"room:a","data":"b3"}`), "room:a")
	sub.next("message")
	wantError(t, "bob's 4th message", post(t, n, bob, `{"channel":"room:a","data":"b5"}`), http.StatusTooManyRequests, errRateLimited)

	// A batch larger than the burst can never pass, and says so.
	r = post(t, n, bearerHeader(newToken(t, "carol").ttl(time.Minute).with(jwt.MapClaims{"chat": rights}).sign()), `{"messages":[{"channel":"room:a","data":1},{"channel":"room:a","data":2},{"channel":"room:a","data":3},{"channel":"room:a","data":4}]}`)
	wantError(t, "a batch over the burst", r, http.StatusTooManyRequests, errRateLimited)
	if msg := r.body["error"].(map[string]any)["message"].(string); !strings.Contains(msg, "burst") {
		t.Errorf("message %q does not name the burst", msg)
	}

	// Nothing refused was published.
	expectNoMessageBefore(t, n, sub, "room:a")
	if got := testutil.ToFloat64(moduleMetrics().httpPublishes.WithLabelValues(errRateLimited)); got < limited+1+1+2+1+4 {
		t.Errorf("http_publishes_total{result=rate_limited} grew by %v, want 9", got-limited)
	}
}

// TestPublishEndpointRateLimitOff: rate_limit off leaves token holders unlimited.
func TestPublishEndpointRateLimitOff(t *testing.T) {
	n := startNode(t, &Handler{
		PublishEndpoint: testPublishPath,
		JWT:             &JWTConfig{Secret: testSecret},
		ChannelPrefix:   ptr(uniquePrefix()),
		RateLimit:       &RateLimit{PerSecond: -1},
	})
	alice := bearerHeader(newToken(t, "alice").ttl(time.Minute).with(jwt.MapClaims{"chat": map[string]any{"publish": []string{"room:*"}}}).sign())
	for i := range 20 {
		wantPublished(t, post(t, n, alice, fmt.Sprintf(`{"channel":"room:a","data":%d}`, i)), "room:a")
	}
}

// TestPublishRateLimiterBounded: users whose bucket refilled are evicted as
// requests come, and the limiter never holds more than its bound.
func TestPublishRateLimiterBounded(t *testing.T) {
	l := newUserRateLimiter(&RateLimit{PerSecond: 10, Burst: 5}, 100)
	now := time.Now()
	for i := range 50 {
		if ok, _ := l.take(fmt.Sprint("idle", i), 1, now); !ok {
			t.Fatal("a first request was refused")
		}
	}
	if got := l.len(); got != 50 {
		t.Fatalf("%d users kept, want 50", got)
	}
	// 0.5 s refills a bucket: the idle users go as requests come.
	later := now.Add(time.Second)
	for i := range 30 {
		l.take("active", 1, later.Add(time.Duration(i)*100*time.Millisecond))
	}
	if got := l.len(); got != 1 {
		t.Fatalf("%d users kept after the others idled, want 1", got)
	}
	// Many users at once: never more than the bound, and the recent ones
	// keep their state.
	for i := range 1000 {
		l.take(fmt.Sprint("burst", i), 5, later)
	}
	if got := l.len(); got != 100 {
		t.Fatalf("%d users kept, want the bound 100", got)
	}
	if ok, wait := l.take("burst999", 1, later); ok || wait <= 0 {
		t.Fatalf("the most recent user's empty bucket was forgotten: ok=%v wait=%v", ok, wait)
	}
}

// TestPublishRateLimiterMemoryBound measures the bound stated at
// maxRateLimitedUsers: a full limiter of users with the longest ids.
func TestPublishRateLimiterMemoryBound(t *testing.T) {
	users := make([]string, maxRateLimitedUsers)
	for i := range users {
		users[i] = fmt.Sprintf("%0256d", i)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	l := newUserRateLimiter(&RateLimit{PerSecond: 1, Burst: 1}, maxRateLimitedUsers)
	now := time.Now()
	for _, u := range users {
		l.take(u, 1, now)
	}
	l.take("one more", 1, now) // evicts one: the bound holds
	runtime.GC()
	runtime.ReadMemStats(&after)
	total := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d users: %d bytes, %d per user", l.len(), total, total/int64(l.len()))
	if l.len() != maxRateLimitedUsers {
		t.Fatalf("%d users kept, want %d", l.len(), maxRateLimitedUsers)
	}
	if total > 5_000_000 {
		t.Errorf("a full limiter takes %d bytes, over the 5 MB stated", total)
	}
	runtime.KeepAlive(l)
	runtime.KeepAlive(users)
}
