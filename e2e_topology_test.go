package caddychat

// End-to-end tests of the Redis Sentinel and Redis Cluster topologies, with
// real sentinels and cluster nodes (internal/redistest) and real Caddy nodes.

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
)

func sentinelRoutes(st *redistest.Sentinel) string {
	return fmt.Sprintf("\tchat /ws {\n\t\tredis_sentinel %s %s\n\t\trate_limit off\n\t}",
		redistest.SentinelMasterName, strings.Join(st.Addrs(), " "))
}

// TestSentinelFailoverKeepsClients: two nodes reach Redis through three
// sentinels. The master is killed (SIGKILL); the sentinels promote the
// replica, and publishes on both nodes reach the subscribers of both nodes
// again, on the same WebSocket connections: no client reconnects. The time
// from the kill to the first successful publish and to the first delivery
// on each node is logged (README, "Redis topologies").
func TestSentinelFailoverKeepsClients(t *testing.T) {
	st := redistest.StartSentinel(t)
	a := startCaddy(t, "A", sentinelRoutes(st))
	b := startCaddy(t, "B", sentinelRoutes(st))
	const channel = "room:failover"
	subA := dialJSON(t, "subA", a.wsURL("/ws"))
	subA.subscribe(channel)
	subB := dialJSON(t, "subB", b.wsURL("/ws"))
	subB.subscribe(channel)
	pubA := dialJSON(t, "pub@A", a.wsURL("/ws"))
	pubB := dialJSON(t, "pub@B", b.wsURL("/ws"))

	for _, pub := range []*wsClient{pubA, pubB} {
		pub.mustPublish(channel, map[string]string{"phase": "before"})
		subA.expectMessage(channel, 5*time.Second)
		subB.expectMessage(channel, 5*time.Second)
	}

	oldMaster := st.Master.Addr()
	killed := time.Now()
	st.Master.Kill()

	// Publish from both nodes in turn until each has had a publish accepted
	// and each subscriber got a message published after the kill.
	var firstOK, firstOKA, firstOKB, gotA, gotB time.Time
	deadline := killed.Add(30 * time.Second)
	for k := 0; firstOKA.IsZero() || firstOKB.IsZero() || gotA.IsZero() || gotB.IsZero(); k++ {
		if time.Now().After(deadline) {
			t.Fatalf("not recovered 30s after the master was killed: publish ok on A %v, on B %v; delivery on A %v, on B %v",
				sinceOrNever(firstOKA, killed), sinceOrNever(firstOKB, killed), sinceOrNever(gotA, killed), sinceOrNever(gotB, killed))
		}
		pub, okAt := pubA, &firstOKA
		if k%2 == 1 {
			pub, okAt = pubB, &firstOKB
		}
		m, err := pub.publishErr(channel, map[string]any{"phase": "after", "k": k}, 10*time.Second)
		if err != nil {
			t.Fatalf("%s: publish after the kill (must stay connected): %v", pub.name, err)
		}
		switch {
		case m.Type == "ok":
			if okAt.IsZero() {
				*okAt = time.Now()
			}
			if firstOK.IsZero() {
				firstOK = *okAt
			}
		case m.Type == "error" && m.Code == "unavailable":
			time.Sleep(20 * time.Millisecond)
		default:
			t.Fatalf("%s: publish after the kill: want ok or unavailable, got %s", pub.name, m)
		}
		collectPhase(t, subA, "after", &gotA, nil)
		collectPhase(t, subB, "after", &gotB, nil)
	}
	newMaster, err := st.MasterAddr()
	if err != nil || newMaster != st.Replica.Addr() {
		t.Errorf("sentinels name %q as master (%v), want the promoted replica %s (old master %s)", newMaster, err, st.Replica.Addr(), oldMaster)
	}
	t.Logf("sentinel failover (down-after 1s): from the master's SIGKILL, first publish accepted after %v (A %v, B %v); first delivery on A after %v, on B after %v; no client reconnected",
		firstOK.Sub(killed).Round(time.Millisecond), firstOKA.Sub(killed).Round(time.Millisecond), firstOKB.Sub(killed).Round(time.Millisecond),
		gotA.Sub(killed).Round(time.Millisecond), gotB.Sub(killed).Round(time.Millisecond))
}

// collectPhase reads what c has received so far (waiting at most 30ms for
// each frame), records when the first message of phase arrived and, when
// seen is not nil, counts each k of the phase's messages. Any closed
// connection fails the test: clients must ride through a failover.
func collectPhase(t *testing.T, c *wsClient, phase string, got *time.Time, seen map[int]int) {
	t.Helper()
	for {
		m, err := c.readMsg(30 * time.Millisecond)
		if errors.Is(err, errTimeout) {
			return
		}
		if err != nil {
			t.Fatalf("%s (must stay connected through the failover): %v", c.name, err)
		}
		var d struct {
			Phase string
			K     int
		}
		_ = json.Unmarshal(m.Data, &d)
		if m.Type != "message" || d.Phase != phase {
			continue
		}
		if got.IsZero() {
			*got = m.at
		}
		if seen != nil {
			seen[d.K]++
		}
	}
}

func clusterRoutes(cl *redistest.Cluster) string {
	return fmt.Sprintf(`	chat /ws {
		redis_cluster %s
		rate_limit off
		history room:* 100 1h
		jwt {
			secret %s
		}
		subscribe room:*
		publish room:*
		anonymous {
			subscribe room:*
			publish room:*
		}
		presence on
	}`, strings.Join(cl.Addrs(), " "), testSecret)
}

// clusterChannels picks channels whose slots sit on every master of cl,
// two of different slots on the first (so that one pub/sub connection per
// shard is seen to carry several slots).
func clusterChannels(t *testing.T, cl *redistest.Cluster) []string {
	t.Helper()
	masters := cl.Masters()
	perShard := map[*redistest.Server][]string{}
	var out []string
	for i := 0; i < 200 && len(out) < len(masters)+1; i++ {
		ch := fmt.Sprintf("room:shard-%d", i)
		owner := cl.Owner("chat:" + ch)
		want := 1
		if owner == masters[0] {
			want = 2
		}
		if len(perShard[owner]) < want {
			perShard[owner] = append(perShard[owner], ch)
			out = append(out, ch)
		}
	}
	if len(out) != len(masters)+1 {
		t.Fatalf("could not find channels on every shard: %v", out)
	}
	return out
}

// TestClusterShardedPubSub runs two nodes on a cluster of three masters with
// a replica each:
//   - channels of every shard, published on either node, reach both, with
//     sharded pub/sub: each channel has one sharded subscription per node on
//     the master of its slot and none elsewhere, and each node holds one
//     pub/sub connection per shard however many channels;
//   - a resume with since replays from the history kept in the cluster;
//   - presence events go out on the channel's shard;
//   - a channel whose slot is resharded to another master is followed there;
//   - when a master is killed and its replica promoted, the channel is
//     followed to the new master; no client reconnects.
func TestClusterShardedPubSub(t *testing.T) {
	cl := redistest.StartCluster(t, 3, 1)
	a := startCaddy(t, "A", clusterRoutes(cl))
	b := startCaddy(t, "B", clusterRoutes(cl))
	channels := clusterChannels(t, cl)

	subA := dialJSON(t, "subA", a.wsURL("/ws"))
	subB := dialJSON(t, "subB", b.wsURL("/ws"))
	for _, ch := range channels {
		subA.subscribe(ch)
		subB.subscribe(ch)
	}
	checkShardSubscriptions(t, cl, channels)
	for _, n := range cl.Masters() {
		if count, list := pubsubClients(t, n); count != 2 {
			t.Errorf("%s: %d pub/sub connections, want 2 (one per Caddy node):\n%s", n.Addr(), count, list)
		}
	}

	// Every channel, published on either node, reaches both.
	pubs := []*wsClient{dialJSON(t, "pub@A", a.wsURL("/ws")), dialJSON(t, "pub@B", b.wsURL("/ws"))}
	for i, ch := range channels {
		pubs[i%2].mustPublish(ch, map[string]int{"n": i})
		for _, c := range []*wsClient{subA, subB} {
			m := c.expectMessage(ch, 5*time.Second)
			if n, err := dataN(m); err != nil || n != i {
				t.Fatalf("%s: on %s got %s, want n=%d", c.name, ch, m, i)
			}
		}
	}

	// Resume with since on the other node: the history is in the cluster,
	// in the slot of the channel.
	ch := channels[0]
	var ids []string
	var epoch string
	for n := 100; n < 103; n++ {
		pubs[0].mustPublish(ch, map[string]int{"n": n})
		m := subA.expectMessage(ch, 5*time.Second)
		ids, epoch = append(ids, m.MessageIDOf()), m.Epoch
		subB.expectMessage(ch, 5*time.Second)
	}
	late := dialJSON(t, "resumer@B", b.wsURL("/ws"))
	m, err := late.request(map[string]any{"op": "subscribe", "channel": ch, "since": ids[0], "epoch": epoch}, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if m.Type != "ok" || m.Recovered == nil || !*m.Recovered || m.Replayed == nil || *m.Replayed != 2 {
		t.Fatalf("resume since %s on the cluster: %s, want ok, recovered, 2 replayed", ids[0], m)
	}
	for i, want := range []int{101, 102} {
		got := late.expectMessage(ch, 5*time.Second)
		if n, err := dataN(got); err != nil || n != want || got.MessageIDOf() != ids[i+1] {
			t.Fatalf("replayed message %d: %s, want n=%d id %s", i, got, want, ids[i+1])
		}
	}

	// Presence: a user's join reaches the other node over the channel's shard.
	carol := dialUser(t, "carol@A", a.wsURL("/ws"), "carol")
	carol.subscribe(ch)
	if got := presenceEvents(t, carol, ch); got != "join carol" {
		t.Fatalf("carol's events after subscribing: %q, want her own join", got)
	}
	for _, c := range []*wsClient{subB, late} {
		if ev := nextEvent(t, c, 5*time.Second); ev.Type != "join" || ev.User == nil || *ev.User != "carol" {
			t.Fatalf("%s: %s, want carol's join", c.name, ev)
		}
	}
	if got := presenceOf(t, late, ch); got != "carol:1" {
		t.Fatalf("presence on B: %q, want carol:1", got)
	}
	carol.closeNormal()
	late.closeNormal()
	for _, c := range []*wsClient{subA, subB} {
		drain(c)
	}

	// Resharding: the channel's slot moves to another master, keys and all.
	moving := channels[1]
	key := "chat:" + moving
	src := cl.Owner(key)
	var dst *redistest.Server
	for _, n := range cl.Masters() {
		if n != src {
			dst = n
			break
		}
	}
	moved := time.Now()
	cl.MoveSlot(cl.Slot(key), dst)
	firstOK, gotA, gotB := publishUntilDelivered(t, pubs, moving, "resharded", subA, subB)
	t.Logf("slot %d of %s moved from %s to %s: first publish ok after %v, delivery on A after %v, on B after %v",
		cl.Slot(key), moving, src.Addr(), dst.Addr(), firstOK.Sub(moved).Round(time.Millisecond),
		gotA.Sub(moved).Round(time.Millisecond), gotB.Sub(moved).Round(time.Millisecond))
	checkShardSubscriptions(t, cl, channels)

	// Failover inside the cluster: the master of a channel is killed and its
	// replica promoted.
	victim := cl.Owner("chat:" + ch)
	killed := time.Now()
	victim.Kill()
	firstOK, gotA, gotB = publishUntilDelivered(t, pubs, ch, "failed-over", subA, subB)
	promoted := cl.Owner("chat:" + ch)
	if promoted == victim {
		t.Fatalf("%s still owns %s after it was killed", victim.Addr(), ch)
	}
	t.Logf("cluster failover (cluster-node-timeout 1s): master %s of %s killed, replica %s promoted: first publish ok after %v, delivery on A after %v, on B after %v; no client reconnected",
		victim.Addr(), ch, promoted.Addr(), firstOK.Sub(killed).Round(time.Millisecond),
		gotA.Sub(killed).Round(time.Millisecond), gotB.Sub(killed).Round(time.Millisecond))
	checkShardSubscriptions(t, cl, channels)
}

// checkShardSubscriptions requires each channel to have one sharded
// subscription per Caddy node (2) on the master of its slot, none on the
// other running nodes, and no classic subscription anywhere.
func checkShardSubscriptions(t *testing.T, cl *redistest.Cluster, channels []string) {
	t.Helper()
	eventually(t, 5*time.Second, "sharded subscriptions on the slots' masters only", func() (bool, string) {
		for _, ch := range channels {
			key := "chat:" + ch
			owner := cl.Owner(key)
			for _, n := range cl.Nodes {
				if !n.Running() {
					continue
				}
				ctx, cancel := redisCtx()
				shard, err := n.Client().PubSubShardNumSub(ctx, key).Result()
				classic, err2 := n.Client().PubSubNumSub(ctx, key).Result()
				cancel()
				if err != nil || err2 != nil {
					t.Fatalf("PUBSUB SHARDNUMSUB/NUMSUB on %s: %v %v", n.Addr(), err, err2)
				}
				want := int64(0)
				if n == owner {
					want = 2
				}
				if shard[key] != want || classic[key] != 0 {
					return false, fmt.Sprintf("%s (slot %d) on %s: SHARDNUMSUB %d, NUMSUB %d; want %d sharded (one per Caddy node) and no classic subscription",
						ch, cl.Slot(key), n.Addr(), shard[key], classic[key], want)
				}
			}
		}
		return true, ""
	})
}

// publishUntilDelivered publishes {"phase": phase, "k": k} on channel, from
// the publishers in turn, until each subscriber got one, and returns when
// the first publish was accepted and when each subscriber got its first
// one. The channel has history, so every accepted publish must reach each
// subscriber exactly once, also those published while its node was not
// subscribed yet (they come from history).
func publishUntilDelivered(t *testing.T, pubs []*wsClient, channel, phase string, subA, subB *wsClient) (firstOK, gotA, gotB time.Time) {
	t.Helper()
	start := time.Now()
	deadline := start.Add(30 * time.Second)
	var acked []int
	seenA, seenB := map[int]int{}, map[int]int{}
	k := 0
	for ; gotA.IsZero() || gotB.IsZero(); k++ {
		if time.Now().After(deadline) {
			t.Fatalf("%s: delivery not back within 30s: first publish ok %v, on A %v, on B %v",
				phase, sinceOrNever(firstOK, start), sinceOrNever(gotA, start), sinceOrNever(gotB, start))
		}
		pub := pubs[k%len(pubs)]
		m, err := pub.publishErr(channel, map[string]any{"phase": phase, "k": k}, 10*time.Second)
		if err != nil {
			t.Fatalf("%s: publish (must stay connected): %v", pub.name, err)
		}
		switch {
		case m.Type == "ok":
			acked = append(acked, k)
			if firstOK.IsZero() {
				firstOK = time.Now()
			}
		case m.Type == "error" && m.Code == "unavailable":
			time.Sleep(20 * time.Millisecond)
		default:
			t.Fatalf("%s: publish: want ok or unavailable, got %s", pub.name, m)
		}
		collectPhase(t, subA, phase, &gotA, seenA)
		collectPhase(t, subB, phase, &gotB, seenB)
	}
	// A last message: once it is in, everything before it is.
	pubs[0].mustPublish(channel, map[string]any{"phase": phase, "k": k})
	acked = append(acked, k)
	for _, sub := range []struct {
		c    *wsClient
		seen map[int]int
	}{{subA, seenA}, {subB, seenB}} {
		var last time.Time
		eventually(t, 5*time.Second, sub.c.name+" got the last message", func() (bool, string) {
			collectPhase(t, sub.c, phase, &last, sub.seen)
			return sub.seen[k] > 0, fmt.Sprint(sub.seen)
		})
		for _, n := range acked {
			if sub.seen[n] != 1 {
				t.Errorf("%s: accepted publish k=%d of %s delivered %d times, want once (seen %v)", sub.c.name, n, phase, sub.seen[n], sub.seen)
			}
		}
	}
	t.Logf("%s: %d publishes accepted, %d answered unavailable; each delivered once on both nodes", phase, len(acked), k+1-len(acked))
	return firstOK, gotA, gotB
}

// drain discards what c has received so far.
func drain(c *wsClient) {
	for {
		if _, err := c.readMsg(30 * time.Millisecond); err != nil {
			return
		}
	}
}

// TestReloadToAnotherTopology: a reload that moves a node from a standalone
// Redis to a cluster builds a new hub on the cluster: the old connections
// are told 1012, the standalone Redis loses the node's pub/sub connection,
// and new connections publish and subscribe through the cluster (sharded).
func TestReloadToAnotherTopology(t *testing.T) {
	rs := redistest.Start(t)
	n := startCaddy(t, "A", chatRoutes(rs.URL()))
	old := dialJSON(t, "before", n.wsURL("/ws"))
	old.subscribe("room:moved")
	old.mustPublish("room:moved", map[string]int{"n": 1})
	old.expectMessage("room:moved", 5*time.Second)

	cluster := redistest.StartCluster(t, 3, 0)
	n.reload(t, fmt.Sprintf("\tchat /ws {\n\t\tredis_cluster %s\n\t\trate_limit off\n\t}", strings.Join(cluster.Addrs(), " ")))
	code, err := old.waitClosed(10 * time.Second)
	if err != nil || code != 1012 {
		t.Fatalf("old connection after the reload to a cluster: code %d, %v; want 1012 (service restart)", code, err)
	}
	eventually(t, 10*time.Second, "the standalone Redis lost the node's pub/sub connection", func() (bool, string) {
		got := numSub(t, rs, "chat:room:moved")
		return got == 0, fmt.Sprintf("NUMSUB chat:room:moved = %d", got)
	})

	sub := dialJSON(t, "after", n.wsURL("/ws"))
	sub.subscribe("room:moved")
	pub := dialJSON(t, "pub", n.wsURL("/ws"))
	pub.mustPublish("room:moved", map[string]int{"n": 2})
	if m := sub.expectMessage("room:moved", 5*time.Second); string(m.Data) != `{"n":2}` {
		t.Fatalf("after the reload: got %s, want data {\"n\":2}", m)
	}
	owner := cluster.Owner("chat:room:moved")
	ctx, cancel := redisCtx()
	defer cancel()
	shard, err := owner.Client().PubSubShardNumSub(ctx, "chat:room:moved").Result()
	if err != nil || shard["chat:room:moved"] != 1 {
		t.Fatalf("PUBSUB SHARDNUMSUB on the slot's master: %v, %v; want 1 (the reloaded node)", shard, err)
	}
}
