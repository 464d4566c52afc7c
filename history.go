package caddychat

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
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
		if r.Channels != "" {
			if strings.Contains(r.Channels, "{user}") {
				errs = append(errs, fmt.Errorf("chat: history %s: {user} is not allowed in history patterns (history is shared by the channel's subscribers)", r.Channels))
			} else if err := validatePattern(r.Channels); err != nil {
				errs = append(errs, fmt.Errorf("chat: history %s: %v", r.Channels, err))
			}
		}
		if r.Count < 1 || r.Count > maxHistoryCount {
			errs = append(errs, fmt.Errorf("chat: history count %d: must be between 1 and %d", r.Count, maxHistoryCount))
		}
		if r.MaxAge < 0 || (r.MaxAge != 0 && time.Duration(r.MaxAge) < time.Second) || time.Duration(r.MaxAge) > 365*24*time.Hour {
			errs = append(errs, fmt.Errorf("chat: history max age %v: must be between 1s and 365 days", time.Duration(r.MaxAge)))
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
}

// Envelopes of kept messages are built from a head naming the channel, the
// id, the channel's epoch and a tail carrying sender, time and data, so that
// the Lua script that stores a message can insert the id Redis assigns.
func envelopeHead(channel string) string {
	return `{"type":"message","channel":"` + channel + `","id":"`
}

func envelopeTail(from sender, ts int64, data json.RawMessage) (string, error) {
	b, err := json.Marshal(struct {
		sender
		TS   int64           `json:"ts"`
		Data json.RawMessage `json:"data"`
	}{from, ts, data})
	if err != nil {
		return "", err
	}
	return string(b[1:]), nil // without '{': it follows the id and epoch
}

func historyEnvelope(channel string, id streamID, epoch, tail string) []byte {
	// Sized exactly: kept envelopes stay in memory for the history's age,
	// and one reallocated by the appends would keep up to a third unused.
	ids := id.String()
	const fixed = len(`{"type":"message","channel":"`) + len(`","id":"`) + len(`","epoch":"`) + len(`",`)
	b := make([]byte, 0, fixed+len(channel)+len(ids)+len(epoch)+len(tail))
	b = append(b, envelopeHead(channel)...)
	b = append(b, ids...)
	b = append(b, `","epoch":"`...)
	b = append(b, epoch...)
	b = append(b, `",`...)
	return append(b, tail...)
}

// historyData is what a kept message carries as data: a raw-protocol frame
// becomes a JSON string so that history holds envelopes only.
func (msg Publication) historyData() (json.RawMessage, error) {
	if msg.Raw == nil {
		return msg.Data, nil
	}
	return json.Marshal(string(msg.Raw))
}

func newEpoch() string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		// crypto/rand does not fail on supported platforms; a time-based
		// epoch still changes whenever the history is recreated.
		return strconv.FormatInt(time.Now().UnixNano(), 36)
	}
	return hex.EncodeToString(b[:])
}

// messageID returns the id of an envelope without decoding it (and without
// allocating: it runs once per delivered message), for the merge of live
// messages with a history read; ok is false for payloads that are not kept
// messages (a backend's plain PUBLISH, an envelope without history).
func messageID(channel string, payload []byte) (streamID, bool) {
	const head, mid = `{"type":"message","channel":"`, `","id":"`
	rest, ok := bytes.CutPrefix(payload, []byte(head))
	if !ok {
		return streamID{}, false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(channel)); !ok {
		return streamID{}, false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(mid)); !ok {
		return streamID{}, false
	}
	var id streamID
	var part *uint64 = &id.ms
	digits := 0
	for i, b := range rest {
		switch {
		case '0' <= b && b <= '9' && digits < 19:
			*part = *part*10 + uint64(b-'0')
			digits++
		case b == '-' && part == &id.ms && digits > 0:
			part, digits = &id.seq, 0
		case b == '"' && part == &id.seq && digits > 0:
			// Only kept messages carry an epoch after the id.
			return id, bytes.HasPrefix(rest[i:], []byte(`","epoch":"`))
		default:
			return streamID{}, false
		}
	}
	return streamID{}, false
}

// ---- Redis history: a stream per channel ----

// Keys of a channel's history. The hash tag is the channel's pub/sub name,
// so in a cluster the keys live in the slot of the channel they belong to.
func historyStreamKey(pubsubName string) string { return "{" + pubsubName + "}:history" }
func historyEpochKey(pubsubName string) string  { return "{" + pubsubName + "}:epoch" }

// publishWithHistory stores and publishes a message in one step: a message
// is never delivered live without being in history, nor kept without being
// delivered. It returns the id Redis gave the entry, the channel's epoch,
// and "1" when it created the stream; 0 (an integer) when the stream does
// not exist and the caller may not create one (history_new_channels).
//
// A stream that does not exist gets a new epoch even if the epoch key
// survived (maxmemory evicts keys one by one): a history that was lost
// always says so through the epoch.
//
// KEYS: stream, epoch key. ARGV: pub/sub name, count, TTL in ms, epoch to
// use for a new history, envelope head, envelope tail, "1" if the stream
// may be created. The stream is trimmed to count (exactly) on every
// publish, and both keys expire after the TTL without a publish. On a
// cluster it runs with SPUBLISH: the keys' hash tag is the channel, so they
// share its slot.
var publishWithHistory = newPubSubScript(`
local epoch
local created = '0'
if redis.call('EXISTS', KEYS[1]) == 0 then
	if ARGV[7] ~= '1' then
		return 0
	end
	epoch = ARGV[4]
	redis.call('SET', KEYS[2], epoch)
	created = '1'
else
	epoch = redis.call('GET', KEYS[2])
	if not epoch then
		epoch = ARGV[4]
		redis.call('SET', KEYS[2], epoch)
	end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '*', 't', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[1], ARGV[5] .. id .. '","epoch":"' .. epoch .. '",' .. ARGV[6])
return {id, epoch, created}
`)

func (b *redisBroker) publishKept(ctx context.Context, msg Publication, now time.Time) (string, error) {
	data, err := msg.historyData()
	if err != nil {
		return "", fmt.Errorf("encoding message: %w", err)
	}
	tail, err := envelopeTail(msg.sender(), now.UnixMilli(), data)
	if err != nil {
		return "", fmt.Errorf("encoding message: %w", err)
	}
	name := b.prefix + msg.Channel
	ttl := max(msg.History.maxAge.Milliseconds(), 1000)
	mayCreate := "1"
	if msg.newHistory != nil && !msg.newHistory.allowed {
		mayCreate = "0"
	}
	cmd, err := b.runScript(ctx, publishWithHistory.get(b.sharded),
		[]string{historyStreamKey(name), historyEpochKey(name)},
		name, msg.History.count, ttl, newEpoch(), nodeStamp+envelopeHead(msg.Channel), tail, mayCreate)
	if err != nil {
		return "", fmt.Errorf("redis XADD+PUBLISH %s: %w", name, err)
	}
	if n, ok := cmd.Val().(int64); ok && n == 0 {
		return "", errNewHistoryLimited
	}
	res, err := cmd.StringSlice()
	if err != nil {
		return "", fmt.Errorf("redis XADD+PUBLISH %s: %w", name, err)
	}
	if len(res) != 3 {
		return "", fmt.Errorf("redis XADD+PUBLISH %s: unexpected reply %q", name, res)
	}
	if res[2] == "1" && msg.newHistory != nil {
		msg.newHistory.created = true
	}
	return res[0], nil
}

func (b *redisBroker) readSince(ctx context.Context, channel string, since streamID, limit int) (historyPage, error) {
	name := b.prefix + channel
	stream := historyStreamKey(name)
	pipe := b.client.TxPipeline()
	epochCmd := pipe.Get(ctx, historyEpochKey(name))
	// From since itself: finding it proves nothing after it was trimmed.
	rangeCmd := pipe.XRangeN(ctx, stream, since.String(), "+", int64(limit)+2)
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return historyPage{}, fmt.Errorf("redis XRANGE %s: %w", stream, err)
	}
	epoch, _ := epochCmd.Result()
	page := historyPage{epoch: epoch}
	msgs := rangeCmd.Val()
	if len(msgs) > 0 && msgs[0].ID == since.String() {
		page.sinceFound = true
		msgs = msgs[1:]
	}
	if len(msgs) > limit {
		// More than one resume replays: take the newest limit instead.
		page.more = true
		rev, err := b.client.XRevRangeN(ctx, stream, "+", "("+since.String(), int64(limit)).Result()
		if err != nil {
			return historyPage{}, fmt.Errorf("redis XREVRANGE %s: %w", stream, err)
		}
		msgs = reverse(rev)
	}
	page.entries = streamEntries(channel, epoch, msgs)
	return page, nil
}

func (b *redisBroker) readBefore(ctx context.Context, channel string, before *streamID, limit int) (historyPage, error) {
	name := b.prefix + channel
	stream := historyStreamKey(name)
	end := "+"
	if before != nil {
		end = "(" + before.String()
	}
	pipe := b.client.TxPipeline()
	epochCmd := pipe.Get(ctx, historyEpochKey(name))
	revCmd := pipe.XRevRangeN(ctx, stream, end, "-", int64(limit)+1)
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return historyPage{}, fmt.Errorf("redis XREVRANGE %s: %w", stream, err)
	}
	epoch, _ := epochCmd.Result()
	page := historyPage{epoch: epoch}
	msgs := revCmd.Val()
	if len(msgs) > limit {
		msgs, page.more = msgs[:limit], true
	}
	page.entries = streamEntries(channel, epoch, reverse(msgs))
	return page, nil
}

func reverse(msgs []redis.XMessage) []redis.XMessage {
	for i, j := 0, len(msgs)-1; i < j; i, j = i+1, j-1 {
		msgs[i], msgs[j] = msgs[j], msgs[i]
	}
	return msgs
}

// streamEntries turns stream entries into envelopes. An entry that is not
// ours (written by something else) is skipped rather than sent.
func streamEntries(channel, epoch string, msgs []redis.XMessage) []historyEntry {
	out := make([]historyEntry, 0, len(msgs))
	for _, m := range msgs {
		id, ok := parseStreamID(m.ID)
		tail, isString := m.Values["t"].(string)
		if !ok || !isString || !json.Valid([]byte("{"+tail)) {
			continue
		}
		out = append(out, historyEntry{id: id, payload: historyEnvelope(channel, id, epoch, tail)})
	}
	return out
}
