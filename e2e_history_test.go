package caddychat

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/coder/websocket"
)

// historyRoutes is chatRoutes with history kept on every channel.
func historyRoutes(redisURL, history string) string {
	return fmt.Sprintf("\tchat /ws {\n\t\tredis %s\n\t\trate_limit off\n\t\thistory %s\n\t\tsend_queue 4MiB\n\t}", redisURL, history)
}

// seqPublisher publishes 1, 2, 3, ... on one channel through one connection,
// paced, with a window of unanswered publishes, until stopped. acked is the
// highest number the node answered ok (replies come in publish order).
type seqPublisher struct {
	t       *testing.T
	conn    *websocket.Conn
	channel string
	acked   atomic.Int64
	window  chan struct{}
	stop    chan struct{}
	done    sync.WaitGroup
	failure atomic.Value // string: the first error reply
}

func startSeqPublisher(t *testing.T, url, channel string, every time.Duration) *seqPublisher {
	t.Helper()
	c, err := dialWS(t, "seqpub", url)
	if err != nil {
		t.Fatal(err)
	}
	p := &seqPublisher{t: t, conn: c.conn, channel: channel, window: make(chan struct{}, 16), stop: make(chan struct{})}
	p.done.Add(2)
	go p.write(every)
	go p.read(c)
	t.Cleanup(p.halt)
	return p
}

func (p *seqPublisher) halt() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	p.done.Wait()
}

func (p *seqPublisher) write(every time.Duration) {
	defer p.done.Done()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for n := 1; ; n++ {
		select {
		case p.window <- struct{}{}:
		case <-p.stop:
			return
		}
		select {
		case <-tick.C:
		case <-p.stop:
			return
		}
		b, _ := json.Marshal(map[string]any{"op": "publish", "channel": p.channel, "data": map[string]int{"n": n}, "id": n})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := p.conn.Write(ctx, websocket.MessageText, b)
		cancel()
		if err != nil {
			p.failure.CompareAndSwap(nil, "write: "+err.Error())
			return
		}
	}
}

func (p *seqPublisher) read(c *wsClient) {
	defer p.done.Done()
	for {
		select {
		case <-p.stop:
			return
		default:
		}
		m, err := c.readMsg(200 * time.Millisecond)
		if err != nil {
			continue
		}
		switch m.Type {
		case "ok":
			n, _ := strconv.Atoi(string(m.ID))
			p.acked.Store(int64(n))
			<-p.window
		case "error":
			p.failure.CompareAndSwap(nil, m.String())
			<-p.window
		}
	}
}

func (p *seqPublisher) check() {
	p.t.Helper()
	if f := p.failure.Load(); f != nil {
		p.t.Fatalf("publisher: %v", f)
	}
}

func (p *seqPublisher) waitAcked(n int64, timeout time.Duration) {
	p.t.Helper()
	eventually(p.t, timeout, fmt.Sprintf("publisher acked %d", n), func() (bool, string) {
		p.check()
		return p.acked.Load() >= n, fmt.Sprintf("acked %d", p.acked.Load())
	})
}

// resumeTracker follows one subscriber's view of the sequence.
type resumeTracker struct {
	lastN     int
	lastID    string
	lastEpoch string
	recent    []string
}

// consume reads the channel's messages until it has seen n up to at least
// upTo, requiring each to be the one after the last (no gap, no duplicate,
// in order).
func (r *resumeTracker) consume(t *testing.T, c *wsClient, channel string, upTo int) {
	t.Helper()
	for r.lastN < upTo {
		m, err := c.readMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("after n=%d (want up to %d): %v", r.lastN, upTo, err)
		}
		if m.Type != "message" || m.Channel != channel {
			t.Fatalf("after n=%d: unexpected frame %s", r.lastN, m)
		}
		n, err := dataN(m)
		if err != nil {
			t.Fatal(err)
		}
		r.recent = append(r.recent, m.raw)
		if len(r.recent) > 6 {
			r.recent = r.recent[1:]
		}
		if r.lastN != 0 && n != r.lastN+1 {
			t.Logf("last frames: %q", r.recent)
			t.Fatalf("%s: got n=%d (id %s) after n=%d (id %s): a gap or a duplicate", c.name, n, m.MessageIDOf(), r.lastN, r.lastID)
		}
		if m.Epoch == "" {
			t.Fatalf("a kept message without its epoch: %s", m)
		}
		r.lastN, r.lastID, r.lastEpoch = n, m.MessageIDOf(), m.Epoch
	}
}

// MessageIDOf is a delivery's id (the "id" field of a message frame).
func (m *serverMsg) MessageIDOf() string {
	var id string
	_ = json.Unmarshal(m.ID, &id)
	return id
}

// TestResumeAcrossNodesNoGapNoDuplicate: a subscriber drops, at least 500
// messages are published on node A while it is away, and it resumes with
// since on either node, 20 times, while the publisher keeps going.
func TestResumeAcrossNodesNoGapNoDuplicate(t *testing.T) {
	rs := redistest.Start(t)
	routes := historyRoutes(rs.URL(), "5000 1h")
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)
	const channel = "room:resume"
	nodes := []*caddyNode{b, a}

	pub := startSeqPublisher(t, a.wsURL("/ws"), channel, time.Millisecond)
	var tr resumeTracker
	start := time.Now()
	for round := range 20 {
		n := nodes[round%2]
		c := dialJSON(t, fmt.Sprintf("sub-%d@%s", round, n.name), n.wsURL("/ws"))
		if round == 0 {
			c.subscribe(channel)
		} else {
			missed := pub.acked.Load() - int64(tr.lastN)
			m, err := c.request(map[string]any{"op": "subscribe", "channel": channel, "since": tr.lastID, "epoch": tr.lastEpoch}, 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if m.Type != "ok" || m.Recovered == nil || !*m.Recovered || m.Replayed == nil || int64(*m.Replayed) < missed || m.Epoch != tr.lastEpoch {
				t.Fatalf("round %d: resume after n=%d (%d missed): %s", round, tr.lastN, missed, m)
			}

		}
		// Everything replayed, then live messages published after the resume.
		tr.consume(t, c, channel, int(pub.acked.Load())+50)
		_ = c.conn.CloseNow()
		pub.waitAcked(int64(tr.lastN)+500, 30*time.Second)
	}
	pub.halt()
	pub.check()
	t.Logf("20 resumes, %d messages in order without gap or duplicate, %v", tr.lastN, time.Since(start).Round(time.Millisecond))
}

// TestResumeAfterHistoryLossIsNotRecovered: since older than the window,
// and a history wiped by FLUSHALL or by a Redis restart without
// persistence, are reported as recovered false, never a silent gap.
func TestResumeAfterHistoryLossIsNotRecovered(t *testing.T) {
	rs := redistest.Start(t)
	routes := historyRoutes(rs.URL(), "50 1h")
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)
	const channel = "room:loss"
	pub := dialJSON(t, "pub@A", a.wsURL("/ws"))

	resume := func(name string, since, epoch string) *serverMsg {
		c := dialJSON(t, name, b.wsURL("/ws"))
		m, err := c.request(map[string]any{"op": "subscribe", "channel": channel, "since": since, "epoch": epoch}, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if m.Type != "ok" || m.Recovered == nil {
			t.Fatalf("%s: resume: %s", name, m)
		}
		return m
	}
	epochOf := func() string {
		c := dialJSON(t, "history", b.wsURL("/ws"))
		m := c.historyPage(channel, 1, "")
		return m.Epoch
	}

	first := pub.mustPublish(channel, map[string]int{"n": 1}).MessageID
	epoch := epochOf()
	if m := resume("in-window", first, epoch); !*m.Recovered {
		t.Fatalf("resume inside the window: %s", m)
	}
	for i := 2; i <= 60; i++ {
		pub.mustPublish(channel, map[string]int{"n": i})
	}
	if m := resume("beyond-window", first, epoch); *m.Recovered {
		t.Fatalf("since older than the 50 kept messages: %s", m)
	}

	last := pub.mustPublish(channel, map[string]int{"n": 61}).MessageID
	rs.Do("FLUSHALL")
	pub.mustPublish(channel, map[string]int{"n": 62})
	if m := resume("after-flushall", last, epoch); *m.Recovered || m.Epoch == epoch {
		t.Fatalf("history flushed since: %s", m)
	}

	epoch = epochOf()
	last = pub.mustPublish(channel, map[string]int{"n": 63}).MessageID
	rs.Kill()
	rs.Restart() // redistest runs redis-server without persistence
	eventually(t, 15*time.Second, "publishing after the Redis restart", func() (bool, string) {
		m, err := pub.publishErr(channel, map[string]int{"n": 64}, 5*time.Second)
		return err == nil && m.Type == "ok", fmt.Sprint(m, err)
	})
	if m := resume("after-restart", last, epoch); *m.Recovered {
		t.Fatalf("Redis restarted without persistence since: %s", m)
	}
}

// historyPage runs the history op.
func (c *wsClient) historyPage(channel string, limit int, before string) *historyPageMsg {
	c.t.Helper()
	c.nextID++
	op := map[string]any{"op": "history", "channel": channel, "limit": limit, "id": c.nextID}
	if before != "" {
		op["before"] = before
	}
	b, _ := json.Marshal(op)
	if err := c.send(websocket.MessageText, b); err != nil {
		c.t.Fatal(err)
	}
	want := strconv.Itoa(c.nextID)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		f, err := c.nextFrame(time.Until(deadline))
		if err != nil {
			break
		}
		var m historyPageMsg
		if json.Unmarshal(f.data, &m) == nil && string(m.ID) == want {
			if m.Type != "history" {
				c.t.Fatalf("%s: history %s: %s", c.name, channel, f.data)
			}
			return &m
		}
	}
	c.t.Fatalf("%s: no answer to %s", c.name, b)
	return nil
}

type historyPageMsg struct {
	Type     string          `json:"type"`
	ID       json.RawMessage `json:"id"`
	Epoch    string          `json:"epoch"`
	More     bool            `json:"more"`
	Messages []struct {
		ID   string          `json:"id"`
		Data json.RawMessage `json:"data"`
	} `json:"messages"`
}

// TestLiveMessagesAreAlwaysInHistory: publishers on both nodes at once; every
// id a subscriber gets live is in the history, with the same data, and the
// history holds nothing that was not delivered. Paging backwards returns
// exactly the kept messages, bounded by the count.
func TestLiveMessagesAreAlwaysInHistory(t *testing.T) {
	rs := redistest.Start(t)
	routes := historyRoutes(rs.URL(), "300 1h")
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)
	const channel = "room:atomic"
	sub := dialJSON(t, "sub@B", b.wsURL("/ws"))
	sub.subscribe(channel)

	const perPublisher = 200
	var wg sync.WaitGroup
	for _, n := range []*caddyNode{a, b} {
		p := dialJSON(t, "pub@"+n.name, n.wsURL("/ws"))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perPublisher {
				if m, err := p.publishErr(channel, map[string]any{"n": i, "node": n.name}, 10*time.Second); err != nil || m.Type != "ok" {
					t.Errorf("publish: %v %v", m, err)
					return
				}
			}
		}()
	}
	live := map[string]string{}
	var order []string
	for len(order) < 2*perPublisher {
		m, err := sub.readMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("after %d live messages: %v", len(order), err)
		}
		id := m.MessageIDOf()
		if _, dup := live[id]; dup {
			t.Fatalf("id %s delivered twice", id)
		}
		live[id] = string(m.Data)
		order = append(order, id)
	}
	wg.Wait()

	// Page back through the 300 kept (of 400) with pages of 64.
	reader := dialJSON(t, "reader@A", a.wsURL("/ws"))
	var kept []string
	before := ""
	for {
		page := reader.historyPage(channel, 64, before)
		var ids []string
		for _, m := range page.Messages {
			ids = append(ids, m.ID)
			if string(m.Data) != live[m.ID] {
				t.Fatalf("history has %s = %s, live delivery was %q", m.ID, m.Data, live[m.ID])
			}
		}
		kept = append(ids, kept...)
		if !page.More {
			break
		}
		before = page.Messages[0].ID
	}
	want := order[len(order)-300:]
	if fmt.Sprint(kept) != fmt.Sprint(want) {
		t.Fatalf("history holds %d ids, want the last 300 live ones in live order", len(kept))
	}
}
