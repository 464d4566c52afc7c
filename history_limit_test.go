package caddychat

import (
	"context"
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/caddyserver/caddy/v2"
)

// TestNewHistoryChannelLimit: an anonymous connection creates count history
// channels, then gets limit_exceeded for a new one, while its existing
// channels and channels without history keep working, and another
// connection has a budget of its own. With Redis, the refused channel has
// no keys.
func TestNewHistoryChannelLimit(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, rs *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Channels: "room:*", Count: 10}}
		h.HistoryNewChannels = &NewChannelLimit{Count: 3, Per: caddy.Duration(time.Hour)}
		n := startNode(t, h)
		a := dial(t, n.url("/"), nil)
		for i := 1; i <= 3; i++ {
			a.publishOK(fmt.Sprintf("room:%d", i), i, float64(i))
		}
		r := a.request(map[string]any{"op": "publish", "channel": "room:4", "data": 4, "id": 4})
		if r["type"] != "error" || r["code"] != errLimitExceeded || !strings.Contains(r["message"].(string), "room:4 has no history yet") {
			t.Fatalf("a fourth new history channel: %v", r)
		}
		t.Logf("refusal: %s", r["message"])
		for i := 1; i <= 3; i++ { // existing channels: no limit
			a.publishOK(fmt.Sprintf("room:%d", i), i, float64(10+i))
		}
		a.publishOK("lobby:new", 1, 20) // no history rule: no limit
		b := dial(t, n.url("/"), nil)
		b.publishOK("room:4", 4, 1)
		if r := a.request(map[string]any{"op": "history", "channel": "room:4", "id": 21}); len(r["messages"].([]any)) != 1 {
			t.Fatalf("room:4 after b created it: %v", r)
		}
		a.publishOK("room:4", 5, 22) // it exists now
		if rs != nil {
			ctx := context.Background()
			name := *h.ChannelPrefix + "room:5"
			a.request(map[string]any{"op": "publish", "channel": "room:5", "data": 5, "id": 23})
			if n := rs.Client().Exists(ctx, historyStreamKey(name), historyEpochKey(name)).Val(); n != 0 {
				t.Fatalf("a refused channel left %d keys in Redis", n)
			}
		}
		if got := n.h.newChannels.tracked(); got != 2 {
			t.Fatalf("tracking %d publishers, want the 2 connections", got)
		}
	})
}

// TestNewHistoryChannelLimitPerUser: an authenticated user's connections
// and HTTP publishes share one budget; over it the HTTP endpoint answers
// 429 limit_exceeded; the publish key is not limited; a raw connection over
// it is closed with 4003.
func TestNewHistoryChannelLimitPerUser(t *testing.T) {
	prefix := uniquePrefix()
	jwtCfg := func() *JWTConfig { return &JWTConfig{Secret: testSecret} }
	n := startNode(t, &Handler{
		ChannelPrefix:      &prefix,
		JWT:                jwtCfg(),
		Publish:            []string{"**"},
		Subscribe:          []string{"**"},
		History:            []HistoryRule{{Count: 10}},
		HistoryNewChannels: &NewChannelLimit{Count: 3, Per: caddy.Duration(time.Hour)},
		PublishEndpoint:    testPublishPath,
		PublishKey:         testPublishKey,
	})
	raw := startNode(t, &Handler{
		ChannelPrefix:      &prefix,
		JWT:                jwtCfg(),
		Publish:            []string{"**"},
		Subscribe:          []string{"**"},
		Protocol:           protocolRaw,
		Channel:            "raw:{http.request.uri.path.1}",
		History:            []HistoryRule{{Count: 10}},
		HistoryNewChannels: &NewChannelLimit{Count: 1, Per: caddy.Duration(time.Hour)},
	})
	alice := newToken(t, "alice").sign()
	c1 := dial(t, n.url("/"), bearer(alice))
	c2 := dial(t, n.url("/"), bearer(alice))
	c1.publishOK("a:1", 1, 1)
	c2.publishOK("a:2", 2, 2)
	if r := post(t, n, bearerHeader(alice), `{"channel":"a:3","data":3}`); r.status != http.StatusOK {
		t.Fatalf("alice's third new channel over HTTP: %s", r)
	}
	if r := c1.request(map[string]any{"op": "publish", "channel": "a:4", "data": 4, "id": 4}); r["code"] != errLimitExceeded {
		t.Fatalf("alice's fourth on a connection: %v", r)
	}
	r := post(t, n, bearerHeader(alice), `{"channel":"a:5","data":5}`)
	if r.status != http.StatusTooManyRequests || r.body["error"].(map[string]any)["code"] != errLimitExceeded {
		t.Fatalf("alice's fifth over HTTP: %s", r)
	}
	batch := post(t, n, bearerHeader(alice), `{"messages":[{"channel":"a:1","data":1},{"channel":"a:6","data":6}]}`)
	results := batch.body["results"].([]any)
	if batch.status != http.StatusOK || results[0].(map[string]any)["id"] == nil || results[1].(map[string]any)["error"].(map[string]any)["code"] != errLimitExceeded {
		t.Fatalf("batch: %s", batch)
	}
	if r := post(t, n, bearerHeader(testPublishKey), `{"channel":"key:1","data":1}`); r.status != http.StatusOK {
		t.Fatalf("the publish key: %s", r)
	}
	bob := newToken(t, "bob").sign()
	dial(t, n.url("/"), bearer(bob)).publishOK("b:1", 1, 1)

	// Raw: bob's budget on the raw route is 1 channel.
	r1 := dial(t, raw.url("/raw/one"), bearer(bob))
	r1.sendText("hello one")
	if m := r1.next("<raw>"); m["text"] != "hello one" {
		t.Fatalf("raw: %v", m)
	}
	r2 := dial(t, raw.url("/raw/two"), bearer(bob))
	r2.sendText("hello two")
	if code := r2.closeCode(); code != closeRateLimited {
		t.Fatalf("raw connection over the limit closed with %v, want %v", code, closeRateLimited)
	}
	r1.sendText("hello again") // its channel exists
	if m := r1.next("<raw>"); m["text"] != "hello again" {
		t.Fatalf("raw: %v", m)
	}
}

// TestCreationLimiterRefillsAndStaysBounded: the bucket refills evenly over
// the period; idle publishers are dropped; the number of tracked
// publishers is bounded, with the cost per entry measured.
func TestCreationLimiterRefillsAndStaysBounded(t *testing.T) {
	l := newCreationLimiter(&NewChannelLimit{Count: 2, Per: caddy.Duration(10 * time.Second)})
	now := time.Unix(1_800_000_000, 0)
	k := publisherKey{user: "u"}
	for i := range 2 {
		if !l.mayCreate(k, now) {
			t.Fatalf("creation %d refused", i)
		}
		l.charge(k, now)
	}
	if l.mayCreate(k, now) || l.mayCreate(k, now.Add(4*time.Second)) {
		t.Fatal("a third creation allowed before a fifth of the period passed")
	}
	if !l.mayCreate(k, now.Add(5*time.Second)) {
		t.Fatal("no creation allowed after half the period")
	}
	// Concurrent publishes allowed together leave a debt.
	l.charge(k, now.Add(5*time.Second))
	l.charge(k, now.Add(5*time.Second))
	if l.mayCreate(k, now.Add(14*time.Second)) || !l.mayCreate(k, now.Add(15*time.Second)) {
		t.Fatal("a debt was not repaid at the refill rate")
	}
	// Idle (full again) after a period: swept.
	if l.mayCreate(publisherKey{user: "v"}, now.Add(time.Hour)); l.tracked() != 0 {
		t.Fatalf("%d idle publishers still tracked", l.tracked())
	}

	// Fill to the bound with publishers that are all busy.
	l = newCreationLimiter(&NewChannelLimit{Count: 2, Per: caddy.Duration(10 * time.Second)})
	before := heapInUse()
	for i := range maxCreationBuckets {
		l.charge(publisherKey{user: fmt.Sprintf("user-%031d", i)}, now) // 36-byte ids
	}
	after := heapInUse()
	perEntry := (int64(after) - int64(before)) / maxCreationBuckets
	t.Logf("%d tracked publishers with 36-byte ids: %d bytes each (stated: at most %d)", maxCreationBuckets, perEntry, creationBucketBytes)
	if perEntry > creationBucketBytes {
		t.Fatalf("a tracked publisher costs %d bytes, more than stated", perEntry)
	}
	if l.mayCreate(publisherKey{user: "newcomer"}, now.Add(2*time.Second)) {
		t.Fatal("a new publisher was tracked beyond the bound")
	}
	if !l.mayCreate(publisherKey{user: "busy-user-0"}, now.Add(2*time.Second)) && l.tracked() > maxCreationBuckets {
		t.Fatal("over the bound")
	}
	// Once they are idle, the newcomer gets in and the map empties.
	if !l.mayCreate(publisherKey{user: "newcomer"}, now.Add(20*time.Second)) || l.tracked() != 0 {
		t.Fatalf("after the period: newcomer refused or %d still tracked", l.tracked())
	}
	runtime.KeepAlive(l)
}
