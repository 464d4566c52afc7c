package caddychat

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// TestHookCacheBounded: the subscribe hook's decision cache never holds
// more than hookCacheEntries decisions, forgets a decision after its ttl,
// and a route without cache stores nothing.
func TestHookCacheBounded(t *testing.T) {
	t.Parallel()
	c := newHookCache(time.Minute)
	now := time.Now()
	for i := 0; i < 3*hookCacheEntries; i++ {
		c.put("u\x00alice\x00room:"+strconv.Itoa(i), hookDecision{allow: true}, now)
		if n := c.len(); n > hookCacheEntries {
			t.Fatalf("after %d puts the cache holds %d decisions, more than %d", i+1, n, hookCacheEntries)
		}
	}
	c.put("k", hookDecision{reason: "no"}, now)
	if d, ok := c.get("k", now.Add(59*time.Second)); !ok || d.allow || d.reason != "no" {
		t.Fatalf("a decision within its ttl: %v %v", d, ok)
	}
	if _, ok := c.get("k", now.Add(61*time.Second)); ok {
		t.Fatal("a decision past its ttl is still used")
	}
	off := newHookCache(0)
	off.put("k", hookDecision{allow: true}, now)
	if _, ok := off.get("k", now); ok {
		t.Fatal("cache 0 stored a decision")
	}
}

// TestCloseReasonText: a close reason fits RFC 6455's 123 bytes, cut at a
// character boundary, valid UTF-8.
func TestCloseReasonText(t *testing.T) {
	t.Parallel()
	for _, in := range []string{"short", strings.Repeat("a", 123), strings.Repeat("a", 124), strings.Repeat("é", 100), strings.Repeat("😀", 40), "bad \xff byte"} {
		out := closeReasonText(in)
		if len(out) > maxCloseReason || !utf8.ValidString(out) {
			t.Errorf("closeReasonText(%q) = %q (%d bytes)", in, out, len(out))
		}
		if len(in) <= maxCloseReason && utf8.ValidString(in) && out != in {
			t.Errorf("closeReasonText(%q) changed a reason that fits: %q", in, out)
		}
	}
}

// TestHookTransportTimeoutIsATimeout: the hook's HTTP transport gives up
// after the same timeout as the call's context (ResponseHeaderTimeout),
// and may do so first; such a failure is a timeout, not an error, in the
// metric and in the close reason.
func TestHookTransportTimeoutIsATimeout(t *testing.T) {
	hc := newHookClient("connect", &HookConfig{URL: "http://127.0.0.1:1/hook", Timeout: caddy.Duration(200 * time.Millisecond)}, zap.NewNop())
	err := hc.failed(context.Background(), "unreachable", fmt.Errorf("Post: %w", &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}))
	var f *hookFailure
	if !errors.As(err, &f) || f.outcome != hookTimeout {
		t.Fatalf("a transport timeout with the context still live: %v, want outcome %q", err, hookTimeout)
	}
	err = hc.failed(context.Background(), "unreachable", errors.New("connection refused"))
	if !errors.As(err, &f) || f.outcome != hookError {
		t.Fatalf("connection refused: %v, want outcome %q", err, hookError)
	}
}
