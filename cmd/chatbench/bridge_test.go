package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/coder/websocket"
)

// bridgeFrame is what the tests read of a server's frames.
type bridgeFrame struct {
	Type    string          `json:"type"`
	ID      json.RawMessage `json:"id"`
	Channel string          `json:"channel"`
	Data    json.RawMessage `json:"data"`
	Code    string          `json:"code"`
}

type bridgeClient struct {
	ws     *websocket.Conn
	frames chan bridgeFrame
}

// dialBridge connects to url and reads the welcome.
func dialBridge(t *testing.T, url string) *bridgeClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := &bridgeClient{ws: ws, frames: make(chan bridgeFrame, 64)}
	t.Cleanup(func() { ws.CloseNow() })
	go func() {
		defer close(c.frames)
		for {
			_, b, err := ws.Read(context.Background())
			if err != nil {
				return
			}
			var f bridgeFrame
			json.Unmarshal(b, &f)
			c.frames <- f
		}
	}()
	if f := c.next(t, 5*time.Second); f.Type != "welcome" {
		t.Fatalf("first frame %+v, want a welcome", f)
	}
	return c
}

func (c *bridgeClient) send(t *testing.T, format string, args ...any) {
	t.Helper()
	if err := c.ws.Write(context.Background(), websocket.MessageText, fmt.Appendf(nil, format, args...)); err != nil {
		t.Fatal(err)
	}
}

// next is the next frame within d; a zero frame if none came.
func (c *bridgeClient) next(t *testing.T, d time.Duration) bridgeFrame {
	t.Helper()
	select {
	case f := <-c.frames:
		return f
	case <-time.After(d):
		return bridgeFrame{}
	}
}

// join subscribes c to channel and waits for the ok.
func (c *bridgeClient) join(t *testing.T, channel string) {
	t.Helper()
	c.send(t, `{"op":"subscribe","id":1,"channel":%q}`, channel)
	if f := c.next(t, 5*time.Second); f.Type != "ok" || f.Channel != channel {
		t.Fatalf("subscribe %s answered %+v", channel, f)
	}
}

// startBridged starts n bare servers in this process bridged through r.
func startBridged(t *testing.T, r *redistest.Server, n int) []string {
	t.Helper()
	var urls []string
	for range n {
		s, err := startBaselineServer(baselineQueue, r.URL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.close)
		urls = append(urls, s.url)
	}
	return urls
}

// TestBridgedRoomsCrossRedis: a message published on one bridged server
// reaches the room's members on the other (through Redis), and the
// scenario's rooms, spread over two bridged child processes, lose nothing.
func TestBridgedRoomsCrossRedis(t *testing.T) {
	t.Parallel()
	r := redistest.Start(t)
	urls := startBridged(t, r, 2)
	pub, far, other := dialBridge(t, urls[0]), dialBridge(t, urls[1]), dialBridge(t, urls[1])
	pub.join(t, "room:x")
	far.join(t, "room:x")
	other.join(t, "room:y")
	pub.send(t, `{"op":"publish","id":2,"channel":"room:x","data":{"n":1}}`)
	f := far.next(t, 5*time.Second)
	if f.Type != "message" || f.Channel != "room:x" || string(f.Data) != `{"n":1}` {
		t.Fatalf("the member on server 2 got %+v, want the message published on server 1", f)
	}
	got := map[string]bool{}
	for range 2 { // the ok and the sender's own copy, in either order
		got[pub.next(t, 5*time.Second).Type] = true
	}
	if !got["ok"] || !got["message"] {
		t.Errorf("the publisher got %v, want its ok and its message", got)
	}
	if f := other.next(t, 200*time.Millisecond); f.Type != "" {
		t.Errorf("a member of another room got %+v", f)
	}

	cfg := testConfig(nil)
	cfg.bridgeRedis = r.URL()
	cfg.scenarios = []string{"baseline-rooms-redis"}
	rep := run(context.Background(), cfg, []string{"-test"})
	if rep.Error != "" {
		t.Fatal(rep.Error)
	}
	res := rep.Scenarios[0]
	p := onePhase(t, res, nil)
	if len(res.Targets) != 2 || !strings.Contains(res.Server, "child processes") || len(p.CPU.ServerSeconds) != 2 {
		t.Errorf("ran against %v (%s), CPU of %d servers; want 2 child processes", res.Targets, res.Server, len(p.CPU.ServerSeconds))
	}
	// Rooms of 4 over 2 servers: every message crosses Redis to 2 members.
	checkCounts(t, p, 4*p.Published, 0, 0)
}

// TestBridgeSubscribesOnceAndAcksAfterRedis: a server holds one
// subscription per channel, however many of its clients joined it; a join
// is answered once Redis confirmed the subscription, a publish once Redis
// answered it (not while Redis is stopped); the last member's leaving ends
// the server's subscription.
func TestBridgeSubscribesOnceAndAcksAfterRedis(t *testing.T) {
	t.Parallel()
	r := redistest.Start(t)
	urls := startBridged(t, r, 2)
	var near, far []*bridgeClient
	for range 3 {
		c := dialBridge(t, urls[0])
		c.join(t, "room:a")
		near = append(near, c)
	}
	near[0].join(t, "room:b")
	for range 2 {
		c := dialBridge(t, urls[1])
		c.join(t, "room:a")
		far = append(far, c)
	}
	numsub := func(channel string) int64 {
		return r.Do("PUBSUB", "NUMSUB", bridgePrefix+channel).([]any)[1].(int64)
	}
	if a, b := numsub("room:a"), numsub("room:b"); a != 2 || b != 1 {
		t.Errorf("PUBSUB NUMSUB: room:a %d, room:b %d; want 2 (one per server) and 1", a, b)
	}
	// One SUBSCRIBE per server and channel, not one per member.
	if n := commandCalls(t, r, "subscribe"); n != 3 {
		t.Errorf("%d SUBSCRIBE commands for 3 (server, channel) pairs and 6 joins", n)
	}

	// While Redis is stopped, neither a join nor a publish is answered.
	late := dialBridge(t, urls[1])
	r.Pause()
	late.send(t, `{"op":"subscribe","id":3,"channel":"room:c"}`)
	near[1].send(t, `{"op":"publish","id":4,"channel":"room:a","data":{"n":1}}`)
	early := []bridgeFrame{late.next(t, 400*time.Millisecond), near[1].next(t, 10*time.Millisecond)}
	r.Resume()
	if early[0].Type != "" || early[1].Type != "" {
		t.Fatalf("answered while Redis was stopped: join %+v, publish %+v", early[0], early[1])
	}
	if f := late.next(t, 5*time.Second); f.Type != "ok" || string(f.ID) != "3" {
		t.Fatalf("join answered %+v after Redis resumed", f)
	}
	if n := numsub("room:c"); n != 1 {
		t.Errorf("join answered ok before the subscription held: NUMSUB room:c %d", n)
	}
	var ok bridgeFrame
	for range 2 { // the ok and the sender's own copy, in either order
		if f := near[1].next(t, 5*time.Second); f.Type != "message" {
			ok = f
		}
	}
	if ok.Type != "ok" || string(ok.ID) != "4" {
		t.Fatalf("publish answered %+v after Redis resumed", ok)
	}
	if n := commandCalls(t, r, "publish"); n != 1 {
		t.Errorf("%d PUBLISH commands, want 1", n)
	}

	for _, c := range far {
		c.ws.CloseNow()
	}
	deadline := time.Now().Add(5 * time.Second)
	for numsub("room:a") != 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := numsub("room:a"); n != 1 {
		t.Errorf("NUMSUB room:a %d after server 2's members left, want 1", n)
	}
}

// commandCalls is the calls of command in r's INFO commandstats.
func commandCalls(t *testing.T, r *redistest.Server, command string) int {
	t.Helper()
	info := r.Do("INFO", "commandstats").(string)
	m := regexp.MustCompile(`cmdstat_` + command + `:calls=(\d+)`).FindStringSubmatch(info)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// TestBridgedScenarioNeedsRedis: baseline-rooms-redis without -bridge-redis
// is refused with a message that names the flag, by the flags and by run.
func TestBridgedScenarioNeedsRedis(t *testing.T) {
	_, err := parseFlags([]string{"-scenario", "baseline-rooms,baseline-rooms-redis"}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "needs -bridge-redis") {
		t.Errorf("without -bridge-redis: %v", err)
	}
	for _, bad := range [][]string{
		{"-scenario", "baseline-rooms-redis", "-bridge-redis", "http://127.0.0.1:1"},
		{"-scenario", "baseline-rooms-redis", "-bridge-redis", "redis://127.0.0.1:1/0", "-bridge-nodes", "0"},
	} {
		if _, err := parseFlags(bad, io.Discard); err == nil {
			t.Errorf("%v: no error", bad)
		}
	}
	cfg, err := parseFlags([]string{"-scenario", "baseline-rooms-redis", "-bridge-redis", "redis://127.0.0.1:1/0", "-bridge-nodes", "3"}, io.Discard)
	if err != nil || cfg.bridgeNodes != 3 {
		t.Fatalf("with -bridge-redis: %v", err)
	}
	cfg = testConfig(nil)
	cfg.scenarios = []string{"baseline-rooms-redis"}
	if rep := run(context.Background(), cfg, nil); !strings.Contains(rep.Error, "needs -bridge-redis") {
		t.Errorf("run without -bridge-redis: %q", rep.Error)
	}
}

// TestRoomsRatioToBridgedBaseline: rooms is reported relative to the
// bridged baseline as well as to the bare one, in the JSON and the note;
// the bridged baseline relative to the bare one.
func TestRoomsRatioToBridgedBaseline(t *testing.T) {
	phase := func(dps, p99 float64) []*deliveryPhase {
		return []*deliveryPhase{{Phase: 1, DeliveriesPerSec: dps, Latency: latencySummary{P99MS: p99}}}
	}
	rep := &report{Scenarios: []*scenarioResult{
		{Scenario: "baseline-rooms", Phases: phase(1000, 2)},
		{Scenario: "baseline-rooms-redis", Phases: phase(800, 4)},
		{Scenario: "rooms", Phases: phase(400, 10)},
	}}
	addBaselineRatios(rep)
	bridged, rooms := rep.Scenarios[1].Phases[0], rep.Scenarios[2].Phases[0]
	if rooms.BridgedRatio == nil || *rooms.BridgedRatio != 0.5 || rooms.P99BridgedRatio == nil || *rooms.P99BridgedRatio != 2.5 {
		t.Errorf("rooms vs bridged: %v %v, want 0.5 and 2.5", ratioText(rooms.BridgedRatio), ratioText(rooms.P99BridgedRatio))
	}
	if rooms.BaselineRatio == nil || *rooms.BaselineRatio != 0.4 || bridged.BaselineRatio == nil || *bridged.BaselineRatio != 0.8 || bridged.BridgedRatio != nil {
		t.Errorf("ratios to baseline-rooms: rooms %v, bridged %v (bridged to itself %v)", ratioText(rooms.BaselineRatio), ratioText(bridged.BaselineRatio), ratioText(bridged.BridgedRatio))
	}
	b, _ := json.Marshal(rooms)
	if !bytes.Contains(b, []byte(`"bridged_baseline_ratio":0.5`)) || !bytes.Contains(b, []byte(`"p99_bridged_baseline_ratio":2.5`)) {
		t.Errorf("JSON: %s", b)
	}
	var table bytes.Buffer
	writeTable(&table, rep)
	if !strings.Contains(table.String(), "rooms phase 1: vs baseline-rooms-redis: deliveries/s 0.50, p99 2.50") {
		t.Errorf("no note of the bridged ratios:\n%s", table.String())
	}
}
