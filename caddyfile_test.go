package caddychat

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
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

// optionPaths are the names of the options in docs, a nested one as
// "jwt/secret".
func optionPaths(docs []optionDoc) []string {
	var paths []string
	for _, o := range docs {
		paths = append(paths, o.name)
		for _, n := range o.block {
			paths = append(paths, o.name+"/"+n.name)
		}
	}
	return paths
}

// TestCaddyfileAdaptPinsEveryOption: every option of the tables, top-level
// and nested, appears in a golden file of TestCaddyfileAdapt.
func TestCaddyfileAdaptPinsEveryOption(t *testing.T) {
	files, err := filepath.Glob("testdata/caddyfile_adapt/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files: %v", err)
	}
	seen := map[string]bool{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		input, _, _ := strings.Cut(string(data), "----------")
		blocks, err := caddyfile.Parse(f, []byte(input))
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, b := range blocks {
			for _, seg := range b.Segments {
				if seg.Directive() != "chat" {
					continue
				}
				d := caddyfile.NewDispenser(seg)
				d.Next()
				d.RemainingArgs()
				for d.NextBlock(0) {
					name := d.Val()
					seen[name] = true
					d.RemainingArgs()
					for nesting := d.Nesting(); d.NextBlock(nesting); {
						seen[name+"/"+d.Val()] = true
						d.RemainingArgs()
					}
				}
			}
		}
	}
	for _, p := range optionPaths(chatOptions.docs()) {
		if !seen[p] {
			t.Errorf("option %s is in no file of testdata/caddyfile_adapt", p)
		}
	}
}

// TestCaddyfileSyntaxComment: the syntax in UnmarshalCaddyfile's doc comment
// is the tables', option for option and in their order.
func TestCaddyfileSyntaxComment(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "caddyfile.go", nil, parser.ParseComments)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, decl := range f.Decls {
		fn, ok := decl.(*ast.FuncDecl)
		if !ok || fn.Name.Name != "UnmarshalCaddyfile" || fn.Doc == nil {
			continue
		}
		for _, c := range fn.Doc.List {
			if line, ok := strings.CutPrefix(c.Text, "//\t"); ok {
				got = append(got, line)
			}
		}
	}
	want := append([]string{"chat [<matcher>] {"}, syntaxLines(chatOptions.docs(), "\t")...)
	want = append(want, "}")
	if slices.Equal(got, want) {
		return
	}
	for _, l := range want {
		if !slices.Contains(got, l) {
			t.Errorf("the syntax comment lacks %q", l)
		}
	}
	for _, l := range got {
		if !slices.Contains(want, l) {
			t.Errorf("the syntax comment has %q, which the tables do not", l)
		}
	}
	t.Errorf("UnmarshalCaddyfile's syntax comment differs from the tables; want:\n//\t%s", strings.Join(want, "\n//\t"))
}

// readmeOptionRows are the rows of README.md's table of options, by the
// options each names (a row may name two: "`subscribe …` / `publish …`").
func readmeOptionRows(t *testing.T) map[string]string {
	t.Helper()
	data, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, table, ok := strings.Cut(string(data), "\n| option | default | meaning |\n|---|---|---|\n")
	if !ok {
		t.Fatal("README.md has no table of options (| option | default | meaning |)")
	}
	table, _, _ = strings.Cut(table, "\n\n")
	code := regexp.MustCompile("`([^`]+)`")
	rows := map[string]string{}
	for _, row := range strings.Split(table, "\n") {
		first, _, _ := strings.Cut(strings.TrimPrefix(row, "| "), " | ")
		for _, part := range strings.Split(first, " / ") {
			m := code.FindStringSubmatch(part)
			if m == nil {
				t.Fatalf("README.md's option row %q names no option", row)
			}
			name, _, _ := strings.Cut(m[1], " ")
			rows[name] = row
		}
	}
	return rows
}

// TestCaddyfileOptionsInREADME: README.md's table of options has a row for
// every option of the table and none for an option it does not have; a
// block option's row names the block's options.
func TestCaddyfileOptionsInREADME(t *testing.T) {
	rows := readmeOptionRows(t)
	docs := chatOptions.docs()
	word := regexp.MustCompile("[a-z_]+")
	code := regexp.MustCompile("`([^`]+)`")
	for _, o := range docs {
		row, ok := rows[o.name]
		if !ok {
			t.Errorf("README.md's table of options has no row for %s", o.name)
			continue
		}
		var named []string
		for _, m := range code.FindAllStringSubmatch(row, -1) {
			named = append(named, word.FindAllString(m[1], -1)...)
		}
		for _, n := range o.block {
			if !slices.Contains(named, n.name) {
				t.Errorf("README.md's row for %s does not name its option %s", o.name, n.name)
			}
		}
	}
	for name := range rows {
		if !slices.ContainsFunc(docs, func(o optionDoc) bool { return o.name == name }) {
			t.Errorf("README.md's table of options has a row for %s, which is no option", name)
		}
	}
}

// jsonNames are the JSON names of T's fields.
func jsonNames[T any]() []string {
	var names []string
	typ := reflect.TypeFor[T]()
	for i := range typ.NumField() {
		name, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" {
			names = append(names, name)
		}
	}
	return names
}

func checkJSONNames[T any](t *testing.T, tbl *optionTable[T]) {
	t.Helper()
	names := jsonNames[T]()
	for _, o := range tbl.options {
		if !slices.Contains(names, o.name) {
			t.Errorf("%s option %s: %T has no JSON field of that name (JSON names: %v)",
				orChat(tbl.block), o.name, *new(T), names)
		}
	}
}

func orChat(block string) string {
	if block != "" {
		return block
	}
	return "chat"
}

// TestCaddyfileNamesAreJSONNames: every Caddyfile option is called the same
// in the JSON config.
func TestCaddyfileNamesAreJSONNames(t *testing.T) {
	checkJSONNames(t, chatOptions)
	checkJSONNames(t, jwtOptions)
	checkJSONNames(t, anonymousOptions)
	checkJSONNames(t, redisSentinelOptions)
	checkJSONNames(t, redisClusterOptions)
	checkJSONNames(t, redisTLSOptions)
}

// TestCaddyfileClosestName: a typo gets the option meant; a name far from
// every option gets none.
func TestCaddyfileClosestName(t *testing.T) {
	names := []string{"history", "history_memory", "max_replay", "ui", "redis", "redis_tls", "tls"}
	for typed, want := range map[string]string{
		"histroy": "history", "hisory": "history", "History": "history", "history_memroy": "history_memory",
		"max_reply": "max_replay", "redis_tsl": "redis_tls", "tsl": "tls", "rdis": "redis",
		"bogus": "", "u": "ui", "x": "", "max": "", "memory": "", "replay": "", "xyz": "",
	} {
		if got := closestName(typed, names); got != want {
			t.Errorf("closestName(%q) = %q, want %q", typed, got, want)
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
		{Handler{EphemeralRate: &RateLimit{PerSecond: 5, Burst: 200000}}, "ephemeral_rate burst"},
		{Handler{PublishEndpoint: "chat/publish", PublishKey: "0123456789abcdef"}, `publish_endpoint "chat/publish"`},
		{Handler{PublishEndpoint: "/chat/publish"}, "publish_endpoint needs publish_key or a jwt block"},
		{Handler{PublishEndpoint: "/p", PublishKey: "short"}, "publish_key: must be at least 16 bytes"},
		{Handler{History: []HistoryRule{{Count: 0}}}, "history count 0"},
		{Handler{History: []HistoryRule{{Count: 2_000_000}}}, "history count 2000000"},
		{Handler{History: []HistoryRule{{Channels: "room:x*", Count: 5}}}, `history room:x*: pattern "room:x*"`},
		{Handler{History: []HistoryRule{{Channels: "user:{user}", Count: 5}}}, "{user} is not allowed in history patterns"},
		{Handler{History: []HistoryRule{{Count: 5, MaxAge: caddy.Duration(time.Millisecond)}}}, "history max age 1ms"},
		{Handler{MaxReplay: -1}, "max_replay -1"},
		{Handler{HistoryMemory: 1000}, "history_memory 1000 bytes: must be between 1MiB and 1TiB"},
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
	if err == nil || !strings.Contains(err.Error(), `chat: redis "http://127.0.0.1:6379": invalid URL scheme`) {
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
