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
		{"chat {\n redis\n}", "redis needs exactly one value"},
		{"chat {\n redis a b\n}", "redis takes one value"},
		{"chat {\n max_message_size lots\n}", "max_message_size"},
		{"chat {\n max_message_size 0\n}", "max_message_size"},
		{"chat {\n send_queue -3\n}", "send_queue"},
		{"chat {\n ping_interval soon\n}", "ping_interval"},
		{"chat {\n write_timeout -1s\n}", "write_timeout"},
		{"chat {\n publish_timeout x\n}", "publish_timeout"},
		{"chat {\n origins\n}", "origins needs at least one pattern"},
		{"chat extra", "no arguments"},
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
		{Handler{SendQueue: 1 << 20}, "send_queue"},
		{Handler{PingInterval: caddy.Duration(time.Millisecond)}, "ping_interval"},
		{Handler{WriteTimeout: caddy.Duration(2 * time.Hour)}, "write_timeout"},
		{Handler{Origins: []string{""}}, "origins"},
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
