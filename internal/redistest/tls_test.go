package redistest

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// TestTLSServers: the TLS servers speak TLS only and require a client
// certificate of the PKI's CA; a cluster and a Sentinel setup form over TLS.
func TestTLSServers(t *testing.T) {
	pki := NewPKI(t)
	start := time.Now()
	s := StartTLS(t, pki)
	t.Logf("TLS redis-server ready in %v", time.Since(start).Round(time.Millisecond))
	if !strings.HasPrefix(s.URL(), "rediss://") {
		t.Errorf("URL %q, want rediss://", s.URL())
	}
	if got := s.Do("PING"); got != "PONG" {
		t.Fatalf("PING over TLS with the client certificate: %v", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	try := func(conf *tls.Config) error {
		c := redis.NewClient(&redis.Options{Addr: s.Addr(), TLSConfig: conf, MaxRetries: -1, DialTimeout: time.Second, ReadTimeout: time.Second})
		defer c.Close()
		return c.Ping(ctx).Err()
	}
	if err := try(nil); err == nil {
		t.Error("a plain-text client got an answer from a TLS-only server")
	}
	noCert := pki.ClientTLS()
	noCert.Certificates = nil
	if err := try(noCert); err == nil || !strings.Contains(err.Error(), "certificate required") {
		t.Errorf("a client without a certificate: %v, want certificate required", err)
	}

	start = time.Now()
	c := StartClusterTLS(t, pki, 3, 0)
	t.Logf("TLS cluster of 3 masters ready in %v", time.Since(start).Round(time.Millisecond))
	if n := len(c.Masters()); n != 3 {
		t.Errorf("%d masters, want 3", n)
	}

	start = time.Now()
	st := StartSentinelTLS(t, pki)
	t.Logf("TLS master, replica and 3 sentinels ready in %v", time.Since(start).Round(time.Millisecond))
	if addr, err := st.MasterAddr(); err != nil || addr != st.Master.Addr() {
		t.Errorf("sentinels name %q (%v) as master, want %s", addr, err, st.Master.Addr())
	}
}
