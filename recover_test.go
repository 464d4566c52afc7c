package caddychat

import (
	"fmt"
	"strings"
	"testing"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap/zapcore"

	"github.com/caddychat/caddychat/internal/redistest"
)

// TestPanicInOpClosesOnlyThatConnection: a panic while handling one
// connection's op closes that connection with 1011, is logged at error
// level with its stack and counted; the node and its other connections go
// on. Without the recovery the panic ends the test binary.
func TestPanicInOpClosesOnlyThatConnection(t *testing.T) {
	hook := func(op, channel string) {
		if op == "publish" && channel == "boom:now" {
			panic("test panic in an op")
		}
	}
	testHookOp.Store(&hook)
	t.Cleanup(func() { testHookOp.Store(nil) }) // after the node's cleanup
	n := startNode(t, &Handler{ChannelPrefix: ptr(uniquePrefix())}, observeLogs())
	logs := n.logs
	panics := moduleMetrics().panics
	before := testutil.ToFloat64(panics)

	bystander := dial(t, n.url("/ws"), nil)
	bystander.next("welcome")
	bystander.subscribe("room:calm", 1)
	victim := dial(t, n.url("/ws"), nil)
	victim.next("welcome")
	victim.subscribe("room:calm", 1)

	victim.send(map[string]any{"op": "publish", "channel": "boom:now", "data": 1, "id": 2})
	if code := victim.closeCode(); code != websocket.StatusInternalError {
		t.Fatalf("the panicking connection closed with %v, want 1011", code)
	}
	if got := testutil.ToFloat64(panics); got < before+1 {
		t.Errorf("caddy_chat_panics_total went from %v to %v, want +1", before, got)
	}
	var logged bool
	for _, e := range logs.All() {
		if e.Level == zapcore.ErrorLevel && strings.Contains(e.Message, "panic") {
			f := e.ContextMap()
			stack, _ := f["stack"].(string)
			if fmt.Sprint(f["panic"]) == "test panic in an op" && strings.Contains(stack, "runTestHookOp") {
				logged = true
			}
		}
	}
	if !logged {
		t.Errorf("no error-level log of the panic with its stack; logs: %v", logs.All())
	}

	// The others go on: the bystander gets what is published, a new
	// connection is accepted and served.
	pub := dial(t, n.url("/ws"), nil)
	pub.next("welcome")
	pub.publishOK("room:calm", "still here", 3)
	if m := bystander.next("message"); m["data"] != "still here" {
		t.Fatalf("bystander got %v", m)
	}
	late := dial(t, n.url("/ws"), nil)
	late.next("welcome")
	late.subscribe("room:calm", 1)
	pub.publishOK("room:calm", "again", 4)
	if m := late.next("message"); m["data"] != "again" {
		t.Fatalf("new connection got %v", m)
	}
}

// TestPanicInDeliveryDropsOnlyThatMessage: a panic while the Redis broker's
// delivering goroutine hands a message to the hub drops that message; the
// node delivers the next ones. Without the recovery the panic ends the
// test binary.
func TestPanicInDeliveryDropsOnlyThatMessage(t *testing.T) {
	rs := redistest.Start(t)
	hook := func(channel string) {
		if channel == "boom:x" {
			panic("test panic in a delivery")
		}
	}
	testHookDeliver.Store(&hook)
	t.Cleanup(func() { testHookDeliver.Store(nil) })
	n := startNode(t, &Handler{Redis: rs.URL(), ChannelPrefix: ptr(uniquePrefix())})
	panics := moduleMetrics().panics
	before := testutil.ToFloat64(panics)

	c := dial(t, n.url("/ws"), nil)
	c.next("welcome")
	c.subscribe("boom:x", 1)
	c.subscribe("room:ok", 2)
	pub := dial(t, n.url("/ws"), nil)
	pub.next("welcome")
	pub.publishOK("boom:x", "lost", 3)
	pub.publishOK("room:ok", "after", 4)
	if m := c.next("message"); m["channel"] != "room:ok" || m["data"] != "after" {
		t.Fatalf("after the panicking delivery the client got %v, want room:ok's message", m)
	}
	if got := testutil.ToFloat64(panics); got < before+1 {
		t.Errorf("caddy_chat_panics_total went from %v to %v, want +1", before, got)
	}
	// The connection is still open and served.
	pub.publishOK("room:ok", "later", 5)
	if m := c.next("message"); m["data"] != "later" {
		t.Fatalf("got %v", m)
	}
}
