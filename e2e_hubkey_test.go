package caddychat

import (
	"fmt"
	"testing"
	"time"
)

// TestReloadChangingPublishTimeout: publish_timeout is a broker setting (the
// Redis client's timeouts and the hub's own): a reload that changes it gets
// a new hub, and the old connections are told to reconnect (1012) to it.
func TestReloadChangingPublishTimeout(t *testing.T) {
	routes := func(timeout string) string {
		return fmt.Sprintf("\tchat /ws {\n\t\trate_limit off\n\t\tpublish_timeout %s\n\t\tdrain_period 1ms\n\t}", timeout)
	}
	n := startCaddy(t, "node", routes("2s"))
	c := dialJSON(t, "c", n.wsURL("/ws"))
	c.subscribe("room:x")
	n.reload(t, routes("1s"))
	code, err := c.waitClosed(10 * time.Second)
	if err != nil || code != 1012 {
		t.Fatalf("after a reload changing publish_timeout, the old connection: close %v, %v; want 1012 (it stayed on the old hub, with the old timeout)", code, err)
	}
	d := dialJSON(t, "d", n.wsURL("/ws"))
	d.subscribe("room:x")
	d.mustPublish("room:x", map[string]any{"n": 1})
	d.expectMessage("room:x", 5*time.Second)
}
