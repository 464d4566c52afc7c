package caddychat

import (
	"fmt"
	"testing"

	"github.com/caddychat/caddychat/internal/redistest"
)

// forgedKept is a kept message's envelope with the largest id there is: a
// node that read ids from what publishers send would drop every later
// message of the channel as a duplicate, on every node.
const forgedKept = `{"type":"message","channel":"room:lobby","id":"9999999999999999999-0","epoch":"x","from":"","ts":1,"data":1}`

// TestForgedIDCannotSilenceAChannel (issue 14, finding 2): an anonymous raw
// client, and a backend's plain PUBLISH, send text shaped like a kept
// message with a huge id; the channel's later messages still reach every
// subscriber, and the forged text arrives as data.
func TestForgedIDCannotSilenceAChannel(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, rs *redistest.Server) {
		jn, rn := lobbyNodes(t, newHandler, func(js *Handler) {
			js.History = []HistoryRule{{Channels: "room:**", Count: 100}}
		})

		prefix := *jn.h.ChannelPrefix
		sub := dial(t, jn.url("/"), nil)
		sub.subscribe("room:lobby", 1)
		pub := dial(t, jn.url("/"), nil)
		attacker := dial(t, rn.url("/"), nil)
		waitFor(t, func() bool { return jn.h.hub.members("room:lobby") == 2 })

		forgeries := []string{forgedKept, `{"type":"message","channel":"room:lobby","id":"9999999999999999999-0","epoch":"x"}`}
		var arrived []map[string]any
		for _, forged := range forgeries {
			attacker.sendText(forged)
			arrived = append(arrived, sub.next("message"))
		}
		if rs != nil {
			const redisPayload = `{"type":"message","channel":"room:lobby","id":"9999999999999999999-1","epoch":"x","from":"","ts":1,"data":2}`
			if n := rs.Client().Publish(t.Context(), prefix+"room:lobby", redisPayload).Val(); n != 1 {
				t.Fatalf("PUBLISH reached %d subscribers", n)
			}
			if m := sub.nextAny(); m["server"] != true || m["id"] == "9999999999999999999-1" {
				t.Fatalf("a backend's envelope-shaped payload arrived as %v", m)
			}
		}
		for i := range 3 {
			pub.publishOK("room:lobby", i, float64(i+10))
		}
		if data, _ := sub.messages("room:lobby", 3); fmt.Sprint(data) != "[0 1 2]" {
			t.Fatalf("after the forgeries the subscriber got %v, want [0 1 2]", data)
		}
		for i, m := range arrived {
			if m["data"] != forgeries[i] || m["anonymous"] != true {
				t.Fatalf("a forged frame arrived as %v, want its text as data, from an anonymous client", m)
			}
		}
	})
}

// TestSenderIsAlwaysKnown (issue 14, finding 3): what a client publishes
// names its sender, or says it was anonymous; only a backend's message
// says server, whatever a client puts in its frame.
func TestSenderIsAlwaysKnown(t *testing.T) {
	forEachBroker(t, func(t *testing.T, newHandler func() *Handler, rs *redistest.Server) {
		jn, rn := lobbyNodes(t, newHandler, func(js *Handler) {
			js.PublishEndpoint, js.PublishKey = testPublishPath, testPublishKey
		})
		prefix := *jn.h.ChannelPrefix

		sub := dial(t, jn.url("/"), nil)
		sub.subscribe("room:lobby", 1)
		pub := dial(t, jn.url("/"), nil)
		rawClient := dial(t, rn.url("/"), nil)
		waitFor(t, func() bool { return jn.h.hub.members("room:lobby") == 2 })

		anonymousSaid := func(how string) {
			t.Helper()
			m := sub.next("message")
			if m["from"] != "" || m["anonymous"] != true || m["server"] != nil {
				t.Fatalf("%s arrived as %v, want from \"\" and anonymous:true", how, m)
			}
		}
		rawClient.sendText(`{"server":true}`)
		anonymousSaid("a raw client's text")
		pub.publishOK("room:lobby", map[string]any{"server": true}, 2)
		anonymousSaid("an anonymous JSON client's publish")

		wantPublished(t, post(t, jn, bearerHeader(testPublishKey), `{"channel":"room:lobby","data":1}`), "room:lobby")
		if m := sub.next("message"); m["server"] != true || m["anonymous"] != nil {
			t.Fatalf("a publish-key message arrived as %v, want server:true", m)
		}
		if rs != nil {
			rs.Client().Publish(t.Context(), prefix+"room:lobby", `{"from":"alice"}`)
			if m := sub.next("message"); m["server"] != true || m["from"] != "" {
				t.Fatalf("a plain PUBLISH arrived as %v, want server:true", m)
			}
		}
	})
}

// lobbyNodes starts a JSON node, set up further by configure, and a raw node
// bridging room:lobby; they share one hub.
func lobbyNodes(t *testing.T, newHandler func() *Handler, configure func(js *Handler)) (jn, rn *testNode) {
	t.Helper()
	prefix := uniquePrefix()
	js := newHandler()
	js.ChannelPrefix = &prefix
	configure(js)
	raw := newHandler()
	raw.ChannelPrefix = &prefix
	raw.Protocol, raw.Channel = protocolRaw, "room:lobby"
	return startNode(t, js), startNode(t, raw)
}
