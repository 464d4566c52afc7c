package caddychat_test

// Multi-process end-to-end tests: a real Caddy binary built from ./cmd/caddy
// (once per test run), real redis-server processes (internal/redistest) and
// WebSocket clients speaking the JSON or raw protocol of PROTOCOL.md.
//
// Environment knobs:
//   CADDYCHAT_CADDY_BIN=/path/to/caddy  use a prebuilt binary instead of building
//   CADDYCHAT_E2E_RACE=0|1              build the binary without/with -race
//                                       (default: like the test binary)
//   CADDYCHAT_E2E_DEBUG=1               run the nodes with the `debug` global option

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/caddychat/caddychat/internal/redistest"
)

// ---------------------------------------------------------------------------
// The Caddy binary: built at most once per test run, shared by all tests.

var (
	e2eDir       string // removed by TestMain
	caddyOnce    sync.Once
	caddyBinPath string
	caddyErr     error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "caddychat-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: temp dir:", err)
		os.Exit(1)
	}
	e2eDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// raceEnabled reports whether this test binary was built with -race.
func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// caddyBinary returns the path of the Caddy binary with this module built in.
// The first caller builds it (go build -o <tmp>/caddy ./cmd/caddy); the build
// is skipped for runs that need no Caddy process, e.g. unit tests only.
func caddyBinary(t testing.TB) string {
	t.Helper()
	caddyOnce.Do(func() {
		if p := os.Getenv("CADDYCHAT_CADDY_BIN"); p != "" {
			caddyBinPath = p
			return
		}
		caddyBinPath = filepath.Join(e2eDir, "caddy")
		args := []string{"build", "-o", caddyBinPath}
		race := raceEnabled()
		if v := os.Getenv("CADDYCHAT_E2E_RACE"); v != "" {
			race = v == "1" || v == "true"
		}
		if race {
			args = append(args, "-race")
		}
		args = append(args, "./cmd/caddy")
		start := time.Now()
		out, err := exec.Command("go", args...).CombinedOutput()
		if err != nil {
			caddyErr = fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
			return
		}
		fmt.Fprintf(os.Stderr, "e2e: built caddy (race=%v) in %v\n", race, time.Since(start).Round(time.Millisecond))
	})
	if caddyErr != nil {
		t.Fatalf("building the caddy binary failed: %v", caddyErr)
	}
	return caddyBinPath
}

func freePort(t testing.TB) int {
	t.Helper()
	p, err := redistest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func freeAddr(t testing.TB) string {
	return "127.0.0.1:" + strconv.Itoa(freePort(t))
}

// ---------------------------------------------------------------------------
// Caddy node processes.

type node struct {
	t         testing.TB
	name      string
	addr      string // 127.0.0.1:port of the HTTP site
	admin     string // 127.0.0.1:port of the admin API ("" if unknown)
	dir       string
	caddyfile string
	logPath   string
	cmd       *exec.Cmd
	exited    chan struct{}
	stopOnce  sync.Once
}

// nodeCaddyfile is a whole Caddyfile for one node: test-safe global options
// and one site on addr whose body is routes.
func nodeCaddyfile(admin, storage, addr, routes string) string {
	var debugOpt string
	if os.Getenv("CADDYCHAT_E2E_DEBUG") == "1" {
		debugOpt = "\tdebug\n"
	}
	_, port, _ := net.SplitHostPort(addr)
	return fmt.Sprintf(`{
	admin %s
	default_bind 127.0.0.1
	persist_config off
	auto_https off
	storage file_system %s
%s}

http://:%s {
%s
}
`, admin, storage, debugOpt, port, routes)
}

// startNode writes a Caddyfile with routes as the site body and runs it.
func startNode(t testing.TB, name, routes string) *node {
	t.Helper()
	dir := t.TempDir()
	n := &node{t: t, name: name, dir: dir, addr: freeAddr(t), admin: freeAddr(t)}
	n.caddyfile = filepath.Join(dir, "Caddyfile")
	text := nodeCaddyfile(n.admin, filepath.Join(dir, "storage"), n.addr, routes)
	if err := os.WriteFile(n.caddyfile, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	n.run(t, []string{"run", "--config", n.caddyfile, "--adapter", "caddyfile"}, nil, "")
	return n
}

// run starts the binary with args, waits until n.addr accepts connections and
// registers the stop in t.Cleanup.
func (n *node) run(t testing.TB, args []string, extraEnv []string, workDir string) {
	t.Helper()
	bin := caddyBinary(t)
	n.logPath = filepath.Join(n.dir, "caddy.log")
	logf, err := os.Create(n.logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = workDir
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Env = append(os.Environ(),
		"XDG_DATA_HOME="+filepath.Join(n.dir, "xdg-data"),
		"XDG_CONFIG_HOME="+filepath.Join(n.dir, "xdg-config"),
		"HOME="+n.dir,
	)
	cmd.Env = append(cmd.Env, extraEnv...)
	// If the test binary dies without running cleanups (e.g. a test timeout),
	// the kernel kills the node too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("%s: start caddy: %v", n.name, err)
	}
	n.cmd = cmd
	n.exited = make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(n.exited)
	}()
	t.Cleanup(n.cleanup)

	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-n.exited:
			t.Fatalf("%s: caddy exited during start-up (%v); log %s:\n%s", n.name, cmd.ProcessState, n.logPath, n.logTail(60))
		default:
		}
		c, err := net.DialTimeout("tcp", n.addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s does not accept connections 30s after start; log %s:\n%s", n.name, n.addr, n.logPath, n.logTail(60))
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits; SIGKILL after timeout. It reports whether the
// process exited by itself.
func (n *node) stop(timeout time.Duration) bool {
	graceful := true
	n.stopOnce.Do(func() {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-n.exited:
		case <-time.After(timeout):
			graceful = false
			_ = n.cmd.Process.Kill()
			<-n.exited
		}
	})
	return graceful
}

func (n *node) cleanup() {
	if !n.stop(10 * time.Second) {
		n.t.Errorf("%s: caddy did not exit within 10s of SIGTERM; killed", n.name)
	}
	log, _ := os.ReadFile(n.logPath)
	if bytes.Contains(log, []byte("WARNING: DATA RACE")) {
		n.t.Errorf("%s: the race detector reported a data race; see log below", n.name)
	}
	if bytes.Contains(log, []byte("\npanic: ")) || bytes.HasPrefix(log, []byte("panic: ")) {
		n.t.Errorf("%s: caddy panicked; see log below", n.name)
	}
	if n.t.Failed() {
		n.t.Logf("%s: caddy log %s (last lines):\n%s", n.name, n.logPath, n.logTail(80))
	}
}

func (n *node) logTail(lines int) string {
	b, err := os.ReadFile(n.logPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}

func (n *node) wsURL(path string) string   { return "ws://" + n.addr + path }
func (n *node) httpURL(path string) string { return "http://" + n.addr + path }

// reload replaces the node's config with a Caddyfile whose site body is routes
// (same ports) and loads it through the admin API, forcing a reload even when
// the config is unchanged.
func (n *node) reload(t testing.TB, routes string) {
	t.Helper()
	text := nodeCaddyfile(n.admin, filepath.Join(n.dir, "storage"), n.addr, routes)
	if err := os.WriteFile(n.caddyfile, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(caddyBinary(t), "adapt", "--config", n.caddyfile, "--adapter", "caddyfile").Output()
	if err != nil {
		t.Fatalf("%s: caddy adapt: %v", n.name, err)
	}
	req, err := http.NewRequest(http.MethodPost, "http://"+n.admin+"/load", bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Cache-Control", "must-revalidate")
	resp, err := adminHTTP.Do(req)
	if err != nil {
		t.Fatalf("%s: POST /load: %v", n.name, err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: POST /load: %s: %s", n.name, resp.Status, body)
	}
}

// adminHTTP makes no keep-alive connections, so admin calls leave no idle
// connection goroutines behind in the node (goroutine counts stay comparable).
var adminHTTP = &http.Client{
	Timeout:   30 * time.Second,
	Transport: &http.Transport{DisableKeepAlives: true},
}

// goroutines reads "goroutine profile: total N" from the node's admin API.
func (n *node) goroutines(t testing.TB) int {
	t.Helper()
	resp, err := adminHTTP.Get("http://" + n.admin + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatalf("%s: goroutine profile: %v", n.name, err)
	}
	defer resp.Body.Close()
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: goroutine profile: %s %v %q", n.name, resp.Status, err, line)
	}
	var total int
	if _, err := fmt.Sscanf(line, "goroutine profile: total %d", &total); err != nil {
		t.Fatalf("%s: goroutine profile first line %q: %v", n.name, line, err)
	}
	return total
}

// chatRoutes is a JSON-protocol chat route on /ws backed by redisURL. The
// tests publish faster than the default per-connection rate limit allows.
func chatRoutes(redisURL string) string {
	return fmt.Sprintf("\tchat /ws {\n\t\tredis %s\n\t\trate_limit off\n\t}", redisURL)
}

// ---------------------------------------------------------------------------
// A WebSocket test client.

type frame struct {
	typ  websocket.MessageType
	data []byte
	at   time.Time // when the reader goroutine got it
}

// serverMsg is any JSON-protocol server frame.
type serverMsg struct {
	Type      string          `json:"type"`
	ID        json.RawMessage `json:"id"`
	Channel   string          `json:"channel"`
	MessageID string          `json:"message_id"`
	Code      string          `json:"code"`
	Message   string          `json:"message"`
	From      *string         `json:"from"`
	TS        int64           `json:"ts"`
	Data      json.RawMessage `json:"data"`
	Conn      string          `json:"conn"`
	Node      string          `json:"node"`
	User      *string         `json:"user"`
	// History: a kept message's epoch; a resume's outcome.
	Epoch     string `json:"epoch"`
	Recovered *bool  `json:"recovered"`
	Replayed  *int   `json:"replayed"`

	raw string
	at  time.Time
}

func (m *serverMsg) String() string { return m.raw }

type wsClient struct {
	t    testing.TB
	name string
	conn *websocket.Conn

	frames  chan frame    // filled by the reader goroutine, closed when it ends
	readErr error         // why the reader ended; valid once frames is closed
	done    chan struct{} // closed by cleanup: stops the reader
	pending []frame       // frames read ahead while waiting for a reply
	nextID  int

	welcome *serverMsg
	skip    string // raw clients: frames with this prefix are ignored by next
}

// dialWS opens a WebSocket with a same-origin Origin header (as a browser
// page served by the node would send) and starts the reader.
func dialWS(t testing.TB, name, url string) (*wsClient, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	host := strings.TrimPrefix(strings.TrimPrefix(url, "ws://"), "wss://")
	if i := strings.IndexByte(host, '/'); i >= 0 {
		host = host[:i]
	}
	conn, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		HTTPHeader: http.Header{"Origin": {"http://" + host}},
	})
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("%s: dial %s: %v (HTTP %s)", name, url, err, resp.Status)
		}
		return nil, fmt.Errorf("%s: dial %s: %v", name, url, err)
	}
	conn.SetReadLimit(1 << 20)
	c := &wsClient{
		t:      t,
		name:   name,
		conn:   conn,
		frames: make(chan frame, 4096),
		done:   make(chan struct{}),
	}
	go c.readLoop()
	t.Cleanup(func() {
		close(c.done)
		_ = c.conn.CloseNow()
	})
	return c, nil
}

func (c *wsClient) readLoop() {
	defer close(c.frames)
	for {
		typ, data, err := c.conn.Read(context.Background())
		if err != nil {
			c.readErr = err
			return
		}
		select {
		case c.frames <- frame{typ: typ, data: data, at: time.Now()}:
		case <-c.done:
			c.readErr = errors.New("client closed by test cleanup")
			return
		}
	}
}

// dialJSON connects to a JSON-protocol route and reads the welcome frame.
func dialJSON(t testing.TB, name, url string) *wsClient {
	t.Helper()
	c, err := dialWS(t, name, url)
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.readMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("%s: waiting for welcome: %v", name, err)
	}
	if m.Type != "welcome" || m.Conn == "" || m.Node == "" {
		t.Fatalf("%s: first frame is not a welcome with conn and node: %s", name, m)
	}
	c.welcome = m
	return c
}

// dialRaw connects to a raw-protocol route (no welcome frame).
func dialRaw(t testing.TB, name, url string) *wsClient {
	t.Helper()
	c, err := dialWS(t, name, url)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var errTimeout = errors.New("timed out")

// nextFrame returns the next frame (read-ahead frames first), skipping frames
// that start with c.skip.
func (c *wsClient) nextFrame(timeout time.Duration) (frame, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		var f frame
		if len(c.pending) > 0 {
			f, c.pending = c.pending[0], c.pending[1:]
		} else {
			var ok bool
			select {
			case f, ok = <-c.frames:
				if !ok {
					return frame{}, fmt.Errorf("%s: connection closed: %w", c.name, c.readErr)
				}
			case <-timer.C:
				return frame{}, fmt.Errorf("%s: no frame within %v: %w", c.name, timeout, errTimeout)
			}
		}
		if c.skip != "" && bytes.HasPrefix(f.data, []byte(c.skip)) {
			continue
		}
		return f, nil
	}
}

func parseMsg(f frame) (*serverMsg, error) {
	if f.typ != websocket.MessageText {
		return nil, fmt.Errorf("got a %v frame, want text: %q", f.typ, f.data)
	}
	m := &serverMsg{raw: string(f.data), at: f.at}
	if err := json.Unmarshal(f.data, m); err != nil {
		return nil, fmt.Errorf("frame is not JSON: %v: %q", err, f.data)
	}
	return m, nil
}

// readMsg returns the next JSON frame.
func (c *wsClient) readMsg(timeout time.Duration) (*serverMsg, error) {
	f, err := c.nextFrame(timeout)
	if err != nil {
		return nil, err
	}
	m, err := parseMsg(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", c.name, err)
	}
	return m, nil
}

func (c *wsClient) send(typ websocket.MessageType, p []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.conn.Write(ctx, typ, p); err != nil {
		return fmt.Errorf("%s: write: %v", c.name, err)
	}
	return nil
}

func (c *wsClient) sendText(s string) {
	c.t.Helper()
	if err := c.send(websocket.MessageText, []byte(s)); err != nil {
		c.t.Fatal(err)
	}
}

// request sends op with a fresh numeric id and returns the ok/error reply that
// carries that id. Other frames read meanwhile are kept for nextFrame.
func (c *wsClient) request(op map[string]any, timeout time.Duration) (*serverMsg, error) {
	c.nextID++
	id := c.nextID
	op["id"] = id
	b, err := json.Marshal(op)
	if err != nil {
		return nil, err
	}
	if err := c.send(websocket.MessageText, b); err != nil {
		return nil, err
	}
	want := strconv.Itoa(id)
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case f, ok := <-c.frames:
			if !ok {
				return nil, fmt.Errorf("%s: connection closed while waiting for the reply to %s: %w", c.name, b, c.readErr)
			}
			m, err := parseMsg(f)
			if err == nil && (m.Type == "ok" || m.Type == "error") && string(m.ID) == want {
				return m, nil
			}
			c.pending = append(c.pending, f)
		case <-timer.C:
			return nil, fmt.Errorf("%s: no reply to %s within %v: %w", c.name, b, timeout, errTimeout)
		}
	}
}

func (c *wsClient) subscribe(channel string) {
	c.t.Helper()
	m, err := c.request(map[string]any{"op": "subscribe", "channel": channel}, 10*time.Second)
	if err != nil {
		c.t.Fatal(err)
	}
	if m.Type != "ok" || m.Channel != channel {
		c.t.Fatalf("%s: subscribe %s: got %s", c.name, channel, m)
	}
}

// publish sends a publish op and returns the reply (ok or error).
func (c *wsClient) publish(channel string, data any) *serverMsg {
	c.t.Helper()
	m, err := c.publishErr(channel, data, 10*time.Second)
	if err != nil {
		c.t.Fatal(err)
	}
	return m
}

func (c *wsClient) publishErr(channel string, data any, timeout time.Duration) (*serverMsg, error) {
	return c.request(map[string]any{"op": "publish", "channel": channel, "data": data}, timeout)
}

// mustPublish publishes and fails unless the reply is ok with a message id.
func (c *wsClient) mustPublish(channel string, data any) *serverMsg {
	c.t.Helper()
	m := c.publish(channel, data)
	if m.Type != "ok" || m.Channel != channel || m.MessageID == "" {
		c.t.Fatalf("%s: publish to %s: want ok with channel and message_id, got %s", c.name, channel, m)
	}
	return m
}

// expectMessage requires the next frame to be a delivery on channel.
func (c *wsClient) expectMessage(channel string, timeout time.Duration) *serverMsg {
	c.t.Helper()
	m, err := c.readMsg(timeout)
	if err != nil {
		c.t.Fatal(err)
	}
	if m.Type != "message" || m.Channel != channel {
		c.t.Fatalf("%s: want a message on %s, got %s", c.name, channel, m)
	}
	return m
}

// expectText requires the next (non-skipped) frame to be the text frame want.
func (c *wsClient) expectText(want string, timeout time.Duration) {
	c.t.Helper()
	f, err := c.nextFrame(timeout)
	if err != nil {
		c.t.Fatalf("%s: waiting for text %q: %v", c.name, want, err)
	}
	if f.typ != websocket.MessageText || string(f.data) != want {
		c.t.Fatalf("%s: want text frame %q, got %v frame %q", c.name, want, f.typ, f.data)
	}
}

// waitClosed reads until the server closes the connection and returns the
// close status (-1 when the connection ended without a close frame).
func (c *wsClient) waitClosed(timeout time.Duration) (websocket.StatusCode, error) {
	deadline := time.Now().Add(timeout)
	for {
		_, err := c.nextFrame(time.Until(deadline))
		if err == nil {
			continue
		}
		if errors.Is(err, errTimeout) {
			return -1, err
		}
		return websocket.CloseStatus(c.readErr), nil
	}
}

// closeNormal performs a client-initiated close handshake (1000).
func (c *wsClient) closeNormal() {
	if err := c.conn.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		c.t.Logf("%s: close: %v", c.name, err)
	}
}

// dataN decodes {"n":N} from a delivery's data.
func dataN(m *serverMsg) (int, error) {
	var d struct {
		N *int `json:"n"`
	}
	if err := json.Unmarshal(m.Data, &d); err != nil || d.N == nil {
		return 0, fmt.Errorf("data is not {\"n\":<int>}: %s", m.Data)
	}
	return *d.N, nil
}

// eventually polls cond every 50ms until it returns true or timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true within %v; last seen: %s", what, timeout, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func redisCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 5*time.Second)
}

func numSub(t testing.TB, rs *redistest.Server, channel string) int64 {
	t.Helper()
	ctx, cancel := redisCtx()
	defer cancel()
	m, err := rs.Client().PubSubNumSub(ctx, channel).Result()
	if err != nil {
		t.Fatalf("PUBSUB NUMSUB %s: %v", channel, err)
	}
	return m[channel]
}

// pubsubClients counts the connections in pub/sub mode (CLIENT LIST TYPE pubsub).
func pubsubClients(t testing.TB, rs *redistest.Server) (int, string) {
	t.Helper()
	ctx, cancel := redisCtx()
	defer cancel()
	s, err := rs.Client().Do(ctx, "CLIENT", "LIST", "TYPE", "pubsub").Text()
	if err != nil {
		t.Fatalf("CLIENT LIST TYPE pubsub: %v", err)
	}
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, s
	}
	return len(strings.Split(s, "\n")), s
}

func redisPublish(t testing.TB, rs *redistest.Server, channel, payload string) int64 {
	t.Helper()
	ctx, cancel := redisCtx()
	defer cancel()
	n, err := rs.Client().Publish(ctx, channel, payload).Result()
	if err != nil {
		t.Fatalf("PUBLISH %s: %v", channel, err)
	}
	return n
}

// ---------------------------------------------------------------------------
// Tests.

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
	n := &node{t: t, name: "example", dir: t.TempDir(), addr: freeAddr(t)}
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
	a := startNode(t, "A", chatRoutes(rs.URL()))
	b := startNode(t, "B", chatRoutes(rs.URL()))
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
	a := startNode(t, "A", chatRoutes(rs.URL()))
	b := startNode(t, "B", chatRoutes(rs.URL()))
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
	a := startNode(t, "A", chatRoutes(rs.URL()))
	b := startNode(t, "B", chatRoutes(rs.URL()))
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

// TestRedisRestart: while Redis is down a publish is answered with
// "unavailable"; after Redis comes back on the same address, delivery to
// subscribers on both nodes resumes within 2s without the clients reconnecting.
func TestRedisRestart(t *testing.T) {
	rs := redistest.Start(t)
	a := startNode(t, "A", chatRoutes(rs.URL()))
	b := startNode(t, "B", chatRoutes(rs.URL()))
	const channel = "room:restart"
	subA := dialJSON(t, "subA", a.wsURL("/ws"))
	subA.subscribe(channel)
	subB := dialJSON(t, "subB", b.wsURL("/ws"))
	subB.subscribe(channel)
	pub := dialJSON(t, "pub@A", a.wsURL("/ws"))

	pub.mustPublish(channel, map[string]string{"phase": "before"})
	subA.expectMessage(channel, 5*time.Second)
	subB.expectMessage(channel, 5*time.Second)

	rs.Kill()
	for _, c := range []*wsClient{pub, subB} {
		sent := time.Now()
		m, err := c.publishErr(channel, map[string]string{"phase": "outage"}, 8*time.Second)
		if err != nil {
			t.Fatalf("publish while Redis is down: want error unavailable, got no reply: %v", err)
		}
		if m.Type != "error" || m.Code != "unavailable" {
			t.Fatalf("%s: publish while Redis is down: want {\"type\":\"error\",\"code\":\"unavailable\"}, got %s", c.name, m)
		}
		t.Logf("%s: unavailable after %v", c.name, time.Since(sent).Round(time.Millisecond))
	}

	rs.Restart()
	back := time.Now()
	var firstOK, gotA, gotB time.Time
	collect := func(c *wsClient, got *time.Time) {
		for {
			m, err := c.readMsg(30 * time.Millisecond)
			if errors.Is(err, errTimeout) {
				return
			}
			if err != nil {
				t.Fatalf("%s (must stay connected through the outage): %v", c.name, err)
			}
			var d struct{ Phase string }
			_ = json.Unmarshal(m.Data, &d)
			switch {
			case m.Type == "message" && d.Phase == "after":
				if got.IsZero() {
					*got = m.at
				}
			case m.Type == "message" && d.Phase == "outage":
				t.Logf("%s: a publish answered \"unavailable\" was delivered later: %s", c.name, m)
			default:
				t.Errorf("%s: unexpected frame %s", c.name, m)
			}
		}
	}
	deadline := back.Add(15 * time.Second)
	for k := 0; gotA.IsZero() || gotB.IsZero(); k++ {
		if time.Now().After(deadline) {
			t.Fatalf("delivery did not resume within 15s of the Redis restart (first ok publish after %v; subA got one: %v, subB got one: %v)",
				sinceOrNever(firstOK, back), !gotA.IsZero(), !gotB.IsZero())
		}
		m, err := pub.publishErr(channel, map[string]any{"phase": "after", "k": k}, 8*time.Second)
		if err != nil {
			t.Fatalf("publish after the Redis restart: %v", err)
		}
		switch {
		case m.Type == "ok":
			if firstOK.IsZero() {
				firstOK = time.Now()
			}
		case m.Type == "error" && m.Code == "unavailable":
			time.Sleep(50 * time.Millisecond)
		default:
			t.Errorf("publish after the Redis restart: want ok or unavailable, got %s", m)
		}
		collect(subA, &gotA)
		collect(subB, &gotB)
	}
	t.Logf("after the Redis restart: first ok publish %v, delivery on A %v, on B %v",
		firstOK.Sub(back).Round(time.Millisecond), gotA.Sub(back).Round(time.Millisecond), gotB.Sub(back).Round(time.Millisecond))
	for name, got := range map[string]time.Time{"A": gotA, "B": gotB} {
		if d := got.Sub(back); d > 2*time.Second {
			t.Errorf("delivery on node %s resumed %v after Redis was back, want <= 2s", name, d.Round(time.Millisecond))
		}
	}
}

func sinceOrNever(t, from time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return t.Sub(from).Round(time.Millisecond).String()
}

// syncRaw waits until every raw client receives what is PUBLISHed on
// redisChannel (a raw connection has no reply that says its subscription is
// live): it publishes "sync-<k>" until each client has seen one. The clients
// then ignore "sync-" frames.
func syncRaw(t testing.TB, rs *redistest.Server, redisChannel string, clients ...*wsClient) {
	t.Helper()
	got := make([]bool, len(clients))
	deadline := time.Now().Add(10 * time.Second)
	for k := 0; ; k++ {
		redisPublish(t, rs, redisChannel, fmt.Sprintf("sync-%d", k))
		all := true
		for i, c := range clients {
			if got[i] {
				continue
			}
			c.skip = ""
			f, err := c.nextFrame(50 * time.Millisecond)
			switch {
			case err == nil && bytes.HasPrefix(f.data, []byte("sync-")):
				got[i] = true
			case err == nil:
				t.Fatalf("%s: unexpected frame %q before any sync frame", c.name, f.data)
			case !errors.Is(err, errTimeout):
				t.Fatal(err)
			}
			all = all && got[i]
		}
		if all {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("raw clients on %s did not receive a PUBLISH within 10s (got: %v)", redisChannel, got)
		}
	}
	for _, c := range clients {
		c.skip = "sync-"
	}
}

// TestRawModeTwoNodes: the seed article's plain client (send text, show
// event.data) on a raw route whose channel comes from the path, across nodes.
func TestRawModeTwoNodes(t *testing.T) {
	rs := redistest.Start(t)
	routes := fmt.Sprintf("\tchat /raw/* {\n\t\tprotocol raw\n\t\tchannel room:{http.request.uri.path.1}\n\t\tredis %s\n\t}", rs.URL())
	a := startNode(t, "A", routes)
	b := startNode(t, "B", routes)

	a1 := dialRaw(t, "x1@A", a.wsURL("/raw/x"))
	b1 := dialRaw(t, "x1@B", b.wsURL("/raw/x"))
	other := dialRaw(t, "other@B", b.wsURL("/raw/other"))
	syncRaw(t, rs, "chat:room:x", a1, b1)
	syncRaw(t, rs, "chat:room:other", other)

	// Watch the Redis channel too.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ps := rs.Client().Subscribe(ctx, "chat:room:x")
	defer ps.Close()
	if _, err := ps.Receive(ctx); err != nil {
		t.Fatalf("subscribe to chat:room:x: %v", err)
	}

	a1.sendText("hello")
	b1.expectText("hello", 5*time.Second)
	a1.expectText("hello", 5*time.Second) // the sender gets its own message
	rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
	msg, err := ps.ReceiveMessage(rctx)
	rcancel()
	if err != nil {
		t.Fatalf("Redis subscriber: %v", err)
	}
	// On Redis a raw frame is the node's stamped envelope naming its sender;
	// raw clients still get the plain text.
	body, stampedOK := strings.CutPrefix(msg.Payload, "\x1ecc1\x1e")
	var env struct {
		Data      json.RawMessage `json:"data"`
		Anonymous bool            `json:"anonymous"`
	}
	if !stampedOK || json.Unmarshal([]byte(body), &env) != nil || string(env.Data) != `"hello"` || !env.Anonymous {
		t.Errorf("Redis saw payload %q on chat:room:x, want the stamped envelope of \"hello\" from an anonymous client", msg.Payload)
	}

	b1.sendText("hi from B")
	a1.expectText("hi from B", 5*time.Second)
	b1.expectText("hi from B", 5*time.Second)

	// /raw/other is another channel: its first frame after the sync must be
	// this marker, not "hello".
	redisPublish(t, rs, "chat:room:other", "marker")
	other.expectText("marker", 5*time.Second)

	// A backend's plain PUBLISH reaches raw clients unchanged.
	if n := redisPublish(t, rs, "chat:room:x", "hi"); n < 2 {
		t.Errorf("PUBLISH chat:room:x reached %d subscribers, want >= 2 (both nodes)", n)
	}
	a1.expectText("hi", 5*time.Second)
	b1.expectText("hi", 5*time.Second)
}

// TestLoadBalancerInFront: a third Caddy balances WebSocket upgrades over two
// nodes round-robin; a publish from one client reaches all of them.
func TestLoadBalancerInFront(t *testing.T) {
	rs := redistest.Start(t)
	a := startNode(t, "A", chatRoutes(rs.URL()))
	b := startNode(t, "B", chatRoutes(rs.URL()))
	lb := startNode(t, "LB", fmt.Sprintf("\treverse_proxy %s %s {\n\t\tlb_policy round_robin\n\t}", a.addr, b.addr))

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

// TestReloadNoLeak: reloading the same config keeps clients connected and
// working and leaks neither goroutines nor Redis pub/sub connections; a
// reload that changes channel_prefix closes the old clients with 1012.
func TestReloadNoLeak(t *testing.T) {
	rs := redistest.Start(t)
	routes := chatRoutes(rs.URL())
	n := startNode(t, "node", routes)

	const clients = 20
	var cs []*wsClient
	for i := range clients {
		c := dialJSON(t, fmt.Sprintf("c%d", i), n.wsURL("/ws"))
		c.subscribe("room:all")
		c.subscribe(fmt.Sprintf("room:r%d", i%3))
		cs = append(cs, c)
	}
	pubsubIs := func(want int) func() (bool, string) {
		return func() (bool, string) {
			got, list := pubsubClients(t, rs)
			return got == want, fmt.Sprintf("%d pub/sub connections:\n%s", got, list)
		}
	}
	eventually(t, 5*time.Second, "one Redis pub/sub connection before the reloads", pubsubIs(1))
	before := n.goroutines(t)

	for i := range 3 {
		n.reload(t, routes)
		t.Logf("reload %d done; goroutines now %d", i+1, n.goroutines(t))
	}
	eventually(t, 10*time.Second, "one Redis pub/sub connection after 3 reloads", pubsubIs(1))
	const margin = 10
	var after int
	eventually(t, 10*time.Second, fmt.Sprintf("goroutines back within %d of %d after 3 reloads", margin, before), func() (bool, string) {
		after = n.goroutines(t)
		return after <= before+margin, strconv.Itoa(after)
	})
	t.Logf("goroutines: %d before the reloads, %d after", before, after)

	// The old connections still work, both ways.
	cs[0].mustPublish("room:all", map[string]int{"n": 1})
	for _, c := range cs {
		c.expectMessage("room:all", 5*time.Second)
	}
	cs[1].mustPublish("room:r1", map[string]int{"n": 2})
	for i, c := range cs {
		if i%3 == 1 {
			c.expectMessage("room:r1", 5*time.Second)
		}
	}
	fresh := dialJSON(t, "fresh", n.wsURL("/ws"))
	fresh.subscribe("room:all")
	fresh.mustPublish("room:all", map[string]int{"n": 3})
	for _, c := range append(cs, fresh) {
		c.expectMessage("room:all", 5*time.Second)
	}

	// Different broker settings: old clients must reconnect (1012).
	n.reload(t, fmt.Sprintf("\tchat /ws {\n\t\tredis %s\n\t\tchannel_prefix chat2:\n\t}", rs.URL()))
	for _, c := range append(cs, fresh) {
		code, err := c.waitClosed(10 * time.Second)
		if err != nil {
			t.Fatalf("%s: after a reload with a new channel_prefix: want close 1012, the connection stayed open: %v", c.name, err)
		}
		if code != websocket.StatusServiceRestart {
			t.Fatalf("%s: after a reload with a new channel_prefix: close code %d, want 1012 (service restart); read error: %v", c.name, code, c.readErr)
		}
	}
	// The old hub's pub/sub connection is gone; the new hub opens its own
	// with its first subscription.
	eventually(t, 10*time.Second, "old pub/sub connection closed after the prefix change", pubsubIs(0))
	eventually(t, 10*time.Second, "old-prefix subscription dropped", func() (bool, string) {
		got := numSub(t, rs, "chat:room:all")
		return got == 0, fmt.Sprintf("NUMSUB chat:room:all = %d", got)
	})
	c := dialJSON(t, "new-prefix", n.wsURL("/ws"))
	c.subscribe("room:all")
	eventually(t, 5*time.Second, "one Redis pub/sub connection for the new prefix", pubsubIs(1))
	if got := redisPublish(t, rs, "chat2:room:all", `{"x":1}`); got != 1 {
		t.Errorf("PUBLISH chat2:room:all reached %d subscribers, want 1", got)
	}
	m := c.expectMessage("room:all", 5*time.Second)
	if string(m.Data) != `{"x":1}` {
		t.Errorf("foreign payload: want data {\"x\":1}, got %s", m)
	}
}

// httpPublish POSTs body to url with "Authorization: Bearer <key>" and
// returns the status and the raw response body.
func httpPublish(t testing.TB, url, key, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+key)
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("POST %s: reading the response: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

// TestHTTPPublishReachesBothNodes: a backend POSTs to node A's publish
// endpoint (a path outside the directive's /ws matcher) and the subscribers
// on both nodes get the message, with the id the response returned. A wrong
// key gets 401 and publishes nothing.
func TestHTTPPublishReachesBothNodes(t *testing.T) {
	const key = "test-publish-key-0123456789"
	rs := redistest.Start(t)
	routes := fmt.Sprintf(`	chat /ws {
		redis %s
		rate_limit off
		publish_endpoint /chat/publish
		publish_key %s
	}`, rs.URL(), key)
	a := startNode(t, "A", routes)
	b := startNode(t, "B", routes)
	subA := dialJSON(t, "sub@A", a.wsURL("/ws"))
	subB := dialJSON(t, "sub@B", b.wsURL("/ws"))
	subA.subscribe("room:http")
	subB.subscribe("room:http")

	body := `{"channel":"room:http","data":{"text":"from the backend"}}`
	status, resp := httpPublish(t, a.httpURL("/chat/publish"), "wrong-publish-key-0123456789", body)
	var refused struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	if err := json.Unmarshal([]byte(resp), &refused); status != http.StatusUnauthorized || err != nil || refused.Error.Code != "unauthorized" {
		t.Fatalf("POST /chat/publish with a wrong key: got HTTP %d %q, want 401 with error code unauthorized", status, resp)
	}

	status, resp = httpPublish(t, a.httpURL("/chat/publish"), key, body)
	var ok struct {
		Channel string `json:"channel"`
		ID      string `json:"id"`
	}
	if err := json.Unmarshal([]byte(resp), &ok); status != http.StatusOK || err != nil || ok.Channel != "room:http" || ok.ID == "" {
		t.Fatalf("POST /chat/publish: got HTTP %d %q, want 200 {\"channel\":\"room:http\",\"id\":...}", status, resp)
	}
	// The next frame of each subscriber is this message: the refused request
	// published nothing.
	for _, c := range []*wsClient{subA, subB} {
		m := c.expectMessage("room:http", 5*time.Second)
		var id string
		if err := json.Unmarshal(m.ID, &id); err != nil || id != ok.ID {
			t.Errorf("%s: delivery id %s, want %q from the HTTP response", c.name, m.ID, ok.ID)
		}
		if m.From == nil || *m.From != "" {
			t.Errorf("%s: from: want \"\", got %s", c.name, m)
		}
		if string(m.Data) != `{"text":"from the backend"}` {
			t.Errorf("%s: data: got %s", c.name, m.Data)
		}
	}
}

// scrapeMetrics reads the node's admin /metrics and returns every caddy_chat_
// sample by its name with labels, e.g. `caddy_chat_connections_closed_total{reason="normal"}`.
func (n *node) scrapeMetrics(t testing.TB) map[string]float64 {
	t.Helper()
	resp, err := adminHTTP.Get("http://" + n.admin + "/metrics")
	if err != nil {
		t.Fatalf("%s: GET /metrics: %v", n.name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: GET /metrics: %s", n.name, resp.Status)
	}
	samples := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "caddy_chat_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("%s: metrics line %q: %v", n.name, line, err)
		}
		samples[line[:i]] = v
	}
	return samples
}

// TestMetricsMoveWithTraffic: every metric of the module is on the admin
// /metrics endpoint and counts what the test does.
func TestMetricsMoveWithTraffic(t *testing.T) {
	rs := redistest.Start(t)
	n := startNode(t, "node", chatRoutes(rs.URL())+`
	chat /secure {
		jwt {
			secret 0123456789abcdef0123456789abcdef
		}
	}`)
	before := n.scrapeMetrics(t)
	for _, name := range []string{
		"caddy_chat_connections", "caddy_chat_connections_opened_total", "caddy_chat_channels",
		"caddy_chat_messages_received_total", "caddy_chat_messages_delivered_total",
		"caddy_chat_messages_dropped_total", "caddy_chat_slow_consumers_total",
		"caddy_chat_broker_publish_seconds_count", "caddy_chat_broker_reconnects_total", "caddy_chat_broker_up",
	} {
		if _, ok := before[name]; !ok {
			t.Errorf("/metrics lacks %s", name)
		}
	}

	const channel = "room:metrics"
	subs := []*wsClient{dialJSON(t, "sub1", n.wsURL("/ws")), dialJSON(t, "sub2", n.wsURL("/ws"))}
	for _, c := range subs {
		c.subscribe(channel)
	}
	pub := dialJSON(t, "pub", n.wsURL("/ws"))
	for i := range 4 {
		pub.mustPublish(channel, map[string]int{"n": i})
	}
	for _, c := range subs {
		for range 4 {
			c.expectMessage(channel, 5*time.Second)
		}
	}
	if _, err := dialWS(t, "anonymous", n.wsURL("/secure")); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("connecting to /secure without a token: %v, want a 401", err)
	}

	during := n.scrapeMetrics(t)
	delta := func(m map[string]float64, name string) float64 { return m[name] - before[name] }
	expect := map[string]float64{
		"caddy_chat_connections":                                 3,
		"caddy_chat_connections_opened_total":                    3,
		"caddy_chat_channels":                                    1,
		"caddy_chat_messages_received_total":                     6, // 2 subscribes, 4 publishes
		"caddy_chat_messages_delivered_total":                    8, // 4 messages × 2 subscribers
		"caddy_chat_broker_publish_seconds_count":                4,
		`caddy_chat_auth_failures_total{reason="missing_token"}`: 1,
	}
	for name, want := range expect {
		if got := delta(during, name); got != want {
			t.Errorf("%s grew by %v, want %v", name, got, want)
		}
	}

	// A Redis restart while a subscriber stays: one reconnect.
	rs.Kill()
	rs.Restart()
	eventually(t, 10*time.Second, "a broker reconnect counted", func() (bool, string) {
		got := delta(n.scrapeMetrics(t), "caddy_chat_broker_reconnects_total")
		return got >= 1, fmt.Sprint(got)
	})
	for _, c := range subs {
		c.closeNormal()
	}
	pub.closeNormal()
	eventually(t, 10*time.Second, "connections closed and the channel released", func() (bool, string) {
		after := n.scrapeMetrics(t)
		state := fmt.Sprintf("connections %v, closed normal +%v, channels %v",
			delta(after, "caddy_chat_connections"), delta(after, `caddy_chat_connections_closed_total{reason="normal"}`),
			delta(after, "caddy_chat_channels"))
		return delta(after, "caddy_chat_connections") == 0 &&
			delta(after, `caddy_chat_connections_closed_total{reason="normal"}`) == 3 &&
			delta(after, "caddy_chat_channels") == 0, state
	})
}
