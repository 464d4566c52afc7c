package caddychat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis history: a stream per channel, written by the script that publishes
// a kept message, read on resume and by the history op.

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
//
// With an idempotency key (KEYS[3], ARGV[8] its window in ms) a key seen
// within its window returns {first id, "", "d"} and does nothing else;
// otherwise the key is recorded with the new entry's id.
var publishWithHistory = newPubSubScript(`
if ARGV[8] then
	local first = redis.call('GET', KEYS[3])
	if first then
		return {first, '', 'd'}
	end
end
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
if ARGV[8] then
	redis.call('SET', KEYS[3], id, 'PX', ARGV[8])
end
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
	keys := []string{historyStreamKey(name), historyEpochKey(name)}
	args := []any{name, msg.History.count, ttl, newEpoch(), nodeStamp + envelopeHead(msg.Channel), tail, mayCreate}
	if msg.idem != nil {
		keys = append(keys, msg.idem.redisKey(name))
		args = append(args, max(msg.idem.window.Milliseconds(), 1))
	}
	cmd, err := b.runScript(ctx, publishWithHistory.get(b.sharded), keys, args...)
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
	if res[2] == "d" {
		msg.idem.duplicate = true
		return res[0], nil
	}
	if res[2] == "1" && msg.newHistory != nil {
		msg.newHistory.created = true
	}
	return res[0], nil
}

func (b *redisBroker) removeHistory(ctx context.Context, channel string) (bool, error) {
	name := b.prefix + channel
	// One slot (the keys' hash tag), so one DEL serves a cluster too.
	n, err := b.client.Del(ctx, historyStreamKey(name), historyEpochKey(name)).Result()
	if err != nil {
		return false, fmt.Errorf("redis DEL %s: %w", historyStreamKey(name), err)
	}
	return n > 0, nil
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
