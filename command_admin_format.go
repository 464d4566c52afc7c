package caddychat

// The human summaries of the admin subcommands' answers (command_admin.go):
// short lines an operator reads at a glance and greps, one per node, channel,
// user, message or figure. --json prints the answers as they are instead:
// scripts should read that, not these lines.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// adminPartialError is an answer that says the op did not fully happen: a
// node did not answer, a connection or a channel was refused. It fails the
// command (exit 1) after the answer is printed, with --json too.
type adminPartialError struct{ msg string }

func (e *adminPartialError) Error() string { return e.msg }

// decodeAnswer reads a 2xx answer into v; an answer of another shape is an
// error that shows it, since the summary would be wrong.
func decodeAnswer(body []byte, v any) error {
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("the answer is not what this command expects (%v): %.300s", err, body)
	}
	return nil
}

// plural is "1 connection", "2 connections".
func plural(n int, noun string) string {
	if n == 1 {
		return fmt.Sprintf("%d %s", n, noun)
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// missingNodes is the failure of a cluster-wide answer some nodes left out.
func missingNodes(n int) error {
	if n <= 0 {
		return nil
	}
	verb := "nodes did"
	if n == 1 {
		verb = "node did"
	}
	return &adminPartialError{fmt.Sprintf("%d %s not answer within publish_timeout: the op may not have happened there", n, verb)}
}

// unixTime is a Unix time in seconds as the summaries print it.
func unixTime(sec int64) string { return time.Unix(sec, 0).UTC().Format(time.RFC3339) }

// statsFigures are what stats counts, for a node, a route or the total.
type statsFigures struct {
	Connections   int  `json:"connections"`
	Users         int  `json:"users"`
	Anonymous     int  `json:"anonymous"`
	Channels      *int `json:"channels"` // not per route
	Subscriptions int  `json:"subscriptions"`
}

func (s statsFigures) String() string {
	out := fmt.Sprintf("%s, %s, %d anonymous", plural(s.Connections, "connection"), plural(s.Users, "user"), s.Anonymous)
	if s.Channels != nil {
		out += ", " + plural(*s.Channels, "channel")
	}
	return out + ", " + plural(s.Subscriptions, "subscription")
}

func summarizeStats(_ adminRequest, body []byte, now time.Time) (string, error) {
	type route struct {
		Route string `json:"route"`
		statsFigures
	}
	var a struct {
		Nodes []struct {
			Node       string `json:"node"`
			ReportedAt int64  `json:"reported_at"` // Unix ms
			statsFigures
		} `json:"nodes"`
		statsFigures
		Routes []route `json:"routes"`
	}
	if err := decodeAnswer(body, &a); err != nil {
		return "", err
	}
	var b strings.Builder
	for _, n := range a.Nodes {
		fmt.Fprintf(&b, "node %s: %s", n.Node, n.statsFigures)
		if n.ReportedAt > 0 {
			fmt.Fprintf(&b, " (reported %v ago)", now.Sub(time.UnixMilli(n.ReportedAt)).Round(100*time.Millisecond))
		}
		b.WriteByte('\n')
	}
	fmt.Fprintf(&b, "total (%s): %s\n", plural(len(a.Nodes), "node"), a.statsFigures)
	for _, r := range a.Routes {
		fmt.Fprintf(&b, "route %s: %s\n", r.Route, r.statsFigures)
	}
	return b.String(), nil
}

func summarizeChannels(_ adminRequest, body []byte, _ time.Time) (string, error) {
	var a struct {
		Channels []struct {
			Channel     string `json:"channel"`
			Subscribers int    `json:"subscribers"`
			Nodes       int    `json:"nodes"`
		} `json:"channels"`
		Nodes        int  `json:"nodes"`
		Truncated    bool `json:"truncated"`
		MissingNodes int  `json:"missing_nodes"`
	}
	if err := decodeAnswer(body, &a); err != nil {
		return "", err
	}
	var b strings.Builder
	for _, c := range a.Channels {
		fmt.Fprintf(&b, "%s: %s on %s\n", c.Channel, plural(c.Subscribers, "subscriber"), plural(c.Nodes, "node"))
	}
	fmt.Fprintf(&b, "%s (%s answered)", plural(len(a.Channels), "channel"), plural(a.Nodes, "node"))
	if a.Truncated {
		b.WriteString("; more match: raise --limit or narrow --pattern")
	}
	return b.String(), missingNodes(a.MissingNodes)
}

func summarizePresence(_ adminRequest, body []byte, _ time.Time) (string, error) {
	var a struct {
		Channel string `json:"channel"`
		Users   []struct {
			User        string `json:"user"`
			Guest       string `json:"guest"`
			Name        string `json:"name"`
			Connections int    `json:"connections"`
		} `json:"users"`
	}
	if err := decodeAnswer(body, &a); err != nil {
		return "", err
	}
	var b strings.Builder
	for _, u := range a.Users {
		who := u.User
		switch {
		case who != "":
		case u.Guest != "":
			// A guest's name is not a user id: say so, as the chat page does.
			who = fmt.Sprintf("guest %q (%s)", u.Name, u.Guest)
		default:
			who = "anonymous"
		}
		fmt.Fprintf(&b, "%s: %s\n", who, plural(u.Connections, "connection"))
	}
	fmt.Fprintf(&b, "%s on %s", plural(len(a.Users), "user"), a.Channel)
	return b.String(), nil
}

func summarizeHistory(_ adminRequest, body []byte, _ time.Time) (string, error) {
	var a struct {
		Channel  string `json:"channel"`
		Epoch    string `json:"epoch"`
		Messages []struct {
			ID        string          `json:"id"`
			TS        int64           `json:"ts"` // Unix ms
			From      string          `json:"from"`
			Anonymous bool            `json:"anonymous"`
			Server    bool            `json:"server"`
			Guest     string          `json:"guest"`
			Name      string          `json:"name"`
			Data      json.RawMessage `json:"data"`
		} `json:"messages"`
		More bool `json:"more"`
	}
	if err := decodeAnswer(body, &a); err != nil {
		return "", err
	}
	var b strings.Builder
	for _, m := range a.Messages {
		from := m.From
		switch {
		case m.Server:
			from = "(server)"
		case from == "" && m.Guest != "":
			from = fmt.Sprintf("guest %q", m.Name)
		case from == "":
			from = "(anonymous)"
		}
		var data bytes.Buffer
		if json.Compact(&data, m.Data) != nil {
			data.Write(m.Data)
		}
		text := data.String()
		if len(text) > 300 {
			text = text[:300] + "…"
		}
		fmt.Fprintf(&b, "%s  %s  %s  %s\n", m.ID, time.UnixMilli(m.TS).UTC().Format("2006-01-02T15:04:05.000Z"), from, text)
	}
	fmt.Fprintf(&b, "%s of %s", plural(len(a.Messages), "message"), a.Channel)
	if a.Epoch != "" {
		fmt.Fprintf(&b, " (epoch %s)", a.Epoch)
	}
	if a.More && len(a.Messages) > 0 {
		fmt.Fprintf(&b, "; older ones: --before %s", a.Messages[0].ID)
	}
	return b.String(), nil
}

func summarizeHistoryRemove(_ adminRequest, body []byte, _ time.Time) (string, error) {
	var a struct {
		Channel string `json:"channel"`
		Removed bool   `json:"removed"`
	}
	if err := decodeAnswer(body, &a); err != nil {
		return "", err
	}
	if !a.Removed {
		return fmt.Sprintf("%s kept no messages: nothing removed", a.Channel), nil
	}
	return fmt.Sprintf("removed the history of %s: its next message starts a new epoch", a.Channel), nil
}

// publishAnswer is one channel's outcome of publish or broadcast.
type publishAnswer struct {
	Channel   string        `json:"channel"`
	ID        string        `json:"id"`
	Duplicate bool          `json:"duplicate"`
	Error     *publishError `json:"error"`
}

func (p publishAnswer) String() string {
	if p.Error != nil {
		return fmt.Sprintf("%s: not published: %s: %s", p.Channel, p.Error.Code, p.Error.Message)
	}
	s := fmt.Sprintf("%s: published, message id %s", p.Channel, p.ID)
	if p.Duplicate {
		s += " (a repeat of an earlier publish with this idempotency key: nothing delivered again)"
	}
	return s
}

func summarizePublish(_ adminRequest, body []byte, _ time.Time) (string, error) {
	var a publishAnswer
	if err := decodeAnswer(body, &a); err != nil {
		return "", err
	}
	if a.Error != nil {
		return a.String(), &adminPartialError{"not published"}
	}
	return a.String(), nil
}

func summarizeBroadcast(_ adminRequest, body []byte, _ time.Time) (string, error) {
	var a struct {
		Results []publishAnswer `json:"results"`
	}
	if err := decodeAnswer(body, &a); err != nil {
		return "", err
	}
	var b strings.Builder
	failed := 0
	for _, r := range a.Results {
		b.WriteString(r.String() + "\n")
		if r.Error != nil {
			failed++
		}
	}
	fmt.Fprintf(&b, "published on %d of %s", len(a.Results)-failed, plural(len(a.Results), "channel"))
	if failed > 0 {
		return b.String(), &adminPartialError{fmt.Sprintf("%d of %s not published", failed, plural(len(a.Results), "channel"))}
	}
	return b.String(), nil
}

// summarizeCount is the summary of disconnect, unsubscribe and subscribe:
// {"<verb>":N,"nodes":M} and what did not happen.
func summarizeCount(verb, noun string) func(adminRequest, []byte, time.Time) (string, error) {
	return func(_ adminRequest, body []byte, _ time.Time) (string, error) {
		var a map[string]json.RawMessage
		if err := decodeAnswer(body, &a); err != nil {
			return "", err
		}
		var count, nodes, missing, refused int
		var message string
		for k, v := range map[string]any{verb: &count, "nodes": &nodes, "missing_nodes": &missing, "refused": &refused, "message": &message} {
			if raw, ok := a[k]; ok {
				if err := json.Unmarshal(raw, v); err != nil {
					return "", fmt.Errorf("the answer's %q is not what this command expects (%v): %.300s", k, err, body)
				}
			}
		}
		if _, ok := a[verb]; !ok {
			return "", fmt.Errorf("the answer has no %q: %.300s", verb, body)
		}
		s := fmt.Sprintf("%s %s on %s", verb, plural(count, noun), plural(nodes, "node"))
		if refused > 0 {
			r := fmt.Sprintf("%s refused", plural(refused, noun))
			if message != "" {
				r += ": " + message
			}
			return s + "; " + r, &adminPartialError{r}
		}
		return s, missingNodes(missing)
	}
}

func summarizeRevoke(req adminRequest, body []byte, _ time.Time) (string, error) {
	var a struct {
		Revoked      string `json:"revoked"`
		Disconnected int    `json:"disconnected"`
		Nodes        int    `json:"nodes"`
		Until        int64  `json:"until"`
		MissingNodes int    `json:"missing_nodes"`
	}
	if err := decodeAnswer(body, &a); err != nil {
		return "", err
	}
	// The answer does not repeat what was revoked: the request says it.
	what := fmt.Sprintf("revoked the token %v", req.body["jti"])
	if a.Revoked == "user" {
		what = fmt.Sprintf("revoked the tokens of %v", req.body["user"])
		if ib, ok := req.body["issued_before"].(int64); ok {
			what += " issued before " + unixTime(ib)
		} else {
			what += " issued before now"
		}
	}
	s := fmt.Sprintf("%s until %s; disconnected %s on %s", what, unixTime(a.Until), plural(a.Disconnected, "connection"), plural(a.Nodes, "node"))
	return s, missingNodes(a.MissingNodes)
}

func summarizeRevocations(_ adminRequest, body []byte, _ time.Time) (string, error) {
	var a struct {
		Revocations []struct {
			JTI          string `json:"jti"`
			User         string `json:"user"`
			IssuedBefore int64  `json:"issued_before"`
			Until        int64  `json:"until"`
		} `json:"revocations"`
	}
	if err := decodeAnswer(body, &a); err != nil {
		return "", err
	}
	var b strings.Builder
	for _, r := range a.Revocations {
		if r.JTI != "" {
			fmt.Fprintf(&b, "token %s until %s\n", r.JTI, unixTime(r.Until))
		} else {
			fmt.Fprintf(&b, "user %s: tokens issued before %s, until %s\n", r.User, unixTime(r.IssuedBefore), unixTime(r.Until))
		}
	}
	b.WriteString(plural(len(a.Revocations), "revocation"))
	return b.String(), nil
}
