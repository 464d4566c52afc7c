package caddychat

import (
	"testing"

	"github.com/caddychat/caddychat/internal/redistest"
)

// TestPublishesPipelinedInOrder: a publisher that sends 300 publishes
// without waiting gets 300 ok replies, and the subscriber the 300 messages
// in the order sent, with the ids the replies named.
func TestPublishesPipelinedInOrder(t *testing.T) {
	rs := redistest.Start(t)
	n := startNode(t, &Handler{Redis: rs.URL(), ChannelPrefix: ptr(uniquePrefix()), RateLimit: &RateLimit{PerSecond: -1}})
	const channel, msgs = "room:pipe", 300
	sub := dial(t, n.url("/ws"), nil)
	sub.next("welcome")
	sub.subscribe(channel, 1)
	pub := dial(t, n.url("/ws"), nil)
	pub.next("welcome")
	for i := range msgs {
		pub.send(map[string]any{"op": "publish", "channel": channel, "data": i, "id": i + 1})
	}
	ids := make(map[float64]string, msgs)
	for len(ids) < msgs {
		m := pub.nextMatching("a publish reply", func(m map[string]any) bool { return m["type"] == "ok" || m["type"] == "error" })
		if m["type"] != "ok" {
			t.Fatalf("publish answered %v", m)
		}
		ids[m["id"].(float64)] = m["message_id"].(string)
	}
	data, got := sub.messages(channel, msgs)
	for i := range msgs {
		if data[i] != float64(i) || got[i] != ids[float64(i+1)] {
			t.Fatalf("message %d: data %v id %s, want data %d id %s (the reply's)", i, data[i], got[i], i, ids[float64(i+1)])
		}
	}
}

// TestPublishDoesNotHoldTheNextFrame: while Redis holds a publish (paused
// for writes), the connection's next frame is handled and answered first;
// the publish is answered and delivered once Redis resumes.
func TestPublishDoesNotHoldTheNextFrame(t *testing.T) {
	rs := redistest.Start(t)
	n := startNode(t, &Handler{Redis: rs.URL(), ChannelPrefix: ptr(uniquePrefix())})
	const channel = "room:held"
	c := dial(t, n.url("/ws"), nil)
	c.next("welcome")
	c.subscribe(channel, 1)
	ctx, cancel := redisCtx()
	defer cancel()
	if err := rs.Client().Do(ctx, "CLIENT", "PAUSE", "1000", "WRITE").Err(); err != nil {
		t.Fatalf("CLIENT PAUSE: %v", err)
	}
	c.send(map[string]any{"op": "publish", "channel": channel, "data": "held", "id": 2})
	c.send(map[string]any{"op": "unsubscribe", "channel": "room:other", "id": 3})
	first := c.nextMatching("a reply", func(m map[string]any) bool { return m["type"] == "ok" || m["type"] == "error" })
	if first["id"] != float64(3) {
		t.Fatalf("first reply %v: the publish held the next frame (want the unsubscribe's ok, id 3, first)", first)
	}
	// Then its ok and its delivery, in either order.
	acked, delivered := false, false
	for !acked || !delivered {
		m := c.nextAny()
		switch {
		case m["type"] == "ok" && m["id"] == float64(2):
			acked = true
		case m["type"] == "message" && m["data"] == "held":
			delivered = true
		default:
			t.Fatalf("want the held publish's ok and delivery, got %v", m)
		}
	}
}
