package caddychat

// `caddy chat ping <url>`: the smoke test of a running chat route. It speaks
// the JSON protocol of PROTOCOL.md as any client would: connect, welcome,
// subscribe, publish, receive the message back and, when the channel keeps
// history, read it back and resume from it; one line per step with its
// latency, and a non-zero exit status naming the step that failed.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"time"

	"github.com/coder/websocket"
	"github.com/spf13/cobra"
)

// pingCommand is `caddy chat ping`.
func pingCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ping [--token <jwt>] [--token-in header|query|subprotocol] [--channel <name>] [--timeout <duration>] [--json] <ws-or-http-url>",
		Short: "Smoke-tests a chat route: connect, subscribe, publish, receive",
		Long: `
Connects to a chat route (JSON protocol) as a client would and checks that it
works end to end, printing one line per step with its latency:

  connect    the WebSocket handshake (a refusal names the HTTP status and
             the server's reason, e.g. "HTTP 401 Unauthorized: missing token")
  welcome    the server's first frame: node id, connection id, user
  subscribe  to a channel of its own (--channel; default ping:<random>)
  publish    a message on it; the server's ok carries the message id
  receive    the message back, checked (same id, same data, from this user);
             its latency runs from the publish
  history    if the channel keeps history: the message read back with the
             history op
  resume     if it does: unsubscribe, publish a second message, subscribe
             with since = the first one, and get the second one replayed

The exit status is 0 when every step passed, 1 otherwise, with the failed
step named on standard error: run it after a deployment, from where the
clients connect (e.g. through the load balancer).

The URL is ws://, wss://, http:// or https:// (http is taken as ws). On a
route with a jwt block, give a token whose permissions cover the channel:

  export CHAT_TOKEN=$(caddy chat token --sub smoke --subscribe 'ping:*' --publish 'ping:*')
  caddy chat ping wss://chat.example.com/ws

--token (default: the environment variable CHAT_TOKEN) is sent as
"Authorization: Bearer <token>"; --token-in query sends it as ?token=
(routes with query_token token), --token-in subprotocol as the browsers'
"Sec-WebSocket-Protocol: caddychat, bearer.<token>".

--timeout bounds each step (default 5s). --json prints one JSON object (the
steps, what the server reported, the failed step) instead of the lines.
--insecure skips the TLS certificate check; --ca adds a PEM CA certificate
(e.g. Caddy's local CA of "tls internal").
`,
		Args:                  cobra.ExactArgs(1),
		DisableFlagsInUseLine: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			f := cmd.Flags()
			o := pingOptions{url: args[0]}
			o.token, _ = f.GetString("token")
			o.tokenIn, _ = f.GetString("token-in")
			o.channel, _ = f.GetString("channel")
			o.timeout, _ = f.GetDuration("timeout")
			o.json, _ = f.GetBool("json")
			o.insecure, _ = f.GetBool("insecure")
			o.caFile, _ = f.GetString("ca")
			o.origin, _ = f.GetString("origin")
			if !f.Changed("token") {
				o.token = os.Getenv("CHAT_TOKEN")
			}
			if err := o.check(); err != nil {
				return err // a usage error: cobra prints it
			}
			rep := runPing(cmd.Context(), o, cmd.OutOrStdout())
			if rep.OK {
				return nil
			}
			// The failure is already on stdout; say it once on stderr, for
			// scripts that keep only that, and exit 1.
			cmd.SilenceErrors = true
			fmt.Fprintf(cmd.ErrOrStderr(), "caddy chat ping: %s failed: %s\n", rep.FailedStep, rep.Error)
			return fmt.Errorf("%s failed", rep.FailedStep)
		},
	}
	f := cmd.Flags()
	f.String("token", "", "a JWT for the route (default $CHAT_TOKEN)")
	f.String("token-in", "header", "how to send the token: header (Authorization: Bearer), query (?token=) or subprotocol (bearer.<token>)")
	f.String("channel", "", "the channel to subscribe and publish on (default ping:<random>)")
	f.Duration("timeout", 5*time.Second, "the longest each step may take")
	f.Bool("json", false, "print one JSON report instead of a line per step")
	f.Bool("insecure", false, "wss: skip the check of the server's certificate")
	f.String("ca", "", "wss: a PEM file of CA certificates to trust besides the system's")
	f.String("origin", "", "an Origin header to send (to check a route's origins)")
	return cmd
}

// pingOptions are the flags and argument of `caddy chat ping`.
type pingOptions struct {
	url      string
	token    string
	tokenIn  string
	channel  string
	timeout  time.Duration
	json     bool
	insecure bool
	caFile   string
	origin   string
}

func (o *pingOptions) check() error {
	u, err := url.Parse(o.url)
	if err != nil {
		return fmt.Errorf("url %q: %v", o.url, err)
	}
	switch u.Scheme {
	case "ws", "wss", "http", "https":
	default:
		return fmt.Errorf("url %q: the scheme must be ws, wss, http or https", o.url)
	}
	if u.Host == "" {
		return fmt.Errorf("url %q has no host", o.url)
	}
	switch o.tokenIn {
	case "header", "query", "subprotocol":
	default:
		return fmt.Errorf("--token-in %q: header, query or subprotocol", o.tokenIn)
	}
	if o.timeout <= 0 {
		return fmt.Errorf("--timeout %v: must be positive", o.timeout)
	}
	if o.channel == "" {
		var b [6]byte
		_, _ = rand.Read(b[:])
		o.channel = "ping:" + hex.EncodeToString(b[:])
	} else if err := validateChannel(o.channel); err != nil {
		return fmt.Errorf("--channel: %v", err)
	}
	return nil
}

// pingStep is one step of a ping, as printed.
type pingStep struct {
	Step   string  `json:"step"`
	OK     bool    `json:"ok"`
	Millis float64 `json:"ms"`
	Detail string  `json:"detail,omitempty"`
	Error  string  `json:"error,omitempty"`
}

// pingReport is the whole outcome, the --json output.
type pingReport struct {
	URL        string  `json:"url"`
	OK         bool    `json:"ok"`
	FailedStep string  `json:"failed_step,omitempty"`
	Error      string  `json:"error,omitempty"`
	HTTPStatus int     `json:"http_status,omitempty"`
	HTTPBody   string  `json:"http_body,omitempty"`
	Channel    string  `json:"channel"`
	Node       string  `json:"node,omitempty"`
	Conn       string  `json:"conn,omitempty"`
	User       *string `json:"user,omitempty"`
	// Welcome is the server's welcome frame as it came, with whatever it
	// announces besides conn, node and user.
	Welcome     json.RawMessage `json:"welcome,omitempty"`
	MessageID   string          `json:"message_id,omitempty"`
	Epoch       string          `json:"epoch,omitempty"`
	History     bool            `json:"history"`
	Steps       []pingStep      `json:"steps"`
	TotalMillis float64         `json:"total_ms"`
}

// pinger runs the steps of one ping.
type pinger struct {
	o     pingOptions
	out   io.Writer
	rep   *pingReport
	conn  *websocket.Conn
	ahead []pingFrame // frames read while waiting for another
}

// pingFrame is any server frame of the JSON protocol, as far as ping reads it.
type pingFrame struct {
	Type      string          `json:"type"`
	ID        json.RawMessage `json:"id"`
	Channel   string          `json:"channel"`
	MessageID string          `json:"message_id"`
	Code      string          `json:"code"`
	Message   string          `json:"message"`
	From      *string         `json:"from"`
	Anonymous bool            `json:"anonymous"`
	Data      json.RawMessage `json:"data"`
	Conn      string          `json:"conn"`
	Node      string          `json:"node"`
	User      *string         `json:"user"`
	Epoch     string          `json:"epoch"`
	Recovered *bool           `json:"recovered"`
	Replayed  *int            `json:"replayed"`
	Limited   bool            `json:"limited"`
	Messages  []pingFrame     `json:"messages"`

	raw []byte
	at  time.Time
}

// stepError fails a step; http carries a refused handshake's response.
type stepError struct {
	msg  string
	resp *http.Response
}

func (e *stepError) Error() string { return e.msg }

func stepErrorf(format string, args ...any) error {
	return &stepError{msg: fmt.Sprintf(format, args...)}
}

// runPing runs the ping, writing a line per step to out (or the JSON report
// at the end), and returns the report.
func runPing(ctx context.Context, o pingOptions, out io.Writer) *pingReport {
	if ctx == nil {
		ctx = context.Background()
	}
	p := &pinger{o: o, out: out, rep: &pingReport{URL: o.url, Channel: o.channel}}
	start := time.Now()
	if !o.json {
		fmt.Fprintf(out, "caddy chat ping %s (channel %s, timeout %v per step)\n", o.url, o.channel, o.timeout)
	}
	p.rep.OK = p.run(ctx)
	if p.conn != nil {
		_ = p.conn.Close(websocket.StatusNormalClosure, "")
	}
	p.rep.TotalMillis = millis(time.Since(start))
	if o.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		_ = enc.Encode(p.rep)
	} else if p.rep.OK {
		fmt.Fprintf(out, "ok: %d steps in %.1fms\n", len(p.rep.Steps), p.rep.TotalMillis)
	}
	return p.rep
}

// step runs one step within the timeout and records it; it reports whether
// the step passed.
func (p *pinger) step(ctx context.Context, name string, since time.Time, fn func(ctx context.Context) (string, error)) bool {
	ctx, cancel := context.WithTimeout(ctx, p.o.timeout)
	defer cancel()
	if since.IsZero() {
		since = time.Now()
	}
	detail, err := fn(ctx)
	s := pingStep{Step: name, OK: err == nil, Millis: millis(time.Since(since)), Detail: detail}
	if err != nil {
		if ctx.Err() != nil && !isStepError(err) {
			err = fmt.Errorf("timed out after %v (%v)", p.o.timeout, err)
		}
		s.Error = err.Error()
		p.rep.FailedStep, p.rep.Error = name, s.Error
		var se *stepError
		if errors.As(err, &se) && se.resp != nil {
			p.rep.HTTPStatus = se.resp.StatusCode
		}
	}
	p.rep.Steps = append(p.rep.Steps, s)
	if !p.o.json {
		status, text := "ok  ", s.Detail
		if !s.OK {
			status, text = "FAIL", s.Error
		}
		fmt.Fprintf(p.out, "%s %-9s %8.1fms  %s\n", status, name, s.Millis, text)
	}
	return s.OK
}

func isStepError(err error) bool {
	var se *stepError
	return errors.As(err, &se)
}

func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func (p *pinger) run(ctx context.Context) bool {
	if !p.step(ctx, "connect", time.Time{}, p.connect) {
		return false
	}
	if !p.step(ctx, "welcome", time.Time{}, p.welcome) {
		return false
	}
	if !p.step(ctx, "subscribe", time.Time{}, func(ctx context.Context) (string, error) {
		f, err := p.request(ctx, map[string]any{"op": "subscribe", "channel": p.o.channel, "id": "ping-subscribe"}, "ping-subscribe")
		if err != nil {
			return "", err
		}
		return "subscribed to " + f.Channel, nil
	}) {
		return false
	}

	nonce := randomHex(8)
	published := time.Now()
	var msgID string
	if !p.step(ctx, "publish", published, func(ctx context.Context) (string, error) {
		f, err := p.request(ctx, map[string]any{"op": "publish", "channel": p.o.channel, "id": "ping-publish",
			"data": map[string]any{"ping": nonce}}, "ping-publish")
		if err != nil {
			return "", err
		}
		if f.MessageID == "" {
			return "", stepErrorf("the ok carries no message_id: %s", f.raw)
		}
		msgID = f.MessageID
		p.rep.MessageID = msgID
		return "message id " + msgID, nil
	}) {
		return false
	}

	var received pingFrame
	if !p.step(ctx, "receive", published, func(ctx context.Context) (string, error) {
		f, err := p.message(ctx, msgID)
		if err != nil {
			return "", err
		}
		received = f
		if err := p.checkMessage(f, nonce); err != nil {
			return "", err
		}
		p.rep.Epoch = f.Epoch
		p.rep.History = f.Epoch != ""
		from := "anonymous"
		if f.From != nil && *f.From != "" {
			from = "from " + *f.From
		}
		d := fmt.Sprintf("message %s back, %s", unquote(f.ID), from)
		if f.Epoch != "" {
			d += ", epoch " + f.Epoch + " (the channel keeps history)"
		} else {
			d += " (the channel keeps no history: no history or resume step)"
		}
		return d, nil
	}) {
		return false
	}
	if !p.rep.History {
		return true
	}

	if !p.step(ctx, "history", time.Time{}, func(ctx context.Context) (string, error) {
		f, err := p.request(ctx, map[string]any{"op": "history", "channel": p.o.channel, "limit": 1, "id": "ping-history"}, "ping-history")
		if err != nil {
			return "", err
		}
		if f.Type != "history" {
			return "", stepErrorf("expected a history reply, got %s", f.raw)
		}
		if len(f.Messages) == 0 {
			return "", stepErrorf("the history holds no message, expected %s: %s", msgID, f.raw)
		}
		last := f.Messages[len(f.Messages)-1]
		if unquote(last.ID) != msgID {
			return "", stepErrorf("the history's last message is %s, expected %s", unquote(last.ID), msgID)
		}
		if f.Epoch != received.Epoch {
			return "", stepErrorf("the history's epoch is %s, the message's %s", f.Epoch, received.Epoch)
		}
		return "message " + msgID + " kept", nil
	}) {
		return false
	}

	return p.step(ctx, "resume", time.Time{}, func(ctx context.Context) (string, error) {
		if _, err := p.request(ctx, map[string]any{"op": "unsubscribe", "channel": p.o.channel, "id": "ping-unsubscribe"}, "ping-unsubscribe"); err != nil {
			return "", fmt.Errorf("unsubscribe: %w", err)
		}
		nonce2 := randomHex(8)
		ok, err := p.request(ctx, map[string]any{"op": "publish", "channel": p.o.channel, "id": "ping-publish-2",
			"data": map[string]any{"ping": nonce2}}, "ping-publish-2")
		if err != nil {
			return "", fmt.Errorf("publish while unsubscribed: %w", err)
		}
		f, err := p.request(ctx, map[string]any{"op": "subscribe", "channel": p.o.channel, "id": "ping-resume",
			"since": msgID, "epoch": received.Epoch}, "ping-resume")
		if err != nil {
			return "", fmt.Errorf("subscribe since %s: %w", msgID, err)
		}
		if f.Recovered == nil || !*f.Recovered {
			return "", stepErrorf("not recovered: %s", f.raw)
		}
		m, err := p.message(ctx, ok.MessageID)
		if err != nil {
			return "", fmt.Errorf("the replay: %w", err)
		}
		if err := p.checkMessage(m, nonce2); err != nil {
			return "", err
		}
		replayed := -1
		if f.Replayed != nil {
			replayed = *f.Replayed
		}
		return fmt.Sprintf("recovered since %s, replayed %d (%s)", msgID, replayed, ok.MessageID), nil
	})
}
