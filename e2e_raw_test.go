package caddychat

// End-to-end: the raw protocol across two nodes.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
)

// syncRaw waits until every raw client receives what is PUBLISHed on
// redisChannel (a raw connection has no reply that says its subscription is
// live): it publishes "sync-<k>" until each client has seen one. The clients
// then ignore "sync-" frames.
func syncRaw(t testing.TB, rs *redistest.Server, redisChannel string, clients ...*wsClient) {
	t.Helper()
	got := make([]bool, len(clients))
	deadline := time.Now().Add(10 * time.Second)
	for k := 0; ; k++ {
		redisPublish(t, rs, redisChannel, fmt.Sprintf("sync-%d", k))
		all := true
		for i, c := range clients {
			if got[i] {
				continue
			}
			c.skip = ""
			f, err := c.nextFrame(50 * time.Millisecond)
			switch {
			case err == nil && bytes.HasPrefix(f.data, []byte("sync-")):
				got[i] = true
			case err == nil:
				t.Fatalf("%s: unexpected frame %q before any sync frame", c.name, f.data)
			case !errors.Is(err, errTimeout):
				t.Fatal(err)
			}
			all = all && got[i]
		}
		if all {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("raw clients on %s did not receive a PUBLISH within 10s (got: %v)", redisChannel, got)
		}
	}
	for _, c := range clients {
		c.skip = "sync-"
	}
}

// TestRawModeTwoNodes: the seed article's plain client (send text, show
// event.data) on a raw route whose channel comes from the path, across nodes.
func TestRawModeTwoNodes(t *testing.T) {
	rs := redistest.Start(t)
	routes := fmt.Sprintf("\tchat /raw/* {\n\t\tprotocol raw\n\t\tchannel room:{http.request.uri.path.1}\n\t\tredis %s\n\t}", rs.URL())
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)

	a1 := dialRaw(t, "x1@A", a.wsURL("/raw/x"))
	b1 := dialRaw(t, "x1@B", b.wsURL("/raw/x"))
	other := dialRaw(t, "other@B", b.wsURL("/raw/other"))
	syncRaw(t, rs, "chat:room:x", a1, b1)
	syncRaw(t, rs, "chat:room:other", other)

	// Watch the Redis channel too.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ps := rs.Client().Subscribe(ctx, "chat:room:x")
	defer ps.Close()
	if _, err := ps.Receive(ctx); err != nil {
		t.Fatalf("subscribe to chat:room:x: %v", err)
	}

	a1.sendText("hello")
	b1.expectText("hello", 5*time.Second)
	a1.expectText("hello", 5*time.Second) // the sender gets its own message
	rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
	msg, err := ps.ReceiveMessage(rctx)
	rcancel()
	if err != nil {
		t.Fatalf("Redis subscriber: %v", err)
	}
	// On Redis a raw frame is the node's stamped envelope naming its sender;
	// raw clients still get the plain text.
	body, stampedOK := strings.CutPrefix(msg.Payload, "\x1ecc1\x1e")
	var env struct {
		Data      json.RawMessage `json:"data"`
		Anonymous bool            `json:"anonymous"`
	}
	if !stampedOK || json.Unmarshal([]byte(body), &env) != nil || string(env.Data) != `"hello"` || !env.Anonymous {
		t.Errorf("Redis saw payload %q on chat:room:x, want the stamped envelope of \"hello\" from an anonymous client", msg.Payload)
	}

	b1.sendText("hi from B")
	a1.expectText("hi from B", 5*time.Second)
	b1.expectText("hi from B", 5*time.Second)

	// /raw/other is another channel: its first frame after the sync must be
	// this marker, not "hello".
	redisPublish(t, rs, "chat:room:other", "marker")
	other.expectText("marker", 5*time.Second)

	// A backend's plain PUBLISH reaches raw clients unchanged.
	if n := redisPublish(t, rs, "chat:room:x", "hi"); n < 2 {
		t.Errorf("PUBLISH chat:room:x reached %d subscribers, want >= 2 (both nodes)", n)
	}
	a1.expectText("hi", 5*time.Second)
	b1.expectText("hi", 5*time.Second)
}
