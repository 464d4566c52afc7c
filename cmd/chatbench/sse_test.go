package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// serveSSE is the fake server's SSE transport: the welcome, then the ok of
// every channel of the query, then deliveries, each a "data:" line; it
// sends an id line and keep-alive comments too, which the reader skips.
func (s *fakeServer) serveSSE(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	c := &fakeConn{w: w}
	c.mu.Lock()
	io.WriteString(w, ":\n\n")
	c.sendSSE([]byte(`{"type":"welcome","conn":"c1","node":"fake","user":"","transport":"sse","session":"s1"}`))
	c.mu.Unlock()
	for _, ch := range r.URL.Query()["channel"] {
		s.mu.Lock()
		s.channels[ch] = append(s.channels[ch], c)
		s.mu.Unlock()
		c.send([]byte(`{"type":"ok","channel":"` + ch + `"}`))
	}
	<-r.Context().Done()
	c.mu.Lock()
	c.ended = true
	c.mu.Unlock()
}

// sendSSE writes one event; c.mu is held.
func (c *fakeConn) sendSSE(b []byte) {
	if c.ended {
		return
	}
	fmt.Fprintf(c.w, "id: room:x=1-0~e\ndata: %s\n\n", b)
	c.w.(http.Flusher).Flush()
}

func TestReadEvent(t *testing.T) {
	stream := "" +
		":\n\n" + // keep-alive comment, no event
		"data: {\"type\":\"welcome\"}\n\n" +
		"id: room:1=1-0~ab,room:2=2-0~cd\ndata: {\"a\":1}\n\n" +
		"event: x\r\ndata:{\"b\":2}\r\n\r\n" + // CRLF, no space after the colon
		"data: {\"c\":\ndata: 3}\n\n" + // two data lines, joined with \n
		"retry: 10\n\n" + // no data: no event
		"data\n\n" + // a data field without a value: one empty line
		"dataX: nope\ndata:  two spaces\n\n" + // only the first space goes
		"data: " + strings.Repeat("x", 3*sseReadBuffer) + "\n\n" + // longer than the reader's buffer
		"data: cut off" // no blank line: not an event
	want := []string{
		`{"type":"welcome"}`,
		`{"a":1}`,
		`{"b":2}`,
		"{\"c\":\n3}",
		"",
		" two spaces",
		strings.Repeat("x", 3*sseReadBuffer),
	}
	br := bufio.NewReaderSize(strings.NewReader(stream), sseReadBuffer)
	var buf []byte
	var err error
	for i, w := range want {
		buf, err = readEvent(br, buf)
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if string(buf) != w {
			t.Fatalf("event %d: %.80q, want %.80q", i, buf, w)
		}
	}
	if buf, err = readEvent(br, buf); err != io.EOF || len(buf) != 0 {
		t.Fatalf("after the last event: %q, %v; want io.EOF", buf, err)
	}
}

func TestReadEventNoAllocs(t *testing.T) {
	ev := `id: bench=1-0~e` + "\n" + `data: {"type":"message","channel":"bench:fanout:x","id":"1-0","from":"","ts":1,"data":{"seq":3,"t":1764060000000123456,"pad":"xxxxxxxx"}}` + "\n\n"
	r := strings.NewReader("")
	br := bufio.NewReaderSize(r, sseReadBuffer)
	buf := make([]byte, 0, 512)
	allocs := testing.AllocsPerRun(100, func() {
		r.Reset(ev)
		br.Reset(r)
		var err error
		if buf, err = readEvent(br, buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per event, want 0", allocs)
	}
}

func TestSSEURL(t *testing.T) {
	for in, want := range map[string]string{
		"ws://127.0.0.1:8081/ws":     "http://127.0.0.1:8081/ws?channel=bench%3Afanout%3A1",
		"wss://example.com/chat?x=1": "https://example.com/chat?channel=bench%3Afanout%3A1&x=1",
		"http://127.0.0.1:8081/ws":   "http://127.0.0.1:8081/ws?channel=bench%3Afanout%3A1",
	} {
		got, err := sseURL(in, "bench:fanout:1")
		if err != nil || got != want {
			t.Errorf("sseURL(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestFanoutOverSSE(t *testing.T) {
	_, urls := startFake(t, 2, 5, 7)
	cfg := testConfig(urls)
	cfg.transport = "sse"
	res, err := runFanout(context.Background(), cfg, "fanout", urls, nil)
	p := onePhase(t, res, err)
	checkCounts(t, p, int64(cfg.subs*cfg.messages), 1, 1)
	if res.Connections != cfg.subs || res.Transport != "sse" || res.label() != "fanout/sse" {
		t.Errorf("connections %d transport %q label %q", res.Connections, res.Transport, res.label())
	}
}

func TestIdleOverSSE(t *testing.T) {
	s, urls := startFake(t, 2, 0, 0)
	cfg := testConfig(urls)
	cfg.transport = "sse"
	res, err := runIdle(context.Background(), cfg, "idle", cfg.urls, cfg.pids)
	if err != nil {
		t.Fatal(err)
	}
	if res.Connections != cfg.clients || res.Idle.Disconnected != 0 {
		t.Errorf("connections %d, disconnected %d", res.Connections, res.Idle.Disconnected)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.channels) != cfg.clients {
		t.Errorf("%d channels subscribed, want %d", len(s.channels), cfg.clients)
	}
}

// A stream the server ends with a close event reports its code; a refused
// stream reports the status and body.
func TestSSECloseAndRefusal(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("channel") == "refused" {
			http.Error(w, `{"error":{"code":"unauthorized"}}`, http.StatusUnauthorized)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: {\"type\":\"welcome\",\"conn\":\"c9\",\"node\":\"n\",\"session\":\"s\"}\n\n")
		io.WriteString(w, "data: {\"type\":\"ok\",\"channel\":\"room:1\"}\n\n")
		w.(http.Flusher).Flush()
		time.Sleep(50 * time.Millisecond)
		io.WriteString(w, "data: {\"type\":\"close\",\"code\":4000,\"reason\":\"slow consumer\"}\n\n")
	}))
	defer srv.Close()
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
	d, err := newDialer([]string{url}, 1, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer d.close()
	c, err := d.connectSSE(context.Background(), 0, 0, "room:1")
	if err != nil {
		t.Fatal(err)
	}
	if c.connID != "c9" {
		t.Errorf("conn id %q", c.connID)
	}
	p := newPool(1)
	p.clients[0] = c
	c.run(p.onDisconnect)
	<-c.done
	if got := p.codes(); got["4000"] != 1 || p.disconnected.Load() != 1 {
		t.Errorf("close codes %v, disconnected %d; want 4000 once", got, p.disconnected.Load())
	}

	_, err = d.connectSSE(context.Background(), 1, 0, "refused")
	if err == nil || !strings.Contains(err.Error(), "HTTP 401") || !strings.Contains(err.Error(), "unauthorized") {
		t.Errorf("refused stream: %v", err)
	}
	var sc *sseClosed
	if errors.As(err, &sc) {
		t.Errorf("a refusal is not a close event: %v", err)
	}
}

func TestTransportFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		ok   bool
	}{
		{[]string{"-transport", "sse", "-scenario", "fanout,idle"}, true},
		{[]string{"-transport", "websocket", "-scenario", "rooms"}, true},
		{[]string{"-transport", "sse", "-scenario", "fanout,baseline"}, false},
		{[]string{"-transport", "sse", "-scenario", "rooms"}, false},
		{[]string{"-transport", "h3"}, false},
	} {
		cfg, err := parseFlags(tc.args, io.Discard)
		if (err == nil) != tc.ok {
			t.Errorf("%v: err %v", tc.args, err)
		}
		if err == nil && cfg.transport != tc.args[1] {
			t.Errorf("%v: transport %q", tc.args, cfg.transport)
		}
	}
}
