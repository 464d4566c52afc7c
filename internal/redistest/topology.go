package redistest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Modes of a Server besides a standalone one.
const (
	modeCluster  = "cluster"
	modeReplica  = "replica"
	modeSentinel = "sentinel"
)

// Sentinel timings: short, so that a test's failover takes about two seconds.
const (
	sentinelDownAfter       = 1000 * time.Millisecond
	sentinelFailoverTimeout = 5000 * time.Millisecond
)

// SentinelMasterName is the name the sentinels of StartSentinel monitor the
// master under.
const SentinelMasterName = "caddychat"

// args is the server's command line for its mode.
func (s *Server) args() ([]string, error) {
	common := []string{
		"--bind", "127.0.0.1",
		"--port", strconv.Itoa(s.port),
		"--dir", s.dir,
		"--daemonize", "no",
		"--logfile", "", // log to stdout, which goes to redis.log
	}
	data := []string{"--save", "", "--appendonly", "no"}
	if s.aof {
		data[3] = "yes"
	}
	if p := s.pki; p != nil {
		// TLS only: no plain port; the TLS port is the server's port.
		common[3] = "0"
		common = append(common, "--tls-port", strconv.Itoa(s.port),
			"--tls-cert-file", p.ServerCert, "--tls-key-file", p.ServerKey,
			"--tls-ca-cert-file", p.CA, "--tls-auth-clients", "yes")
		switch s.mode {
		case modeCluster:
			common = append(common, "--tls-cluster", "yes")
		case modeReplica, modeSentinel:
			common = append(common, "--tls-replication", "yes")
		}
	}
	switch s.mode {
	case "":
		return append(common, data...), nil
	case modeCluster:
		return append(append(common, data...),
			"--cluster-enabled", "yes",
			"--cluster-config-file", filepath.Join(s.dir, "nodes-"+strconv.Itoa(s.port)+".conf"),
			"--cluster-node-timeout", "1000",
		), nil
	case modeReplica:
		host, port, _ := net.SplitHostPort(s.modeArg)
		return append(append(common, data...), "--replicaof", host, port), nil
	case modeSentinel:
		// A sentinel rewrites its configuration file, so it must be a file
		// of its own, writable, and kept across the sentinel's life.
		conf := filepath.Join(s.dir, "sentinel-"+strconv.Itoa(s.port)+".conf")
		if _, err := os.Stat(conf); err != nil {
			text := fmt.Sprintf("sentinel monitor %s 127.0.0.1 %s 2\n"+
				"sentinel down-after-milliseconds %[1]s %[3]d\n"+
				"sentinel failover-timeout %[1]s %[4]d\n"+
				"sentinel parallel-syncs %[1]s 1\n",
				SentinelMasterName, s.modeArg, sentinelDownAfter.Milliseconds(), sentinelFailoverTimeout.Milliseconds())
			if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
				return nil, err
			}
		}
		return append([]string{conf, "--sentinel"}, common...), nil
	}
	return nil, fmt.Errorf("unknown mode %q", s.mode)
}

// ---------------------------------------------------------------------------
// Redis Cluster.

// Cluster is a Redis Cluster, every node a Server on a free loopback port.
type Cluster struct {
	t        testing.TB
	Nodes    []*Server // masters and replicas, in no particular order
	masters  int
	replicas int // per master
}

// StartCluster starts masters*(1+replicas) cluster-enabled servers, joins
// them with redis-cli --cluster create (slots spread evenly, replicas
// assigned by redis-cli) and waits until every node reports
// cluster_state:ok and agrees on who serves the slots, and every replica is
// in sync with its master.
func StartCluster(t testing.TB, masters, replicas int) *Cluster {
	t.Helper()
	return startCluster(t, masters, replicas, nil)
}

// StartClusterTLS is StartCluster with nodes that speak TLS only, to
// clients and on the cluster bus (tls-cluster yes, tls-replication yes),
// with the server certificate of pki and client certificates required.
func StartClusterTLS(t testing.TB, pki *PKI, masters, replicas int) *Cluster {
	t.Helper()
	return startCluster(t, masters, replicas, pki)
}

func startCluster(t testing.TB, masters, replicas int, pki *PKI) *Cluster {
	t.Helper()
	c := &Cluster{t: t, masters: masters, replicas: replicas}
	for range masters * (1 + replicas) {
		c.Nodes = append(c.Nodes, startServer(t, modeCluster, "", pki))
	}
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		t.Fatalf("redistest: redis-cli not found (Debian: apt-get install -y redis-tools): %v", err)
	}
	var args []string
	if pki != nil {
		args = []string{"--tls", "--cacert", pki.CA, "--cert", pki.ClientCert, "--key", pki.ClientKey}
	}
	args = append(append(args, "--cluster", "create"), c.Addrs()...)
	args = append(args, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	if out, err := exec.Command(cli, args...).CombinedOutput(); err != nil {
		t.Fatalf("redistest: redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	c.waitReady()
	return c
}

// Addrs are the nodes' addresses, to configure a cluster client with.
func (c *Cluster) Addrs() []string {
	addrs := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		addrs[i] = n.Addr()
	}
	return addrs
}

func (c *Cluster) waitReady() {
	c.t.Helper()
	deadline := time.Now().Add(startTimeout)
	for {
		state := c.readiness()
		if state == "" {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("redistest: cluster not ready within %v: %s", startTimeout, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readiness is "" when the cluster is ready, else what is still missing.
func (c *Cluster) readiness() string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, n := range c.Nodes {
		info, err := n.Client().ClusterInfo(ctx).Result()
		if err != nil {
			return fmt.Sprintf("%s: CLUSTER INFO: %v", n.Addr(), err)
		}
		if !strings.Contains(info, "cluster_state:ok") {
			return n.Addr() + ": cluster_state is not ok"
		}
		slots, err := n.Client().ClusterSlots(ctx).Result()
		if err != nil {
			return fmt.Sprintf("%s: CLUSTER SLOTS: %v", n.Addr(), err)
		}
		if len(slots) != c.masters {
			return fmt.Sprintf("%s sees %d slot ranges, want %d", n.Addr(), len(slots), c.masters)
		}
		for _, r := range slots {
			if len(r.Nodes) != 1+c.replicas {
				return fmt.Sprintf("%s sees %d nodes serving slots %d-%d, want %d", n.Addr(), len(r.Nodes), r.Start, r.End, 1+c.replicas)
			}
		}
		repl, err := n.Client().Info(ctx, "replication").Result()
		if err != nil {
			return fmt.Sprintf("%s: INFO replication: %v", n.Addr(), err)
		}
		if strings.Contains(repl, "role:slave") && !strings.Contains(repl, "master_link_status:up") {
			return n.Addr() + ": replica not in sync yet"
		}
	}
	return ""
}

// live is a node that is running, to ask about the cluster.
func (c *Cluster) live() *Server {
	for _, n := range c.Nodes {
		if n.Running() {
			return n
		}
	}
	c.t.Fatal("redistest: no cluster node is running")
	return nil
}

// Masters are the nodes that serve slots now, in slot order.
func (c *Cluster) Masters() []*Server {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ranges, err := c.live().Client().ClusterSlots(ctx).Result()
	if err != nil {
		c.t.Fatalf("redistest: CLUSTER SLOTS: %v", err)
	}
	var out []*Server
	for _, r := range ranges {
		if len(r.Nodes) > 0 {
			out = append(out, c.server(r.Nodes[0].Addr))
		}
	}
	return out
}

func (c *Cluster) server(addr string) *Server {
	for _, n := range c.Nodes {
		if n.Addr() == addr {
			return n
		}
	}
	c.t.Fatalf("redistest: %s is not a node of this cluster", addr)
	return nil
}

// Slot is the cluster slot of key (or shard channel), asked of the cluster.
func (c *Cluster) Slot(key string) int64 {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	slot, err := c.live().Client().ClusterKeySlot(ctx, key).Result()
	if err != nil {
		c.t.Fatalf("redistest: CLUSTER KEYSLOT %s: %v", key, err)
	}
	return slot
}

// Owner is the master that serves key's slot, according to CLUSTER SLOTS
// of a running node.
func (c *Cluster) Owner(key string) *Server {
	c.t.Helper()
	slot := c.Slot(key)
	addr := c.ownerOf(c.live(), slot)
	if addr == "" {
		c.t.Fatalf("redistest: no node serves slot %d", slot)
	}
	return c.server(addr)
}

// ---------------------------------------------------------------------------
// Redis Sentinel.

// Sentinel is a master, one replica and three sentinels monitoring the
// master as SentinelMasterName with a quorum of two.
type Sentinel struct {
	t         testing.TB
	Master    *Server
	Replica   *Server
	Sentinels []*Server
	pki       *PKI
}

// StartSentinel starts the setup and waits until every sentinel knows the
// replica and the other sentinels, so that a failover can happen.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	return startSentinel(t, nil)
}

// StartSentinelTLS is StartSentinel with a master, a replica and sentinels
// that speak TLS only (tls-replication yes), with the server certificate
// of pki and client certificates required.
func StartSentinelTLS(t testing.TB, pki *PKI) *Sentinel {
	t.Helper()
	return startSentinel(t, pki)
}

func startSentinel(t testing.TB, pki *PKI) *Sentinel {
	t.Helper()
	s := &Sentinel{t: t, pki: pki}
	s.Master = startServer(t, "", "", pki)
	s.Replica = startServer(t, modeReplica, s.Master.Addr(), pki)
	for range 3 {
		s.Sentinels = append(s.Sentinels, startServer(t, modeSentinel, strconv.Itoa(s.Master.Port()), pki))
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		state := s.readiness()
		if state == "" {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: sentinel setup not ready within 30s: %s", state)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Addrs are the sentinels' addresses.
func (s *Sentinel) Addrs() []string {
	addrs := make([]string, len(s.Sentinels))
	for i, n := range s.Sentinels {
		addrs[i] = n.Addr()
	}
	return addrs
}

func (s *Sentinel) readiness() string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	info, err := s.Replica.Client().Info(ctx, "replication").Result()
	if err != nil {
		return "replica: INFO: " + err.Error()
	}
	if !strings.Contains(info, "master_link_status:up") {
		return "replica not in sync with the master yet"
	}
	for _, n := range s.Sentinels {
		sc := redis.NewSentinelClient(&redis.Options{Addr: n.Addr(), DialTimeout: time.Second, ReadTimeout: time.Second, TLSConfig: n.tlsConfig()})
		replicas, err1 := sc.Replicas(ctx, SentinelMasterName).Result()
		peers, err2 := sc.Sentinels(ctx, SentinelMasterName).Result()
		sc.Close()
		if err1 != nil || err2 != nil {
			return fmt.Sprintf("sentinel %s: %v %v", n.Addr(), err1, err2)
		}
		if len(replicas) != 1 || len(peers) != len(s.Sentinels)-1 {
			return fmt.Sprintf("sentinel %s knows %d replicas and %d other sentinels", n.Addr(), len(replicas), len(peers))
		}
	}
	return ""
}

// MasterAddr is the master's address according to the first sentinel that
// answers.
func (s *Sentinel) MasterAddr() (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var lastErr error
	for _, n := range s.Sentinels {
		if !n.Running() {
			continue
		}
		sc := redis.NewSentinelClient(&redis.Options{Addr: n.Addr(), DialTimeout: time.Second, ReadTimeout: time.Second, TLSConfig: n.tlsConfig()})
		addr, err := sc.GetMasterAddrByName(ctx, SentinelMasterName).Result()
		sc.Close()
		if err == nil && len(addr) == 2 {
			return net.JoinHostPort(addr[0], addr[1]), nil
		}
		lastErr = err
	}
	return "", fmt.Errorf("no sentinel names the master: %v", lastErr)
}

// nodeID is the node's cluster id (CLUSTER MYID).
func (c *Cluster) nodeID(n *Server) string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	id, err := n.Client().Do(ctx, "CLUSTER", "MYID").Text()
	if err != nil {
		c.t.Fatalf("redistest: CLUSTER MYID on %s: %v", n.Addr(), err)
	}
	return id
}

// MoveSlot reshards one slot from its owner to the master dst, keys included, as
// redis-cli --cluster reshard does it (IMPORTING, MIGRATING, MIGRATE, then
// SETSLOT NODE on every node), and waits until every node agrees.
func (c *Cluster) MoveSlot(slot int64, dst *Server) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src := c.server(c.ownerOf(c.live(), slot))
	if src == nil || src == dst {
		c.t.Fatalf("redistest: slot %d: owner %v, destination %s", slot, src, dst.Addr())
	}
	srcID, dstID := c.nodeID(src), c.nodeID(dst)
	do := func(n *Server, args ...any) {
		c.t.Helper()
		if err := n.Client().Do(ctx, args...).Err(); err != nil {
			c.t.Fatalf("redistest: %v on %s: %v", args, n.Addr(), err)
		}
	}
	do(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", srcID)
	do(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dstID)
	for {
		keys, err := src.Client().ClusterGetKeysInSlot(ctx, int(slot), 100).Result()
		if err != nil {
			c.t.Fatalf("redistest: CLUSTER GETKEYSINSLOT %d: %v", slot, err)
		}
		if len(keys) == 0 {
			break
		}
		args := []any{"MIGRATE", "127.0.0.1", dst.Port(), "", 0, 5000, "KEYS"}
		for _, k := range keys {
			args = append(args, k)
		}
		do(src, args...)
	}
	do(dst, "CLUSTER", "SETSLOT", slot, "NODE", dstID)
	do(src, "CLUSTER", "SETSLOT", slot, "NODE", dstID)
	for _, n := range c.Masters() {
		if n != src && n != dst {
			do(n, "CLUSTER", "SETSLOT", slot, "NODE", dstID)
		}
	}
	deadline := time.Now().Add(startTimeout)
	for {
		agreed := true
		for _, n := range c.Nodes {
			if n.Running() && c.ownerOf(n, slot) != dst.Addr() {
				agreed = false
			}
		}
		if agreed {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("redistest: nodes do not agree that %s owns slot %d", dst.Addr(), slot)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ownerOf is the address of slot's master in n's view of the cluster.
func (c *Cluster) ownerOf(n *Server, slot int64) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ranges, err := n.Client().ClusterSlots(ctx).Result()
	if err != nil {
		return ""
	}
	for _, r := range ranges {
		if int64(r.Start) <= slot && slot <= int64(r.End) && len(r.Nodes) > 0 {
			return r.Nodes[0].Addr
		}
	}
	return ""
}
