package caddychat

// `caddy chat stats|channels|presence|history|history-remove|publish|
// broadcast|disconnect|unsubscribe|subscribe|revoke|revocations`: thin
// clients of the server API (spec: the admin module admin.api.chat and the
// site's <publish_endpoint>/<op>). Each one turns its arguments into one
// request, sends it to Caddy's admin endpoint (or, with --url, to a site's
// publish endpoint with the publish key) and prints the answer: as is with
// --json, else a short summary (command_admin_format.go). The server decides
// everything else (names, limits, defaults), so the commands check only what
// they need to build the request: the server's refusal names the problem
// better than a second copy of its rules would.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// adminRequest is one call of the server API, before it has a base URL.
type adminRequest struct {
	method string
	op     string         // path relative to the base: "stats", "history/remove"
	query  map[string]any // GET parameters (url.Values sorts them)
	body   map[string]any // POST body, marshalled as one JSON object
}

// adminCommand describes one subcommand: how its arguments become a
// request and how the answer reads.
type adminCommand struct {
	name  string
	use   string
	short string
	long  string
	args  cobra.PositionalArgs
	flags func(f *pflag.FlagSet)
	// build makes the request from the flags and arguments; now is the time
	// durations in time flags count from.
	build func(f *pflag.FlagSet, args []string, in io.Reader, now time.Time) (adminRequest, error)
	// summarize is the human text of a 2xx answer, and an error when the
	// answer says the op did not fully happen (a node missing, a refused
	// connection, a channel not published): that fails the command with
	// --json too.
	summarize func(req adminRequest, body []byte, now time.Time) (string, error)
}

// adminCommands are the subcommands in the order `caddy chat --help` lists
// them.
func adminCommands() []adminCommand {
	return []adminCommand{
		{
			name: "stats", use: "stats", short: "Connections, users and subscriptions of every node and in total",
			long: `Prints each node's figures (as it last reported them, every 2 s) and the
totals: connections, distinct users, anonymous connections, channels with a
subscriber, subscriptions; then the same per route.`,
			args:      cobra.NoArgs,
			build:     getOp("stats"),
			summarize: summarizeStats,
		},
		{
			name: "channels", use: "channels [--pattern <pattern>] [--limit <n>]", short: "Channels with a subscriber on some node",
			long: `Lists the channels that have at least one subscribed connection on some node,
sorted by name, with their subscribers (connections, all nodes) and the nodes
they are on. --pattern uses the ACL syntax ("room:*": one segment, a final
"**": the rest); --limit caps the list (server default 1000, at most 10000).`,
			args: cobra.NoArgs,
			flags: func(f *pflag.FlagSet) {
				f.String("pattern", "", `channel pattern, e.g. "room:*" (server default "**": every channel)`)
				f.Int("limit", 0, "at most this many channels (server default 1000)")
			},
			build: func(f *pflag.FlagSet, _ []string, _ io.Reader, _ time.Time) (adminRequest, error) {
				r := adminRequest{method: "GET", op: "channels", query: map[string]any{}}
				setChangedString(f, "pattern", r.query)
				setChangedInt(f, "limit", r.query)
				return r, nil
			},
			summarize: summarizeChannels,
		},
		{
			name: "presence", use: "presence <channel>", short: "Who is on a channel (needs presence on a route)",
			long:      `Lists the users on a channel and their connections, from any node.`,
			args:      cobra.ExactArgs(1),
			build:     getChannelOp("presence"),
			summarize: summarizePresence,
		},
		{
			name: "history", use: "history <channel> [--limit <n>] [--before <message id>]", short: "The messages a channel keeps",
			long: `Prints a channel's kept messages, oldest first: the last --limit (server
default 50), or the ones before --before <message id> to page back.`,
			args: cobra.ExactArgs(1),
			flags: func(f *pflag.FlagSet) {
				f.Int("limit", 0, "at most this many messages (server default 50, at most the route's max_replay)")
				f.String("before", "", "only messages older than this message id (the page before it)")
			},
			build: func(f *pflag.FlagSet, args []string, in io.Reader, now time.Time) (adminRequest, error) {
				r, _ := getChannelOp("history")(f, args, in, now)
				setChangedInt(f, "limit", r.query)
				setChangedString(f, "before", r.query)
				return r, nil
			},
			summarize: summarizeHistory,
		},
		{
			name: "history-remove", use: "history-remove <channel>", short: "Deletes a channel's history",
			long: `Deletes the messages a channel keeps. The next message starts a new epoch: a
client resuming from an older message id gets recovered:false.`,
			args: cobra.ExactArgs(1),
			build: func(_ *pflag.FlagSet, args []string, _ io.Reader, _ time.Time) (adminRequest, error) {
				return adminRequest{method: "POST", op: "history/remove", body: map[string]any{"channel": args[0]}}, nil
			},
			summarize: summarizeHistoryRemove,
		},
		{
			name: "publish", use: "publish <channel> <json> [--idempotency-key <key>]", short: "Publishes a message as the server",
			long: `Publishes the JSON value <json> (an object, a string in JSON quotes, a number…;
"-" reads it from standard input) on a channel. The message is marked
"server":true, as from the publish key.`,
			args: cobra.ExactArgs(2),
			flags: func(f *pflag.FlagSet) {
				f.String("idempotency-key", "", "a key that makes a retry of this publish deliver nothing twice")
			},
			build: func(f *pflag.FlagSet, args []string, in io.Reader, _ time.Time) (adminRequest, error) {
				data, err := jsonArg(args[1], in)
				if err != nil {
					return adminRequest{}, err
				}
				r := adminRequest{method: "POST", op: "publish", body: map[string]any{"channel": args[0], "data": data}}
				setChangedString(f, "idempotency-key", r.body)
				return r, nil
			},
			summarize: summarizePublish,
		},
		{
			name: "broadcast", use: "broadcast <json> <channel>... [--idempotency-key <key>]", short: "Publishes one message on several channels",
			long: `Publishes the JSON value <json> ("-" reads it from standard input) on each
channel (1 to 100), as the server. A channel the server refuses fails the
command after the others are published.`,
			args: cobra.MinimumNArgs(2),
			flags: func(f *pflag.FlagSet) {
				f.String("idempotency-key", "", "a key that makes a retry deliver nothing twice (one key covers each channel once)")
			},
			build: func(f *pflag.FlagSet, args []string, in io.Reader, _ time.Time) (adminRequest, error) {
				data, err := jsonArg(args[0], in)
				if err != nil {
					return adminRequest{}, err
				}
				r := adminRequest{method: "POST", op: "broadcast", body: map[string]any{"channels": args[1:], "data": data}}
				setChangedString(f, "idempotency-key", r.body)
				return r, nil
			},
			summarize: summarizeBroadcast,
		},
		{
			name: "disconnect", use: "disconnect <user> | --conn <conn id> [--code <4000-4999>] [--reason <text>]", short: "Closes every connection of a user (or one connection)",
			long: `Closes every connection of the user on every node, or the one connection
--conn names, with close --code (server default 4005, which the JS client
does not reconnect after) and --reason (server default "disconnected by the
server"). A token the user still holds lets them back in: see revoke.`,
			args: cobra.MaximumNArgs(1),
			flags: func(f *pflag.FlagSet) {
				f.String("conn", "", "the connection id (a welcome's conn) instead of a user")
				f.Int("code", 0, "the WebSocket close code, 4000-4999 (server default 4005)")
				f.String("reason", "", "the close reason, at most 123 bytes")
			},
			build: func(f *pflag.FlagSet, args []string, _ io.Reader, _ time.Time) (adminRequest, error) {
				r := adminRequest{method: "POST", op: "disconnect", body: map[string]any{}}
				conn, _ := f.GetString("conn")
				switch {
				case len(args) == 1 && f.Changed("conn"):
					return r, errors.New("give a user or --conn, not both")
				case len(args) == 1:
					r.body["user"] = args[0]
				case conn != "":
					r.body["conn"] = conn
				default:
					return r, errors.New("give the user to disconnect, or --conn <conn id>")
				}
				setChangedInt(f, "code", r.body)
				setChangedString(f, "reason", r.body)
				return r, nil
			},
			summarize: summarizeCount("disconnected", "connection"),
		},
		{
			name: "unsubscribe", use: "unsubscribe <user> <channel>", short: "Unsubscribes every connection of a user from a channel",
			long: `Unsubscribes every connection of the user from the channel, on every node;
each gets {"type":"unsubscribed","channel":…}.`,
			args:      cobra.ExactArgs(2),
			build:     userChannelOp("unsubscribe"),
			summarize: summarizeCount("unsubscribed", "connection"),
		},
		{
			name: "subscribe", use: "subscribe <user> <channel>", short: "Subscribes every connection of a user to a channel",
			long: `Subscribes every current (JSON protocol) connection of the user to the
channel, on every node, with no ACL or hook check; each gets
{"type":"subscribed","channel":…}. Connections opened later are not.`,
			args:      cobra.ExactArgs(2),
			build:     userChannelOp("subscribe"),
			summarize: summarizeCount("subscribed", "connection"),
		},
		{
			name: "revoke", use: "revoke --jti <token id> | --user <user> [--issued-before <time>] [--until <time>]", short: "Revokes a token, or a user's tokens, and closes their connections",
			long: `Revokes one token (--jti, its jti claim) or the tokens of a user issued
before --issued-before (server default: now), on every node: their
connections are closed with 4006 and the tokens are refused until --until
(server default: 24h from now, at most 30 days; set it to the tokens' exp).

Times are Unix seconds, RFC 3339 (2026-01-02T15:04:05Z), "now", or a
duration from now: --until 24h (or 7d) is a day (a week) ahead,
--issued-before -1h an hour ago.`,
			args: cobra.NoArgs,
			flags: func(f *pflag.FlagSet) {
				f.String("jti", "", "the token id (jti claim) to revoke")
				f.String("user", "", "the user whose tokens to revoke")
				f.String("issued-before", "", "with --user: revoke the tokens issued before this time (server default: now)")
				f.String("until", "", "keep the revocation until this time (server default: 24h from now)")
			},
			build:     buildRevoke,
			summarize: summarizeRevoke,
		},
		{
			name: "revocations", use: "revocations", short: "The revocations in force",
			long:      `Lists the revoked tokens and users, with how long each revocation is kept.`,
			args:      cobra.NoArgs,
			build:     getOp("revocations"),
			summarize: summarizeRevocations,
		},
	}
}

// getOp builds a GET of op with no parameters.
func getOp(op string) func(*pflag.FlagSet, []string, io.Reader, time.Time) (adminRequest, error) {
	return func(*pflag.FlagSet, []string, io.Reader, time.Time) (adminRequest, error) {
		return adminRequest{method: "GET", op: op, query: map[string]any{}}, nil
	}
}

// getChannelOp builds a GET of op?channel=<the argument>.
func getChannelOp(op string) func(*pflag.FlagSet, []string, io.Reader, time.Time) (adminRequest, error) {
	return func(_ *pflag.FlagSet, args []string, _ io.Reader, _ time.Time) (adminRequest, error) {
		return adminRequest{method: "GET", op: op, query: map[string]any{"channel": args[0]}}, nil
	}
}

// userChannelOp builds a POST of op with {"user","channel"} from the arguments.
func userChannelOp(op string) func(*pflag.FlagSet, []string, io.Reader, time.Time) (adminRequest, error) {
	return func(_ *pflag.FlagSet, args []string, _ io.Reader, _ time.Time) (adminRequest, error) {
		return adminRequest{method: "POST", op: op, body: map[string]any{"user": args[0], "channel": args[1]}}, nil
	}
}

// buildRevoke is the request of `caddy chat revoke`.
func buildRevoke(f *pflag.FlagSet, _ []string, _ io.Reader, now time.Time) (adminRequest, error) {
	r := adminRequest{method: "POST", op: "revoke", body: map[string]any{}}
	jti, _ := f.GetString("jti")
	user, _ := f.GetString("user")
	switch {
	case jti != "" && user != "":
		return r, errors.New("give --jti or --user, not both")
	case jti != "":
		if f.Changed("issued-before") {
			return r, errors.New("--issued-before goes with --user (a --jti names one token)")
		}
		r.body["jti"] = jti
	case user != "":
		r.body["user"] = user
	default:
		return r, errors.New("give --jti <token id> or --user <user>")
	}
	for _, name := range []string{"issued-before", "until"} {
		if !f.Changed(name) {
			continue // the server's default
		}
		s, _ := f.GetString(name)
		t, err := parseTimeFlag(s, now)
		if err != nil {
			return r, fmt.Errorf("--%s: %w", name, err)
		}
		r.body[strings.ReplaceAll(name, "-", "_")] = t
	}
	return r, nil
}

// setChangedString copies a string flag into m under its JSON name, only
// when it was given: left out, the server applies its own default.
func setChangedString(f *pflag.FlagSet, name string, m map[string]any) {
	if f.Changed(name) {
		v, _ := f.GetString(name)
		m[strings.ReplaceAll(name, "-", "_")] = v
	}
}

// setChangedInt is setChangedString for an int flag.
func setChangedInt(f *pflag.FlagSet, name string, m map[string]any) {
	if f.Changed(name) {
		v, _ := f.GetInt(name)
		m[strings.ReplaceAll(name, "-", "_")] = v
	}
}

// jsonArg is a message's data: the argument, or standard input for "-",
// which must be one JSON value (sent as it is, not re-encoded, so numbers
// keep their digits).
func jsonArg(arg string, in io.Reader) (json.RawMessage, error) {
	b := []byte(arg)
	if arg == "-" {
		var err error
		if b, err = io.ReadAll(in); err != nil {
			return nil, fmt.Errorf("reading the message from standard input: %w", err)
		}
	}
	b = []byte(strings.TrimSpace(string(b)))
	if !json.Valid(b) {
		what := fmt.Sprintf("%.60q", arg)
		if arg == "-" {
			what = "standard input"
		}
		return nil, fmt.Errorf("the message (%s) is not one JSON value: quote a string as JSON, e.g. '\"hello\"' or '{\"text\":\"hello\"}'", what)
	}
	return json.RawMessage(b), nil
}

// parseTimeFlag reads a time flag as Unix seconds: digits are Unix seconds,
// "now" is now, an RFC 3339 time, or a duration from now ("24h", "-1h",
// "7d").
func parseTimeFlag(s string, now time.Time) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "now" {
		return now.Unix(), nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		// A Unix time in milliseconds is a common mix-up (the stats' and
		// messages' times are ms); in seconds it would be past year 5000.
		if n > 1e11 {
			return 0, fmt.Errorf("%q looks like milliseconds; give Unix seconds", s)
		}
		return n, nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t.Unix(), nil
	}
	if d, ok := strings.CutSuffix(s, "d"); ok {
		if n, err := strconv.Atoi(d); err == nil {
			return now.Add(time.Duration(n) * 24 * time.Hour).Unix(), nil
		}
	}
	if d, err := time.ParseDuration(s); err == nil {
		return now.Add(d).Unix(), nil
	}
	return 0, fmt.Errorf("%q: give Unix seconds, an RFC 3339 time (2026-01-02T15:04:05Z), \"now\" or a duration from now (24h, 7d, -1h)", s)
}

// newAdminCommand is the cobra command of c.
func newAdminCommand(c adminCommand) *cobra.Command {
	cmd := &cobra.Command{
		Use:                   c.use + " [--admin <host:port> | --url <publish endpoint>] [--json]",
		Short:                 c.short,
		Long:                  "\n" + c.long + "\n" + cliTargetHelp,
		Args:                  c.args,
		DisableFlagsInUseLine: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			now := time.Now()
			t, req, err := prepareAdmin(c, cmd.Flags(), args, cmd.InOrStdin(), os.Getenv, now)
			if err != nil {
				return err // a usage error: cobra prints it
			}
			asJSON, _ := cmd.Flags().GetBool("json")
			// From here on a failure is the server's or the network's, not
			// the command line's: say it once, on stderr, prefixed with the
			// command, and exit 1.
			cmd.SilenceErrors = true
			err = runAdmin(cmd.Context(), t, c, req, asJSON, cmd.OutOrStdout(), now)
			if err != nil {
				fmt.Fprintf(cmd.ErrOrStderr(), "caddy chat %s: %v\n", c.name, err)
			}
			return err
		},
	}
	addCLITargetFlags(cmd.Flags())
	if c.flags != nil {
		c.flags(cmd.Flags())
	}
	return cmd
}

// prepareAdmin reads the command line of c: where to send and what.
func prepareAdmin(c adminCommand, f *pflag.FlagSet, args []string, in io.Reader, getenv func(string) string, now time.Time) (cliTarget, adminRequest, error) {
	t, err := cliTargetFromFlags(f, getenv)
	if err != nil {
		return t, adminRequest{}, err
	}
	req, err := c.build(f, args, in, now)
	return t, req, err
}

// cliTargetHelp ends every admin subcommand's help: where it sends.
const cliTargetHelp = `
It sends the request to Caddy's admin endpoint, http://<--admin>/chat/<op>
(default: $CADDY_ADMIN, else localhost:2019; a "unix//path" socket works
too); --prefix <channel prefix> names the chat when the node runs several
(different brokers or channel prefixes). Or, with --url <publish endpoint>
(e.g. https://chat.example.com/chat/publish), to <url>/<op> on a site, with
"Authorization: Bearer <--key>" (default $CHAT_PUBLISH_KEY, the route's
publish_key).

--json prints the server's answer as it is; otherwise a short summary. The
exit status is 1 when the request fails (unreachable, an HTTP error: the
status and the server's message go to standard error) or when the answer
says the op did not fully happen (a node did not answer, a connection or a
channel was refused).
`

// cliTarget is where the requests go: Caddy's admin endpoint, or a site's
// publish endpoint with its key.
type cliTarget struct {
	admin   string // the admin address, when url is ""
	prefix  string // the chat's channel_prefix (admin endpoint only)
	url     string // the site's publish endpoint, without a final /
	key     string
	timeout time.Duration
}

// addCLITargetFlags adds the flags every admin subcommand takes.
func addCLITargetFlags(f *pflag.FlagSet) {
	f.String("admin", "", "Caddy's admin address, host:port or unix//path (default $CADDY_ADMIN, else localhost:2019)")
	f.String("prefix", "", "the channel_prefix of the chat, when the node runs several")
	f.String("url", "", "a site's publish endpoint URL to send to instead (e.g. https://chat.example.com/chat/publish)")
	f.String("key", "", "with --url: the route's publish key (default $CHAT_PUBLISH_KEY)")
	f.Bool("json", false, "print the server's answer as it is")
	f.Duration("timeout", 30*time.Second, "the longest the request may take")
}

// defaultAdminAddress is Caddy's own default admin address.
const defaultAdminAddress = "localhost:2019"

// cliTargetFromFlags reads the target flags, with the environment's
// defaults (getenv is os.Getenv, a parameter for the tests).
func cliTargetFromFlags(f *pflag.FlagSet, getenv func(string) string) (cliTarget, error) {
	var t cliTarget
	t.admin, _ = f.GetString("admin")
	t.prefix, _ = f.GetString("prefix")
	t.url, _ = f.GetString("url")
	t.key, _ = f.GetString("key")
	t.timeout, _ = f.GetDuration("timeout")
	if t.timeout <= 0 {
		return t, fmt.Errorf("--timeout %v: must be positive", t.timeout)
	}
	if t.url == "" {
		if f.Changed("key") {
			return t, errors.New("--key goes with --url (the admin endpoint takes no key: Caddy's admin access control applies)")
		}
		if t.admin == "" {
			t.admin = getenv("CADDY_ADMIN")
		}
		if t.admin == "" {
			t.admin = defaultAdminAddress
		}
		// "http://localhost:2019/" is how the address is often written.
		t.admin = strings.TrimSuffix(strings.TrimPrefix(t.admin, "http://"), "/")
		return t, nil
	}
	if f.Changed("admin") || f.Changed("prefix") {
		return t, errors.New("--url sends to a site's publish endpoint: --admin and --prefix do not go with it (the route's own chat answers)")
	}
	u, err := url.Parse(t.url)
	if err != nil {
		return t, fmt.Errorf("--url %q: %w", t.url, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return t, fmt.Errorf("--url %q: give the publish endpoint's http:// or https:// URL, e.g. https://chat.example.com/chat/publish", t.url)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return t, fmt.Errorf("--url %q: the publish endpoint's URL takes no query", t.url)
	}
	t.url = strings.TrimSuffix(t.url, "/")
	if !f.Changed("key") {
		t.key = getenv("CHAT_PUBLISH_KEY")
	}
	if t.key == "" {
		return t, errors.New("--url needs the route's publish key: give --key or set CHAT_PUBLISH_KEY")
	}
	return t, nil
}

// runAdmin sends req to t and prints the answer to out: as it is (asJSON)
// or summarized. It fails when the request does and when the answer says the
// op did not fully happen.
func runAdmin(ctx context.Context, t cliTarget, c adminCommand, req adminRequest, asJSON bool, out io.Writer, now time.Time) error {
	body, err := t.send(ctx, req)
	if err != nil {
		return err
	}
	text, failure := c.summarize(req, body, now)
	if asJSON {
		// The answer as it is. Only what it says about the op fails the
		// command: an answer the summary cannot read is still the answer.
		text = string(body)
		var partial *adminPartialError
		if !errors.As(failure, &partial) {
			failure = nil
		}
	}
	if text != "" && !strings.HasSuffix(text, "\n") {
		text += "\n"
	}
	if _, err := io.WriteString(out, text); err != nil {
		return fmt.Errorf("writing the answer: %w", err)
	}
	return failure
}
