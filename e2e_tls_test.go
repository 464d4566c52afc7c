package caddychat

// End-to-end tests of transport security: WebSockets over wss:// with
// Caddy's own TLS (`tls internal`), and Redis over TLS with client
// certificates (redis_tls) on a standalone server, a Cluster and Sentinel,
// all real processes (internal/redistest's TLS mode, Caddy nodes built by
// caddyBinary).

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/caddychat/caddychat/internal/redistest"
)

// localCA is the root certificate of the node's local CA, read from its
// storage dir (pki/authorities/local/root.crt), as a pool. It returns once
// the node has its site certificate (Caddy issues it in the background
// after start; until then handshakes fail with an internal error alert).
func (n *caddyNode) localCA(t testing.TB) *x509.CertPool {
	t.Helper()
	path := filepath.Join(n.dir, "storage", "pki", "authorities", "local", "root.crt")
	var pem []byte
	eventually(t, 10*time.Second, n.name+": local CA root in "+path, func() (bool, string) {
		var err error
		pem, err = os.ReadFile(path)
		return err == nil, fmt.Sprint(err)
	})
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("%s: %s holds no PEM certificate", n.name, path)
	}
	eventually(t, 20*time.Second, n.name+": a TLS handshake with the site certificate", func() (bool, string) {
		conn, err := tls.Dial("tcp", n.addr, &tls.Config{RootCAs: pool})
		if err != nil {
			return false, err.Error()
		}
		conn.Close()
		return true, ""
	})
	return pool
}

// dialWSS opens a wss:// connection to path on n, trusting roots (nil: the
// system's roots), and starts the reader.
func dialWSS(t testing.TB, name string, n *caddyNode, path string, roots *x509.CertPool) (*wsClient, error) {
	t.Helper()
	httpClient := &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
	}}
	return dialWSWith(t, name, "wss://"+n.addr+path, &websocket.DialOptions{
		HTTPClient: httpClient,
		HTTPHeader: http.Header{"Origin": {"https://" + n.addr}},
	})
}

// dialJSONS is dialJSON over wss://.
func dialJSONS(t testing.TB, name string, n *caddyNode, roots *x509.CertPool) *wsClient {
	t.Helper()
	c, err := dialWSS(t, name, n, "/ws", roots)
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.readMsg(10 * time.Second)
	if err != nil || m.Type != "welcome" {
		t.Fatalf("%s: want a welcome first: %v %v", name, m, err)
	}
	c.welcome = m
	return c
}

// handshakeTimes makes count TLS handshakes (no session resumption) with n,
// trusting roots, and returns their durations, sorted.
func handshakeTimes(t testing.TB, n *caddyNode, roots *x509.CertPool, count int) []time.Duration {
	t.Helper()
	var times []time.Duration
	for range count {
		start := time.Now()
		conn, err := tls.Dial("tcp", n.addr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"})
		if err != nil {
			t.Fatalf("%s: TLS handshake: %v", n.name, err)
		}
		times = append(times, time.Since(start))
		conn.Close()
	}
	slices.Sort(times)
	return times
}

// TestWSSTwoNodes: two nodes serve wss:// with certificates of their own
// local CAs (`tls internal`) and share one redis-server. A client that
// trusts a node's root publishes on node A, and a subscriber on node B gets
// the message (and the other way round). A client that trusts neither root,
// or the other node's only, fails the handshake with a certificate error.
func TestWSSTwoNodes(t *testing.T) {
	rs := redistest.Start(t)
	a := startCaddy(t, "A", chatRoutes(rs.URL()), overTLS())
	b := startCaddy(t, "B", chatRoutes(rs.URL()), overTLS())
	rootA, rootB := a.localCA(t), b.localCA(t)

	const channel = "room:wss"
	subB := dialJSONS(t, "sub@B", b, rootB)
	subB.subscribe(channel)
	subA := dialJSONS(t, "sub@A", a, rootA)
	subA.subscribe(channel)
	pubA := dialJSONS(t, "pub@A", a, rootA)
	pubB := dialJSONS(t, "pub@B", b, rootB)
	if subB.welcome.Node == pubA.welcome.Node {
		t.Fatalf("both nodes report node id %s", subB.welcome.Node)
	}
	start := time.Now()
	pubA.mustPublish(channel, map[string]string{"text": "over wss from A"})
	m := subB.expectMessage(channel, 5*time.Second)
	t.Logf("publish on A to delivery on B over wss: %v", time.Since(start).Round(time.Microsecond))
	if !strings.Contains(string(m.Data), "over wss from A") {
		t.Errorf("sub@B got %s", m)
	}
	subA.expectMessage(channel, 5*time.Second)
	pubB.mustPublish(channel, map[string]string{"text": "over wss from B"})
	if m := subA.expectMessage(channel, 5*time.Second); !strings.Contains(string(m.Data), "over wss from B") {
		t.Errorf("sub@A got %s", m)
	}
	subB.expectMessage(channel, 5*time.Second)

	// Untrusted: the system's roots (the local CA is not installed: the
	// nodes run with skip_install_trust), and node B's root for node A.
	for _, tc := range []struct {
		what  string
		roots *x509.CertPool
	}{{"the system's roots", nil}, {"node B's root only", rootB}} {
		_, err := dialWSS(t, "untrusted", a, "/ws", tc.roots)
		var unknown x509.UnknownAuthorityError
		if err == nil || !errors.As(err, &unknown) || !strings.Contains(err.Error(), "x509: certificate signed by unknown authority") {
			t.Errorf("dial node A trusting %s: %v, want x509: certificate signed by unknown authority", tc.what, err)
		} else {
			t.Logf("dial node A trusting %s: %v", tc.what, err)
		}
	}

	times := handshakeTimes(t, a, rootA, 20)
	t.Logf("TLS handshakes with node A (full, no resumption, race build): min %v, median %v, max %v",
		times[0].Round(time.Microsecond), times[len(times)/2].Round(time.Microsecond), times[len(times)-1].Round(time.Microsecond))
}

// tlsChatRoutes is chatRoutes with a Redis topology line (redis,
// redis_sentinel or redis_cluster) and a redis_tls block.
func tlsChatRoutes(topology, redisTLS string) string {
	return fmt.Sprintf("\tchat /ws {\n\t\t%s\n\t\tredis_tls {\n%s\t\t}\n\t\trate_limit off\n\t}", topology, redisTLS)
}

// mutualTLS is the redis_tls block body trusting ca and presenting the
// PKI's client certificate.
func mutualTLS(pki *redistest.PKI, ca string, extra ...string) string {
	s := fmt.Sprintf("\t\t\tca %s\n\t\t\tcert %s\n\t\t\tkey %s\n", ca, pki.ClientCert, pki.ClientKey)
	for _, e := range extra {
		s += "\t\t\t" + e + "\n"
	}
	return s
}

// crossDeliver checks that channels published on either node reach
// subscribers on both.
func crossDeliver(t *testing.T, a, b *caddyNode, channels ...string) {
	t.Helper()
	subA := dialJSON(t, "sub@A", a.wsURL("/ws"))
	subB := dialJSON(t, "sub@B", b.wsURL("/ws"))
	for _, ch := range channels {
		subA.subscribe(ch)
		subB.subscribe(ch)
	}
	pubs := []*wsClient{dialJSON(t, "pub@A", a.wsURL("/ws")), dialJSON(t, "pub@B", b.wsURL("/ws"))}
	for i, ch := range channels {
		for _, pub := range pubs {
			want := fmt.Sprintf("%s from %s #%d", ch, pub.name, i)
			pub.mustPublish(ch, map[string]string{"text": want})
			for _, sub := range []*wsClient{subA, subB} {
				if m := sub.expectMessage(ch, 5*time.Second); !strings.Contains(string(m.Data), want) {
					t.Errorf("%s: got %s, want %q", sub.name, m, want)
				}
			}
		}
	}
}

// TestRedisTLSStandalone: two nodes reach a TLS-only redis-server that
// requires client certificates (tls-auth-clients yes) with redis
// rediss://... and redis_tls { ca, cert, key }; messages cross.
func TestRedisTLSStandalone(t *testing.T) {
	pki := redistest.NewPKI(t)
	rs := redistest.StartTLS(t, pki)
	routes := tlsChatRoutes("redis "+rs.URL(), mutualTLS(pki, pki.CA))
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)
	crossDeliver(t, a, b, "room:tls")
	if n := numSub(t, rs, "chat:room:tls"); n != 2 {
		t.Errorf("PUBSUB NUMSUB chat:room:tls = %d over TLS, want 2 (one per node)", n)
	}
}

// TestRedisTLSCluster: the same against a Redis Cluster whose nodes speak
// TLS only (clients and cluster bus) and require client certificates; the
// redis_tls block turns TLS on by itself (no tls flag). Channels of every
// shard cross between the nodes.
func TestRedisTLSCluster(t *testing.T) {
	pki := redistest.NewPKI(t)
	cl := redistest.StartClusterTLS(t, pki, 3, 0)
	routes := tlsChatRoutes("redis_cluster "+strings.Join(cl.Addrs(), " "), mutualTLS(pki, pki.CA))
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)
	masters := cl.Masters()
	var channels []string
	seen := map[*redistest.Server]bool{}
	for i := 0; i < 100 && len(channels) < len(masters); i++ {
		ch := fmt.Sprintf("room:tls-%d", i)
		if owner := cl.Owner("chat:" + ch); !seen[owner] {
			seen[owner] = true
			channels = append(channels, ch)
		}
	}
	crossDeliver(t, a, b, channels...)
}

// TestRedisTLSSentinel: the same through three TLS-only sentinels to a
// TLS-only master (with a replica); server_name checks every server
// against a name its certificate holds instead of the addresses the
// sentinels report.
func TestRedisTLSSentinel(t *testing.T) {
	pki := redistest.NewPKI(t)
	st := redistest.StartSentinelTLS(t, pki)
	routes := tlsChatRoutes(fmt.Sprintf("redis_sentinel %s %s", redistest.SentinelMasterName, strings.Join(st.Addrs(), " ")),
		mutualTLS(pki, pki.CA, "server_name redis.test"))
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)
	crossDeliver(t, a, b, "room:sentinel-tls")
}

// TestRedisTLSErrorsReachTheOperator: a node whose TLS settings cannot
// work still starts (Redis may be fixed later), logs at error level why it
// cannot reach Redis, in words that name the fix, and its clients get
// unavailable: a CA that did not sign the server's certificate, a
// server_name the certificate does not hold, no client certificate, and a
// client certificate of another CA.
func TestRedisTLSErrorsReachTheOperator(t *testing.T) {
	pki := redistest.NewPKI(t)
	rs := redistest.StartTLS(t, pki)
	cases := []struct {
		name     string
		redisTLS string
		want     []string
	}{
		{"wrong CA", mutualTLS(pki, pki.OtherCA), []string{
			"x509: certificate signed by unknown authority",
			"the server's certificate is not trusted: redis_tls ca must name the CA that signed it"}},
		{"wrong hostname", mutualTLS(pki, pki.CA, "server_name chat-redis.example"), []string{
			"x509: certificate is valid for localhost, redis.test, not chat-redis.example",
			`the server's certificate does not name \"chat-redis.example\": dial a name it holds or set redis_tls server_name`}},
		{"no client certificate", fmt.Sprintf("\t\t\tca %s\n", pki.CA), []string{
			"remote error: tls: certificate required",
			"the server requires a client certificate: set redis_tls cert and key"}},
		{"client certificate of another CA", fmt.Sprintf("\t\t\tca %s\n\t\t\tcert %s\n\t\t\tkey %s\n", pki.CA, pki.OtherClientCert, pki.OtherClientKey), []string{
			"remote error: tls: unknown certificate authority",
			"the server refused the client certificate of redis_tls cert: it must be signed by a CA in the server's tls-ca-cert-file"}},
	}
	for _, tc := range cases {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			n := startCaddy(t, "N", tlsChatRoutes("redis "+rs.URL(), tc.redisTLS))
			start := time.Now()
			var line string
			eventually(t, 15*time.Second, "the error log line", func() (bool, string) {
				line = logLine(n, `"level":"error"`, "cannot reach redis")
				return line != "", n.logTail(10)
			})
			t.Logf("%s: logged %v after the node listened: %s", tc.name, time.Since(start).Round(time.Millisecond), line)
			for _, w := range tc.want {
				if !strings.Contains(line, w) {
					t.Errorf("%s: the log line lacks %q:\n%s", tc.name, w, line)
				}
			}
			c := dialJSON(t, "client", n.wsURL("/ws"))
			m, err := c.publishErr("room:x", map[string]string{"text": "hi"}, 10*time.Second)
			if err != nil || m.Type != "error" || m.Code != "unavailable" {
				t.Errorf("%s: publish: %v %v, want error unavailable", tc.name, m, err)
			}
		})
	}
}

// logLine is the first line of n's log holding every one of parts.
func logLine(n *caddyNode, parts ...string) string {
	b, _ := os.ReadFile(n.logPath)
	for _, l := range strings.Split(string(b), "\n") {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(l, p)
		}
		if ok {
			return l
		}
	}
	return ""
}

// redisClientNodes is the set of module nodes (hubs) with connections to
// rs: every hub names its Redis connections caddychat-<node>. How many
// connections a hub's pool holds varies with load; which hubs hold them
// does not.
func redisClientNodes(t testing.TB, rs *redistest.Server) map[string]bool {
	t.Helper()
	ctx, cancel := redisCtx()
	defer cancel()
	list, err := rs.Client().ClientList(ctx).Result()
	if err != nil {
		t.Fatalf("CLIENT LIST: %v", err)
	}
	nodes := map[string]bool{}
	for _, field := range strings.Fields(list) {
		if name, ok := strings.CutPrefix(field, "name=caddychat-"); ok {
			nodes[name] = true
		}
	}
	return nodes
}

// TestRedisTLSReloadWithNewCertificate: the hub's key holds the TLS files'
// contents. A reload with the same files keeps the WebSocket connections
// and the Redis connections; a reload after the client certificate was
// replaced at the same paths makes a new hub: the old connections are told
// 1012 (service restart), the old hub's Redis connections close, and new
// clients are served with the new certificate.
func TestRedisTLSReloadWithNewCertificate(t *testing.T) {
	pki := redistest.NewPKI(t)
	rs := redistest.StartTLS(t, pki)
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "client.pem"), filepath.Join(dir, "client.key")
	install := func(c, k string) {
		for from, to := range map[string]string{c: cert, k: key} {
			b, err := os.ReadFile(from)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(to, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	install(pki.ClientCert, pki.ClientKey)
	routes := fmt.Sprintf("\tchat /ws {\n\t\tredis %s\n\t\tredis_tls {\n\t\t\tca %s\n\t\t\tcert %s\n\t\t\tkey %s\n\t\t}\n\t\trate_limit off\n\t\tdrain_period 100ms\n\t}",
		rs.URL(), pki.CA, cert, key)
	n := startCaddy(t, "N", routes)
	sub := dialJSON(t, "sub", n.wsURL("/ws"))
	sub.subscribe("room:rotate")
	pub := dialJSON(t, "pub", n.wsURL("/ws"))
	pub.mustPublish("room:rotate", map[string]string{"text": "before"})
	sub.expectMessage("room:rotate", 5*time.Second)
	before := redisClientNodes(t, rs)

	n.reload(t, routes) // same files
	pub.mustPublish("room:rotate", map[string]string{"text": "after a reload with the same files"})
	sub.expectMessage("room:rotate", 5*time.Second)
	if got := redisClientNodes(t, rs); fmt.Sprint(got) != fmt.Sprint(before) {
		t.Errorf("a reload with the same TLS files: Redis connections of hubs %v, want %v as before", got, before)
	}

	// The server certificate of the PKI is a client certificate of the same
	// CA too: Redis accepts it, and the files' contents are new.
	install(pki.ServerCert, pki.ServerKey)
	n.reload(t, routes)
	for _, c := range []*wsClient{sub, pub} {
		code, err := c.waitClosed(10 * time.Second)
		if err != nil || code != websocket.StatusServiceRestart {
			t.Errorf("%s after a reload with a new client certificate: close %v (%v), want 1012", c.name, code, err)
		}
	}
	sub2 := dialJSON(t, "sub2", n.wsURL("/ws"))
	sub2.subscribe("room:rotate")
	pub2 := dialJSON(t, "pub2", n.wsURL("/ws"))
	pub2.mustPublish("room:rotate", map[string]string{"text": "with the new certificate"})
	if m := sub2.expectMessage("room:rotate", 5*time.Second); !strings.Contains(string(m.Data), "with the new certificate") {
		t.Errorf("sub2 got %s", m)
	}
	eventually(t, 10*time.Second, "the old hub's Redis connections closed", func() (bool, string) {
		got := redisClientNodes(t, rs)
		for node := range before {
			if got[node] {
				return false, fmt.Sprintf("hubs %v still connected, the old one %v among them", got, before)
			}
		}
		return len(got) == 1, fmt.Sprintf("hubs %v connected", got)
	})
}
