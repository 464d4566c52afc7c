package caddychat

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestSSEAttacks: what a forged or broken request gets, and that none of
// it harms the stream it names.
func TestSSEAttacks(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix()), MaxMessageSize: 1024, Origins: []string{"chat.example.com"}})
	s := openSSE(t, n.httpURL("/ws?channel=room:1"), nil)
	s.next("ok")
	route := n.httpURL("/ws")

	for name, body := range map[string]string{
		"not JSON":   "hello",
		"an array":   `[{"op":"publish"}]`,
		"truncated":  `{"op":"publish","channel":"room:1"`,
		"empty":      "",
		"bad UTF-8":  "{\"op\":\"publish\",\"channel\":\"room:1\",\"data\":\"\xff\xfe\"}",
		"two frames": `{"op":"presence","channel":"room:1"}{"op":"presence"}`,
	} {
		if status, resp := s.post(body); status != http.StatusBadRequest || !strings.Contains(resp, `"bad_request"`) {
			t.Errorf("%s: %d %s, want 400", name, status, resp)
		}
	}
	big := fmt.Sprintf(`{"op":"publish","channel":"room:1","data":%q}`, strings.Repeat("x", 2000))
	if status, _ := s.post(big); status != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized body: %d, want 413", status)
	}
	for name, session := range map[string]string{
		"unknown":          n.h.hub.node + ".0123456789abcdef0123456789abcdef",
		"no node":          "0123456789abcdef",
		"too long":         n.h.hub.node + "." + strings.Repeat("a", 500),
		"another node's":   "nosuchnode.0123456789abcdef0123456789abcdef",
		"the conn id":      s.session[:strings.IndexByte(s.session, '.')] + ".",
		"a prefix of ours": s.session[:len(s.session)-1],
	} {
		if status, body := postFrame(t, route, session, map[string]any{"op": "publish", "channel": "room:1", "data": 1}); status != http.StatusNotFound || !strings.Contains(body, `"not_found"`) {
			t.Errorf("%s session: %d %s, want 404", name, status, body)
		}
	}
	// A POST without the header is not an op at all.
	if status, _ := postFrame(t, route, "", map[string]any{"op": "publish"}); status == http.StatusAccepted {
		t.Errorf("POST without a session accepted")
	}
	// Nothing of that reached the stream: the next event is this reply.
	s.mustPost(map[string]any{"op": "publish", "channel": "room:1", "id": 1, "data": "fine"})
	for {
		ev := s.nextEvent(5 * time.Second)
		if ev.data["type"] == "ok" && ev.data["id"] == float64(1) {
			break
		}
		if ev.data["type"] != "message" || ev.data["data"] != "fine" {
			t.Fatalf("after the attacks the stream got %v", ev.raw)
		}
	}

	lastID := func(v string) int {
		_, status, _ := tryOpenSSE(t, n.httpURL("/ws?channel=room:1"), http.Header{"Last-Event-ID": {v}})
		return status
	}
	many := make([]string, 101)
	for i := range many {
		many[i] = fmt.Sprintf("room:%d=1-0~abc", i)
	}
	for name, v := range map[string]string{
		"garbage":        "hello",
		"no epoch":       "room:1=1-0",
		"bad id":         "room:1=abc~e",
		"bad channel":    "room 1=1-0~e",
		"glob channel":   "room:*=1-0~e",
		"empty epoch":    "room:1=1-0~",
		"bad epoch":      "room:1=1-0~e\"}",
		"long epoch":     "room:1=1-0~" + strings.Repeat("e", 65),
		"duplicate":      "room:1=1-0~e,room:1=2-0~e",
		"too many":       strings.Join(many, ","),
		"too long":       "room:1=1-0~" + strings.Repeat("e", 20000),
		"trailing comma": "room:1=1-0~e,",
	} {
		if status := lastID(v); status != http.StatusBadRequest {
			t.Errorf("Last-Event-ID %s: %d, want 400", name, status)
		}
	}
	for name, q := range map[string]string{
		"negative history":  "?channel=room:1&history=-1",
		"bad history":       "?channel=room:1&history=lots",
		"too many channels": "?" + strings.Repeat("channel=room:1&", 101),
	} {
		if _, status, _ := tryOpenSSE(t, n.httpURL("/ws"+q), nil); status != http.StatusBadRequest {
			t.Errorf("%s: %d, want 400", name, status)
		}
	}
	// A bad channel name is the subscribe's error, as on a WebSocket.
	bad := openSSE(t, n.httpURL("/ws?channel="+url.QueryEscape("room:*")), nil)
	if e := bad.next("error"); e["code"] != errBadRequest || e["channel"] != "room:*" {
		t.Fatalf("bad channel answer = %v", e)
	}
	// The origin rule is the upgrade's.
	if _, status, _ := tryOpenSSE(t, n.httpURL("/ws"), http.Header{"Origin": {"https://evil.example"}}); status != http.StatusForbidden {
		t.Errorf("foreign origin: %d, want 403", status)
	}
	openSSE(t, n.httpURL("/ws"), http.Header{"Origin": {"https://chat.example.com"}})

	// A raw route has no SSE transport.
	raw := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix()), Protocol: protocolRaw, Channel: "room:raw"})
	if _, status, _ := tryOpenSSE(t, raw.httpURL("/ws"), nil); status != http.StatusBadRequest {
		t.Errorf("raw route stream: %d, want 400", status)
	}
	if status, _ := postFrame(t, raw.httpURL("/ws"), s.session, map[string]any{"op": "publish"}); status != http.StatusBadRequest {
		t.Errorf("raw route POST: %d, want 400", status)
	}
	s.mustPost(map[string]any{"op": "presence", "channel": "room:1", "id": 2})
	s.reply(2)
}

// TestSSEPostFloodDoesNotDelayOthers: one stream's client POSTs as fast as
// it can from many goroutines; its inbox refuses the excess (429) and
// rate_limit closes it, while two other clients' round trips stay fast.
func TestSSEPostFloodDoesNotDelayOthers(t *testing.T) {
	n := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix()), RateLimit: &RateLimit{PerSecond: 50, Burst: 50}})
	flood := openSSE(t, n.httpURL("/ws?channel=room:flood"), nil)
	flood.next("ok")
	// The flooder's events are drained so that only its POSTs press.
	go func() {
		for range flood.events {
		}
	}()
	a := dial(t, n.url("/ws"), nil)
	b := openSSE(t, n.httpURL("/ws?channel=room:calm"), nil)
	b.next("ok")
	a.subscribe("room:calm", 1)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	statuses := map[int]int{}
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				status := tryPost(flood.url, flood.session, `{"op":"publish","channel":"room:flood","data":"spam"}`)
				mu.Lock()
				statuses[status]++
				mu.Unlock()
			}
		}()
	}
	var worst time.Duration
	for i := range 30 {
		start := time.Now()
		b.mustPost(map[string]any{"op": "publish", "channel": "room:calm", "id": i, "data": i})
		a.nextMatching("the stream's message", func(m map[string]any) bool { return m["type"] == "message" && m["data"] == float64(i) })
		a.send(map[string]any{"op": "publish", "channel": "room:calm", "id": 100 + i, "data": -i})
		b.nextMatching("the websocket's message", func(m map[string]any) bool { return m["type"] == "message" && m["data"] == float64(-i) })
		worst = max(worst, time.Since(start))
		time.Sleep(20 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if statuses[http.StatusTooManyRequests]+statuses[http.StatusNotFound] == 0 {
		t.Fatalf("the flood was never refused: %v", statuses)
	}
	if worst > time.Second {
		t.Fatalf("a round trip took %v during the flood (statuses %v)", worst, statuses)
	}
	t.Logf("flood statuses %v; worst round trip %v", statuses, worst)
}

// tryPost POSTs body for session; 0 when the request failed (the flood
// goroutines must not call t.Fatal).
func tryPost(url, session, body string) int {
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return 0
	}
	req.Header.Set(sessionHeader, session)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}
