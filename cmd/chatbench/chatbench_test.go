package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestMain lets the test binary act as the baseline child process.
func TestMain(m *testing.M) {
	if len(os.Args) >= 2 && os.Args[1] == serveBaselineFlag {
		os.Exit(serveBaselineChild(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// fakeServer is an in-test chat server speaking the JSON protocol, written
// independently of the baseline server, with two faults to inject:
// the dropAt-th publish (counting from 1, over all channels) is not
// delivered to the second subscriber of its channel, and the dupAt-th
// publish is delivered twice to the first subscriber. It can listen on
// several addresses ("nodes") that share one broker.
type fakeServer struct {
	dropAt, dupAt int
	// strict: frames it does not serve get a bad_request error reply;
	// maxFrames > 0: a connection that sends more is closed with 4003.
	strict    bool
	maxFrames int
	// Bounded latency (overload_test.go): every refuseEvery-th publish is
	// answered unavailable and not published; skip(n, i) says publish n is
	// not sent to the channel's i-th subscriber but owed to it in a gap
	// frame, sent before its next message or, when gapNow(i), at once;
	// delay > 0 sends publish n's deliveries n×delay after it arrives.
	refuseEvery int
	skip        func(n, i int) bool
	gapNow      func(i int) bool
	delay       time.Duration
	owed        map[*fakeConn]int64
	// What the faults did: publishes refused, messages reported in gap
	// frames and the frames.
	refused, reported, gapFrames int64

	mu        sync.Mutex
	channels  map[string][]*fakeConn
	published int
	servers   []*httptest.Server
}

type fakeConn struct {
	ws *websocket.Conn
	mu sync.Mutex // one writer at a time, to keep each subscriber's order

	// An SSE stream instead (ws nil); ended: its handler returned.
	w     http.ResponseWriter
	ended bool
}

func (c *fakeConn) send(b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ws == nil {
		c.sendSSE(b)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c.ws.Write(ctx, websocket.MessageText, b)
}

// startFake starts nodes listeners and returns their ws:// URLs.
func startFake(t *testing.T, nodes, dropAt, dupAt int) (*fakeServer, []string) {
	t.Helper()
	s := &fakeServer{dropAt: dropAt, dupAt: dupAt, channels: map[string][]*fakeConn{}}
	var urls []string
	for range nodes {
		srv := httptest.NewServer(http.HandlerFunc(s.serve))
		s.servers = append(s.servers, srv)
		urls = append(urls, "ws"+strings.TrimPrefix(srv.URL, "http")+"/ws")
	}
	t.Cleanup(func() {
		for _, srv := range s.servers {
			srv.CloseClientConnections()
			srv.Close()
		}
	})
	return s, urls
}

func (s *fakeServer) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && r.Header.Get("Accept") == "text/event-stream" {
		s.serveSSE(w, r)
		return
	}
	ws, err := websocket.Accept(w, r, nil)
	if err != nil {
		return
	}
	defer ws.CloseNow()
	c := &fakeConn{ws: ws}
	c.send([]byte(`{"type":"welcome","conn":"c1","node":"fake","user":""}`))
	for frames := 1; ; frames++ {
		_, b, err := ws.Read(context.Background())
		if err != nil {
			return
		}
		if s.maxFrames > 0 && frames > s.maxFrames {
			ws.Close(4003, "rate limited")
			return
		}
		var f struct {
			Op      string          `json:"op"`
			Channel string          `json:"channel"`
			ID      json.RawMessage `json:"id"`
			Data    json.RawMessage `json:"data"`
		}
		if json.Unmarshal(b, &f) != nil {
			if s.strict {
				c.send([]byte(`{"type":"error","code":"bad_request","message":"malformed"}`))
			}
			continue
		}
		switch f.Op {
		default:
			if s.strict {
				c.send([]byte(`{"type":"error","code":"bad_request","message":"unknown op"}`))
			}
		case "subscribe":
			s.mu.Lock()
			s.channels[f.Channel] = append(s.channels[f.Channel], c)
			s.mu.Unlock()
			c.send([]byte(`{"type":"ok","id":` + string(f.ID) + `,"channel":"` + f.Channel + `"}`))
		case "publish":
			s.mu.Lock()
			s.published++
			n := s.published
			if s.refuseEvery > 0 && n%s.refuseEvery == 0 {
				s.refused++
				s.mu.Unlock()
				c.send([]byte(`{"type":"error","id":` + string(f.ID) + `,"code":"unavailable","message":"deliveries are running late on this node; retry later"}`))
				continue
			}
			subs := append([]*fakeConn(nil), s.channels[f.Channel]...)
			msg := []byte(`{"type":"message","channel":"` + f.Channel + `","id":"m` + string(f.ID) + `","from":"","ts":1,"data":` + string(f.Data) + `}`)
			// Deliver before answering, under the lock, so that every
			// subscriber sees the publishes in one order.
			for i, sub := range subs {
				if n == s.dropAt && i == 1 {
					continue
				}
				if s.skip != nil && s.skip(n, i) {
					s.owe(sub, f.Channel, i)
					continue
				}
				s.payGap(sub, f.Channel)
				if s.delay > 0 {
					go func() {
						time.Sleep(time.Duration(n) * s.delay)
						sub.send(msg)
					}()
					continue
				}
				sub.send(msg)
				if n == s.dupAt && i == 0 {
					sub.send(msg)
				}
			}
			s.mu.Unlock()
			c.send([]byte(`{"type":"ok","id":` + string(f.ID) + `,"channel":"` + f.Channel + `","message_id":"m"}`))
		}
	}
}

// testConfig is a small, quick configuration against urls.
func testConfig(urls []string) *config {
	cfg := defaultConfig()
	cfg.urls = urls
	cfg.sources = 2
	cfg.connectConcurrency = 8
	cfg.connectTimeout = 5 * time.Second
	cfg.timeout = 30 * time.Second
	cfg.out = ""
	cfg.subs = 6
	cfg.messages = 20
	cfg.rate = 0
	cfg.inflight = 4
	cfg.drain = 300 * time.Millisecond
	cfg.clients = 8
	cfg.roomSize = 4
	cfg.clientRate = 25
	cfg.duration = 400 * time.Millisecond
	cfg.hold = 200 * time.Millisecond
	cfg.settle = 50 * time.Millisecond
	return cfg
}

func onePhase(t *testing.T, res *scenarioResult, err error) *deliveryPhase {
	t.Helper()
	if err != nil {
		t.Fatalf("scenario failed: %v", err)
	}
	if len(res.Phases) != 1 {
		t.Fatalf("want 1 phase, got %d", len(res.Phases))
	}
	return res.Phases[0]
}

func checkCounts(t *testing.T, p *deliveryPhase, expected, lost, dups int64) {
	t.Helper()
	if p.Expected != expected || p.Lost != lost || p.Duplicates != dups || p.OutOfOrder != 0 || p.Disconnected != 0 || p.Stray != 0 {
		t.Errorf("expected=%d lost=%d dup=%d ooo=%d disc=%d stray=%d; want expected=%d lost=%d dup=%d and no ooo, disconnects or strays",
			p.Expected, p.Lost, p.Duplicates, p.OutOfOrder, p.Disconnected, p.Stray, expected, lost, dups)
	}
	if p.Received != expected-lost {
		t.Errorf("received %d, want %d", p.Received, expected-lost)
	}
	if p.Deliveries != expected-lost+dups {
		t.Errorf("deliveries %d, want %d", p.Deliveries, expected-lost+dups)
	}
	if p.Latency.Count != uint64(expected-lost) || p.Latency.P99MS <= 0 || p.DeliveriesPerSec <= 0 {
		t.Errorf("latency count %d p99 %v, deliveries/s %v", p.Latency.Count, p.Latency.P99MS, p.DeliveriesPerSec)
	}
	if p.PublishOK != p.Published || p.Unanswered != 0 || len(p.PublishErrors) != 0 {
		t.Errorf("published %d ok %d unanswered %d errors %v", p.Published, p.PublishOK, p.Unanswered, p.PublishErrors)
	}
}

func TestFanoutCounts(t *testing.T) {
	for _, tc := range []struct {
		name          string
		dropAt, dupAt int
		lost, dups    int64
	}{
		{"correct", 0, 0, 0, 0},
		{"drop", 5, 0, 1, 0},
		{"duplicate", 0, 7, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, urls := startFake(t, 2, tc.dropAt, tc.dupAt)
			cfg := testConfig(urls)
			res, err := runFanout(context.Background(), cfg, "fanout", urls, nil)
			p := onePhase(t, res, err)
			checkCounts(t, p, int64(cfg.subs*cfg.messages), tc.lost, tc.dups)
			if res.Connections != cfg.subs {
				t.Errorf("connections %d, want %d", res.Connections, cfg.subs)
			}
		})
	}
}

func TestRoomsCounts(t *testing.T) {
	for _, tc := range []struct {
		name          string
		dropAt, dupAt int
		lost, dups    int64
	}{
		{"correct", 0, 0, 0, 0},
		{"drop", 3, 0, 1, 0},
		{"duplicate", 0, 4, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, urls := startFake(t, 2, tc.dropAt, tc.dupAt)
			cfg := testConfig(urls)
			res, err := runRooms(context.Background(), cfg, "rooms", cfg.urls, nil)
			p := onePhase(t, res, err)
			// Every publish is expected by the 4 members of its room.
			if p.Published < int64(cfg.clients) {
				t.Fatalf("only %d publishes", p.Published)
			}
			checkCounts(t, p, 4*p.Published, tc.lost, tc.dups)
		})
	}
}

func TestStepRatesStopAtMaxP99(t *testing.T) {
	t.Parallel()
	_, urls := startFake(t, 1, 0, 0)
	cfg := testConfig(urls)
	cfg.stepRates = []float64{2000, 4000, 8000}
	cfg.maxP99 = 0 // every phase is over: stepping stops after the first
	res, err := runFanout(context.Background(), cfg, "fanout", urls, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Phases) != 1 || !res.Phases[0].OverMaxP99 {
		t.Fatalf("phases %d, over %v", len(res.Phases), len(res.Phases) > 0 && res.Phases[0].OverMaxP99)
	}

	cfg.maxP99 = time.Hour
	res, err = runFanout(context.Background(), cfg, "fanout", urls, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Phases) != 3 {
		t.Fatalf("phases %d, want 3", len(res.Phases))
	}
	for _, p := range res.Phases {
		checkCounts(t, p, int64(cfg.subs*cfg.messages), 0, 0)
	}
}

// TestReportFields runs fanout and baseline (and idle, reading this test's
// own RSS) through run and checks the table and the JSON file.
func TestReportFields(t *testing.T) {
	t.Parallel()
	_, urls := startFake(t, 2, 0, 0)
	cfg := testConfig(urls)
	cfg.scenarios = []string{"fanout", "baseline", "idle", "rooms", "baseline-rooms"}
	cfg.pids = []int{os.Getpid(), os.Getpid()}
	rep := run(context.Background(), cfg, []string{"-test"})
	if rep.Error != "" {
		t.Fatal(rep.Error)
	}
	if len(rep.Scenarios) != 5 {
		t.Fatalf("%d scenarios", len(rep.Scenarios))
	}
	base := rep.Scenarios[1].Phases[0]
	checkCounts(t, base, int64(cfg.subs*cfg.messages), 0, 0)
	if r := rep.Scenarios[0].Phases[0].BaselineRatio; r == nil || *r <= 0 {
		t.Errorf("fanout has no baseline ratio")
	}
	// The bare server puts every client of a room in it, as the fake does.
	roomsBase := rep.Scenarios[4].Phases[0]
	checkCounts(t, roomsBase, 4*roomsBase.Published, 0, 0)
	if r := rep.Scenarios[3].Phases[0].BaselineRatio; r == nil || *r <= 0 {
		t.Errorf("rooms has no baseline ratio")
	}

	var table bytes.Buffer
	writeTable(&table, rep)
	for _, col := range []string{"scenario", "deliveries/s", "vs_baseline", "p50_ms", "p90_ms", "p99_ms", "max_ms", "lost", "dup", "ooo", "pub_err", "disc",
		"conns/s", "connect_s", "tool_cores", "srv_cores", "srv_rss_MiB", "KiB/conn_settled", "KiB/conn_end", "fanout", "baseline", "idle", "rooms", "baseline-rooms", "all"} {
		if !strings.Contains(table.String(), col) {
			t.Errorf("table lacks %q:\n%s", col, table.String())
		}
	}

	path := filepath.Join(t.TempDir(), "results.json")
	if err := writeJSON(path, rep); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Host      map[string]any `json:"host"`
		Scenarios []struct {
			Scenario string           `json:"scenario"`
			Phases   []map[string]any `json:"phases"`
			Idle     map[string]any   `json:"idle"`
		} `json:"scenarios"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	if doc.Host["cpus"] == nil {
		t.Error("JSON lacks host.cpus")
	}
	fan := doc.Scenarios[0].Phases[0]
	for _, k := range []string{"deliveries_per_sec", "baseline_ratio", "latency", "lost", "duplicates", "out_of_order", "publish_errors", "subscribers_disconnected", "expected", "received", "cpu"} {
		if _, ok := fan[k]; !ok {
			t.Errorf("JSON fanout phase lacks %q", k)
		}
	}
	lat := fan["latency"].(map[string]any)
	for _, k := range []string{"p50_ms", "p90_ms", "p99_ms", "max_ms"} {
		if _, ok := lat[k]; !ok {
			t.Errorf("JSON latency lacks %q", k)
		}
	}
	idle := doc.Scenarios[2].Idle
	if idle == nil || len(idle["nodes"].([]any)) != 2 {
		t.Fatalf("JSON idle: %v", idle)
	}
	total := idle["total"].(map[string]any)
	for _, k := range []string{"kib_per_conn_settled", "kib_per_conn_end", "rss_before_kib", "conns"} {
		if _, ok := total[k]; !ok {
			t.Errorf("JSON idle total lacks %q", k)
		}
	}
	if total["rss_before_kib"].(float64) <= 0 {
		t.Errorf("no RSS reading: %v", total)
	}
}

// TestBaselineChild runs the baseline server as a child process, as
// chatbench does when the connections do not fit in one process.
func TestBaselineChild(t *testing.T) {
	t.Parallel()
	url, pid, stop, err := startBaselineChild(baselineQueue, "")
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	cfg := testConfig([]string{url})
	res, err := runFanout(context.Background(), cfg, "baseline", cfg.urls, []int{pid})
	p := onePhase(t, res, err)
	checkCounts(t, p, int64(cfg.subs*cfg.messages), 0, 0)
	if len(p.CPU.ServerSeconds) != 1 {
		t.Errorf("no CPU reading of the child: %+v", p.CPU)
	}
	if p.CPU.ServerRSSStartKiB <= 0 || p.CPU.ServerRSSPeakKiB < p.CPU.ServerRSSStartKiB {
		t.Errorf("no memory reading of the child: start %d KiB, peak %d KiB", p.CPU.ServerRSSStartKiB, p.CPU.ServerRSSPeakKiB)
	}
}

func TestConnectFailureSaysHowMany(t *testing.T) {
	t.Parallel()
	_, urls := startFake(t, 1, 0, 0)
	// A second node that refuses connections.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "ws://" + ln.Addr().String() + "/ws"
	ln.Close()
	cfg := testConfig(append(urls, dead))
	cfg.connectConcurrency = 1
	res, err := runFanout(context.Background(), cfg, "fanout", cfg.urls, nil)
	if err == nil {
		t.Fatal("no error")
	}
	// Clients alternate between the nodes: client 0 connects, client 1 fails.
	if !strings.Contains(err.Error(), "1 of 6 connections open") || res.Connections != 1 {
		t.Errorf("error %q, connections %d", err, res.Connections)
	}
}

func TestParseFlags(t *testing.T) {
	var stderr bytes.Buffer
	cfg, err := parseFlags([]string{"-url", "ws://a:1/ws, ws://b:2/ws", "-scenario", "fanout,idle", "-step-rates", "10,20", "-pids", "3,4"}, &stderr)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.urls) != 2 || len(cfg.scenarios) != 2 || len(cfg.stepRates) != 2 || len(cfg.pids) != 2 {
		t.Errorf("parsed %+v", cfg)
	}
	for _, bad := range [][]string{
		{"-scenario", "nope"},
		{"-url", "ws://a/ws,ws://b/ws", "-pids", "1"}, // one pid per node
		{"-step-rates", "x"},
		{"-subs", "0"},
	} {
		if _, err := parseFlags(bad, &stderr); err == nil {
			t.Errorf("%v: no error", bad)
		}
	}
}

// TestFanoutVariantsComparedWithFanout: fanout-history and fanout-hook run
// against -history-url and -hook-url and are reported relative to fanout
// from the same run.
func TestFanoutVariantsComparedWithFanout(t *testing.T) {
	t.Parallel()
	for _, variant := range []struct {
		scenario, flag string
		set            func(*config, []string)
	}{
		{"fanout-history", "-history-url", func(c *config, u []string) { c.historyURLs = u }},
		{"fanout-hook", "-hook-url", func(c *config, u []string) { c.hookURLs = u }},
	} {
		_, urls := startFake(t, 2, 0, 0)
		_, variantURLs := startFake(t, 2, 0, 0)
		cfg := testConfig(urls)
		variant.set(cfg, variantURLs)
		cfg.scenarios = []string{"fanout", variant.scenario}
		rep := run(context.Background(), cfg, []string{"-test"})
		if rep.Error != "" {
			t.Fatal(rep.Error)
		}
		h := rep.Scenarios[1]
		if h.Scenario != variant.scenario || fmt.Sprint(h.Targets) != fmt.Sprint(variantURLs) {
			t.Fatalf("%s ran against %v, want %v", variant.scenario, h.Targets, variantURLs)
		}
		checkCounts(t, h.Phases[0], int64(cfg.subs*cfg.messages), 0, 0)
		if r := h.Phases[0].BaselineRatio; r == nil || *r <= 0 {
			t.Errorf("%s has no ratio to fanout", variant.scenario)
		}
		if _, err := parseFlags([]string{"-scenario", variant.scenario}, io.Discard); err == nil {
			t.Errorf("%s without %s accepted", variant.scenario, variant.flag)
		}
	}
}
