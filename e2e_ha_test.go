package caddychat_test

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
)

// restart stops the node (SIGTERM: it drains its connections) and starts it
// again on the same address with the same Caddyfile.
func (n *node) restart(t *testing.T) {
	t.Helper()
	if !n.stop(30 * time.Second) {
		t.Fatalf("%s: did not stop within 30s", n.name)
	}
	n.stopOnce = sync.Once{}
	n.run(t, []string{"run", "--config", n.caddyfile, "--adapter", "caddyfile"}, nil, "")
}

// resumingSubscriber stays subscribed to one channel through a load
// balancer as the JS client does: after any drop it reconnects and resumes
// from the last message it saw.
type resumingSubscriber struct {
	t       *testing.T
	name    string
	url     string
	channel string

	mu         sync.Mutex
	got        []int
	lastID     string
	epoch      string
	resumes    int
	subscribed bool
	notResync  []string // resumes answered recovered:false
	failure    error
}

func (s *resumingSubscriber) run(stop <-chan struct{}, done *sync.WaitGroup) {
	defer done.Done()
	for attempt := 0; ; attempt++ {
		select {
		case <-stop:
			return
		default:
		}
		c, err := dialWS(s.t, fmt.Sprintf("%s#%d", s.name, attempt), s.url)
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if _, err := c.readMsg(5 * time.Second); err != nil { // the welcome
			_ = c.conn.CloseNow()
			continue
		}
		op := map[string]any{"op": "subscribe", "channel": s.channel}
		s.mu.Lock()
		if s.lastID != "" {
			op["since"], op["epoch"] = s.lastID, s.epoch
		}
		s.mu.Unlock()
		reply, err := c.request(op, 10*time.Second)
		if err != nil || reply.Type != "ok" {
			_ = c.conn.CloseNow()
			time.Sleep(100 * time.Millisecond)
			continue
		}
		s.mu.Lock()
		s.subscribed = true
		if op["since"] != nil {
			s.resumes++
			if reply.Recovered == nil || !*reply.Recovered {
				s.notResync = append(s.notResync, reply.String())
			}
		}
		s.mu.Unlock()
		s.read(c, stop)
		_ = c.conn.CloseNow()
	}
}

// read records deliveries until the connection ends or stop closes.
func (s *resumingSubscriber) read(c *wsClient, stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		default:
		}
		m, err := c.readMsg(200 * time.Millisecond)
		if err != nil {
			if c.readErr != nil || isClosedErr(err) {
				return
			}
			continue
		}
		if m.Type != "message" {
			continue
		}
		n, err := dataN(m)
		s.mu.Lock()
		if err != nil {
			s.failure = err
		} else {
			s.got = append(s.got, n)
			s.lastID, s.epoch = m.MessageIDOf(), m.Epoch
		}
		s.mu.Unlock()
	}
}

func isClosedErr(err error) bool {
	return err != nil && !errors.Is(err, errTimeout)
}

// TestRollingRestartBehindLoadBalancer restarts both nodes, one after the
// other, behind a load-balancing Caddy while a publisher runs: every
// subscriber (resuming as the JS client does) ends with every acknowledged
// message exactly once, in order.
func TestRollingRestartBehindLoadBalancer(t *testing.T) {
	rs := redistest.Start(t)
	routes := fmt.Sprintf("\tchat /ws {\n\t\tredis %s\n\t\trate_limit off\n\t\thistory 100000 1h\n\t\tdrain_period 1s\n\t}", rs.URL())
	a := startNode(t, "A", routes)
	b := startNode(t, "B", routes)
	lb := startNode(t, "LB", fmt.Sprintf("\treverse_proxy %s %s {\n\t\tlb_policy round_robin\n\t\tlb_try_duration 10s\n\t\tlb_try_interval 100ms\n\t\tfail_duration 2s\n\t}", a.addr, b.addr))
	const channel = "room:rolling"

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var subs []*resumingSubscriber
	for i := range 10 {
		s := &resumingSubscriber{t: t, name: fmt.Sprintf("sub%d", i), url: lb.wsURL("/ws"), channel: channel}
		subs = append(subs, s)
		wg.Add(1)
		go s.run(stop, &wg)
	}
	eventually(t, 20*time.Second, "subscribers subscribed", func() (bool, string) {
		for _, s := range subs {
			s.mu.Lock()
			ok := s.subscribed
			s.mu.Unlock()
			if !ok {
				return false, s.name + " not subscribed"
			}
		}
		return true, ""
	})

	// The publisher goes through the balancer too, reconnecting after drops;
	// a publish without an ok may or may not have been published.
	var acked []int
	var pubMu sync.Mutex
	pubStop := make(chan struct{})
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		n := 0
		for {
			c, err := dialWS(t, "publisher", lb.wsURL("/ws"))
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			if _, err := c.readMsg(5 * time.Second); err != nil {
				_ = c.conn.CloseNow()
				continue
			}
			for {
				select {
				case <-pubStop:
					_ = c.conn.CloseNow()
					return
				default:
				}
				n++
				m, err := c.publishErr(channel, map[string]int{"n": n}, 5*time.Second)
				if err != nil {
					break // the connection dropped: reconnect
				}
				if m.Type == "ok" {
					pubMu.Lock()
					acked = append(acked, n)
					pubMu.Unlock()
				}
				time.Sleep(5 * time.Millisecond)
			}
			_ = c.conn.CloseNow()
		}
	}()

	time.Sleep(time.Second)
	a.restart(t)
	time.Sleep(time.Second)
	b.restart(t)
	time.Sleep(time.Second)
	close(pubStop)
	<-pubDone

	pubMu.Lock()
	last := acked[len(acked)-1]
	pubMu.Unlock()
	eventually(t, 30*time.Second, "every subscriber has the last acknowledged message", func() (bool, string) {
		for _, s := range subs {
			s.mu.Lock()
			n := len(s.got)
			top := 0
			if n > 0 {
				top = s.got[n-1]
			}
			s.mu.Unlock()
			if top < last {
				return false, fmt.Sprintf("%s at %d of %d", s.name, top, last)
			}
		}
		return true, ""
	})
	close(stop)
	wg.Wait()

	ackedSet := make(map[int]bool, len(acked))
	for _, n := range acked {
		ackedSet[n] = true
	}
	resumes := 0
	for _, s := range subs {
		if s.failure != nil {
			t.Fatalf("%s: %v", s.name, s.failure)
		}
		if len(s.notResync) > 0 {
			t.Errorf("%s: resumes not recovered: %v", s.name, s.notResync)
		}
		resumes += s.resumes
		seen := map[int]bool{}
		for i, n := range s.got {
			if seen[n] {
				t.Fatalf("%s: message %d twice", s.name, n)
			}
			seen[n] = true
			if i > 0 && n < s.got[i-1] {
				t.Fatalf("%s: %d after %d: out of order", s.name, n, s.got[i-1])
			}
		}
		for _, n := range acked {
			if !seen[n] && n >= s.got[0] {
				t.Fatalf("%s: acknowledged message %d missing", s.name, n)
			}
		}
	}
	if resumes < len(subs) {
		t.Errorf("only %d resumes for %d subscribers over two restarts: the restarts did not drop them", resumes, len(subs))
	}
	t.Logf("%d acknowledged messages, %d subscribers, %d resumes, all complete", len(acked), len(subs), resumes)
}
