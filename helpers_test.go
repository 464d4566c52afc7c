package caddychat

// The shared test helpers of the package, one of each:
//
//   - the Redis harness: real redis-server processes from internal/redistest,
//     forEachBroker (a test against the in-process broker and a real Redis)
//     and the few Redis commands the tests check the server with;
//   - two node harnesses, which are different things on purpose:
//     startCaddy runs a real Caddy process (the binary built once per test
//     binary from ./cmd/caddy) configured by a Caddyfile: it is what the
//     e2e tests need to show the module as operators run it (Caddyfile
//     parsing, module loading, config reloads through the admin API, TLS
//     sites, SIGTERM drains, crashes, several nodes sharing one Redis).
//     startNode serves one *Handler with httptest in this process: it
//     starts in milliseconds and lets a test look at the handler it built
//     (its hub, its connections, its log), which no process boundary allows.
//     Both take options (overTLS; smallSendBuffers, observeLogs) rather
//     than coming in variants;
//   - newToken, the one JWT builder.
//
// The WebSocket clients that speak the protocol to these nodes are in
// client_test.go (in-process tests) and e2e_client_test.go (e2e tests).
//
// Environment knobs of the Caddy harness:
// Multi-process end-to-end tests: a real Caddy binary built from ./cmd/caddy
// (once per test run), real redis-server processes (internal/redistest) and
// WebSocket clients speaking the JSON or raw protocol of PROTOCOL.md.
//
// Environment knobs:
//   CADDYCHAT_CADDY_BIN=/path/to/caddy  use a prebuilt binary instead of building
//   CADDYCHAT_E2E_RACE=0|1              build the binary without/with -race
//                                       (default: like the test binary)

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

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

type caddyNode struct {
	t         testing.TB
	name      string
	addr      string // 127.0.0.1:port of the HTTP site
	admin     string // 127.0.0.1:port of the admin API ("" if unknown)
	dir       string
	caddyfile string
	logPath   string
	tls       bool // overTLS
	httpPort  int  // with tls: the http_port Caddy binds besides addr
	debug     bool // log at debug level
	retryBind bool // run reports a port in use at start instead of failing
	cmd       *exec.Cmd
	exited    chan struct{}
	stopOnce  sync.Once
}

// caddyOption changes how startCaddy runs a node.
type caddyOption func(*caddyNode)

// overTLS serves the site as https://127.0.0.1:<port> with a certificate
// from Caddy's local CA (`tls internal`), kept in the node's storage dir and
// never installed into the machine's trust stores (see localCA).
func overTLS() caddyOption { return func(n *caddyNode) { n.tls = true } }

// debugLog runs the node with Caddy's debug option: every log level.
func debugLog() caddyOption { return func(n *caddyNode) { n.debug = true } }

// startCaddy writes a Caddyfile with routes as the site body and runs it.
func startCaddy(t testing.TB, name, routes string, opts ...caddyOption) *caddyNode {
	t.Helper()
	dir := t.TempDir()
	n := &caddyNode{t: t, name: name, dir: dir, addr: freeAddr(t), admin: freeAddr(t)}
	for _, o := range opts {
		o(n)
	}
	if n.tls {
		n.httpPort = freePort(t)
	}
	n.caddyfile = filepath.Join(dir, "Caddyfile")
	// A port freePort found free may be taken again before Caddy binds it
	// (another test's outgoing connection can get it): then start over on
	// other ports.
	for attempt := 1; ; attempt++ {
		n.writeCaddyfile(t, routes)
		n.retryBind = attempt < 3
		if n.run(t, []string{"run", "--config", n.caddyfile, "--adapter", "caddyfile"}, nil, "") {
			n.retryBind = false
			return n
		}
		n.addr, n.admin = freeAddr(t), freeAddr(t)
		if n.tls {
			n.httpPort = freePort(t)
		}
	}
}

// writeCaddyfile writes the node's whole Caddyfile: test-safe global options
// and one site on n.addr whose body is routes.
func (n *caddyNode) writeCaddyfile(t testing.TB, routes string) {
	t.Helper()
	var debugOpt string
	if n.debug || os.Getenv("CADDYCHAT_E2E_DEBUG") == "1" {
		debugOpt = "\tdebug\n"
	}
	_, port, _ := net.SplitHostPort(n.addr)
	storage := filepath.Join(n.dir, "storage")
	text := fmt.Sprintf(`{
	admin %s
	default_bind 127.0.0.1
	persist_config off
	auto_https off
	storage file_system %s
%s}

http://:%s {
%s
}
`, n.admin, storage, debugOpt, port, routes)
	if n.tls {
		text = fmt.Sprintf(`{
	admin %s
	default_bind 127.0.0.1
	persist_config off
	storage file_system %s
	skip_install_trust
	auto_https disable_redirects
	http_port %d
	https_port %s
%s}

https://127.0.0.1:%[4]s {
	tls internal
%[6]s
}
`, n.admin, storage, n.httpPort, port, debugOpt, routes)
	}
	if err := os.WriteFile(n.caddyfile, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

// run starts the binary with args, waits until n.addr accepts connections and
// registers the stop in t.Cleanup. With n.retryBind, a node that exited at
// start because a port was in use makes it report false instead of failing.
func (n *caddyNode) run(t testing.TB, args []string, extraEnv []string, workDir string) bool {
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
			if n.retryBind && strings.Contains(n.logTail(60), "address already in use") {
				return false
			}
			t.Fatalf("%s: caddy exited during start-up (%v); log %s:\n%s", n.name, cmd.ProcessState, n.logPath, n.logTail(60))
		default:
		}
		c, err := net.DialTimeout("tcp", n.addr, time.Second)
		if err == nil {
			c.Close()
			return true
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s does not accept connections 30s after start; log %s:\n%s", n.name, n.addr, n.logPath, n.logTail(60))
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits; SIGKILL after timeout. It reports whether the
// process exited by itself.
func (n *caddyNode) stop(timeout time.Duration) bool {
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

func (n *caddyNode) cleanup() {
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

func (n *caddyNode) logTail(lines int) string {
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

func (n *caddyNode) wsURL(path string) string   { return "ws://" + n.addr + path }
func (n *caddyNode) httpURL(path string) string { return "http://" + n.addr + path }

// reload replaces the node's config with a Caddyfile whose site body is routes
// (same ports) and loads it through the admin API, forcing a reload even when
// the config is unchanged.
func (n *caddyNode) reload(t testing.TB, routes string) {
	t.Helper()
	n.writeCaddyfile(t, routes)
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
func (n *caddyNode) goroutines(t testing.TB) int {
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

// restart stops the node (SIGTERM: it drains its connections) and starts it
// again on the same address with the same Caddyfile.
func (n *caddyNode) restart(t testing.TB) {
	t.Helper()
	if !n.stop(30 * time.Second) {
		t.Fatalf("%s: did not stop within 30s", n.name)
	}
	n.stopOnce = sync.Once{}
	n.run(t, []string{"run", "--config", n.caddyfile, "--adapter", "caddyfile"}, nil, "")
}

// kill ends the node's process with SIGKILL: no shutdown, no goodbye to
// Redis, as in a crash.
func (n *caddyNode) kill() {
	n.stopOnce.Do(func() {
		_ = n.cmd.Process.Kill()
		<-n.exited
	})
}

// ---------------------------------------------------------------------------
// In-process nodes.

// testNode is one handler served by an httptest server, in this process.
type testNode struct {
	h    *Handler
	srv  *httptest.Server
	logs *observer.ObservedLogs // with observeLogs: the handler's log
	done chan any               // with observeLogs: each request's log_skip variable once ServeHTTP returns
}

type nodeOptions struct {
	wrap    func(net.Listener) net.Listener
	observe bool
}

// nodeOption changes how startNode serves its handler.
type nodeOption func(*nodeOptions)

// smallSendBuffers gives accepted connections 4 KiB socket send buffers, so
// that what a client has not read waits in the node's send queue rather than
// in the kernel (which on loopback takes megabytes).
func smallSendBuffers() nodeOption {
	return func(o *nodeOptions) {
		o.wrap = func(l net.Listener) net.Listener { return smallSendBufferListener{l} }
	}
}

type smallSendBufferListener struct{ net.Listener }

func (l smallSendBufferListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetWriteBuffer(4096)
	}
	return c, err
}

// observeLogs records the handler's log (n.logs, every level) and puts
// Caddy's vars table in each request's context, so that n.done receives each
// request's log_skip variable once ServeHTTP returns (see waitDone).
func observeLogs() nodeOption { return func(o *nodeOptions) { o.observe = true } }

// startNode provisions and validates h and serves it, as Caddy's server
// would: the request's replacer knows its HTTP placeholders.
func startNode(t testing.TB, h *Handler, opts ...nodeOption) *testNode {
	t.Helper()
	var o nodeOptions
	for _, opt := range opts {
		opt(&o)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	if err := h.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	n := &testNode{h: h}
	h.logger = zap.NewNop()
	if o.observe {
		var core zapcore.Core
		core, n.logs = observer.New(zapcore.DebugLevel)
		h.logger = zap.New(core)
		n.done = make(chan any, 16)
	}
	// The connections log through the route, resolved by Provision.
	h.route.log = h.logger
	n.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := context.WithValue(r.Context(), caddy.ReplacerCtxKey, caddyhttp.NewTestReplacer(r))
		if o.observe {
			c = context.WithValue(c, caddyhttp.VarsCtxKey, map[string]any{})
		}
		r = r.WithContext(c)
		_ = h.ServeHTTP(w, r, nil)
		if o.observe {
			n.done <- caddyhttp.GetVar(r.Context(), caddyhttp.LogSkipVar)
		}
	}))
	if o.wrap != nil {
		n.srv.Listener = o.wrap(n.srv.Listener)
	}
	n.srv.Start()
	t.Cleanup(func() {
		n.srv.CloseClientConnections()
		n.srv.Close()
		if err := h.Cleanup(); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
	})
	return n
}

func (n *testNode) url(path string) string {
	return "ws" + strings.TrimPrefix(n.srv.URL, "http") + path
}

// waitDone waits for the next request of an observeLogs node to finish and
// returns its log_skip variable.
func (n *testNode) waitDone(t testing.TB) any {
	t.Helper()
	select {
	case v := <-n.done:
		return v
	case <-time.After(5 * time.Second):
		t.Fatal("request not finished within 5s")
	}
	return nil
}

// ---------------------------------------------------------------------------
// Redis.

// forEachBroker runs test against the in-process broker and a real Redis;
// newHandler gives a handler of that broker on a channel prefix (hence a
// hub) of the test's own.
func forEachBroker(t *testing.T, test func(t *testing.T, newHandler func() *Handler, rs *redistest.Server)) {
	t.Run("memory", func(t *testing.T) {
		test(t, func() *Handler { return &Handler{ChannelPrefix: ptr(uniquePrefix())} }, nil)
	})
	t.Run("redis", func(t *testing.T) {
		rs := redistest.Start(t)
		test(t, func() *Handler { return &Handler{Redis: rs.URL(), ChannelPrefix: ptr(uniquePrefix())} }, rs)
	})
}

var prefixSeq atomic.Uint64

// uniquePrefix is a channel prefix no other node of the test binary has,
// hence a hub of its own (hubs are per redis+prefix): no test sees
// another's messages or connection counts.
func uniquePrefix() string {
	return fmt.Sprintf("t%d:", prefixSeq.Add(1))
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
// Tokens.

// testSecret is the HMAC secret of the test routes with JWT (Validate wants
// at least 32 bytes).
const testSecret = "caddychat-test-secret-0123456789abcdef"

// tokenBuilder is a JWT being made for a test; sign returns it.
type tokenBuilder struct {
	t      testing.TB
	method jwt.SigningMethod
	key    any
	kid    string
	claims jwt.MapClaims
}

// newToken starts a token of user (the sub claim), issued now, valid for an
// hour, signed HS256 with testSecret.
func newToken(t testing.TB, user string) *tokenBuilder {
	now := time.Now()
	return &tokenBuilder{
		t: t, method: jwt.SigningMethodHS256, key: []byte(testSecret),
		claims: jwt.MapClaims{"sub": user, "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()},
	}
}

// ttl makes the token expire d from now.
func (b *tokenBuilder) ttl(d time.Duration) *tokenBuilder {
	b.claims["exp"] = time.Now().Add(d).Unix()
	return b
}

// with sets claims; a nil value removes the claim.
func (b *tokenBuilder) with(claims jwt.MapClaims) *tokenBuilder {
	for k, v := range claims {
		if v == nil {
			delete(b.claims, k)
			continue
		}
		b.claims[k] = v
	}
	return b
}

// secret signs the token HS256 with secret instead of testSecret.
func (b *tokenBuilder) secret(secret string) *tokenBuilder {
	return b.signedWith(jwt.SigningMethodHS256, []byte(secret), "")
}

// signedWith signs the token with method and key, naming kid in its header
// when kid is not empty.
func (b *tokenBuilder) signedWith(method jwt.SigningMethod, key any, kid string) *tokenBuilder {
	b.method, b.key, b.kid = method, key, kid
	return b
}

func (b *tokenBuilder) sign() string {
	b.t.Helper()
	tok := jwt.NewWithClaims(b.method, b.claims)
	if b.kid != "" {
		tok.Header["kid"] = b.kid
	}
	s, err := tok.SignedString(b.key)
	if err != nil {
		b.t.Fatalf("signing %s token: %v", b.method.Alg(), err)
	}
	return s
}

// ---------------------------------------------------------------------------
// Waiting.

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

// waitFor polls cond every 10ms until it is true; the test fails after 5s.
func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func ptr[T any](v T) *T { return &v }
