package caddychat

// End-to-end: one or two Caddy nodes on one Redis deliver what is
// published (the shipped example, fan-out across nodes, one Redis
// subscription per node and channel, shutdown, a load balancer in front).

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/caddychat/caddychat/internal/redistest"
)

// TestSingleNodeExample runs the shipped Caddyfile.example (in-process broker,
// no Redis): the demo page is served and two clients chat over /ws.
func TestSingleNodeExample(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	example := filepath.Join(wd, "Caddyfile.example")
	if _, err := os.Stat(example); err != nil {
		t.Fatalf("Caddyfile.example: %v", err)
	}
	n := &caddyNode{t: t, name: "example", dir: t.TempDir(), addr: freeAddr(t)}
	// CADDY_ADMIN keeps the example's default admin endpoint (if it does not
	// set one) off the well-known port 2019.
	n.run(t, []string{"run", "--config", example, "--adapter", "caddyfile"},
		[]string{"CHAT_ADDR=" + n.addr, "CADDY_ADMIN=" + freeAddr(t)}, wd)

	resp, err := http.Get(n.httpURL("/"))
	if err != nil {
		t.Fatalf("GET /: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /: %s", resp.Status)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
		t.Errorf("GET /: Content-Type %q, want text/html", ct)
	}
	if lb := bytes.ToLower(body); !bytes.Contains(lb, []byte("<html")) && !bytes.Contains(lb, []byte("<!doctype html")) {
		t.Errorf("GET /: body is not an HTML page: %.200q", body)
	}

	c1 := dialJSON(t, "client1", n.wsURL("/ws"))
	c2 := dialJSON(t, "client2", n.wsURL("/ws"))
	if c1.welcome.Conn == c2.welcome.Conn {
		t.Errorf("both connections got conn id %q", c1.welcome.Conn)
	}
	if c1.welcome.User == nil || *c1.welcome.User != "" {
		t.Errorf("welcome user: want \"\", got %s", c1.welcome)
	}
	c1.subscribe("room:lobby")
	// The example has presence on: c1's own join (a guest's: guest_names on) comes first.
	if j, err := c1.readMsg(5 * time.Second); err != nil || j.Type != "join" || !strings.Contains(j.raw, `"anonymous":true,"guest":"`) {
		t.Fatalf("client1: want its own guest join on room:lobby, got %v %v", j, err)
	}
	ok := c2.mustPublish("room:lobby", map[string]any{"text": "hello lobby"})
	m := c1.expectMessage("room:lobby", 5*time.Second)
	if m.From == nil || *m.From != "" {
		t.Errorf("from: want \"\", got %s", m)
	}
	var id string
	if err := json.Unmarshal(m.ID, &id); err != nil || id != ok.MessageID {
		t.Errorf("delivery id %s, want the publish reply's message_id %q", m.ID, ok.MessageID)
	}
	if m.TS <= 0 || time.Since(time.UnixMilli(m.TS)).Abs() > time.Minute {
		t.Errorf("ts %d is not a current unix-ms time", m.TS)
	}
	var data struct{ Text string }
	if err := json.Unmarshal(m.Data, &data); err != nil || data.Text != "hello lobby" {
		t.Errorf("data: want {\"text\":\"hello lobby\"}, got %s", m.Data)
	}
}

// TestTwoNodesFanout: 100 subscribers spread over two nodes sharing one Redis
// get each of 1000 sequentially published messages exactly once, in order.
func TestTwoNodesFanout(t *testing.T) {
	rs := redistest.Start(t)
	a := startCaddy(t, "A", chatRoutes(rs.URL()))
	b := startCaddy(t, "B", chatRoutes(rs.URL()))
	const (
		channel     = "room:bench"
		subscribers = 100
		messages    = 1000
	)
	subs := make([]*wsClient, 0, subscribers)
	for i := range subscribers {
		n := a
		if i%2 == 1 {
			n = b
		}
		c := dialJSON(t, fmt.Sprintf("sub%d@%s", i, n.name), n.wsURL("/ws"))
		c.subscribe(channel)
		subs = append(subs, c)
	}
	pub := dialJSON(t, "publisher@A", a.wsURL("/ws"))

	// Every subscriber is read by its own goroutine while the publisher runs.
	// messages+1: the last one (n == messages) is an end marker that shows no
	// duplicate follows the 1000th.
	start := time.Now()
	deadline := start.Add(90 * time.Second)
	errs := make(chan error, subscribers)
	var wg sync.WaitGroup
	for _, c := range subs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- consumeSequence(c, channel, messages+1, deadline)
		}()
	}
	for i := 0; i <= messages; i++ {
		m, err := pub.publishErr(channel, map[string]int{"n": i}, 10*time.Second)
		if err != nil {
			t.Fatalf("publish n=%d: %v", i, err)
		}
		if m.Type != "ok" || m.MessageID == "" {
			t.Fatalf("publish n=%d: want ok with message_id, got %s", i, m)
		}
	}
	published := time.Since(start)
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		if err != nil {
			failed++
			if failed <= 10 {
				t.Error(err)
			}
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d subscribers did not get the exact sequence", failed, subscribers)
	}
	t.Logf("%d messages to %d subscribers on 2 nodes: published in %v, all delivered in %v",
		messages+1, subscribers, published.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
}

// consumeSequence requires the next count frames of c to be deliveries on
// channel with data {"n":0} .. {"n":count-1}, in order. It runs in its own
// goroutine, so it returns an error instead of failing the test.
func consumeSequence(c *wsClient, channel string, count int, deadline time.Time) error {
	seen := make(map[string]bool, count)
	for want := 0; want < count; want++ {
		m, err := c.readMsg(time.Until(deadline))
		if err != nil {
			return fmt.Errorf("%s: after %d of %d messages: %v", c.name, want, count, err)
		}
		if m.Type != "message" || m.Channel != channel {
			return fmt.Errorf("%s: message %d: want a delivery on %s, got %s", c.name, want, channel, m)
		}
		n, err := dataN(m)
		if err != nil {
			return fmt.Errorf("%s: message %d: %v", c.name, want, err)
		}
		if n != want {
			return fmt.Errorf("%s: message %d: got n=%d, want n=%d (lost, duplicated or reordered)", c.name, want, n, want)
		}
		id := string(m.ID)
		if seen[id] {
			return fmt.Errorf("%s: message id %s delivered twice", c.name, id)
		}
		seen[id] = true
	}
	return nil
}

// TestTwoNodesShutdownGoingAway: SIGTERM on a node closes its clients with
// 1001 (going away); the other node keeps working.
func TestTwoNodesShutdownGoingAway(t *testing.T) {
	rs := redistest.Start(t)
	a := startCaddy(t, "A", chatRoutes(rs.URL()))
	b := startCaddy(t, "B", chatRoutes(rs.URL()))
	subA := dialJSON(t, "subA", a.wsURL("/ws"))
	subA.subscribe("room:bye")
	var onB []*wsClient
	for i := range 3 {
		c := dialJSON(t, fmt.Sprintf("sub%d@B", i), b.wsURL("/ws"))
		c.subscribe("room:bye")
		onB = append(onB, c)
	}
	if !b.stop(10 * time.Second) {
		t.Errorf("B did not exit within 10s of SIGTERM")
	}
	for _, c := range onB {
		code, err := c.waitClosed(5 * time.Second)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
		} else if code != websocket.StatusGoingAway {
			t.Errorf("%s: close code %d after SIGTERM, want 1001 (going away); read error: %v", c.name, code, c.readErr)
		}
	}
	subA.mustPublish("room:bye", map[string]int{"n": 1})
	subA.expectMessage("room:bye", 5*time.Second)
	eventually(t, 5*time.Second, "NUMSUB chat:room:bye == 1 after B stopped", func() (bool, string) {
		n := numSub(t, rs, "chat:room:bye")
		return n == 1, strconv.FormatInt(n, 10)
	})
}

// TestOneRedisSubscriptionPerNodePerChannel: however many local clients a node
// has on a channel, it holds one Redis subscription for it, and drops it when
// the last local client goes.
func TestOneRedisSubscriptionPerNodePerChannel(t *testing.T) {
	rs := redistest.Start(t)
	a := startCaddy(t, "A", chatRoutes(rs.URL()))
	b := startCaddy(t, "B", chatRoutes(rs.URL()))
	const (
		channel  = "room:numsub"
		rchannel = "chat:" + channel
		perNode  = 20
	)
	var onA, onB []*wsClient
	for i := range perNode {
		ca := dialJSON(t, fmt.Sprintf("c%d@A", i), a.wsURL("/ws"))
		ca.subscribe(channel)
		onA = append(onA, ca)
		cb := dialJSON(t, fmt.Sprintf("c%d@B", i), b.wsURL("/ws"))
		cb.subscribe(channel)
		onB = append(onB, cb)
	}
	numSubIs := func(want int64) func() (bool, string) {
		return func() (bool, string) {
			n := numSub(t, rs, rchannel)
			return n == want, fmt.Sprintf("NUMSUB %s = %d", rchannel, n)
		}
	}
	// Every subscribe has been acknowledged, so the count must be 2 now.
	if n := numSub(t, rs, rchannel); n != 2 {
		t.Errorf("NUMSUB %s = %d right after %d subscribes on each of 2 nodes, want 2", rchannel, n, perNode)
	}
	eventually(t, 5*time.Second, "one Redis subscription per node", numSubIs(2))
	if n, list := pubsubClients(t, rs); n != 2 {
		t.Errorf("%d pub/sub connections for 2 nodes, want 2:\n%s", n, list)
	}

	// Half of A's clients leave with an explicit unsubscribe, which must not
	// drop the node's subscription while others remain.
	for _, c := range onA[:perNode/2] {
		m, err := c.request(map[string]any{"op": "unsubscribe", "channel": channel}, 10*time.Second)
		if err != nil || m.Type != "ok" {
			t.Fatalf("%s: unsubscribe: %v %v", c.name, m, err)
		}
	}
	if n := numSub(t, rs, rchannel); n != 2 {
		t.Errorf("NUMSUB %s = %d after some clients of A unsubscribed, want 2", rchannel, n)
	}

	for _, c := range onB {
		c.closeNormal()
	}
	eventually(t, 10*time.Second, "after all clients of B closed", numSubIs(1))

	for _, c := range onA {
		c.closeNormal()
	}
	eventually(t, 10*time.Second, "after all clients closed", numSubIs(0))
}

// TestLoadBalancerInFront: a third Caddy balances WebSocket upgrades over two
// nodes round-robin; a publish from one client reaches all of them.
func TestLoadBalancerInFront(t *testing.T) {
	rs := redistest.Start(t)
	a := startCaddy(t, "A", chatRoutes(rs.URL()))
	b := startCaddy(t, "B", chatRoutes(rs.URL()))
	lb := startCaddy(t, "LB", fmt.Sprintf("\treverse_proxy %s %s {\n\t\tlb_policy round_robin\n\t}", a.addr, b.addr))

	nodeA := dialJSON(t, "direct@A", a.wsURL("/ws")).welcome.Node
	nodeB := dialJSON(t, "direct@B", b.wsURL("/ws")).welcome.Node
	if nodeA == nodeB {
		t.Fatalf("both nodes report node id %q; they must differ", nodeA)
	}
	const channel = "room:lb"
	var clients []*wsClient
	perNode := map[string]int{}
	for i := range 6 {
		c := dialJSON(t, fmt.Sprintf("c%d@LB", i), lb.wsURL("/ws"))
		switch c.welcome.Node {
		case nodeA:
			perNode["A"]++
		case nodeB:
			perNode["B"]++
		default:
			t.Fatalf("%s: welcome from unknown node %q (A is %q, B is %q)", c.name, c.welcome.Node, nodeA, nodeB)
		}
		c.subscribe(channel)
		clients = append(clients, c)
	}
	if perNode["A"] == 0 || perNode["B"] == 0 {
		t.Fatalf("round robin put clients on A: %d, B: %d; want both", perNode["A"], perNode["B"])
	}
	ok := clients[0].mustPublish(channel, map[string]string{"text": "through the balancer"})
	for _, c := range clients {
		m := c.expectMessage(channel, 5*time.Second)
		var id string
		if err := json.Unmarshal(m.ID, &id); err != nil || id != ok.MessageID {
			t.Errorf("%s: delivery id %s, want %q", c.name, m.ID, ok.MessageID)
		}
	}
	t.Logf("clients per node through the balancer: %v", perNode)
}
