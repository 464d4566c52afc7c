package caddychat

// End-to-end: config reloads leak no goroutine and no Redis connection.

import (
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/coder/websocket"
)

// TestReloadNoLeak: reloading the same config keeps clients connected and
// working and leaks neither goroutines nor Redis pub/sub connections; a
// reload that changes channel_prefix closes the old clients with 1012.
func TestReloadNoLeak(t *testing.T) {
	rs := redistest.Start(t)
	routes := chatRoutes(rs.URL())
	n := startCaddy(t, "node", routes)

	const clients = 20
	var cs []*wsClient
	for i := range clients {
		c := dialJSON(t, fmt.Sprintf("c%d", i), n.wsURL("/ws"))
		c.subscribe("room:all")
		c.subscribe(fmt.Sprintf("room:r%d", i%3))
		cs = append(cs, c)
	}
	pubsubIs := func(want int) func() (bool, string) {
		return func() (bool, string) {
			got, list := pubsubClients(t, rs)
			return got == want, fmt.Sprintf("%d pub/sub connections:\n%s", got, list)
		}
	}
	eventually(t, 5*time.Second, "one Redis pub/sub connection before the reloads", pubsubIs(1))
	before := n.goroutines(t)

	for i := range 3 {
		n.reload(t, routes)
		t.Logf("reload %d done; goroutines now %d", i+1, n.goroutines(t))
	}
	eventually(t, 10*time.Second, "one Redis pub/sub connection after 3 reloads", pubsubIs(1))
	const margin = 10
	var after int
	eventually(t, 10*time.Second, fmt.Sprintf("goroutines back within %d of %d after 3 reloads", margin, before), func() (bool, string) {
		after = n.goroutines(t)
		return after <= before+margin, strconv.Itoa(after)
	})
	t.Logf("goroutines: %d before the reloads, %d after", before, after)

	// The old connections still work, both ways.
	cs[0].mustPublish("room:all", map[string]int{"n": 1})
	for _, c := range cs {
		c.expectMessage("room:all", 5*time.Second)
	}
	cs[1].mustPublish("room:r1", map[string]int{"n": 2})
	for i, c := range cs {
		if i%3 == 1 {
			c.expectMessage("room:r1", 5*time.Second)
		}
	}
	fresh := dialJSON(t, "fresh", n.wsURL("/ws"))
	fresh.subscribe("room:all")
	fresh.mustPublish("room:all", map[string]int{"n": 3})
	for _, c := range append(cs, fresh) {
		c.expectMessage("room:all", 5*time.Second)
	}

	// Different broker settings: old clients must reconnect (1012).
	n.reload(t, fmt.Sprintf("\tchat /ws {\n\t\tredis %s\n\t\tchannel_prefix chat2:\n\t}", rs.URL()))
	for _, c := range append(cs, fresh) {
		code, err := c.waitClosed(10 * time.Second)
		if err != nil {
			t.Fatalf("%s: after a reload with a new channel_prefix: want close 1012, the connection stayed open: %v", c.name, err)
		}
		if code != websocket.StatusServiceRestart {
			t.Fatalf("%s: after a reload with a new channel_prefix: close code %d, want 1012 (service restart); read error: %v", c.name, code, c.readErr)
		}
	}
	// The old hub's pub/sub connection is gone; the new hub has its own,
	// subscribed to its control channels from the start.
	eventually(t, 10*time.Second, "old pub/sub connection closed after the prefix change", func() (bool, string) {
		got, list := pubsubClients(t, rs)
		old, fresh := numSub(t, rs, "chat:"+controlChannel), numSub(t, rs, "chat2:"+controlChannel)
		return got == 1 && old == 0 && fresh == 1, fmt.Sprintf("%d pub/sub connections, control channel subscribers: old prefix %d, new %d:\n%s", got, old, fresh, list)
	})
	eventually(t, 10*time.Second, "old-prefix subscription dropped", func() (bool, string) {
		got := numSub(t, rs, "chat:room:all")
		return got == 0, fmt.Sprintf("NUMSUB chat:room:all = %d", got)
	})
	c := dialJSON(t, "new-prefix", n.wsURL("/ws"))
	c.subscribe("room:all")
	eventually(t, 5*time.Second, "one Redis pub/sub connection for the new prefix", pubsubIs(1))
	if got := redisPublish(t, rs, "chat2:room:all", `{"x":1}`); got != 1 {
		t.Errorf("PUBLISH chat2:room:all reached %d subscribers, want 1", got)
	}
	m := c.expectMessage("room:all", 5*time.Second)
	if string(m.Data) != `{"x":1}` {
		t.Errorf("foreign payload: want data {\"x\":1}, got %s", m)
	}
}
