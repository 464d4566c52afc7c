package caddychat

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
)

// Redis topologies. A standalone Redis is the redis option's URL; Sentinel
// and Cluster take a list of addresses and credentials of their own. The hub
// gets a redis.UniversalClient either way and does not know which it is,
// except that on a cluster pub/sub is sharded (see redis_cluster.go).

// RedisSentinel names a master watched by Redis Sentinel: the nodes ask the
// sentinels where the master is and follow its failovers, for commands and
// for the pub/sub connection alike.
type RedisSentinel struct {
	// Name the sentinels monitor the master under (the <master-name> of
	// "sentinel monitor" in sentinel.conf).
	Master string `json:"master"`
	// Addresses of sentinels, host:port. One that answers is enough; list
	// them all so that any may be down.
	Addrs []string `json:"addrs"`
	// ACL user and password of the master and replicas. Placeholders such
	// as {env.REDIS_PASSWORD} are expanded.
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`
	// Database number. Default: 0.
	DB int `json:"db,omitempty"`
	// ACL user and password of the sentinels themselves (requirepass in
	// sentinel.conf), if they have one. Placeholders are expanded.
	SentinelUsername string `json:"sentinel_username,omitempty"`
	SentinelPassword string `json:"sentinel_password,omitempty"`
	// Speak TLS to the sentinels, the master and the replicas, verifying
	// their certificates against the system's roots.
	TLS bool `json:"tls,omitempty"`
}

// RedisCluster is a Redis Cluster. Its nodes carry the channels with sharded
// pub/sub (SPUBLISH, SSUBSCRIBE): a message goes to the shard that owns its
// channel's slot, not to every node of the cluster.
type RedisCluster struct {
	// Addresses of some of the cluster's nodes, host:port; the others are
	// discovered from them.
	Addrs []string `json:"addrs"`
	// ACL user and password of the nodes. Placeholders are expanded.
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`
	// Speak TLS to the nodes, verifying their certificates against the
	// system's roots.
	TLS bool `json:"tls,omitempty"`
}

// provisionRedisTopology expands placeholders in the Redis options and
// rejects combinations and values that cannot work, naming the option
// (checkBroker, the checks `caddy adapt` runs too), before any hub is built.
func (h *Handler) provisionRedisTopology(repl *caddy.Replacer) error {
	expand := func(s string) string { return strings.TrimSpace(repl.ReplaceKnown(s, "")) }
	var errs []error
	required := func(option string, v *string) {
		raw := *v
		*v = expand(raw)
		errs = append(errs, emptyExpansion(option, raw, *v))
	}
	if s := h.RedisSentinel; s != nil {
		s.Master = expand(s.Master)
		s.Username, s.Password = expand(s.Username), expand(s.Password)
		s.SentinelUsername, s.SentinelPassword = expand(s.SentinelUsername), expand(s.SentinelPassword)
		for i := range s.Addrs {
			required("redis_sentinel address", &s.Addrs[i])
		}
	}
	if c := h.RedisCluster; c != nil {
		c.Username, c.Password = expand(c.Username), expand(c.Password)
		for i := range c.Addrs {
			required("redis_cluster address", &c.Addrs[i])
		}
	}
	if t := h.RedisTLS; t != nil {
		required("redis_tls ca", &t.CA)
		required("redis_tls cert", &t.Cert)
		required("redis_tls key", &t.Key)
		t.ServerName = expand(t.ServerName)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if errs := h.checkBroker(false); len(errs) > 0 {
		return errors.Join(errs...)
	}
	return h.provisionRedisTLS()
}

// servers identifies the Redis deployment of c, credentials included (as a
// digest), for the hub's key: a reload that changes any of it gets a new hub.
func (c hubConfig) servers() string {
	secret := func(parts ...string) string {
		sum := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
		return fmt.Sprintf("%x", sum[:8])
	}
	switch {
	case c.sentinel != nil:
		s := c.sentinel
		return fmt.Sprintf("sentinel:%s@%s/%d,tls=%v,auth=%s", s.Master, strings.Join(s.Addrs, ","), s.DB, s.TLS,
			secret(s.Username, s.Password, s.SentinelUsername, s.SentinelPassword)) + c.redisTLS.keyPart()
	case c.cluster != nil:
		cl := c.cluster
		return fmt.Sprintf("cluster:%s,tls=%v,auth=%s", strings.Join(cl.Addrs, ","), cl.TLS, secret(cl.Username, cl.Password)) + c.redisTLS.keyPart()
	}
	return c.redisURL + c.redisTLS.keyPart()
}

// brokerName names the broker for logs and the broker_up metric, without
// credentials: "memory", a Redis URL without its password, or the
// sentinels' or cluster's addresses.
func (c hubConfig) brokerName() string {
	switch {
	case c.sentinel != nil:
		return fmt.Sprintf("sentinel %s at %s", c.sentinel.Master, strings.Join(c.sentinel.Addrs, ","))
	case c.cluster != nil:
		return "cluster at " + strings.Join(c.cluster.Addrs, ",")
	case c.redisURL != "":
		u, err := url.Parse(c.redisURL)
		if err != nil {
			return "redis"
		}
		u.User = nil
		return u.Redacted()
	}
	return "memory"
}

// usesRedis reports whether c names any Redis (else the in-process broker).
func (c hubConfig) usesRedis() bool {
	return c.redisURL != "" || c.sentinel != nil || c.cluster != nil
}

// newRedisClient connects (lazily, as go-redis does) to the Redis of cfg.
// sharded is true for a cluster, whose channels use sharded pub/sub.
func newRedisClient(cfg hubConfig, clientName string) (client redis.UniversalClient, sharded bool, err error) {
	timeout := cfg.brokerTimeouts
	// Every TLS connection is dialled by tlsDialer, whose errors say what a
	// failed handshake means for the configuration.
	dialer := func(conf *tls.Config) func(context.Context, string, string) (net.Conn, error) {
		if conf == nil {
			return nil
		}
		return tlsDialer(timeout, conf)
	}
	switch {
	case cfg.sentinel != nil:
		s := cfg.sentinel
		conf := clientTLSConfig(s.TLS, cfg.redisTLS)
		return redis.NewFailoverClient(&redis.FailoverOptions{
			MasterName:       s.Master,
			SentinelAddrs:    s.Addrs,
			SentinelUsername: s.SentinelUsername,
			SentinelPassword: s.SentinelPassword,
			Username:         s.Username,
			Password:         s.Password,
			DB:               s.DB,
			TLSConfig:        conf,
			Dialer:           dialer(conf),
			ClientName:       clientName,
			DialTimeout:      timeout,
			ReadTimeout:      timeout,
			WriteTimeout:     timeout,
		}), false, nil
	case cfg.cluster != nil:
		c := cfg.cluster
		conf := clientTLSConfig(c.TLS, cfg.redisTLS)
		return redis.NewClusterClient(&redis.ClusterOptions{
			Addrs:        c.Addrs,
			Username:     c.Username,
			Password:     c.Password,
			TLSConfig:    conf,
			Dialer:       dialer(conf),
			ClientName:   clientName,
			DialTimeout:  timeout,
			ReadTimeout:  timeout,
			WriteTimeout: timeout,
		}), true, nil
	}
	// rediss:// URLs get their TLS configuration (server name from the
	// host, skip_verify from the query) from ParseURL; redis_tls adds to it.
	opts, err := redis.ParseURL(cfg.redisURL)
	if err != nil {
		return nil, false, fmt.Errorf("parsing redis URL: %w", err)
	}
	opts.TLSConfig = urlTLSConfig(opts.TLSConfig, cfg.redisTLS)
	opts.Dialer = dialer(opts.TLSConfig)
	opts.DialTimeout = timeout
	opts.ReadTimeout = timeout
	opts.WriteTimeout = timeout
	opts.ClientName = clientName
	return redis.NewClient(opts), false, nil
}
