package caddychat

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/caddyserver/caddy/v2"
)

func seq(from, to int) []any {
	var out []any
	for i := from; i <= to; i++ {
		out = append(out, float64(i))
	}
	return out
}

func equalData(a, b []any) bool {
	return fmt.Sprint(a) == fmt.Sprint(b)
}

func TestHistoryResumeReplaysExactlyWhatWasMissed(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Channels: "room:*", Count: 100}}
		n := startNode(t, h)
		pub := dial(t, n.url("/"), nil)
		sub := dial(t, n.url("/"), nil)
		sub.subscribe("room:a", 1)
		for i := 1; i <= 3; i++ {
			pub.publishOK("room:a", i, float64(i))
		}
		_, ids := sub.messages("room:a", 3)
		last := ids[2]
		if _, ok := parseStreamID(last); !ok {
			t.Fatalf("message id %q is not a history id", last)
		}
		// The epoch travels in every kept message.
		sub.send(map[string]any{"op": "unsubscribe", "channel": "room:a", "id": 9})
		sub.reply(9)

		for i := 4; i <= 10; i++ {
			pub.publishOK("room:a", i, float64(i))
		}
		sub2 := dial(t, n.url("/"), nil)
		epoch := historyEpoch(t, sub2, "room:a")
		r := sub2.request(map[string]any{"op": "subscribe", "channel": "room:a", "since": last, "epoch": epoch, "id": 2})
		if r["type"] != "ok" || r["recovered"] != true || r["replayed"] != float64(7) || r["epoch"] != epoch {
			t.Fatalf("resume reply %v", r)
		}
		data, _ := sub2.messages("room:a", 7)
		if !equalData(data, seq(4, 10)) {
			t.Fatalf("replayed %v, want 4..10", data)
		}
		pub.publishOK("room:a", 11, 11)
		if data, _ := sub2.messages("room:a", 1); !equalData(data, seq(11, 11)) {
			t.Fatalf("live after resume: %v", data)
		}
		sub2.expectQuiet(100 * time.Millisecond)

		// Resuming from the newest id replays nothing and is complete.
		r = sub.request(map[string]any{"op": "subscribe", "channel": "room:a", "since": lastID(t, sub2, "room:a"), "id": 3})
		if r["recovered"] != true || r["replayed"] != float64(0) {
			t.Fatalf("resume from the newest id: %v", r)
		}
	})
}

// historyEpoch reads the channel's epoch with a one-message history query.
func historyEpoch(t *testing.T, c *testClient, channel string) string {
	t.Helper()
	r := c.request(map[string]any{"op": "history", "channel": channel, "limit": 1, "id": "epoch"})
	if r["type"] != "history" {
		t.Fatalf("history: %v", r)
	}
	return r["epoch"].(string)
}

func lastID(t *testing.T, c *testClient, channel string) string {
	t.Helper()
	r := c.request(map[string]any{"op": "history", "channel": channel, "limit": 1, "id": "last"})
	msgs := r["messages"].([]any)
	if len(msgs) != 1 {
		t.Fatalf("history: %v", r)
	}
	return msgs[0].(map[string]any)["id"].(string)
}

func TestHistoryResumeBeyondTheWindowIsNotRecovered(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Count: 5}}
		n := startNode(t, h)
		c := dial(t, n.url("/"), nil)
		first := c.publishOK("ch", 1, 1)
		for i := 2; i <= 9; i++ {
			c.publishOK("ch", i, float64(i))
		}
		r := c.request(map[string]any{"op": "subscribe", "channel": "ch", "since": first, "id": 2})
		if r["type"] != "ok" || r["recovered"] != false {
			t.Fatalf("since older than the window: %v", r)
		}
		// What is kept is still replayed, newest five.
		if data, _ := c.messages("ch", 5); !equalData(data, seq(5, 9)) {
			t.Fatalf("replayed %v", data)
		}
		// Another epoch: the history since points into was lost, so the
		// whole current one is newer than it and replayed, unrecovered.
		c.request(map[string]any{"op": "unsubscribe", "channel": "ch", "id": "u"})
		r = c.request(map[string]any{"op": "subscribe", "channel": "ch", "since": first, "epoch": "not-this-one", "id": 3})
		if r["recovered"] != false || r["replayed"] != float64(5) {
			t.Fatalf("other epoch: %v", r)
		}
		if data, _ := c.messages("ch", 5); !equalData(data, seq(5, 9)) {
			t.Fatalf("replayed after an epoch change %v", data)
		}
		c.expectQuiet(100 * time.Millisecond)
	})
}

func TestHistoryResumeLimitedByMaxReplay(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Count: 100}}
		h.MaxReplay = 4
		n := startNode(t, h)
		c := dial(t, n.url("/"), nil)
		first := c.publishOK("ch", 1, 1)
		for i := 2; i <= 10; i++ {
			c.publishOK("ch", i, float64(i))
		}
		r := c.request(map[string]any{"op": "subscribe", "channel": "ch", "since": first, "id": 2})
		if r["recovered"] != false || r["limited"] != true || r["replayed"] != float64(4) {
			t.Fatalf("limited resume: %v", r)
		}
		if data, _ := c.messages("ch", 4); !equalData(data, seq(7, 10)) {
			t.Fatalf("replayed %v, want the newest four", data)
		}
	})
}

func TestHistorySubscribeStartsWithTheLastN(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Count: 100}}
		n := startNode(t, h)
		c := dial(t, n.url("/"), nil)
		for i := 1; i <= 8; i++ {
			c.publishOK("ch", i, float64(i))
		}
		r := c.request(map[string]any{"op": "subscribe", "channel": "ch", "history": 3, "id": "s"})
		if r["type"] != "ok" || r["replayed"] != float64(3) || r["recovered"] != nil {
			t.Fatalf("subscribe with history: %v", r)
		}
		if data, _ := c.messages("ch", 3); !equalData(data, seq(6, 8)) {
			t.Fatalf("got %v", data)
		}
	})
}

func TestHistoryPagesBackwardsBoundedByCount(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Channels: "room:*", Count: 25}}
		n := startNode(t, h)
		c := dial(t, n.url("/"), nil)
		for i := 1; i <= 40; i++ {
			c.publishOK("room:x", i, float64(i))
		}
		var got []any
		before := ""
		for page := 0; page < 10; page++ {
			q := map[string]any{"op": "history", "channel": "room:x", "limit": 10, "id": page}
			if before != "" {
				q["before"] = before
			}
			r := c.request(q)
			if r["type"] != "history" {
				t.Fatalf("history: %v", r)
			}
			msgs := r["messages"].([]any)
			var data []any
			for _, m := range msgs {
				data = append(data, m.(map[string]any)["data"])
			}
			got = append(data, got...)
			if r["more"] != true {
				break
			}
			before = msgs[0].(map[string]any)["id"].(string)
		}
		// Only the last 25 are kept: 16..40, in order.
		if !equalData(got, seq(16, 40)) {
			t.Fatalf("paged %v, want 16..40", got)
		}

		for _, tc := range []struct {
			q    map[string]any
			code string
		}{
			{map[string]any{"op": "history", "channel": "other", "id": 1}, errBadRequest},
			{map[string]any{"op": "history", "channel": "room:x", "limit": 5000, "id": 2}, errBadRequest},
			{map[string]any{"op": "history", "channel": "room:x", "before": "yesterday", "id": 3}, errBadRequest},
			{map[string]any{"op": "subscribe", "channel": "room:x", "since": "x-1", "id": 4}, errBadRequest},
		} {
			if r := c.request(tc.q); r["type"] != "error" || r["code"] != tc.code {
				t.Errorf("%v: %v, want %s", tc.q, r, tc.code)
			}
		}
	})
}

func TestHistoryBoundedByAge(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Count: 100, MaxAge: caddy.Duration(time.Second)}}
		n := startNode(t, h)
		c := dial(t, n.url("/"), nil)
		old := c.publishOK("ch", "old", 1)
		time.Sleep(1200 * time.Millisecond)
		c.publishOK("ch", "new", 2)
		r := c.request(map[string]any{"op": "history", "channel": "ch", "id": 3})
		if msgs := r["messages"].([]any); len(msgs) != 1 || msgs[0].(map[string]any)["data"] != "new" || r["more"] != false {
			t.Fatalf("history past max age: %v", r)
		}
		r = c.request(map[string]any{"op": "subscribe", "channel": "ch", "since": old, "id": 4})
		if r["recovered"] != false {
			t.Fatalf("resume from an id older than max age: %v", r)
		}
	})
}

func TestHistoryNotKeptOnOtherChannels(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, rs *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Channels: "room:*", Count: 10}}
		n := startNode(t, h)
		c := dial(t, n.url("/"), nil)
		id := c.publishOK("lobby", 1, 1)
		if _, ok := parseStreamID(id); ok {
			t.Fatalf("a channel without history got history id %q", id)
		}
		r := c.request(map[string]any{"op": "subscribe", "channel": "lobby", "since": "1-0", "id": 2})
		if r["type"] != "ok" || r["recovered"] != false {
			t.Fatalf("resume on a channel without history: %v", r)
		}
		if rs != nil {
			if n := rs.Client().Exists(context.Background(), historyStreamKey(*h.ChannelPrefix+"lobby")).Val(); n != 0 {
				t.Fatalf("a stream exists for a channel without history")
			}
		}
	})
}

// TestHistoryResumeUnderConcurrentPublishes resumes while a publisher keeps
// going: the resumed client must see every message exactly once, in order.
func TestHistoryResumeUnderConcurrentPublishes(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		h := newHandler()
		h.History = []HistoryRule{{Count: 10000}}
		h.RateLimit = &RateLimit{PerSecond: -1}
		n := startNode(t, h)
		// With Redis, resume on a second hub (another node's view: its live
		// stream and its history reads race each other).
		sn := n
		if h.Redis != "" {
			s := newHandler()
			s.Redis = strings.Replace(h.Redis, "127.0.0.1", "localhost", 1)
			s.ChannelPrefix, s.History, s.RateLimit = h.ChannelPrefix, h.History, h.RateLimit
			sn = startNode(t, s)
		}
		pub := dial(t, n.url("/"), nil)
		first := pub.publishOK("ch", 0, 0)

		var wg sync.WaitGroup
		const total = 400
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 1; i <= total; i++ {
				pub.send(map[string]any{"op": "publish", "channel": "ch", "data": i})
				if i%20 == 0 {
					time.Sleep(time.Millisecond)
				}
			}
		}()
		for round := range 5 {
			c := dial(t, sn.url("/"), nil)
			time.Sleep(time.Duration(round) * 3 * time.Millisecond)
			r := c.request(map[string]any{"op": "subscribe", "channel": "ch", "since": first, "id": "r"})
			if r["recovered"] != true {
				t.Fatalf("round %d: %v", round, r)
			}
			want := 1
			for want <= total {
				m := c.nextAny()
				if m["type"] != "message" {
					continue
				}
				if m["data"] != float64(want) {
					t.Fatalf("round %d: got %v, want %d", round, m["data"], want)
				}
				want++
			}
			c.expectQuiet(50 * time.Millisecond)
		}
		wg.Wait()
	})
}

func TestRawPublishesAreKeptAsText(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, _ *redistest.Server) {
		prefix := uniquePrefix()
		raw := newHandler()
		raw.ChannelPrefix = &prefix
		raw.Protocol, raw.Channel = protocolRaw, "room:raw"
		raw.History = []HistoryRule{{Count: 10}}
		rn := startNode(t, raw)
		js := newHandler()
		js.ChannelPrefix = &prefix
		js.History = []HistoryRule{{Count: 10}}
		jn := startNode(t, js)

		c := dial(t, jn.url("/"), nil)
		c.subscribe("room:raw", 1)
		r := dial(t, rn.url("/"), nil)
		r.sendText("hello <b>there</b>")
		if data, _ := c.messages("room:raw", 1); data[0] != "hello <b>there</b>" {
			t.Fatalf("live: %v", data)
		}
		if m := r.nextAny(); m["text"] != "hello <b>there</b>" {
			t.Fatalf("raw echo: %v", m)
		}
		h := c.request(map[string]any{"op": "history", "channel": "room:raw", "id": 2})
		if msgs := h["messages"].([]any); len(msgs) != 1 || msgs[0].(map[string]any)["data"] != "hello <b>there</b>" {
			t.Fatalf("history: %v", h)
		}
	})
}
