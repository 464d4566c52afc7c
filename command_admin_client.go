package caddychat

// The admin subcommands' side of the conversation with the server
// (command_admin.go): one HTTP request to Caddy's admin endpoint or a site's
// publish endpoint, and errors that say what to do about a failure.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"

	"github.com/caddyserver/caddy/v2"
)

// maxAdminAnswer bounds what the commands read of an answer: a history page
// of 16 MiB messages at the routes' max_replay is the largest the server
// sends; beyond that something else is answering.
const maxAdminAnswer = 256 << 20

// endpoint is the URL of req at t, and the HTTP client that reaches it.
func (t cliTarget) endpoint(req adminRequest) (string, *http.Client, error) {
	q := url.Values{}
	for k, v := range req.query {
		q.Set(k, fmt.Sprint(v))
	}
	if t.url != "" {
		u := t.url + "/" + req.op
		if len(q) > 0 {
			u += "?" + q.Encode()
		}
		return u, &http.Client{Transport: &http.Transport{Proxy: http.ProxyFromEnvironment}}, nil
	}
	if t.prefix != "" {
		q.Set("prefix", t.prefix)
	}
	addr, err := caddy.ParseNetworkAddress(t.admin)
	if err != nil || addr.PortRangeSize() > 1 {
		return "", nil, fmt.Errorf("--admin %q is not an admin address (host:port or unix//path): %v", t.admin, err)
	}
	// As Caddy's own commands (caddy reload, caddy stop) reach it: dial the
	// address's network, whatever the URL's host.
	network, dial := addr.Network, addr.JoinHostPort(0)
	host := dial
	if addr.IsUnixNetwork() {
		// A unix address may end in |<permission bits>, not part of the path;
		// the host is a stand-in that Caddy's host check accepts.
		dial, _, _ = strings.Cut(addr.Host, "|")
		host = "127.0.0.1"
	}
	u := "http://" + host + "/chat/" + req.op
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, dial)
		},
	}}
	return u, client, nil
}

// send makes the request and returns the body of a 2xx answer.
func (t cliTarget) send(ctx context.Context, req adminRequest) ([]byte, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	u, client, err := t.endpoint(req)
	if err != nil {
		return nil, err
	}
	var body io.Reader
	if req.method == http.MethodPost {
		b, err := json.Marshal(req.body)
		if err != nil {
			return nil, fmt.Errorf("encoding the request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	hr, err := http.NewRequestWithContext(ctx, req.method, u, body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", req.method, u, err)
	}
	if body != nil {
		hr.Header.Set("Content-Type", "application/json")
	}
	if t.url != "" {
		hr.Header.Set("Authorization", "Bearer "+t.key)
	} else if !strings.HasPrefix(t.admin, "unix/") {
		// Caddy's admin endpoint checks the Origin of requests that carry
		// one against its own address; its own commands send this one.
		hr.Header.Set("Origin", "http://"+hr.URL.Host)
	}
	resp, err := client.Do(hr)
	if err != nil {
		return nil, t.unreachable(ctx, req.method+" "+u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxAdminAnswer))
	if err != nil {
		return nil, fmt.Errorf("%s %s: reading the answer (HTTP %s): %w", req.method, u, resp.Status, err)
	}
	if resp.StatusCode/100 != 2 {
		return nil, t.httpError(req.method+" "+u, resp, b)
	}
	return b, nil
}

// unreachable explains a request that got no answer.
func (t cliTarget) unreachable(ctx context.Context, what string, err error) error {
	if ctx.Err() == context.DeadlineExceeded {
		return fmt.Errorf("%s: no answer within --timeout %v", what, t.timeout)
	}
	refused := errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT)
	// The URL is in what already: keep the dial's own words.
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	if t.url != "" {
		return fmt.Errorf("%s: the site is not reachable: %w", what, err)
	}
	if refused {
		return fmt.Errorf("Caddy's admin endpoint is not reachable at %s (%w): is Caddy running, with this admin address? "+
			"Is \"admin off\" in its config? Give its admin address with --admin or $CADDY_ADMIN", t.admin, err)
	}
	return fmt.Errorf("%s: Caddy's admin endpoint at %s: %w", what, t.admin, err)
}

// httpError names the request, the status and the server's reason: the
// spec's {"error":{"code","message"}}, Caddy's own {"error":"…"} (its admin
// endpoint's refusals), or the first line of any other body.
func (t cliTarget) httpError(what string, resp *http.Response, body []byte) error {
	reason := strings.TrimSpace(string(body))
	var ours struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	var caddys struct {
		Error string `json:"error"`
	}
	switch {
	case json.Unmarshal(body, &ours) == nil && ours.Error.Code != "":
		reason = ours.Error.Code + ": " + ours.Error.Message
	case json.Unmarshal(body, &caddys) == nil && caddys.Error != "":
		reason = caddys.Error
	default:
		reason, _, _ = strings.Cut(reason, "\n")
		if len(reason) > 200 {
			reason = reason[:200] + "…"
		}
		// Not an answer of the chat API at all.
		if resp.StatusCode == http.StatusNotFound {
			if t.url != "" {
				reason += " (is this the route's publish_endpoint, on a caddychat with the server API?)"
			} else {
				reason += " (no chat API on this admin endpoint: is this Caddy built with a caddychat that has the server API?)"
			}
		}
	}
	msg := fmt.Sprintf("%s: HTTP %s", what, resp.Status)
	if reason != "" {
		msg += ": " + reason
	}
	return errors.New(msg)
}
