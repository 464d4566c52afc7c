// Package redistest runs a real redis-server (the Debian binary) for tests.
//
// Each Server is a foreground child process bound to 127.0.0.1 on a free port,
// with persistence off (StartAOF: appendonly yes) and its working directory in t.TempDir(). It is killed
// in t.Cleanup. Kill and Restart simulate a broker outage: Restart starts the
// server again on the same port, so clients configured with the old address
// can reconnect. StartSentinel and StartCluster (topology.go) build a
// Sentinel setup and a Redis Cluster from such servers. StartTLS,
// StartSentinelTLS and StartClusterTLS do the same with servers that speak
// TLS only and require client certificates, from a PKI that NewPKI (tls.go)
// generates for the test.
package redistest

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Binary is the redis-server executable used by Start. It is looked up in
// PATH first, then at the Debian location.
var Binary = "redis-server"

const debianBinary = "/usr/bin/redis-server"

// startTimeout bounds how long a start (or restart) may take until the server
// answers PING.
const startTimeout = 10 * time.Second

// Server is a running (or killed) redis-server child process.
type Server struct {
	t       testing.TB
	bin     string
	port    int
	dir     string
	logPath string

	// mode is how the server runs: "" standalone, or modeCluster,
	// modeReplica, modeSentinel (see topology.go).
	mode    string
	modeArg string // the master's address for modeReplica, its port for modeSentinel
	// pki, when set, makes the server speak TLS only (tls.go): its port is
	// a tls-port, and clients must present a certificate of pki's CA.
	pki *PKI
	// aof: appendonly yes (StartAOF), so that a restart keeps the data.
	aof bool

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
	client *redis.Client
}

// Start launches redis-server on a free loopback port and waits until it
// answers PING. The server is killed when the test ends. If redis-server is not
// installed the test fails (it is not skipped: CI installs it).
func Start(t testing.TB) *Server {
	t.Helper()
	return startMode(t, "", "")
}

// StartTLS is Start for a server that speaks TLS only, with the server
// certificate of pki, and requires clients to present a certificate signed
// by pki's CA (tls-auth-clients yes).
func StartTLS(t testing.TB, pki *PKI) *Server {
	t.Helper()
	return startServer(t, "", "", pki)
}

// StartAOF is Start for a server with AOF persistence (appendonly yes):
// Restart replays the append-only file, so the data written before a Kill
// survives it (SIGKILL loses nothing the server had written to the file,
// which it does before answering the command).
func StartAOF(t testing.TB) *Server {
	t.Helper()
	return startWith(t, "", "", nil, true)
}

func startMode(t testing.TB, mode, modeArg string) *Server {
	t.Helper()
	return startServer(t, mode, modeArg, nil)
}

func startServer(t testing.TB, mode, modeArg string, pki *PKI) *Server {
	t.Helper()
	return startWith(t, mode, modeArg, pki, false)
}

func startWith(t testing.TB, mode, modeArg string, pki *PKI, aof bool) *Server {
	t.Helper()
	bin, err := lookBinary()
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	s := &Server{t: t, bin: bin, dir: t.TempDir(), mode: mode, modeArg: modeArg, pki: pki, aof: aof}
	s.logPath = filepath.Join(s.dir, "redis.log")
	t.Cleanup(s.cleanup)

	// The free port is found by listening on :0 and closing, so another
	// process may take it before redis binds it: try a few ports.
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := FreePort()
		if err != nil {
			t.Fatalf("redistest: %v", err)
		}
		s.port = port
		if lastErr = s.start(); lastErr == nil {
			return s
		}
	}
	t.Fatalf("redistest: could not start redis-server: %v\n%s", lastErr, s.logTail())
	return nil
}

func lookBinary() (string, error) {
	if p, err := exec.LookPath(Binary); err == nil {
		return p, nil
	}
	if _, err := os.Stat(debianBinary); err == nil {
		return debianBinary, nil
	}
	return "", fmt.Errorf("redis-server not found in PATH or at %s; install it (Debian: apt-get install -y redis-server)", debianBinary)
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, err
	}
	return port, nil
}

// start runs redis-server on s.port and waits for PING. On failure the process
// is killed and an error is returned.
func (s *Server) start() error {
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(logf, "=== redistest: starting redis-server on port %d at %s\n", s.port, time.Now().Format(time.RFC3339Nano))
	args, err := s.args()
	if err != nil {
		logf.Close()
		return err
	}
	cmd := exec.Command(s.bin, args...)
	cmd.Dir = s.dir
	cmd.Stdout = logf
	cmd.Stderr = logf
	// If the test binary dies without running cleanups (test timeout panic),
	// the kernel kills redis-server too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", s.bin, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(exited)
	}()
	s.mu.Lock()
	s.cmd, s.exited = cmd, exited
	s.mu.Unlock()

	deadline := time.Now().Add(startTimeout)
	for {
		select {
		case <-exited:
			return fmt.Errorf("redis-server on port %d exited during start-up: %v", s.port, cmd.ProcessState)
		default:
		}
		if err := s.ping(); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			s.Kill()
			return fmt.Errorf("redis-server on port %d did not answer PING within %v: %v", s.port, startTimeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ping sends an inline PING and expects +PONG (over TLS for a TLS server).
func (s *Server) ping() error {
	var c net.Conn
	var err error
	if s.pki != nil {
		c, err = tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", s.Addr(), s.pki.ClientTLS())
	} else {
		c, err = net.DialTimeout("tcp", s.Addr(), time.Second)
	}
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != "+PONG" {
		return fmt.Errorf("PING answered %q", strings.TrimSpace(line))
	}
	return nil
}

// Addr is "127.0.0.1:<port>".
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// Port is the TCP port the server listens on (the same across restarts).
func (s *Server) Port() int { return s.port }

// URL is "redis://127.0.0.1:<port>/0", usable as the chat module's redis
// option; "rediss://..." for a TLS server.
func (s *Server) URL() string {
	if s.pki != nil {
		return "rediss://" + s.Addr() + "/0"
	}
	return "redis://" + s.Addr() + "/0"
}

// LogPath is the file that collects the server's output across restarts.
func (s *Server) LogPath() string { return s.logPath }

// Running reports whether the server process is alive.
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return false
	}
	select {
	case <-s.exited:
		return false
	default:
		return true
	}
}

// Kill sends SIGKILL to the server and waits until it has exited. Killing a
// server that is not running does nothing.
func (s *Server) Kill() {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		s.t.Errorf("redistest: redis-server (pid %d) did not exit 10s after SIGKILL", cmd.Process.Pid)
	}
}

// Restart starts the server again on the same port (killing it first if it is
// still running) and waits until it answers PING. Data is not kept, except
// by a server started with StartAOF.
func (s *Server) Restart() {
	s.t.Helper()
	s.Kill()
	// The port may briefly be unavailable; retry until the start deadline.
	deadline := time.Now().Add(startTimeout)
	for {
		err := s.start()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("redistest: restart on port %d: %v\n%s", s.port, err, s.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Client returns a go-redis client for the server, created on first use and
// closed when the test ends. It keeps working across Kill/Restart (go-redis
// reconnects on demand).
func (s *Server) Client() *redis.Client {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client == nil {
		s.client = redis.NewClient(&redis.Options{
			Addr:         s.Addr(),
			DialTimeout:  2 * time.Second,
			ReadTimeout:  2 * time.Second,
			WriteTimeout: 2 * time.Second,
			MaxRetries:   -1, // tests want to see errors, not retries
			TLSConfig:    s.tlsConfig(),
		})
	}
	return s.client
}

// Do runs a raw command with a 5 s timeout using Client and fails the test on
// error.
func (s *Server) Do(args ...any) any {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	v, err := s.Client().Do(ctx, args...).Result()
	if err != nil && !errors.Is(err, redis.Nil) {
		s.t.Fatalf("redistest: %v: %v", args, err)
	}
	return v
}

// tlsConfig is a client configuration for the server: nil for a plain one.
func (s *Server) tlsConfig() *tls.Config {
	if s.pki == nil {
		return nil
	}
	return s.pki.ClientTLS()
}

func (s *Server) cleanup() {
	s.mu.Lock()
	c := s.client
	s.client = nil
	s.mu.Unlock()
	if c != nil {
		_ = c.Close()
	}
	s.Kill()
	if s.t.Failed() {
		s.t.Logf("redistest: redis-server log (%s):\n%s", s.logPath, s.logTail())
	}
}

// logTail returns the last lines of the server log.
func (s *Server) logTail() string {
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return strings.Join(lines, "\n")
}

// Pause stops the server process (SIGSTOP) without closing anything: its
// connections stay open and every command hangs, as with a network partition
// or a stalled server, the hardest case for a client's timeouts. Resume
// continues it with its data intact.
func (s *Server) Pause() { s.signal(syscall.SIGSTOP) }

// Resume continues a paused server (SIGCONT).
func (s *Server) Resume() { s.signal(syscall.SIGCONT) }

func (s *Server) signal(sig syscall.Signal) {
	s.mu.Lock()
	cmd := s.cmd
	s.mu.Unlock()
	if cmd == nil {
		s.t.Fatalf("redistest: %v: the server is not running", sig)
	}
	if err := cmd.Process.Signal(sig); err != nil {
		s.t.Fatalf("redistest: %v: %v", sig, err)
	}
}
