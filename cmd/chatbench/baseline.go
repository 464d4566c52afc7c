package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// runBaseline runs a delivery measurement (runFanout or runRooms) against a
// bare coder/websocket broadcast server: what the same clients get with no
// Caddy and no broker in the way. The server runs in this process. When both
// ends of every connection would not fit in this process's RLIMIT_NOFILE,
// the same server runs in a child process of this binary instead (its CPU
// use is then reported like a node's).
func runBaseline(ctx context.Context, cfg *config, name string, conns int, measure func(ctx context.Context, cfg *config, name string, urls []string, pids []int) (*scenarioResult, error)) (*scenarioResult, error) {
	need := uint64(2*conns + 64)
	if cur, _, err := raiseNoFile(); err == nil && need > cur {
		url, pid, stop, err := startBaselineChild(baselineQueue, "")
		if err != nil {
			return &scenarioResult{Scenario: name}, fmt.Errorf("%d connections need about %d file descriptors for both ends in one process (RLIMIT_NOFILE %d), and the baseline server could not run as a child process: %v", conns, need, cur, err)
		}
		defer stop()
		logf(cfg, "[%s] server in child process %d on %s", name, pid, url)
		res, err := measure(ctx, cfg, name, []string{url}, []int{pid})
		res.Server = fmt.Sprintf("child process %d", pid)
		return res, err
	}
	srv, err := startBaselineServer(baselineQueue, "")
	if err != nil {
		return &scenarioResult{Scenario: name}, err
	}
	defer srv.close()
	logf(cfg, "[%s] in-process server on %s", name, srv.url)
	res, err := measure(ctx, cfg, name, []string{srv.url}, nil)
	res.Server = "in-process"
	return res, err
}

// runBaselineIdle runs the idle measurement against the bare server, always
// in a child process: its VmRSS is then the server's alone, as a node's is.
func runBaselineIdle(ctx context.Context, cfg *config, name string) (*scenarioResult, error) {
	url, pid, stop, err := startBaselineChild(baselineIdleQueue, "")
	if err != nil {
		return &scenarioResult{Scenario: name}, fmt.Errorf("the baseline server could not run as a child process: %v", err)
	}
	defer stop()
	logf(cfg, "[%s] server in child process %d on %s", name, pid, url)
	res, err := runIdle(ctx, cfg, name, []string{url}, []int{pid})
	res.Server = fmt.Sprintf("child process %d", pid)
	return res, err
}

// baselineQueue is the frames that may wait for one subscriber, like the
// send_queue a node under test should be given.
const baselineQueue = 1024

// baselineIdleQueue is the bare server's send channel in baseline-idle: a
// channel of baselineQueue slots is 24 KiB per connection by itself, which
// no server built for many idle connections would allocate up front.
const baselineIdleQueue = 16

// serveBaselineFlag makes the binary the baseline server: it prints the URL
// on stdout and serves until stdin is closed (its parent ended). An
// argument after it is the send channel's size; a second, a Redis URL the
// server is bridged through (bridge.go).
const serveBaselineFlag = "-serve-baseline"

func serveBaselineChild(args []string) int {
	raiseNoFile()
	queue := baselineQueue
	if len(args) > 0 {
		n, err := strconv.Atoi(args[0])
		if err != nil || n < 1 {
			fmt.Fprintln(os.Stderr, "chatbench baseline server: bad queue size", args[0])
			return 2
		}
		queue = n
	}
	redisURL := ""
	if len(args) > 1 {
		redisURL = args[1]
	}
	srv, err := startBaselineServer(queue, redisURL)
	if err != nil {
		fmt.Fprintln(os.Stderr, "chatbench baseline server:", err)
		return 1
	}
	fmt.Println(srv.url)
	io.Copy(io.Discard, os.Stdin)
	srv.close()
	return 0
}

// startBaselineChild starts this binary as the baseline server (bridged
// through Redis at redisURL unless it is "") and returns its URL and pid,
// and a function that ends it.
func startBaselineChild(queue int, redisURL string) (url string, pid int, stop func(), err error) {
	exe, err := os.Executable()
	if err != nil {
		return "", 0, nil, err
	}
	args := []string{serveBaselineFlag, strconv.Itoa(queue)}
	if redisURL != "" {
		args = append(args, redisURL)
	}
	cmd := exec.Command(exe, args...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return "", 0, nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return "", 0, nil, err
	}
	if err := cmd.Start(); err != nil {
		return "", 0, nil, err
	}
	stop = func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "ws://") {
		stop()
		return "", 0, nil, fmt.Errorf("child did not report its address (%q, %v)", line, err)
	}
	return strings.TrimSpace(line), cmd.Process.Pid, stop, nil
}

// baselineServer speaks just enough of the JSON protocol for the fanout
// clients: a welcome on connect, ok for subscribe, ok+message_id for publish,
// and one delivery frame per publish, built once and queued to every
// subscriber's buffered channel, written by that connection's own goroutine.
type baselineServer struct {
	url   string
	ln    net.Listener
	http  *http.Server
	queue int

	mu       sync.RWMutex
	channels map[string]map[*baseConn]struct{}
	conns    map[*baseConn]struct{}
	nextID   atomic.Int64

	// bridge, when set, carries publishes through Redis (bridge.go): a
	// message reaches the members of every server bridged to the same Redis.
	bridge *bridge
}

type baseConn struct {
	ws   *websocket.Conn
	send chan []byte
	once sync.Once
	gone chan struct{}
	slow atomic.Bool // dropped because its queue was full
	// acks: the bridged publishes waiting for Redis, answered in order by
	// their own goroutine (bridge.go); made by the first one.
	acks chan bridgeAck
}

func startBaselineServer(queue int, redisURL string) (*baselineServer, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &baselineServer{
		ln:       ln,
		queue:    queue,
		url:      "ws://" + ln.Addr().String() + "/ws",
		channels: map[string]map[*baseConn]struct{}{},
		conns:    map[*baseConn]struct{}{},
	}
	if redisURL != "" {
		if s.bridge, err = newBridge(redisURL, s.deliver); err != nil {
			ln.Close()
			return nil, err
		}
	}
	s.http = &http.Server{Handler: http.HandlerFunc(s.serve), ReadHeaderTimeout: 10 * time.Second, ErrorLog: log.New(io.Discard, "", 0)}
	go s.http.Serve(ln)
	return s, nil
}

func (s *baselineServer) close() {
	s.http.Close() // the listener; hijacked connections are ours
	if s.bridge != nil {
		defer s.bridge.close()
	}
	s.mu.Lock()
	conns := make([]*baseConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.drop()
		c.ws.CloseNow()
	}
}

// drop stops c's writer; the connection is closed by whoever ends first.
func (c *baseConn) drop() { c.once.Do(func() { close(c.gone) }) }

func (s *baselineServer) serve(w http.ResponseWriter, r *http.Request) {
	ws, err := websocket.Accept(w, r, nil)
	if err != nil {
		return
	}
	ws.SetReadLimit(1 << 20)
	c := &baseConn{ws: ws, send: make(chan []byte, s.queue), gone: make(chan struct{})}
	s.mu.Lock()
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		var left []string
		for channel, subs := range s.channels {
			if _, ok := subs[c]; ok {
				delete(subs, c)
				left = append(left, channel)
			}
		}
		s.mu.Unlock()
		c.drop()
		if s.bridge != nil {
			for _, channel := range left {
				s.bridge.leave(channel)
			}
		}
	}()
	go s.write(c)
	c.enqueue([]byte(`{"type":"welcome","conn":"b` + strconv.FormatInt(s.nextID.Add(1), 10) + `","node":"baseline","user":""}`))

	var f struct {
		Op      string          `json:"op"`
		Channel string          `json:"channel"`
		ID      json.RawMessage `json:"id"`
		Data    json.RawMessage `json:"data"`
	}
	for {
		_, b, err := ws.Read(context.Background())
		if err != nil {
			return
		}
		f.Op, f.Channel, f.ID, f.Data = "", "", nil, nil
		if err := json.Unmarshal(b, &f); err != nil {
			c.enqueue(errorFrame(nil, "bad_request", "malformed JSON"))
			continue
		}
		switch f.Op {
		case "subscribe":
			if err := s.join(c, f.Channel); err != nil {
				c.enqueue(errorFrame(f.ID, "unavailable", err.Error()))
				continue
			}
			c.enqueue(okFrame(f.ID, f.Channel, ""))
		case "publish":
			if len(f.Data) == 0 {
				c.enqueue(errorFrame(f.ID, "bad_request", `publish needs "data"`))
				continue
			}
			now := time.Now()
			msgID := strconv.FormatInt(now.UnixMilli(), 10) + "-b-" + strconv.FormatInt(s.nextID.Add(1), 10)
			ok := okFrame(f.ID, f.Channel, msgID)
			frame := fmt.Appendf(nil, `{"type":"message","channel":%q,"id":%q,"from":"","ts":%d,"data":%s}`, f.Channel, msgID, now.UnixMilli(), f.Data)
			if s.bridge != nil {
				s.bridge.publish(c, f.Channel, frame, ok, errorFrame(f.ID, "unavailable", "Redis did not take the message"))
				continue
			}
			c.enqueue(ok)
			s.deliver(f.Channel, frame)
		default:
			c.enqueue(errorFrame(f.ID, "bad_request", "unsupported op"))
		}
	}
}

// join makes c a member of channel; a bridged server first holds a Redis
// subscription to it.
func (s *baselineServer) join(c *baseConn, channel string) error {
	s.mu.RLock()
	_, member := s.channels[channel][c]
	s.mu.RUnlock()
	if member {
		return nil
	}
	if s.bridge != nil {
		if err := s.bridge.join(channel); err != nil {
			return err
		}
	}
	s.mu.Lock()
	subs := s.channels[channel]
	if subs == nil {
		subs = map[*baseConn]struct{}{}
		s.channels[channel] = subs
	}
	subs[c] = struct{}{}
	s.mu.Unlock()
	return nil
}

// deliver queues frame to every member of channel on this server.
func (s *baselineServer) deliver(channel string, frame []byte) {
	s.mu.RLock()
	for sub := range s.channels[channel] {
		sub.enqueue(frame)
	}
	s.mu.RUnlock()
}

// enqueue never blocks: a subscriber whose queue is full is dropped as a
// slow consumer (4000), as the real server does.
func (c *baseConn) enqueue(b []byte) {
	select {
	case c.send <- b:
	case <-c.gone:
	default:
		c.slow.Store(true)
		c.drop()
	}
}

func (s *baselineServer) write(c *baseConn) {
	for {
		select {
		case b := <-c.send:
			if err := c.ws.Write(context.Background(), websocket.MessageText, b); err != nil {
				c.drop()
				c.ws.CloseNow()
				return
			}
		case <-c.gone:
			if c.slow.Load() {
				c.ws.Close(websocket.StatusCode(4000), "slow consumer")
			} else {
				c.ws.CloseNow() // the reader ended: the peer is gone
			}
			return
		}
	}
}

func okFrame(id json.RawMessage, channel, msgID string) []byte {
	b := []byte(`{"type":"ok"`)
	if len(id) > 0 {
		b = append(b, `,"id":`...)
		b = append(b, id...)
	}
	b = fmt.Appendf(b, `,"channel":%q`, channel)
	if msgID != "" {
		b = fmt.Appendf(b, `,"message_id":%q`, msgID)
	}
	return append(b, '}')
}

func errorFrame(id json.RawMessage, code, message string) []byte {
	b := []byte(`{"type":"error"`)
	if len(id) > 0 {
		b = append(b, `,"id":`...)
		b = append(b, id...)
	}
	return fmt.Appendf(b, `,"code":%q,"message":%q}`, code, message)
}
