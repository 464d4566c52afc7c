package caddychat

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// TLS to Redis. A rediss:// URL, or the tls flag of redis_sentinel and
// redis_cluster, verifies the servers against the system's roots and sends
// no client certificate. The redis_tls block names a private CA, a client
// certificate for servers that require one (tls-auth-clients yes: mutual
// TLS) and the name the servers' certificates are checked against, for
// whichever topology the route uses.

// RedisTLS is the TLS configuration of the connections to Redis: to the
// standalone server of a rediss:// URL, to the sentinels, master and
// replicas of redis_sentinel, or to every node of redis_cluster. Setting it
// turns TLS on for redis_sentinel and redis_cluster (their tls flag is then
// implied); with redis, the URL must be rediss://. The files are read once,
// when the configuration is loaded: a reload reads them again, and new
// contents make a new Redis connection (the hub's key holds their digest).
type RedisTLS struct {
	// PEM file with the CA certificate(s) that the Redis servers'
	// certificates must chain to (redis.conf's tls-ca-cert-file, for a
	// private CA). Default: the system's roots.
	CA string `json:"ca,omitempty"`

	// PEM files of the client certificate (with any intermediates) and its
	// private key, presented to servers that ask for one (redis.conf's
	// tls-auth-clients yes or optional). Both or neither. Default: none.
	Cert string `json:"cert,omitempty"`
	Key  string `json:"key,omitempty"`

	// Name the servers' certificates must hold (a DNS or IP SAN), instead of
	// the host each connection dials: needed when nodes are reached by an
	// address their certificate does not name, e.g. the IPs a cluster or
	// the sentinels report. Every server must then hold this name.
	ServerName string `json:"server_name,omitempty"`

	config *tls.Config // built by provision
	digest string      // of the files' contents and ServerName, for the hub's key
}

// provisionRedisTLS loads the files of the redis_tls block, which
// provisionRedisTopology expanded and checked. It runs before the hub is
// made, so a hub is never built from TLS settings that cannot work.
func (h *Handler) provisionRedisTLS() error {
	if h.RedisTLS == nil {
		return nil
	}
	return h.RedisTLS.load()
}

// load reads the CA and the client key pair and builds the tls.Config.
func (t *RedisTLS) load() error {
	conf := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	sum := sha256.New()
	fmt.Fprintf(sum, "server_name=%s\x00", t.ServerName)
	if t.CA != "" {
		pem, err := os.ReadFile(t.CA)
		if err != nil {
			return fmt.Errorf("chat: redis_tls ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("chat: redis_tls ca %s: holds no PEM certificate", t.CA)
		}
		conf.RootCAs = pool
		fmt.Fprintf(sum, "ca=%x\x00", sha256.Sum256(pem))
	}
	if t.Cert != "" {
		certPEM, err := os.ReadFile(t.Cert)
		if err != nil {
			return fmt.Errorf("chat: redis_tls cert: %w", err)
		}
		keyPEM, err := os.ReadFile(t.Key)
		if err != nil {
			return fmt.Errorf("chat: redis_tls key: %w", err)
		}
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return fmt.Errorf("chat: redis_tls cert %s and key %s: %w", t.Cert, t.Key, err)
		}
		if leaf := pair.Leaf; leaf != nil && time.Now().After(leaf.NotAfter) {
			return fmt.Errorf("chat: redis_tls cert %s: expired on %s", t.Cert, leaf.NotAfter.UTC().Format(time.RFC3339))
		}
		conf.Certificates = []tls.Certificate{pair}
		fmt.Fprintf(sum, "cert=%x\x00key=%x\x00", sha256.Sum256(certPEM), sha256.Sum256(keyPEM))
	}
	t.config = conf
	t.digest = fmt.Sprintf("%x", sum.Sum(nil)[:8])
	return nil
}

// keyPart is what the TLS settings add to the hub's key.
func (t *RedisTLS) keyPart() string {
	if t == nil {
		return ""
	}
	return ",redis_tls=" + t.digest
}

// clientTLSConfig is the tls.Config of a topology whose tls flag is on (or
// that has a redis_tls block): the block's, else the system's roots.
func clientTLSConfig(on bool, t *RedisTLS) *tls.Config {
	switch {
	case t != nil && t.config != nil:
		return t.config.Clone()
	case on || t != nil:
		return &tls.Config{MinVersion: tls.VersionTLS12}
	}
	return nil
}

// urlTLSConfig merges the redis_tls block into the TLS configuration
// redis.ParseURL made of a rediss:// URL (server name from the URL's host,
// skip_verify from its query), which is kept where the block says nothing.
func urlTLSConfig(fromURL *tls.Config, t *RedisTLS) *tls.Config {
	if fromURL == nil || t == nil || t.config == nil {
		return fromURL
	}
	conf := t.config.Clone()
	if conf.ServerName == "" {
		conf.ServerName = fromURL.ServerName
	}
	conf.InsecureSkipVerify = fromURL.InsecureSkipVerify
	return conf
}

// tlsDialer dials Redis with TLS, completing the handshake before the
// connection is handed to go-redis, and says in the error what a failed
// handshake means for the configuration: a certificate is not trusted or
// names another host, or the server wants a client certificate.
func tlsDialer(timeout time.Duration, conf *tls.Config) func(ctx context.Context, network, addr string) (net.Conn, error) {
	d := &tls.Dialer{
		NetDialer: &net.Dialer{Timeout: timeout, KeepAlive: 5 * time.Minute},
		Config:    conf,
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, explainTLSError(addr, conf, err)
		}
		return conn, nil
	}
}

// explainTLSError adds to err what the operator may change. Errors of the
// TCP dial itself are returned as they are.
func explainTLSError(addr string, conf *tls.Config, err error) error {
	var (
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		invalid  x509.CertificateInvalidError
		verify   *tls.CertificateVerificationError
	)
	var hint string
	switch msg := err.Error(); {
	case errors.As(err, &unknown):
		hint = "the server's certificate is not trusted: redis_tls ca must name the CA that signed it"
		if conf.RootCAs == nil {
			hint = "the server's certificate is not trusted by the system's roots: name its CA in redis_tls ca"
		}
	case errors.As(err, &hostname):
		name := conf.ServerName
		if name == "" {
			name, _, _ = net.SplitHostPort(addr)
		}
		hint = fmt.Sprintf("the server's certificate does not name %q: dial a name it holds or set redis_tls server_name", name)
	case errors.As(err, &invalid):
		hint = "the server's certificate is not valid (expired, not yet valid, or not for TLS servers)"
	case errors.As(err, &verify):
		hint = "the server's certificate could not be verified"
	case remoteAlertHint(err) != "":
		hint = remoteAlertHint(err)
	case strings.Contains(msg, "tls:") || strings.Contains(msg, "first record does not look like a TLS handshake"):
		hint = "is the server's port a TLS port (tls-port)?"
	default:
		var opErr *net.OpError
		if errors.As(err, &opErr) && opErr.Op == "dial" {
			return err
		}
		hint = "TLS handshake failed"
	}
	return fmt.Errorf("redis TLS handshake with %s: %w (%s)", addr, err, hint)
}

// remoteAlertHint explains the TLS alerts a Redis server sends about the
// client's certificate. With TLS 1.3 they come after the client's side of
// the handshake, at the first read, so they reach go-redis's command errors
// rather than the dialer.
func remoteAlertHint(err error) string {
	switch msg := err.Error(); {
	case strings.Contains(msg, "certificate required"):
		return "the server requires a client certificate: set redis_tls cert and key"
	case strings.Contains(msg, "bad certificate"), strings.Contains(msg, "unknown certificate authority"), strings.Contains(msg, "certificate unknown"):
		return "the server refused the client certificate of redis_tls cert: it must be signed by a CA in the server's tls-ca-cert-file"
	case strings.Contains(msg, "certificate expired"), strings.Contains(msg, "certificate revoked"):
		return "the server refused the client certificate of redis_tls cert as expired or revoked"
	}
	return ""
}

// checkRedisAtStart asks a new hub's Redis for a PING once, so that a Redis
// the node cannot reach (wrong address, a certificate it does not trust, a
// client certificate Redis refuses) is reported when the configuration is
// loaded, not only at the first publish. The configuration still loads:
// Redis may come up later, and publishes are answered unavailable until it
// does.
func (h *hub) checkRedisAtStart(timeout time.Duration) {
	if h.redis == nil {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), max(timeout, 5*time.Second))
		defer cancel()
		start := time.Now()
		err := h.redis.Ping(ctx).Err()
		// With TLS 1.3 a Redis that refuses the client's certificate sends
		// its alert after the client's side of the handshake: a PING written
		// before the alert arrived meets a reset, which names no cause. A
		// new connection usually reads the alert first; ask twice more.
		for try := 0; try < 2 && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF)) && ctx.Err() == nil; try++ {
			time.Sleep(100 * time.Millisecond)
			err = h.redis.Ping(ctx).Err()
		}
		switch {
		case err == nil:
			h.log.Debug("redis answers", zap.Duration("ping", time.Since(start)))
		case errors.Is(err, redis.ErrClosed):
			// The hub was closed meanwhile (a reload or shutdown).
		default:
			if hint := remoteAlertHint(err); hint != "" && !strings.Contains(err.Error(), hint) {
				err = fmt.Errorf("%w (%s)", err, hint)
			}
			h.log.Error("cannot reach redis; clients are told unavailable until it answers", zap.Error(err))
		}
	}()
}

// unmarshalRedisTLS parses the redis_tls block (its options are
// redisTLSOptions).
func (h *Handler) unmarshalRedisTLS(d *caddyfile.Dispenser, _ []string) error {
	if h.RedisTLS != nil {
		return errors.New("redis_tls is set twice")
	}
	t := new(RedisTLS)
	if err := redisTLSOptions.parse(d, t); err != nil {
		return err
	}
	h.RedisTLS = t
	return nil
}

// redisTLSOptions are the options of the redis_tls block.
var redisTLSOptions = &optionTable[RedisTLS]{block: "redis_tls", options: []option[RedisTLS]{
	stringOption("ca", "<PEM file>", "/etc/chat/redis-ca.pem", func(t *RedisTLS, v string) { t.CA = v }),
	stringOption("cert", "<PEM file>", "/etc/chat/redis-client.pem", func(t *RedisTLS, v string) { t.Cert = v }),
	stringOption("key", "<PEM file>", "/etc/chat/redis-client.key", func(t *RedisTLS, v string) { t.Key = v }),
	stringOption("server_name", "<name>", "redis.internal", func(t *RedisTLS, v string) { t.ServerName = v }),
}}
