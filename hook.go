package caddychat

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// Synchronous hooks (issue 18): the node asks the application's backend
// before it admits a connection (connect_hook), lets it subscribe to a
// channel (subscribe_hook) or fans a message out (publish_hook). The wire
// format is PROTOCOL.md's "Hooks"; this file is the client all three share:
// one keep-alive http.Client per hook, a timeout, a bound on the calls in
// flight (over it a call fails at once, it never queues), the signature
// header (signature.go), an answer read with a limit, metrics, and the
// warnings about bad answers. What each answer means is in hook_connect.go
// and hook_channel.go.

// HookConfig is one synchronous hook: the backend URL the node POSTs to and
// how it calls it.
type HookConfig struct {
	// URL the node POSTs to, http:// or https://. Placeholders such as
	// {env.HOOK_URL} are expanded.
	URL string `json:"url"`

	// Channels the hook is asked about, as patterns (the grammar of
	// subscribe and publish, without {user}). Empty: every channel.
	// subscribe_hook and publish_hook only.
	Channels []string `json:"channels,omitempty"`

	// Longest a call may take, answer included; a slower backend is a
	// failure (timeout). Default: 2s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// Calls of this hook in flight on this node at once; one more fails at
	// once (overloaded) rather than waiting. Default: 64.
	MaxConcurrent int `json:"max_concurrent,omitempty"`

	// Secret of the Caddychat-Signature header (HMAC-SHA256 of the time and
	// the body), so that the backend can tell the node's requests from
	// others'. Use {env.NAME}. Empty: no signature.
	Secret string `json:"secret,omitempty"`

	// Request headers the connect hook passes on to the backend, e.g.
	// Cookie. connect_hook only; default: none.
	Headers []string `json:"headers,omitempty"`

	// Let the request through when the hook fails (timeout, overloaded,
	// error, bad answer) instead of refusing it. Default: off (fail closed).
	FailOpen bool `json:"fail_open,omitempty"`

	// How long a subscribe hook's decision for a user and a channel is
	// reused, allows and denies alike. subscribe_hook only; default: 0, ask
	// every time. The cache holds at most hookCacheEntries decisions per
	// route.
	Cache caddy.Duration `json:"cache,omitempty"`
}

const (
	defaultHookTimeout       = 2 * time.Second
	defaultHookMaxConcurrent = 64
	// maxHookAnswer bounds the answer read from a backend; a longer one is
	// the backend's error.
	maxHookAnswer = 64 << 10
	// maxHookInfo bounds a connect answer's info object (name, avatar...):
	// it is carried by the welcome, every message and every hook request.
	maxHookInfo = 1 << 10
	// hookWarnEvery: a kind of bad answer of one hook is logged at warn at
	// most this often (every one at debug).
	hookWarnEvery = time.Minute
)

// Hook outcomes, the outcome label of the hook metrics.
const (
	hookAllow      = "allow"
	hookDeny       = "deny"
	hookError      = "error"
	hookTimeout    = "timeout"
	hookOverloaded = "overloaded"
	hookFailOpen   = "fail_open"
)

// hookAnswer is a backend's answer to any hook; each hook reads its fields.
type hookAnswer struct {
	Result string `json:"result"`
	Reason string `json:"reason,omitempty"`

	// connect_hook.
	User      string          `json:"user,omitempty"`
	Subscribe []string        `json:"subscribe,omitempty"`
	Publish   []string        `json:"publish,omitempty"`
	Info      json.RawMessage `json:"info,omitempty"`
	Channels  []string        `json:"channels,omitempty"`
	ExpiresIn string          `json:"expires_in,omitempty"`
	ExpiresAt int64           `json:"expires_at,omitempty"`

	// publish_hook: replacement data.
	Data json.RawMessage `json:"data,omitempty"`

	// failedOpen: not the backend's answer; the hook failed and fail_open
	// let the request through.
	failedOpen bool
}

// hookFailure is a hook call that did not give an answer: outcome is
// hookError, hookTimeout or hookOverloaded.
type hookFailure struct {
	outcome string
	err     error
}

func (f *hookFailure) Error() string { return f.outcome + ": " + f.err.Error() }

// hookClient calls one hook of one route.
type hookClient struct {
	name     string // connect, subscribe, publish
	url      string
	secret   []byte
	timeout  time.Duration
	failOpen bool
	channels channelACL // nil: every channel
	sem      chan struct{}
	client   *http.Client
	log      *zap.Logger

	warnMu sync.Mutex
	warned map[string]time.Time // kind of bad answer → last warn
}

// newHookClient makes the client of a provisioned hook config.
func newHookClient(name string, cfg *HookConfig, log *zap.Logger) *hookClient {
	timeout := time.Duration(cfg.Timeout)
	if timeout <= 0 {
		timeout = defaultHookTimeout
	}
	n := cfg.MaxConcurrent
	if n <= 0 {
		n = defaultHookMaxConcurrent
	}
	transport := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: timeout, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          n,
		MaxIdleConnsPerHost:   n,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   timeout,
		ResponseHeaderTimeout: timeout,
	}
	hc := &hookClient{
		name:     name,
		url:      cfg.URL,
		timeout:  timeout,
		failOpen: cfg.FailOpen,
		sem:      make(chan struct{}, n),
		client:   &http.Client{Transport: transport, Timeout: timeout},
		log:      log,
		warned:   map[string]time.Time{},
	}
	if cfg.Secret != "" {
		hc.secret = []byte(cfg.Secret)
	}
	if len(cfg.Channels) > 0 {
		hc.channels = compileACL(cfg.Channels, "")
	}
	return hc
}

// applies reports whether the hook is asked about channel.
func (hc *hookClient) applies(channel string) bool {
	return hc != nil && (hc.channels == nil || hc.channels.allows(channel))
}

func (hc *hookClient) close() {
	if hc != nil {
		hc.client.CloseIdleConnections()
	}
}

// decide calls the hook with req and returns its answer, allow or deny
// (check has accepted it), or, when the call failed and the hook fails
// open, an allow with failedOpen set. Otherwise the error is a
// *hookFailure: the caller refuses.
func (hc *hookClient) decide(ctx context.Context, req any, check func(*hookAnswer) error) (*hookAnswer, error) {
	start := time.Now()
	ans, err := hc.call(ctx, req, check)
	outcome := ""
	switch {
	case err == nil:
		outcome = ans.Result
	case hc.failOpen:
		outcome = hookFailOpen
		ans, err = &hookAnswer{Result: hookAllow, failedOpen: true}, nil
	default:
		var f *hookFailure
		errors.As(err, &f)
		outcome = f.outcome
	}
	m := moduleMetrics()
	m.hookSeconds.WithLabelValues(hc.name, outcome).Observe(time.Since(start).Seconds())
	m.hookOutcomes.WithLabelValues(hc.name, outcome).Inc()
	return ans, err
}

// call makes one request; any failure is a *hookFailure.
func (hc *hookClient) call(ctx context.Context, req any, check func(*hookAnswer) error) (*hookAnswer, error) {
	select {
	case hc.sem <- struct{}{}:
		defer func() { <-hc.sem }()
	default:
		hc.warn("overloaded", fmt.Sprintf("more than %d calls in flight (max_concurrent); refused at once", cap(hc.sem)))
		return nil, &hookFailure{hookOverloaded, fmt.Errorf("more than %d calls in flight", cap(hc.sem))}
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, &hookFailure{hookError, err}
	}
	ctx, cancel := context.WithTimeout(ctx, hc.timeout)
	defer cancel()
	r, err := http.NewRequestWithContext(ctx, http.MethodPost, hc.url, bytes.NewReader(body))
	if err != nil {
		return nil, &hookFailure{hookError, err}
	}
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("User-Agent", "caddychat")
	if hc.secret != nil {
		r.Header.Set(signatureHeader, signature(hc.secret, body, time.Now()))
	}
	resp, err := hc.client.Do(r)
	if err != nil {
		return nil, hc.failed(ctx, "unreachable", err)
	}
	defer resp.Body.Close()
	// One byte more than allowed tells an oversized answer from a full one.
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxHookAnswer+1))
	if err != nil {
		return nil, hc.failed(ctx, "unreadable", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, hc.bad("status", fmt.Errorf("HTTP %d (want 200 with a JSON answer)", resp.StatusCode))
	}
	if len(data) > maxHookAnswer {
		return nil, hc.bad("too_large", fmt.Errorf("answer longer than %d bytes", maxHookAnswer))
	}
	ans := new(hookAnswer)
	if err := json.Unmarshal(data, ans); err != nil {
		return nil, hc.bad("not_json", fmt.Errorf("answer is not the hook's JSON object: %v", err))
	}
	switch ans.Result {
	case hookAllow:
	case hookDeny:
		ans.Reason = strings.ToValidUTF8(ans.Reason, "\uFFFD")
		return ans, nil
	default:
		return nil, hc.bad("result", fmt.Errorf("result %q (want allow or deny)", truncate(ans.Result, 32)))
	}
	if check != nil {
		if err := check(ans); err != nil {
			return nil, hc.bad("answer", err)
		}
	}
	return ans, nil
}

// failed is a call that got no answer: a timeout when the context ran out,
// or when the transport gave up waiting first (its ResponseHeaderTimeout is
// the same timeout, and either may fire first).
func (hc *hookClient) failed(ctx context.Context, kind string, err error) error {
	var netErr net.Error
	if ctx.Err() != nil || (errors.As(err, &netErr) && netErr.Timeout()) {
		hc.warn("timeout", fmt.Sprintf("no answer within %v", hc.timeout))
		return &hookFailure{hookTimeout, fmt.Errorf("no answer within %v", hc.timeout)}
	}
	hc.warn(kind, err.Error())
	return &hookFailure{hookError, err}
}

// bad is an answer that breaks the hook's contract: the backend's error.
func (hc *hookClient) bad(kind string, err error) error {
	hc.warn(kind, "bad answer: "+err.Error())
	return &hookFailure{hookError, err}
}

// warn logs a failure of the hook at warn, once per kind per
// hookWarnEvery (the others at debug), so a broken backend cannot flood
// the log.
func (hc *hookClient) warn(kind, msg string) {
	now := time.Now()
	hc.warnMu.Lock()
	last, seen := hc.warned[kind]
	loud := !seen || now.Sub(last) >= hookWarnEvery
	if loud {
		hc.warned[kind] = now
	}
	hc.warnMu.Unlock()
	fields := []zap.Field{zap.String("hook", hc.name), zap.String("url", hc.url), zap.String("kind", kind), zap.String("error", msg)}
	if loud {
		hc.log.Warn(hc.name+"_hook failed (logged once a minute per kind; the rest at debug)", fields...)
		return
	}
	hc.log.Debug(hc.name+"_hook failed", fields...)
}

// checkHookPatterns checks patterns a backend answered.
func checkHookPatterns(field string, patterns []string) error {
	if len(patterns) > 1000 {
		return fmt.Errorf("%s: %d patterns (at most 1000)", field, len(patterns))
	}
	for _, p := range patterns {
		if err := validatePattern(p); err != nil {
			return fmt.Errorf("%s: %v", truncate(field, 32), truncateErr(err))
		}
	}
	return nil
}

// truncateErr keeps a message about a backend's value short.
func truncateErr(err error) string { return truncate(err.Error(), 200) }

// checkHookData checks a publish hook's replacement data.
func checkHookData(data json.RawMessage, most int64) error {
	if !json.Valid(data) {
		return errors.New("data is not JSON")
	}
	if int64(len(data)) > most {
		return fmt.Errorf("data is %d bytes, more than max_message_size (%d)", len(data), most)
	}
	return nil
}
