package caddychat

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/coder/websocket"
)

// The ping's side of the conversation with a node (command_ping.go): the
// handshake, frames, and the checks of what the node answers.

func (p *pinger) connect(ctx context.Context) (string, error) {
	u, _ := url.Parse(p.o.url)
	opts := &websocket.DialOptions{HTTPHeader: http.Header{}}
	if p.o.origin != "" {
		opts.HTTPHeader.Set("Origin", p.o.origin)
	}
	if p.o.token != "" {
		switch p.o.tokenIn {
		case "header":
			opts.HTTPHeader.Set("Authorization", "Bearer "+p.o.token)
		case "query":
			q := u.Query()
			q.Set("token", p.o.token)
			u.RawQuery = q.Encode()
		case "subprotocol":
			opts.Subprotocols = []string{"caddychat", "bearer." + p.o.token}
		}
	}
	if u.Scheme == "wss" || u.Scheme == "https" {
		tc := &tls.Config{InsecureSkipVerify: p.o.insecure} //nolint:gosec // only with --insecure
		if p.o.caFile != "" {
			pemData, err := os.ReadFile(p.o.caFile)
			if err != nil {
				return "", stepErrorf("--ca: %v", err)
			}
			pool, err := x509.SystemCertPool()
			if err != nil {
				pool = x509.NewCertPool()
			}
			if !pool.AppendCertsFromPEM(pemData) {
				return "", stepErrorf("--ca %s holds no PEM certificate", p.o.caFile)
			}
			tc.RootCAs = pool
		}
		opts.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: tc, Proxy: http.ProxyFromEnvironment}}
	}
	conn, resp, err := websocket.Dial(ctx, u.String(), opts)
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			return "", p.refusal(resp)
		}
		// Hide the token a query URL carries from the error text.
		msg := err.Error()
		if p.o.token != "" {
			msg = strings.ReplaceAll(msg, url.QueryEscape(p.o.token), "REDACTED")
		}
		return "", errors.New(msg)
	}
	conn.SetReadLimit(16 << 20)
	p.conn = conn
	d := "HTTP 101 Switching Protocols"
	if sp := conn.Subprotocol(); sp != "" {
		d += ", subprotocol " + sp
	}
	if p.o.token != "" {
		d += ", token sent in the " + p.o.tokenIn
	}
	return d, nil
}

// refusal describes a refused handshake: its status, the server's reason
// (the body's first line) and the headers that tell what to do.
func (p *pinger) refusal(resp *http.Response) error {
	var body string
	if resp.Body != nil {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		body = strings.TrimSpace(string(b))
	}
	p.rep.HTTPStatus, p.rep.HTTPBody = resp.StatusCode, body
	msg := "HTTP " + resp.Status
	if first, _, _ := strings.Cut(body, "\n"); first != "" {
		if len(first) > 200 {
			first = first[:200] + "…"
		}
		msg += ": " + first
	}
	if ra := resp.Header.Get("Retry-After"); ra != "" {
		msg += " (Retry-After " + ra + ")"
	}
	switch {
	case resp.StatusCode == http.StatusUnauthorized && p.o.token == "":
		msg += " (the route wants a token: give --token or set CHAT_TOKEN)"
	case resp.StatusCode < 300 || resp.StatusCode == http.StatusNotFound:
		msg += " (not a WebSocket upgrade: is this the path of a chat route?)"
	}
	return &stepError{msg: msg, resp: resp}
}

func (p *pinger) welcome(ctx context.Context) (string, error) {
	f, err := p.next(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return "", stepErrorf("no frame within %v: is this a raw-protocol route? ping speaks the JSON protocol", p.o.timeout)
		}
		return "", err
	}
	if f.Type != "welcome" {
		return "", stepErrorf("the first frame is not a welcome: %s", f.raw)
	}
	p.rep.Node, p.rep.Conn, p.rep.User = f.Node, f.Conn, f.User
	p.rep.Welcome = json.RawMessage(f.raw)
	user := "anonymous"
	if f.User != nil && *f.User != "" {
		user = "user " + *f.User
	}
	d := fmt.Sprintf("node %s, conn %s, %s", f.Node, f.Conn, user)
	// Whatever else the welcome announces (limits, in a newer server).
	var all map[string]json.RawMessage
	if json.Unmarshal(f.raw, &all) == nil {
		var extra []string
		for k, v := range all {
			switch k {
			case "type", "conn", "node", "user":
			default:
				extra = append(extra, k+"="+string(v))
			}
		}
		sort.Strings(extra)
		if len(extra) > 0 {
			d += ", " + strings.Join(extra, ", ")
		} else {
			d += " (the welcome announces no limits)"
		}
	}
	return d, nil
}

// next reads the next frame (one read ahead first).
func (p *pinger) next(ctx context.Context) (pingFrame, error) {
	if len(p.ahead) > 0 {
		f := p.ahead[0]
		p.ahead = p.ahead[1:]
		return f, nil
	}
	typ, data, err := p.conn.Read(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return pingFrame{}, ctx.Err()
		}
		var ce websocket.CloseError
		if errors.As(err, &ce) {
			return pingFrame{}, stepErrorf("the server closed the connection: %d %s", ce.Code, ce.Reason)
		}
		return pingFrame{}, err
	}
	if typ != websocket.MessageText {
		return pingFrame{}, stepErrorf("a binary frame (%d bytes): not the JSON protocol", len(data))
	}
	f := pingFrame{raw: data, at: time.Now()}
	if err := json.Unmarshal(data, &f); err != nil {
		return pingFrame{}, stepErrorf("a frame that is not JSON (a raw-protocol route?): %.200q", data)
	}
	f.raw = data
	return f, nil
}

// request sends frame and waits for the reply whose id is id; an error
// reply fails. Frames that come meanwhile (deliveries, presence events) are
// kept for later reads.
func (p *pinger) request(ctx context.Context, frame map[string]any, id string) (pingFrame, error) {
	b, _ := json.Marshal(frame)
	if err := p.conn.Write(ctx, websocket.MessageText, b); err != nil {
		return pingFrame{}, fmt.Errorf("send: %w", err)
	}
	want, _ := json.Marshal(id)
	var held []pingFrame
	defer func() { p.ahead = append(held, p.ahead...) }()
	for {
		f, err := p.next(ctx)
		if err != nil {
			return pingFrame{}, err
		}
		if string(f.ID) != string(want) || f.Type == "message" {
			held = append(held, f)
			continue
		}
		if f.Type == "error" {
			return pingFrame{}, stepErrorf("the server answered %s: %s", f.Code, f.Message)
		}
		return f, nil
	}
}

// message waits for the delivery of message id on the ping's channel.
func (p *pinger) message(ctx context.Context, id string) (pingFrame, error) {
	var held []pingFrame
	defer func() { p.ahead = append(held, p.ahead...) }()
	for {
		f, err := p.next(ctx)
		if err != nil {
			return pingFrame{}, err
		}
		if f.Type == "message" && f.Channel == p.o.channel && unquote(f.ID) == id {
			return f, nil
		}
		if f.Type == "error" {
			return pingFrame{}, stepErrorf("the server sent an error: %s: %s", f.Code, f.Message)
		}
		held = append(held, f)
	}
}

// checkMessage checks that a delivery carries what was published, stamped
// with the ping's user.
func (p *pinger) checkMessage(f pingFrame, nonce string) error {
	var data struct {
		Ping string `json:"ping"`
	}
	if json.Unmarshal(f.Data, &data) != nil || data.Ping != nonce {
		return stepErrorf("the message's data is %s, expected {\"ping\":%q}", f.Data, nonce)
	}
	user := ""
	if p.rep.User != nil {
		user = *p.rep.User
	}
	from := ""
	if f.From != nil {
		from = *f.From
	}
	if from != user || (user == "" && !f.Anonymous) {
		return stepErrorf("the message is stamped from %q (anonymous %v), the welcome said user %q: %s", from, f.Anonymous, user, f.raw)
	}
	return nil
}

// unquote is a JSON id as a string: a string's content, a number's text.
func unquote(id json.RawMessage) string {
	var s string
	if json.Unmarshal(id, &s) == nil {
		return s
	}
	return string(id)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
