package caddychat

import (
	"context"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Defaults and bounds of history.
const (
	defaultHistoryMaxAge = 24 * time.Hour
	defaultMaxReplay     = 1000
	defaultHistoryLimit  = 50
	maxHistoryCount      = 1_000_000
)

// HistoryRule keeps the recent messages of the channels it matches, so that
// a client that reconnects gets what it missed and a client that joins can
// scroll back.
type HistoryRule struct {
	// Channel pattern the rule applies to, in the syntax of subscribe rules
	// ("room:*", "team:**"). Empty: every channel of the route.
	Channels string `json:"channels,omitempty"`
	// Messages kept per channel; older ones are trimmed as new ones arrive.
	Count int `json:"count"`
	// Age beyond which messages are no longer served, and after which a
	// channel with no new message is deleted altogether. Default: 24h.
	MaxAge caddy.Duration `json:"max_age,omitempty"`
}

// historyPolicy is what a publish on one channel must keep.
type historyPolicy struct {
	count  int
	maxAge time.Duration
}

// compiledHistory is a route's history rules, matched first to last.
type compiledHistory struct {
	rules []compiledHistoryRule
}

type compiledHistoryRule struct {
	match  channelACL
	policy *historyPolicy
}

func compileHistory(rules []HistoryRule) *compiledHistory {
	if len(rules) == 0 {
		return nil
	}
	ch := &compiledHistory{}
	for _, r := range rules {
		pattern := r.Channels
		if pattern == "" {
			pattern = "**"
		}
		maxAge := time.Duration(r.MaxAge)
		if maxAge == 0 {
			maxAge = defaultHistoryMaxAge
		}
		ch.rules = append(ch.rules, compiledHistoryRule{
			match:  compileACL([]string{pattern}, ""),
			policy: &historyPolicy{count: r.Count, maxAge: maxAge},
		})
	}
	return ch
}

// policyFor returns the history kept for channel, nil when none.
func (ch *compiledHistory) policyFor(channel string) *historyPolicy {
	if ch == nil {
		return nil
	}
	for _, r := range ch.rules {
		if r.match.allows(channel) {
			return r.policy
		}
	}
	return nil
}

func validateHistoryRules(rules []HistoryRule) []error {
	var errs []error
	for _, r := range rules {
		at := r.Channels
		if at == "" {
			at = strconv.Itoa(r.Count)
		}
		if r.Channels != "" {
			if strings.Contains(r.Channels, "{user}") {
				errs = append(errs, optionErr("history", at, "chat: history %s: {user} is not allowed in history patterns (history is shared by the channel's subscribers)", r.Channels))
			} else if err := validatePattern(r.Channels); err != nil {
				errs = append(errs, optionErr("history", at, "chat: history %s: %v", r.Channels, err))
			}
		}
		if r.Count < 1 || r.Count > maxHistoryCount {
			errs = append(errs, optionErr("history", at, "chat: history count %d: must be between 1 and %d", r.Count, maxHistoryCount))
		}
		if r.MaxAge < 0 || (r.MaxAge != 0 && time.Duration(r.MaxAge) < time.Second) || time.Duration(r.MaxAge) > 365*24*time.Hour {
			errs = append(errs, optionErr("history", at, "chat: history max age %s: must be between 1s and 365 days (8760h)", formatDuration(time.Duration(r.MaxAge))))
		}
	}
	return errs
}

// streamID is a message id in history: Redis stream id syntax, <ms>-<seq>,
// ordered by time and then sequence.
type streamID struct{ ms, seq uint64 }

func parseStreamID(s string) (streamID, bool) {
	msPart, seqPart, ok := strings.Cut(s, "-")
	if !ok {
		return streamID{}, false
	}
	ms, err1 := strconv.ParseUint(msPart, 10, 64)
	seq, err2 := strconv.ParseUint(seqPart, 10, 64)
	if err1 != nil || err2 != nil {
		return streamID{}, false
	}
	return streamID{ms, seq}, true
}

func (a streamID) less(b streamID) bool {
	return a.ms < b.ms || (a.ms == b.ms && a.seq < b.seq)
}

func (a streamID) String() string {
	return strconv.FormatUint(a.ms, 10) + "-" + strconv.FormatUint(a.seq, 10)
}

// historyEntry is one kept message: its id and the envelope clients receive.
type historyEntry struct {
	id      streamID
	payload []byte
}

// historyPage is what a history read found.
type historyPage struct {
	// epoch names the channel's history: it changes when the history is lost
	// (Redis flushed or restarted without persistence, keys expired), so a
	// client holding an id of an older epoch knows its id means nothing now.
	// Empty when the channel has no history at all.
	epoch   string
	entries []historyEntry // oldest first
	// sinceFound: the id a read after it started from is still kept, so
	// nothing between it and the entries was trimmed.
	sinceFound bool
	// more: the read's limit left out entries (older ones for a read
	// backwards, the oldest ones after since for a resume).
	more bool
}

// historyStore is the history side of a broker.
type historyStore interface {
	// readSince returns the entries after since, oldest first; when there
	// are more than limit, the newest limit of them with more set.
	readSince(ctx context.Context, channel string, since streamID, limit int) (historyPage, error)
	// readBefore returns the newest limit entries older than before (all
	// entries when before is nil), oldest first, with more set when older
	// ones remain.
	readBefore(ctx context.Context, channel string, before *streamID, limit int) (historyPage, error)
	// removeHistory deletes the channel's history (the server API); the
	// next message kept starts a new epoch. false: it had none.
	removeHistory(ctx context.Context, channel string) (bool, error)
}
