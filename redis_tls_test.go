package caddychat

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddychat/caddychat/internal/redistest"
)

func TestRedisTLSCaddyfileErrors(t *testing.T) {
	cases := []struct{ input, want string }{
		{"chat {\n redis_tls /ca.pem\n}", "redis_tls takes no values, only a block"},
		{"chat {\n redis_tls {\n ca\n }\n}", "redis_tls ca takes one value"},
		{"chat {\n redis_tls {\n cert a b\n }\n}", "redis_tls cert takes one value"},
		{"chat {\n redis_tls {\n insecure_skip_verify yes\n }\n}", `unknown redis_tls option "insecure_skip_verify"`},
		{"chat {\n redis_tls {\n ca a\n }\n redis_tls {\n ca b\n }\n}", "redis_tls is set twice"},
	}
	for _, tc := range cases {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want one containing %q", tc.input, err, tc.want)
		}
	}
}

// TestRedisTLSProvisionErrors: a redis_tls block that cannot work fails the
// config load with a message naming the option and the file, and no hub is
// made.
func TestRedisTLSProvisionErrors(t *testing.T) {
	pki := redistest.NewPKI(t)
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.pem")
	const url = "rediss://127.0.0.1:6390/0"
	cases := []struct {
		h    Handler
		want string
	}{
		{Handler{RedisTLS: &RedisTLS{CA: pki.CA}}, "redis_tls applies to redis (rediss://), redis_sentinel or redis_cluster, and none is set"},
		{Handler{Redis: "redis://127.0.0.1:6390/0", RedisTLS: &RedisTLS{CA: pki.CA}}, "redis_tls needs a rediss:// URL"},
		{Handler{Redis: url, RedisTLS: &RedisTLS{Cert: pki.ClientCert}}, "redis_tls: cert and key go together"},
		{Handler{Redis: url, RedisTLS: &RedisTLS{Key: pki.ClientKey}}, "redis_tls: cert and key go together"},
		{Handler{Redis: url, RedisTLS: &RedisTLS{ServerName: "redis.test:6390"}}, `redis_tls server_name "redis.test:6390"`},
		{Handler{Redis: url, RedisTLS: &RedisTLS{CA: missing}}, "redis_tls ca: open " + missing},
		{Handler{Redis: url, RedisTLS: &RedisTLS{CA: notPEM}}, "redis_tls ca " + notPEM + ": holds no PEM certificate"},
		{Handler{Redis: url, RedisTLS: &RedisTLS{Cert: missing, Key: pki.ClientKey}}, "redis_tls cert: open " + missing},
		{Handler{Redis: url, RedisTLS: &RedisTLS{Cert: pki.ClientCert, Key: missing}}, "redis_tls key: open " + missing},
		{Handler{Redis: url, RedisTLS: &RedisTLS{Cert: pki.ClientCert, Key: pki.ServerKey}}, "redis_tls cert " + pki.ClientCert + " and key " + pki.ServerKey + ": tls: private key does not match public key"},
		{Handler{RedisCluster: &RedisCluster{Addrs: []string{"127.0.0.1:7000"}}, RedisTLS: &RedisTLS{Cert: notPEM, Key: notPEM}}, "redis_tls cert " + notPEM},
	}
	for _, tc := range cases {
		h := tc.h
		ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
		err := h.Provision(ctx)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: Provision error %v, want one containing %q", tc.h.RedisTLS, err, tc.want)
		}
		if h.hubKey != "" {
			t.Errorf("%+v: a failed Provision holds a hub", tc.h.RedisTLS)
			_ = h.Cleanup()
		}
		cancel()
	}
}

// TestRedisTLSHubKey: the hub's key holds a digest of the TLS files'
// contents, so that new certificates (same paths) make a new hub on reload,
// and identical settings share one.
func TestRedisTLSHubKey(t *testing.T) {
	pki := redistest.NewPKI(t)
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	copyFile(t, pki.CA, ca)
	key := func(h *Handler) string {
		t.Helper()
		if err := h.provisionRedisTLS(); err != nil {
			t.Fatal(err)
		}
		return hubConfig{redisURL: h.Redis, redisTLS: h.RedisTLS}.key()
	}
	const url = "rediss://127.0.0.1:6390/0"
	plain := hubConfig{redisURL: url}.key()
	first := key(&Handler{Redis: url, RedisTLS: &RedisTLS{CA: ca, Cert: pki.ClientCert, Key: pki.ClientKey}})
	same := key(&Handler{Redis: url, RedisTLS: &RedisTLS{CA: ca, Cert: pki.ClientCert, Key: pki.ClientKey}})
	if first != same {
		t.Errorf("the same TLS settings give two hub keys:\n%s\n%s", first, same)
	}
	if first == plain {
		t.Errorf("redis_tls is not in the hub key: %s", first)
	}
	copyFile(t, pki.OtherCA, ca) // the CA file's contents change, not its name
	if rotated := key(&Handler{Redis: url, RedisTLS: &RedisTLS{CA: ca, Cert: pki.ClientCert, Key: pki.ClientKey}}); rotated == first {
		t.Errorf("a new CA in the same file keeps the hub key %s", first)
	}
	if named := key(&Handler{Redis: url, RedisTLS: &RedisTLS{ServerName: "redis.test"}}); named == plain || named == first {
		t.Errorf("server_name is not in the hub key: %s", named)
	}
	for _, s := range []string{first, same} {
		if strings.Contains(s, "BEGIN") || strings.Contains(s, dir) {
			t.Errorf("the hub key shows file contents or paths: %s", s)
		}
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
