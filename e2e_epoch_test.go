package caddychat

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
)

// TestRedisRestartKeepsAcknowledgedMessages kills and restarts Redis while
// a publisher runs, with subscribers on two nodes that resume as
// caddychat.js does (since and epoch of the last message seen, after any
// drop). Every acknowledged message reaches every subscriber exactly once,
// or the subscriber was told of a loss (a resume answered recovered:false)
// and the message is one that really is gone: acknowledged before the
// restart and not in the history Redis holds afterwards. Without
// persistence the restart starts a new history epoch, and what was
// acknowledged after it (while a node's subscription was still down) is in
// that history, so it must arrive; with AOF the history survives and no
// loss may be reported at all.
func TestRedisRestartKeepsAcknowledgedMessages(t *testing.T) {
	t.Run("no-persistence", func(t *testing.T) { testRedisRestartKeeps(t, redistest.Start(t), false) })
	t.Run("aof", func(t *testing.T) { testRedisRestartKeeps(t, redistest.StartAOF(t), true) })
}

func testRedisRestartKeeps(t *testing.T, rs *redistest.Server, persistent bool) {
	const subscribers = 50
	routes := fmt.Sprintf("\tchat /ws {\n\t\tredis %s\n\t\trate_limit off\n\t\thistory 100000 1h\n\t\tpublish_timeout 1s\n\t\tsend_queue 4MiB\n\t}", rs.URL())
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)
	const channel = "room:epoch"

	stopSubs := make(chan struct{})
	var subsDone sync.WaitGroup
	subs := make([]*resumingSubscriber, subscribers)
	for i := range subs {
		n := []*caddyNode{a, b}[i%2]
		subs[i] = &resumingSubscriber{t: t, name: fmt.Sprintf("sub%d@%s", i, n.name), url: n.wsURL("/ws"), channel: channel}
		subsDone.Add(1)
		go subs[i].run(stopSubs, &subsDone)
	}
	stopped := false
	stopAll := func() {
		if !stopped {
			stopped = true
			close(stopSubs)
			subsDone.Wait()
		}
	}
	defer stopAll()
	eventually(t, 20*time.Second, "every subscriber subscribed", func() (bool, string) {
		n := 0
		for _, s := range subs {
			s.mu.Lock()
			if s.subscribed {
				n++
			}
			s.mu.Unlock()
		}
		return n == len(subs), fmt.Sprintf("%d of %d", n, len(subs))
	})

	// Two publishers on each node, each waiting for its ok before the next
	// (over 200 msg/s together here); their numbers differ by base.
	pubs := []*outagePublisher{
		{name: "A", c: dialJSON(t, "pub@A", a.wsURL("/ws")), acked: map[int]bool{}},
		{name: "B", c: dialJSON(t, "pub@B", b.wsURL("/ws")), acked: map[int]bool{}, base: 1_000_000},
		{name: "A2", c: dialJSON(t, "pub2@A", a.wsURL("/ws")), acked: map[int]bool{}, base: 2_000_000},
		{name: "B2", c: dialJSON(t, "pub2@B", b.wsURL("/ws")), acked: map[int]bool{}, base: 3_000_000},
	}
	stopPub := make(chan struct{})
	var pubDone sync.WaitGroup
	for _, p := range pubs {
		pubDone.Add(1)
		go p.run(channel, stopPub, &pubDone)
	}
	pubStopped := false
	haltPub := func() {
		if !pubStopped {
			pubStopped = true
			close(stopPub)
			pubDone.Wait()
		}
	}
	defer haltPub()
	acks := func() int {
		n := 0
		for _, p := range pubs {
			n += p.acks()
		}
		return n
	}
	waitAcks := func(what string, atLeast int) {
		eventually(t, 30*time.Second, what, func() (bool, string) {
			for _, p := range pubs {
				p.mu.Lock()
				failure := p.failure
				p.mu.Unlock()
				if failure != nil {
					t.Fatal(failure)
				}
			}
			n := acks()
			return n >= atLeast, fmt.Sprintf("%d acknowledged", n)
		})
	}
	started := time.Now()
	waitAcks("publishes before the restart", 600)
	rate := float64(acks()) / time.Since(started).Seconds()

	rs.Kill()
	time.Sleep(time.Second)
	rs.Restart()
	waitAcks("publishes after the restart", acks()+600)
	haltPub()
	acked := map[int]bool{}
	unavailable := 0
	for _, p := range pubs {
		for n := range p.acked {
			acked[n] = true
		}
		unavailable += p.unavailable
	}
	t.Logf("publishers: %d acknowledged (%.0f msg/s before the restart), %d answered unavailable", len(acked), rate, unavailable)

	// What Redis holds now: the messages that are not gone.
	kept := map[int]bool{}
	keys, _ := rs.Do("KEYS", "*"+channel+"*:history").([]any)
	if len(keys) != 1 {
		t.Fatalf("want the channel's history stream in Redis, found keys %v", keys)
	}
	entries, _ := rs.Do("XRANGE", keys[0], "-", "+").([]any)
	for _, e := range entries {
		fields := e.([]any)[1].([]any)
		var tail struct {
			Data struct{ N int } `json:"data"`
		}
		if err := json.Unmarshal([]byte("{"+fields[1].(string)), &tail); err != nil {
			t.Fatalf("history entry %v: %v", e, err)
		}
		kept[tail.Data.N] = true
	}

	// Every subscriber ends with every acknowledged message that was not
	// really lost (or told of the loss): wait for them, then check.
	missing := func(s *resumingSubscriber) (inHistory, gone []int) {
		seen := map[int]bool{}
		for _, n := range s.got {
			seen[n] = true
		}
		for n := range acked {
			if seen[n] {
				continue
			}
			if kept[n] {
				inHistory = append(inHistory, n)
			} else if len(s.notResync) == 0 || persistent {
				gone = append(gone, n)
			}
		}
		sort.Ints(inHistory)
		sort.Ints(gone)
		return inHistory, gone
	}
	deadline := time.Now().Add(20 * time.Second)
	for _, s := range subs {
		for {
			s.mu.Lock()
			kept, gone := missing(s)
			s.mu.Unlock()
			if len(kept)+len(gone) == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	stopAll()

	for _, s := range subs {
		if s.failure != nil {
			t.Errorf("%s: %v", s.name, s.failure)
		}
		count := map[int]int{}
		for _, n := range s.got {
			count[n]++
		}
		var dups []string
		for n, k := range count {
			if k > 1 {
				dups = append(dups, fmt.Sprintf("n=%d ×%d", n, k))
			}
		}
		if len(dups) > 0 {
			t.Errorf("%s: got messages more than once: %s", s.name, strings.Join(dups, ", "))
		}
		inHistory, gone := missing(s)
		if len(inHistory) > 0 {
			t.Errorf("%s: %d acknowledged messages that Redis still holds never arrived (first %v); resumes answered recovered:false: %v",
				s.name, len(inHistory), inHistory[:min(5, len(inHistory))], s.notResync)
		}
		if len(gone) > 0 {
			t.Errorf("%s: %d acknowledged messages lost without a loss being reported (first %v)", s.name, len(gone), gone[:min(5, len(gone))])
		}
		if persistent && len(s.notResync) > 0 {
			t.Errorf("%s: with AOF the history survives, yet resumes were answered recovered:false: %v", s.name, s.notResync)
		}
		t.Logf("%s: %d messages, %d resumes, %d answered recovered:false", s.name, len(s.got), s.resumes, len(s.notResync))
	}
}

// TestResumeAcrossEpochChange: a client that was away while Redis restarted
// without persistence resumes with the since and epoch of the last message
// it saw. The old history is gone, so the reply says recovered:false, but
// every message of the new epoch is newer than its position and is
// replayed, in order, before live messages.
func TestResumeAcrossEpochChange(t *testing.T) {
	rs := redistest.Start(t)
	routes := fmt.Sprintf("\tchat /ws {\n\t\tredis %s\n\t\trate_limit off\n\t\thistory 1000 1h\n\t}", rs.URL())
	a := startCaddy(t, "A", routes)
	const channel = "room:epoch-resume"
	pub := dialJSON(t, "pub", a.wsURL("/ws"))
	away := dialJSON(t, "away", a.wsURL("/ws"))
	away.subscribe(channel)
	for n := 1; n <= 3; n++ {
		pub.mustPublish(channel, map[string]int{"n": n})
	}
	var last *serverMsg
	for n := 1; n <= 3; n++ {
		last = away.expectMessage(channel, 5*time.Second)
	}
	since, epoch := last.MessageIDOf(), last.Epoch
	if since == "" || epoch == "" {
		t.Fatalf("a kept message without id or epoch: %s", last)
	}
	away.closeNormal()

	rs.Kill()
	rs.Restart()
	// Published the moment Redis answers: the new epoch's history.
	for n := 4; n <= 8; {
		m, err := pub.publishErr(channel, map[string]int{"n": n}, 8*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case m.Type == "ok":
			n++
		case m.Type == "error" && m.Code == "unavailable":
			time.Sleep(20 * time.Millisecond)
		default:
			t.Fatalf("publish after the restart: %s", m)
		}
	}

	back := dialJSON(t, "back", a.wsURL("/ws"))
	reply, err := back.request(map[string]any{"op": "subscribe", "channel": channel, "since": since, "epoch": epoch}, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if reply.Type != "ok" || reply.Recovered == nil || *reply.Recovered || reply.Epoch == epoch || reply.Replayed == nil || *reply.Replayed != 5 {
		t.Fatalf("resume with the epoch Redis lost: want ok, recovered:false, a new epoch and replayed:5 (the whole new epoch), got %s", reply)
	}
	for n := 4; n <= 8; n++ {
		m := back.expectMessage(channel, 5*time.Second)
		if got, err := dataN(m); err != nil || got != n || m.Epoch != reply.Epoch {
			t.Fatalf("replay: want n=%d of epoch %s, got %s", n, reply.Epoch, m)
		}
	}
	pub.mustPublish(channel, map[string]int{"n": 9})
	if got, err := dataN(back.expectMessage(channel, 5*time.Second)); err != nil || got != 9 {
		t.Fatalf("live after the replay: want n=9, got %d (%v)", got, err)
	}
}
