package caddychat

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
)

// TestCaddyfileAdapt pins the JSON every Caddyfile option adapts to. Each file
// in testdata/caddyfile_adapt is a Caddyfile, a line of dashes, and its JSON.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/caddyfile_adapt/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files: %v", err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			parts := strings.Split(string(data), "----------")
			if len(parts) != 2 {
				t.Fatalf("%s: want a Caddyfile, a line of dashes and JSON", f)
			}
			caddyfileText, want := strings.TrimSpace(parts[0])+"\n", strings.TrimSpace(parts[1])
			if !caddytest.CompareAdapt(t, f, caddyfileText, "caddyfile", want) {
				t.Errorf("%s adapts to different JSON", f)
			}
		})
	}
}

func TestCaddyfileErrorsNameTheOption(t *testing.T) {
	cases := []struct{ input, want string }{
		{"chat {\n bogus 1\n}", `unknown chat option "bogus"`},
		{"chat {\n guest_names maybe\n}", "guest_names takes on or off"},
		{"chat {\n guest_names\n}", "guest_names takes on or off"},
		{"chat {\n guest_names on off\n}", "guest_names takes on or off"},
		{"chat {\n redis\n}", "redis needs exactly one value"},
		{"chat {\n redis a b\n}", "redis takes one value"},
		{"chat {\n max_message_size lots\n}", "max_message_size"},
		{"chat {\n max_message_size 0\n}", "max_message_size"},
		{"chat {\n send_queue -3\n}", "send_queue"},
		{"chat {\n ping_interval soon\n}", "ping_interval"},
		{"chat {\n write_timeout -1s\n}", "write_timeout"},
		{"chat {\n publish_timeout x\n}", "publish_timeout"},
		{"chat {\n drain_period soon\n}", "drain_period"},
		{"chat {\n origins\n}", "origins needs at least one pattern"},
		{"chat extra", "no arguments"},
		{"chat {\n jwt {\n bogus 1\n }\n}", `unknown jwt option "bogus"`},
		{"chat {\n jwt {\n secret\n }\n}", "jwt secret needs exactly one value"},
		{"chat {\n jwt {\n leeway never\n }\n}", "jwt leeway"},
		{"chat {\n jwt {\n max_token_size huge\n }\n}", "jwt max_token_size"},
		{"chat {\n jwt {\n query_token a b\n }\n}", "jwt query_token"},
		{"chat {\n anonymous {\n read x\n }\n}", `unknown anonymous option "read"`},
		{"chat {\n anonymous {\n subscribe\n }\n}", "anonymous subscribe needs at least one channel pattern"},
		{"chat {\n subscribe\n}", "subscribe needs at least one channel pattern"},
		{"chat {\n rate_limit fast\n}", `rate_limit "fast"`},
		{"chat {\n rate_limit 10 many\n}", `rate_limit burst "many"`},
		{"chat {\n rate_limit\n}", "rate_limit needs"},
		{"chat {\n max_connections 0\n}", "max_connections"},
		{"chat {\n max_connections_per_user x\n}", "max_connections_per_user"},
		{"chat {\n max_subscriptions -1\n}", "max_subscriptions"},
		{"chat {\n history\n}", "history [<channel pattern>] <count> [<max age>]"},
		{"chat {\n history room:*\n}", "history [<channel pattern>] <count>"},
		{"chat {\n history room:* lots\n}", `history count "lots"`},
		{"chat {\n history 0\n}", "history count"},
		{"chat {\n history 10 forever\n}", `history max age "forever"`},
		{"chat {\n history room:* 10 1h extra\n}", "history [<channel pattern>]"},
		{"chat {\n max_replay none\n}", "max_replay"},
		{"chat {\n history_memory lots\n}", `history_memory "lots"`},
		{"chat {\n history_memory 0\n}", `history_memory "0"`},
		{"chat {\n history_new_channels\n}", "history_new_channels <n> [<per duration>]"},
		{"chat {\n history_new_channels many\n}", `history_new_channels "many"`},
		{"chat {\n history_new_channels 0\n}", `history_new_channels "0"`},
		{"chat {\n history_new_channels 10 soon\n}", `history_new_channels period "soon"`},
		{"chat {\n history_new_channels 10 1m extra\n}", "history_new_channels <n>"},
	}
	for _, tc := range cases {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want one containing %q", tc.input, err, tc.want)
		}
	}
}

func TestValidateRejectsBadValues(t *testing.T) {
	cases := []struct {
		h    Handler
		want string
	}{
		{Handler{Protocol: "xml"}, `protocol "xml"`},
		{Handler{Protocol: protocolRaw}, "protocol raw needs a channel"},
		{Handler{Protocol: protocolRaw, Channel: "room *"}, `channel "room *"`},
		{Handler{Channel: "room:a"}, "channel applies to protocol raw only"},
		{Handler{ChannelPrefix: ptr("a b")}, "channel_prefix"},
		{Handler{MaxMessageSize: 1 << 30}, "max_message_size"},
		{Handler{SendQueue: 1 << 10}, "send_queue"},
		{Handler{PingInterval: caddy.Duration(time.Millisecond)}, "ping_interval"},
		{Handler{WriteTimeout: caddy.Duration(2 * time.Hour)}, "write_timeout"},
		{Handler{Origins: []string{""}}, "origins"},
		{Handler{Anonymous: &Permissions{Subscribe: []string{"room:x*"}}}, `anonymous subscribe: pattern "room:x*"`},
		{Handler{Subscribe: []string{"room:*"}}, "subscribe and publish rules apply to authenticated users and need a jwt block"},
		{Handler{JWT: &JWTConfig{Secret: "short"}}, "jwt secret: must be at least 32 bytes"},
		{Handler{JWT: &JWTConfig{Secret: testSecret, Leeway: caddy.Duration(time.Hour)}}, "jwt leeway"},
		{Handler{JWT: &JWTConfig{Secret: testSecret}, Publish: []string{"a::b"}}, "publish: pattern"},
		{Handler{RateLimit: &RateLimit{PerSecond: 5, Burst: -2}}, "rate_limit burst"},
		{Handler{PublishEndpoint: "chat/publish", PublishKey: "0123456789abcdef"}, `publish_endpoint "chat/publish"`},
		{Handler{PublishEndpoint: "/chat/publish"}, "publish_endpoint needs publish_key or a jwt block"},
		{Handler{PublishEndpoint: "/p", PublishKey: "short"}, "publish_key: must be at least 16 bytes"},
		{Handler{History: []HistoryRule{{Count: 0}}}, "history count 0"},
		{Handler{History: []HistoryRule{{Count: 2_000_000}}}, "history count 2000000"},
		{Handler{History: []HistoryRule{{Channels: "room:x*", Count: 5}}}, `history room:x*: pattern "room:x*"`},
		{Handler{History: []HistoryRule{{Channels: "user:{user}", Count: 5}}}, "{user} is not allowed in history patterns"},
		{Handler{History: []HistoryRule{{Count: 5, MaxAge: caddy.Duration(time.Millisecond)}}}, "history max age 1ms"},
		{Handler{MaxReplay: -1}, "max_replay -1"},
		{Handler{HistoryMemory: 1000}, "history_memory 1000: must be between 1MiB and 1TiB"},
		{Handler{HistoryNewChannels: &NewChannelLimit{Count: 0, Per: caddy.Duration(time.Minute)}}, "history_new_channels 0: must be between 1 and 100000 channels, or off"},
		{Handler{HistoryNewChannels: &NewChannelLimit{Count: 5, Per: caddy.Duration(time.Millisecond)}}, "history_new_channels period 1ms: must be between 1s and 24h"},
	}
	for _, tc := range cases {
		h := tc.h
		ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
		if err := h.Provision(ctx); err != nil {
			t.Fatalf("Provision: %v", err)
		}
		err := h.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: Validate error %v, want one containing %q", tc.h, err, tc.want)
		}
		if err := h.Cleanup(); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
		cancel()
	}
}

func TestProvisionRejectsBadKeyMaterial(t *testing.T) {
	notPEM := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(notPEM, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		jwt  JWTConfig
		want string
	}{
		{JWTConfig{}, "jwt needs exactly one of secret, public_key and jwks"},
		{JWTConfig{Secret: testSecret, JWKS: "https://idp.example.com/jwks.json"}, "jwt needs exactly one of"},
		{JWTConfig{PublicKey: filepath.Join(t.TempDir(), "missing.pem")}, "jwt public_key"},
		{JWTConfig{PublicKey: notPEM}, "holds no PEM block"},
		{JWTConfig{JWKS: "ftp://idp.example.com/jwks"}, "jwt jwks"},
	}
	for _, tc := range cases {
		jwtCfg := tc.jwt
		h := Handler{JWT: &jwtCfg}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
		err := h.Provision(ctx)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: Provision error %v, want one containing %q", tc.jwt, err, tc.want)
		}
		if h.hubKey != "" {
			t.Errorf("%+v: a failed Provision holds a hub", tc.jwt)
		}
		cancel()
	}
}

func TestProvisionRejectsBadRedisURL(t *testing.T) {
	h := Handler{Redis: "http://127.0.0.1:6379"}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	err := h.Provision(ctx)
	if err == nil || !strings.Contains(err.Error(), "chat: redis:") {
		t.Fatalf("Provision error = %v, want one naming the redis option", err)
	}
	if h.Cleanup() != nil || h.hubKey != "" {
		t.Fatal("Cleanup after a failed Provision must release nothing")
	}
}

func TestEnvPlaceholdersInConfig(t *testing.T) {
	t.Setenv("CHAT_TEST_PREFIX", "envprefix:")
	h := Handler{ChannelPrefix: ptr("{env.CHAT_TEST_PREFIX}")}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	defer h.Cleanup()
	if *h.ChannelPrefix != "envprefix:" {
		t.Fatalf("channel_prefix = %q, want the environment's value", *h.ChannelPrefix)
	}
}
