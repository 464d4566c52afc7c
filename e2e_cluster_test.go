package caddychat

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestClusterExample runs examples/cluster/run.sh as a user would (only the
// Caddy binary is the test's, and the ports are free ones): Redis, three
// nodes from node.Caddyfile and the balancer from balancer.Caddyfile. Nine
// clients subscribe through the balancer with history, two others publish
// through it; node2 is stopped with SIGTERM. Its clients are closed with
// 1001, reconnect through the balancer, land on node1 or node3 and resume
// from their last message id: every subscriber ends with every acknowledged
// message once, in order. Then Ctrl-C (SIGINT to the script's process group,
// as a terminal sends it) stops everything.
func TestClusterExample(t *testing.T) {
	t.Parallel()
	bin := caddyBinary(t)
	start := time.Now()

	dir := filepath.Join(t.TempDir(), "cluster")
	lbPort, redisPort := freePort(t), freePort(t)
	nodePorts := []int{freePort(t), freePort(t), freePort(t)}
	var portList []string
	for _, p := range nodePorts {
		portList = append(portList, strconv.Itoa(p))
	}

	sc := startClusterScript(t, dir, []string{
		"CADDY_BIN=" + bin,
		"CLUSTER_DIR=" + dir,
		"LB_PORT=" + strconv.Itoa(lbPort),
		"REDIS_PORT=" + strconv.Itoa(redisPort),
		"NODE_PORTS=" + strings.Join(portList, " "),
		// The example's default is 10s; the test does not need to wait that
		// long for a node with three clients.
		"CHAT_DRAIN_PERIOD=2s",
	})
	wantURL := fmt.Sprintf("open http://127.0.0.1:%d/", lbPort)
	sc.waitLine(t, wantURL, 2*time.Minute)
	started := time.Since(start)

	// Which node is which: each node's welcome names it.
	nodeOf := map[string]int{} // welcome "node" -> 1..3
	nodeID := map[int]string{}
	for i, p := range nodePorts {
		c := dialJSON(t, fmt.Sprintf("probe%d", i+1), fmt.Sprintf("ws://127.0.0.1:%d/ws", p))
		nodeOf[c.welcome.Node] = i + 1
		nodeID[i+1] = c.welcome.Node
		c.closeNormal()
	}
	if len(nodeOf) != 3 {
		t.Fatalf("the three nodes report %d distinct node ids: %v", len(nodeOf), nodeID)
	}

	lbURL := fmt.Sprintf("ws://127.0.0.1:%d/ws", lbPort)
	const channel = "room:cluster"
	const seeded = 5

	// Messages published before anyone subscribes: the subscribers get them
	// from the room's history.
	seed := dialJSON(t, "seed", lbURL)
	for n := 1; n <= seeded; n++ {
		m, err := seed.publishErr(channel, map[string]int{"p": 0, "n": n}, 10*time.Second)
		if err != nil || m.Type != "ok" {
			t.Fatalf("seed publish %d: %v %v", n, m, err)
		}
	}
	seed.closeNormal()

	stopSubs := make(chan struct{})
	var subsWG sync.WaitGroup
	var subs []*clusterSubscriber
	for i := range 9 {
		s := &clusterSubscriber{t: t, name: fmt.Sprintf("sub%d", i), url: lbURL, channel: channel,
			history: 50, got: map[int][]int{}, ready: make(chan struct{})}
		subs = append(subs, s)
		subsWG.Add(1)
		go s.run(stopSubs, &subsWG)
		// One at a time, so that least_conn sees the earlier ones.
		select {
		case <-s.ready:
		case <-time.After(20 * time.Second):
			t.Fatalf("%s: not subscribed within 20s: %v", s.name, s.err())
		}
	}
	perNode := map[int][]*clusterSubscriber{}
	for _, s := range subs {
		s.mu.Lock()
		first := s.sessions[0]
		s.mu.Unlock()
		if first.replayed == nil || *first.replayed != seeded {
			t.Errorf("%s: subscribe with history replayed %v, want %d", s.name, first.replayed, seeded)
		}
		n := nodeOf[first.node]
		if n == 0 {
			t.Fatalf("%s: welcome from unknown node %q (nodes: %v)", s.name, first.node, nodeID)
		}
		perNode[n] = append(perNode[n], s)
	}
	for n := 1; n <= 3; n++ {
		if len(perNode[n]) == 0 {
			t.Fatalf("the balancer put no subscriber on node%d: %d, %d, %d", n, len(perNode[1]), len(perNode[2]), len(perNode[3]))
		}
	}

	// Two publishers through the balancer, reconnecting after a drop.
	stopPubs := make(chan struct{})
	var pubsWG sync.WaitGroup
	var pubs []*clusterPublisher
	for p := 1; p <= 2; p++ {
		pub := &clusterPublisher{t: t, p: p, url: lbURL, channel: channel}
		pubs = append(pubs, pub)
		pubsWG.Add(1)
		go pub.run(stopPubs, &pubsWG)
	}
	time.Sleep(time.Second)

	// Stop node2 as an orchestrator would: SIGTERM.
	pid2 := sc.pid(t, "node2")
	stoppedAt := time.Now()
	if err := syscall.Kill(pid2, syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM node2 (pid %d): %v", pid2, err)
	}
	moved := perNode[2]
	eventually(t, 30*time.Second, "node2's subscribers resumed on another node", func() (bool, string) {
		for _, s := range moved {
			s.mu.Lock()
			n := len(s.sessions)
			s.mu.Unlock()
			if n < 2 {
				return false, s.name + " has not resumed"
			}
		}
		return true, ""
	})
	resumedIn := time.Since(stoppedAt)
	eventually(t, 30*time.Second, "node2 exited", func() (bool, string) {
		return !processAlive(pid2), fmt.Sprintf("pid %d still there", pid2)
	})
	time.Sleep(time.Second) // publishing goes on with two nodes
	close(stopPubs)
	pubsWG.Wait()

	want := map[int][]int{0: {1, 2, 3, 4, 5}}
	for _, pub := range pubs {
		pub.mu.Lock()
		want[pub.p] = slices.Clone(pub.acked)
		pub.mu.Unlock()
		if len(want[pub.p]) < 20 {
			t.Fatalf("publisher %d: only %d acknowledged publishes", pub.p, len(want[pub.p]))
		}
	}
	eventually(t, 30*time.Second, "every subscriber has each publisher's last acknowledged message", func() (bool, string) {
		for _, s := range subs {
			s.mu.Lock()
			got := s.got
			for p, acked := range want {
				last := acked[len(acked)-1]
				if len(got[p]) == 0 || got[p][len(got[p])-1] < last {
					s.mu.Unlock()
					return false, fmt.Sprintf("%s: publisher %d at %v of %d", s.name, p, tail(got[p]), last)
				}
			}
			s.mu.Unlock()
		}
		return true, ""
	})
	close(stopSubs)
	subsWG.Wait()

	// What each subscriber saw.
	total := 0
	for _, s := range subs {
		if s.failure != nil {
			t.Errorf("%s: %v", s.name, s.failure)
		}
		for p, got := range s.got {
			for i := 1; i < len(got); i++ {
				if got[i] <= got[i-1] {
					t.Errorf("%s: publisher %d: %d after %d (twice or out of order)", s.name, p, got[i], got[i-1])
				}
			}
		}
		for p, acked := range want {
			have := map[int]bool{}
			for _, n := range s.got[p] {
				have[n] = true
			}
			for _, n := range acked {
				if !have[n] {
					t.Errorf("%s: acknowledged message p%d n%d never arrived", s.name, p, n)
				}
			}
			total += len(acked)
		}
	}
	onTwo := map[*clusterSubscriber]bool{}
	for _, s := range moved {
		onTwo[s] = true
		first, rest := s.sessions[0], s.sessions[1:]
		if first.closeStatus != websocket.StatusGoingAway {
			t.Errorf("%s: node2 closed it with %d, want 1001 (going away)", s.name, first.closeStatus)
		}
		for _, ss := range rest {
			if n := nodeOf[ss.node]; n != 1 && n != 3 {
				t.Errorf("%s: reconnected to node %q (node%d), want node1 or node3", s.name, ss.node, n)
			}
			if !ss.resumed {
				t.Errorf("%s: a later session subscribed without since", s.name)
			} else if ss.recovered == nil || !*ss.recovered {
				t.Errorf("%s: resume not recovered: %s", s.name, ss.reply)
			}
		}
	}
	for _, s := range subs {
		if !onTwo[s] && len(s.sessions) != 1 {
			t.Errorf("%s (node%d): %d sessions; a client of a node that kept running was disconnected", s.name, nodeOf[s.sessions[0].node], len(s.sessions))
		}
	}
	var landed []string
	for _, s := range moved {
		for _, ss := range s.sessions[1:] {
			landed = append(landed, fmt.Sprintf("%s->node%d", s.name, nodeOf[ss.node]))
		}
	}

	// Ctrl-C: the script stops the balancer, the nodes and Redis, and exits.
	pids := sc.pids(t)
	stopStart := time.Now()
	sc.interrupt(t)
	if err := sc.wait(90 * time.Second); err != nil {
		t.Fatalf("run.sh after the interrupt: %v\n%s", err, sc.output())
	}
	for name, pid := range pids {
		if processAlive(pid) {
			t.Errorf("%s (pid %d) still runs after run.sh exited", name, pid)
		}
	}
	for _, p := range append([]int{lbPort, redisPort}, nodePorts...) {
		if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(p), time.Second); err == nil {
			c.Close()
			t.Errorf("127.0.0.1:%d still accepts connections after run.sh exited", p)
		}
	}
	sc.checkLogs(t)

	t.Logf("cluster up in %v; subscribers per node: %d, %d, %d; node2's %d resumed %v after its SIGTERM (%s); %d acknowledged deliveries checked; stopped in %v",
		started.Round(time.Millisecond), len(perNode[1]), len(perNode[2]), len(perNode[3]), len(moved),
		resumedIn.Round(time.Millisecond), strings.Join(landed, " "), total, time.Since(stopStart).Round(time.Millisecond))
}

func tail(ns []int) any {
	if len(ns) == 0 {
		return "nothing"
	}
	return ns[len(ns)-1]
}

func processAlive(pid int) bool {
	return syscall.Kill(pid, 0) == nil
}

// clusterScript is a running examples/cluster/run.sh.
type clusterScript struct {
	dir    string
	cmd    *exec.Cmd
	exited chan struct{}
	lines  chan string

	mu  sync.Mutex
	out bytes.Buffer
}

func startClusterScript(t *testing.T, dir string, env []string) *clusterScript {
	t.Helper()
	sc := &clusterScript{dir: dir, exited: make(chan struct{}), lines: make(chan string, 100)}
	cmd := exec.Command("bash", filepath.Join("examples", "cluster", "run.sh"))
	cmd.Env = append(os.Environ(), env...)
	// Its own process group, as a terminal's foreground job: the interrupt
	// goes to the group. If the test binary dies, the kernel kills the
	// script (its trap cannot run then; the cleanup below covers the rest).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	cmd.Stderr = pw
	if err := cmd.Start(); err != nil {
		t.Fatalf("start run.sh: %v", err)
	}
	sc.cmd = cmd
	go func() {
		sc2 := bufio.NewScanner(pr)
		for sc2.Scan() {
			line := sc2.Text()
			sc.mu.Lock()
			sc.out.WriteString(line + "\n")
			sc.mu.Unlock()
			select {
			case sc.lines <- line:
			default:
			}
		}
	}()
	go func() {
		_ = cmd.Wait()
		pw.Close()
		close(sc.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-sc.exited:
		default:
			_ = cmd.Process.Signal(syscall.SIGTERM)
			if sc.wait(60*time.Second) != nil {
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			}
		}
		// Whatever the script could not stop.
		for _, pid := range sc.pids(t) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if t.Failed() {
			t.Logf("run.sh output:\n%s", sc.output())
			for _, name := range []string{"node1", "node2", "node3", "balancer"} {
				b, _ := os.ReadFile(filepath.Join(dir, name+".log"))
				lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
				if len(lines) > 25 {
					lines = lines[len(lines)-25:]
				}
				t.Logf("%s.log (last lines):\n%s", name, strings.Join(lines, "\n"))
			}
		}
	})
	return sc
}

func (sc *clusterScript) output() string {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.out.String()
}

// waitLine waits for an output line that contains want.
func (sc *clusterScript) waitLine(t *testing.T, want string, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case line := <-sc.lines:
			if strings.Contains(line, want) {
				return
			}
		case <-sc.exited:
			t.Fatalf("run.sh exited (%v) before printing %q:\n%s", sc.cmd.ProcessState, want, sc.output())
		case <-deadline:
			t.Fatalf("run.sh did not print %q within %v:\n%s", want, timeout, sc.output())
		}
	}
}

func (sc *clusterScript) pid(t *testing.T, name string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(sc.dir, name+".pid"))
	if err != nil {
		t.Fatalf("pid file of %s: %v", name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("pid file of %s: %v", name, err)
	}
	return pid
}

// pids reads every pid file the script wrote.
func (sc *clusterScript) pids(t *testing.T) map[string]int {
	out := map[string]int{}
	files, _ := filepath.Glob(filepath.Join(sc.dir, "*.pid"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			out[strings.TrimSuffix(filepath.Base(f), ".pid")] = pid
		}
	}
	return out
}

// interrupt does what Ctrl-C in a terminal does: SIGINT to the foreground
// process group. A shell cannot trap a signal that was ignored when it
// started (as SIGINT is for a background job of a non-interactive shell,
// e.g. under some CI runners): then SIGTERM, which the script treats alike.
func (sc *clusterScript) interrupt(t *testing.T) {
	t.Helper()
	sig := syscall.SIGINT
	if signalIgnored(sc.cmd.Process.Pid, syscall.SIGINT) {
		t.Logf("SIGINT is ignored in run.sh (inherited from the test's parent): sending SIGTERM instead")
		sig = syscall.SIGTERM
	}
	if err := syscall.Kill(-sc.cmd.Process.Pid, sig); err != nil {
		t.Fatalf("signal run.sh's process group: %v", err)
	}
}

// signalIgnored reads SigIgn of /proc/<pid>/status.
func signalIgnored(pid int, sig syscall.Signal) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "SigIgn:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && mask&(1<<(uint(sig)-1)) != 0
		}
	}
	return false
}

// wait waits for the script to exit and returns an error unless it exited 0.
func (sc *clusterScript) wait(timeout time.Duration) error {
	select {
	case <-sc.exited:
	case <-time.After(timeout):
		return fmt.Errorf("still running after %v", timeout)
	}
	if !sc.cmd.ProcessState.Success() {
		return fmt.Errorf("exited with %v", sc.cmd.ProcessState)
	}
	return nil
}

// checkLogs fails the test on a data race or a panic in any Caddy's log.
func (sc *clusterScript) checkLogs(t *testing.T) {
	t.Helper()
	for _, name := range []string{"node1", "node2", "node3", "balancer"} {
		b, err := os.ReadFile(filepath.Join(sc.dir, name+".log"))
		if err != nil {
			t.Errorf("%s.log: %v", name, err)
			continue
		}
		if bytes.Contains(b, []byte("WARNING: DATA RACE")) {
			t.Errorf("%s: the race detector reported a data race (log %s)", name, filepath.Join(sc.dir, name+".log"))
		}
		if bytes.Contains(b, []byte("\npanic: ")) || bytes.HasPrefix(b, []byte("panic: ")) {
			t.Errorf("%s: caddy panicked (log %s)", name, filepath.Join(sc.dir, name+".log"))
		}
	}
}

// clusterSession is one connection of a clusterSubscriber.
type clusterSession struct {
	node        string // from the welcome
	resumed     bool   // subscribed with since
	replayed    *int
	recovered   *bool
	reply       string
	closeStatus websocket.StatusCode // how it ended; -1 without a close frame
}

// clusterSubscriber stays subscribed to one channel through the balancer as
// caddychat.js does: the first subscribe asks for the room's history, and
// after a drop it reconnects and resumes from the last message it saw.
type clusterSubscriber struct {
	t       *testing.T
	name    string
	url     string
	channel string
	history int

	mu        sync.Mutex
	got       map[int][]int // publisher -> the n it sent, as received
	lastID    string
	epoch     string
	sessions  []*clusterSession
	lastErr   error
	failure   error
	ready     chan struct{} // closed after the first subscribe's ok
	readyOnce sync.Once
}

func (s *clusterSubscriber) err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr
}

func (s *clusterSubscriber) run(stop <-chan struct{}, done *sync.WaitGroup) {
	defer done.Done()
	for attempt := 0; ; attempt++ {
		select {
		case <-stop:
			return
		default:
		}
		if err := s.session(attempt, stop); err != nil {
			s.mu.Lock()
			s.lastErr = err
			s.mu.Unlock()
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func (s *clusterSubscriber) session(attempt int, stop <-chan struct{}) error {
	c, err := dialWS(s.t, fmt.Sprintf("%s#%d", s.name, attempt), s.url)
	if err != nil {
		return err
	}
	defer c.conn.CloseNow()
	w, err := c.readMsg(10 * time.Second)
	if err != nil {
		return err
	}
	if w.Type != "welcome" {
		return fmt.Errorf("first frame is not a welcome: %s", w)
	}
	op := map[string]any{"op": "subscribe", "channel": s.channel}
	ss := &clusterSession{node: w.Node, closeStatus: -1}
	s.mu.Lock()
	if s.lastID != "" {
		op["since"], op["epoch"] = s.lastID, s.epoch
		ss.resumed = true
	} else {
		op["history"] = s.history
	}
	s.mu.Unlock()
	reply, err := c.request(op, 10*time.Second)
	if err != nil {
		return err
	}
	if reply.Type != "ok" {
		return fmt.Errorf("subscribe %v: %s", op, reply)
	}
	ss.replayed, ss.recovered, ss.reply = reply.Replayed, reply.Recovered, reply.String()
	s.mu.Lock()
	s.sessions = append(s.sessions, ss)
	s.mu.Unlock()
	s.readyOnce.Do(func() { close(s.ready) })

	for {
		select {
		case <-stop:
			return nil
		default:
		}
		m, err := c.readMsg(200 * time.Millisecond)
		if errors.Is(err, errTimeout) {
			continue
		}
		if err != nil {
			s.mu.Lock()
			ss.closeStatus = websocket.CloseStatus(err)
			s.mu.Unlock()
			return nil
		}
		if m.Type != "message" {
			continue
		}
		var d struct {
			P *int `json:"p"`
			N *int `json:"n"`
		}
		s.mu.Lock()
		if err := json.Unmarshal(m.Data, &d); err != nil || d.P == nil || d.N == nil {
			s.failure = fmt.Errorf("delivery data is not {p,n}: %s", m)
		} else {
			s.got[*d.P] = append(s.got[*d.P], *d.N)
			s.lastID, s.epoch = m.MessageIDOf(), m.Epoch
		}
		s.mu.Unlock()
	}
}

// clusterPublisher publishes {"p":p,"n":1,2,...} through the balancer,
// reconnecting after a drop; acked holds the n answered ok (one without an
// answer may or may not have been published).
type clusterPublisher struct {
	t       *testing.T
	p       int
	url     string
	channel string

	mu    sync.Mutex
	acked []int
}

func (pub *clusterPublisher) run(stop <-chan struct{}, done *sync.WaitGroup) {
	defer done.Done()
	n := 0
	for attempt := 0; ; attempt++ {
		select {
		case <-stop:
			return
		default:
		}
		c, err := dialWS(pub.t, fmt.Sprintf("pub%d#%d", pub.p, attempt), pub.url)
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if _, err := c.readMsg(10 * time.Second); err != nil { // the welcome
			_ = c.conn.CloseNow()
			continue
		}
	publishing:
		for {
			select {
			case <-stop:
				_ = c.conn.CloseNow()
				return
			default:
			}
			n++
			m, err := c.publishErr(pub.channel, map[string]int{"p": pub.p, "n": n}, 10*time.Second)
			if err != nil {
				break publishing // the connection dropped: reconnect
			}
			if m.Type == "ok" {
				pub.mu.Lock()
				pub.acked = append(pub.acked, n)
				pub.mu.Unlock()
			}
			// Under the default rate limit (50 a second per connection).
			time.Sleep(30 * time.Millisecond)
		}
		_ = c.conn.CloseNow()
	}
}
