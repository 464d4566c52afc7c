package caddychat

import (
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/redis/go-redis/v9"
)

func TestCaddyfileRedisTopologyErrors(t *testing.T) {
	cases := []struct{ input, want string }{
		{"chat {\n redis_sentinel mymaster\n}", "redis_sentinel takes the master name and one or more sentinel addresses"},
		{"chat {\n redis_sentinel\n}", "redis_sentinel takes the master name and one or more sentinel addresses, e.g. redis_sentinel mymaster 10.0.0.1:26379 10.0.0.2:26379; got none"},
		{"chat {\n redis_sentinel m 127.0.0.1:26379 {\n bogus 1\n }\n}", `unknown redis_sentinel option "bogus"`},
		{"chat {\n redis_sentinel m 127.0.0.1:26379 {\n password\n }\n}", "redis_sentinel password takes one value"},
		{"chat {\n redis_sentinel m 127.0.0.1:26379 {\n db two\n }\n}", `redis_sentinel db "two"`},
		{"chat {\n redis_sentinel m 127.0.0.1:26379 {\n db -1\n }\n}", `redis_sentinel db "-1"`},
		{"chat {\n redis_sentinel m 127.0.0.1:26379 {\n tls yes\n }\n}", "redis_sentinel tls takes no values"},
		{"chat {\n redis_cluster\n}", "redis_cluster takes one or more node addresses"},
		{"chat {\n redis_cluster 127.0.0.1:7000 {\n db 1\n }\n}", `unknown redis_cluster option "db"`},
		{"chat {\n redis_cluster 127.0.0.1:7000 {\n username a b\n }\n}", "redis_cluster username takes one value"},
	}
	for _, tc := range cases {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want one containing %q", tc.input, err, tc.want)
		}
	}
}

// TestProvisionRejectsBadRedisTopology: a wrong Redis setting fails
// Provision with a message naming the option, before any hub is built.
func TestProvisionRejectsBadRedisTopology(t *testing.T) {
	sentinel := func(master string, addrs ...string) *RedisSentinel {
		return &RedisSentinel{Master: master, Addrs: addrs}
	}
	cases := []struct {
		h    Handler
		want string
	}{
		{Handler{Redis: "redis://127.0.0.1:6379", RedisCluster: &RedisCluster{Addrs: []string{"127.0.0.1:7000"}}},
			"chat: redis and redis_cluster are alternatives, set one of them"},
		{Handler{RedisSentinel: sentinel("m", "127.0.0.1:26379"), RedisCluster: &RedisCluster{Addrs: []string{"127.0.0.1:7000"}}},
			"chat: redis_sentinel and redis_cluster are alternatives"},
		{Handler{RedisSentinel: sentinel("", "127.0.0.1:26379")}, "chat: redis_sentinel: needs the name the sentinels monitor the master under"},
		{Handler{RedisSentinel: sentinel("m")}, "chat: redis_sentinel: needs at least one address"},
		{Handler{RedisSentinel: sentinel("m", "127.0.0.1")}, `chat: redis_sentinel address "127.0.0.1": want host:port`},
		{Handler{RedisSentinel: &RedisSentinel{Master: "m", Addrs: []string{"h:1"}, DB: -1}}, "chat: redis_sentinel db -1"},
		{Handler{RedisCluster: &RedisCluster{}}, "chat: redis_cluster: needs at least one address"},
		{Handler{RedisCluster: &RedisCluster{Addrs: []string{"127.0.0.1:99999"}}}, `chat: redis_cluster address "127.0.0.1:99999"`},
		{Handler{RedisCluster: &RedisCluster{Addrs: []string{"h:1"}}, ChannelPrefix: ptr("{app}:")}, `chat: channel_prefix "{app}:": no { or } with redis_cluster`},
		{Handler{Redis: "http://127.0.0.1:6379"}, `chat: redis "http://127.0.0.1:6379": invalid URL scheme: http`},
	}
	for _, tc := range cases {
		h := tc.h
		ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
		err := h.Provision(ctx)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: Provision error %v, want one containing %q", tc.h, err, tc.want)
		}
		if h.hubKey != "" {
			t.Errorf("%+v: a failed Provision holds a hub", tc.h)
		}
		cancel()
	}
}

func TestRedisTopologyPlaceholdersAndHubKey(t *testing.T) {
	t.Setenv("CHAT_TEST_REDIS_PASSWORD", "s3cret")
	t.Setenv("CHAT_TEST_SENTINEL", "127.0.0.1:26399")
	h := Handler{RedisSentinel: &RedisSentinel{Master: "m", Addrs: []string{"{env.CHAT_TEST_SENTINEL}"}, Password: "{env.CHAT_TEST_REDIS_PASSWORD}"}}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	defer h.Cleanup()
	if s := h.RedisSentinel; s.Addrs[0] != "127.0.0.1:26399" || s.Password != "s3cret" {
		t.Fatalf("placeholders not expanded: %+v", s)
	}
	if strings.Contains(h.hubKey, "s3cret") || !strings.Contains(h.hubKey, "sentinel:m@127.0.0.1:26399") {
		t.Errorf("hub key %q: want the topology, and no password in clear", h.hubKey)
	}
	// Each topology, and a changed password, is another hub.
	keys := map[string]bool{}
	for _, cfg := range []hubConfig{
		{redisURL: "redis://127.0.0.1:6379/0"},
		{sentinel: &RedisSentinel{Master: "m", Addrs: []string{"127.0.0.1:26399"}}},
		{sentinel: &RedisSentinel{Master: "m", Addrs: []string{"127.0.0.1:26399"}, Password: "other"}},
		{cluster: &RedisCluster{Addrs: []string{"127.0.0.1:26399"}}},
	} {
		keys[cfg.key()] = true
	}
	if len(keys) != 4 {
		t.Errorf("hub keys are not distinct per topology: %v", keys)
	}
}

func TestNewRedisClientPerTopology(t *testing.T) {
	c, sharded, err := newRedisClient(hubConfig{redisURL: "rediss://user:pw@redis.internal:6380/3"}, "test")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	opts := c.(*redis.Client).Options()
	if sharded || opts.TLSConfig == nil || opts.TLSConfig.ServerName != "redis.internal" || opts.Username != "user" || opts.Password != "pw" || opts.DB != 3 {
		t.Errorf("rediss URL: sharded %v, options %+v: want TLS with the host as server name, user, password and db", sharded, opts)
	}
	fc, sharded, err := newRedisClient(hubConfig{sentinel: &RedisSentinel{Master: "m", Addrs: []string{"127.0.0.1:1"}}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	defer fc.Close()
	if _, ok := fc.(*redis.Client); !ok || sharded {
		t.Errorf("sentinel: got %T sharded %v, want a failover *redis.Client with classic pub/sub", fc, sharded)
	}
	cc, sharded, err := newRedisClient(hubConfig{cluster: &RedisCluster{Addrs: []string{"127.0.0.1:1"}, TLS: true}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	if cl, ok := cc.(*redis.ClusterClient); !ok || !sharded || cl.Options().TLSConfig == nil {
		t.Errorf("cluster: got %T sharded %v, want a *redis.ClusterClient with sharded pub/sub and TLS", cc, sharded)
	}
}

// TestBrokerNameHidesCredentials: the broker's name labels a metric and
// every log line of its hub, so it never carries a password.
func TestBrokerNameHidesCredentials(t *testing.T) {
	for _, tc := range []struct {
		cfg  hubConfig
		want string
	}{
		{hubConfig{}, "memory"},
		{hubConfig{redisURL: "redis://default:s3cret@10.0.0.5:6379/2"}, "redis://10.0.0.5:6379/2"},
		{hubConfig{redisURL: "rediss://:s3cret@cache.internal:6380"}, "rediss://cache.internal:6380"},
		{hubConfig{sentinel: &RedisSentinel{Master: "mymaster", Addrs: []string{"a:26379", "b:26379"}, Password: "s3cret"}}, "sentinel mymaster at a:26379,b:26379"},
		{hubConfig{cluster: &RedisCluster{Addrs: []string{"a:7000", "b:7000"}, Password: "s3cret"}}, "cluster at a:7000,b:7000"},
	} {
		if got := tc.cfg.brokerName(); got != tc.want {
			t.Errorf("brokerName of %+v = %q, want %q", tc.cfg, got, tc.want)
		}
	}
}
