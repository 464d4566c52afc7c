package caddychat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// The Redis presence store, shared by every node of a deployment (see
// presence.go for the model and the node's side).

// redisPresence keeps presence in Redis, in two keys per channel, hash-tagged
// with the channel's pub/sub name so that they share a Redis Cluster slot:
//
//	{<prefix><channel>}:presence  ZSET member -> expiry (Redis time, ms)
//	{<prefix><channel>}:users     HASH user -> connections
//	{<prefix><channel>}:info      HASH user -> info of its latest join (JSON, at most maxPresenceInfo bytes)
//
// Every change is a script, so the count and the join or leave event it
// causes are one atomic step, whichever node makes it.
type redisPresence struct {
	client redis.UniversalClient
	prefix string
	// sharded: the events go out with SPUBLISH (Redis Cluster).
	sharded bool
}

func newRedisPresence(client redis.UniversalClient, prefix string, sharded bool) *redisPresence {
	return &redisPresence{client: client, prefix: prefix, sharded: sharded}
}

func (s *redisPresence) expires() bool { return true }

// presenceLua is shared by the scripts. KEYS: the ZSET, the users HASH and
// the info HASH. ARGV[1]:
// the channel's pub/sub name, ARGV[2]: the channel, ARGV[3]: how long (ms)
// the keys outlive this call. Time is Redis's, so nodes' clocks do not matter
// (a script may read TIME and then write since Redis 5, which replicates
// scripts by their effects).
const presenceLua = guestPresenceLua + `
local function now_ms()
	local t = redis.call('TIME')
	return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- A member is "<user>\0<node>\0<conn>"; node and conn never hold a \0, the
-- user may.
local function user_of(m)
	return string.match(m, '^(.*)%z[^%z]*%z[^%z]*$')
end
-- info is the user's info as JSON, or false.
local function event(kind, user, info)
	local tail = '}'
	if info then
		tail = ',"info":' .. info .. '}'
	end
	return ` + nodeStampLua + ` .. '{"type":"' .. kind .. '","channel":"' .. ARGV[2] .. '","user":' .. user_json(user) .. tail
end
-- The user's last connection went: its leave, with the info it had.
local function gone(u)
	local info = redis.call('HGET', KEYS[3], u)
	redis.call('HDEL', KEYS[2], u)
	redis.call('HDEL', KEYS[3], u)
	redis.call('PUBLISH', ARGV[1], event('leave', u, info))
end
local function sweep(now)
	local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
	if #dead == 0 then
		return
	end
	redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
	for _, m in ipairs(dead) do
		local u = user_of(m)
		if u and redis.call('HINCRBY', KEYS[2], u, -1) <= 0 then
			gone(u)
		end
	end
end
-- Extends, never shortens: nodes may run with different TTLs.
local function keep()
	local ms = tonumber(ARGV[3])
	for _, k in ipairs(KEYS) do
		local t = redis.call('PTTL', k)
		if t == -1 or (t >= 0 and t < ms) then
			redis.call('PEXPIRE', k, ms)
		end
	end
end
`

var (
	// ARGV[4], ARGV[5], ARGV[6]: ttl (ms), member, the user's info ("":
	// none). The latest join's info is the user's; one over the bound
	// (which nodes never send) is dropped, so Redis never keeps it.
	presenceJoinScript = newPubSubScript(presenceLua + `
local now = now_ms()
local m = ARGV[5]
local joined = 0
if redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), m) == 1 then
	local u = user_of(m)
	local info = ARGV[6]
	if info ~= '' and #info <= ` + strconv.Itoa(maxPresenceInfo) + ` and string.byte(info, 1) == 123 then
		redis.call('HSET', KEYS[3], u, info)
	else
		info = false
		redis.call('HDEL', KEYS[3], u)
	end
	if redis.call('HINCRBY', KEYS[2], u, 1) == 1 then
		redis.call('PUBLISH', ARGV[1], event('join', u, info))
		joined = 1
	end
end
keep()
return joined
`)

	// ARGV[4...]: members.
	presenceLeaveScript = newPubSubScript(presenceLua + `
local left = {}
for i = 4, #ARGV do
	local m = ARGV[i]
	if redis.call('ZREM', KEYS[1], m) == 1 then
		local u = user_of(m)
		if redis.call('HINCRBY', KEYS[2], u, -1) <= 0 then
			gone(u)
			left[#left + 1] = m
		end
	end
end
return left
`)

	// ARGV[4...]: pairs of ttl (ms), member. Refreshes only members still
	// there (one that left meanwhile must stay gone) and returns the others.
	// Refreshing before the sweep saves a late node's own entries.
	presenceHeartbeatScript = newPubSubScript(presenceLua + `
local now = now_ms()
local missing = {}
for i = 4, #ARGV, 2 do
	local m = ARGV[i + 1]
	if redis.call('ZSCORE', KEYS[1], m) then
		redis.call('ZADD', KEYS[1], now + tonumber(ARGV[i]), m)
	else
		missing[#missing + 1] = m
	end
end
sweep(now)
keep()
return missing
`)

	// Sweeps first, so the answer never lists a dead node's users. Answers
	// the users and their info, each as HGETALL does.
	presenceListScript = newPubSubScript(presenceLua + `
sweep(now_ms())
return {redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3])}
`)
)

func (s *redisPresence) keys(channel string) []string {
	tag := "{" + s.prefix + channel + "}"
	return []string{tag + ":presence", tag + ":users", tag + ":info"}
}

func (s *redisPresence) args(channel string, keep time.Duration, n int) []any {
	args := make([]any, 3, 3+n)
	args[0], args[1], args[2] = s.prefix+channel, channel, keep.Milliseconds()
	return args
}

func (s *redisPresence) join(ctx context.Context, e *presenceEntry) error {
	args := append(s.args(e.channel, presenceKeep*e.ttl, 3), e.ttl.Milliseconds(), e.member, string(e.info))
	joined, err := presenceJoinScript.get(s.sharded).Run(ctx, s.client, s.keys(e.channel), args...).Int()
	if err != nil {
		return fmt.Errorf("redis presence join on %s: %w", s.prefix+e.channel, err)
	}
	e.announced = joined == 1
	return nil
}

func (s *redisPresence) leave(ctx context.Context, entries []*presenceEntry) error {
	byChannel := make(map[string][]any)
	var order []string
	for _, e := range entries {
		if _, ok := byChannel[e.channel]; !ok {
			order = append(order, e.channel)
			byChannel[e.channel] = s.args(e.channel, 0, 1)
		}
		byChannel[e.channel] = append(byChannel[e.channel], e.member)
	}
	calls := make([]scriptCall, 0, len(order))
	for _, ch := range order {
		calls = append(calls, scriptCall{script: presenceLeaveScript.get(s.sharded), keys: s.keys(ch), args: byChannel[ch]})
	}
	cmds, err := s.run(ctx, calls)
	// The script answers the members whose leave it published.
	announced := make(map[string]bool)
	for i, cmd := range cmds {
		members, _ := cmd.StringSlice()
		for _, m := range members {
			announced[order[i]+"\x00"+m] = true
		}
	}
	for _, e := range entries {
		e.announced = announced[e.channel+"\x00"+e.member]
	}
	return err
}

func (s *redisPresence) list(ctx context.Context, channel string) ([]presenceUser, error) {
	res, err := presenceListScript.get(s.sharded).Run(ctx, s.client, s.keys(channel), s.args(channel, 0, 0)...).Slice()
	if err != nil {
		return nil, fmt.Errorf("redis presence of %s: %w", s.prefix+channel, err)
	}
	if len(res) != 2 {
		return nil, fmt.Errorf("redis presence of %s: answer of %d parts, want 2", s.prefix+channel, len(res))
	}
	flat, infos := stringsOf(res[0]), stringsOf(res[1])
	info := make(map[string]string, len(infos)/2)
	for i := 0; i+1 < len(infos); i += 2 {
		info[infos[i]] = infos[i+1]
	}
	users := make([]presenceUser, 0, len(flat)/2)
	for i := 0; i+1 < len(flat); i += 2 {
		n, err := strconv.Atoi(flat[i+1])
		if err != nil || n <= 0 {
			continue
		}
		u := newPresenceUser(flat[i], n)
		if v := info[flat[i]]; v != "" && json.Valid([]byte(v)) {
			u.Info = json.RawMessage(v)
		}
		users = append(users, u)
	}
	slices.SortFunc(users, comparePresenceUsers)
	return users, nil
}

func (s *redisPresence) heartbeat(ctx context.Context, beats []presenceBeat) ([]*presenceEntry, error) {
	var calls []scriptCall
	// members maps each call's members back to their entries.
	var members []map[string]*presenceEntry
	for _, b := range beats {
		entries := b.entries
		for first := true; first || len(entries) > 0; first = false {
			chunk := entries[:min(len(entries), presenceChunk)]
			entries = entries[len(chunk):]
			args := s.args(b.channel, b.keep, 2*len(chunk))
			byMember := make(map[string]*presenceEntry, len(chunk))
			for _, e := range chunk {
				args = append(args, e.ttl.Milliseconds(), e.member)
				byMember[e.member] = e
			}
			calls = append(calls, scriptCall{script: presenceHeartbeatScript.get(s.sharded), keys: s.keys(b.channel), args: args})
			members = append(members, byMember)
		}
	}
	cmds, err := s.run(ctx, calls)
	var missing []*presenceEntry
	for i, cmd := range cmds {
		gone, cmdErr := cmd.StringSlice()
		if cmdErr != nil {
			continue
		}
		for _, m := range gone {
			if e := members[i][m]; e != nil {
				missing = append(missing, e)
			}
		}
	}
	return missing, err
}

// stringsOf is a script's array of strings (as go-redis decodes it).
func stringsOf(v any) []string {
	items, _ := v.([]any)
	out := make([]string, 0, len(items))
	for _, it := range items {
		s, _ := it.(string)
		out = append(out, s)
	}
	return out
}

type scriptCall struct {
	script *redis.Script
	keys   []string
	args   []any
}

// run sends calls in one pipeline. A script Redis does not have cached (it
// restarted, or SCRIPT FLUSH) is run again on its own, which loads it. On a
// cluster go-redis splits the pipeline by node; each call's keys are of one
// channel, so of one slot.
func (s *redisPresence) run(ctx context.Context, calls []scriptCall) ([]*redis.Cmd, error) {
	if len(calls) == 0 {
		return nil, nil
	}
	pipe := s.client.Pipeline()
	cmds := make([]*redis.Cmd, len(calls))
	for i, c := range calls {
		cmds[i] = c.script.EvalSha(ctx, pipe, c.keys, c.args...)
	}
	_, _ = pipe.Exec(ctx)
	var first error
	failed := 0
	for i, c := range calls {
		if err := cmds[i].Err(); err != nil && (errors.Is(err, redis.ErrNoScript) || redis.HasErrorPrefix(err, "NOSCRIPT")) {
			cmds[i] = c.script.Run(ctx, s.client, c.keys, c.args...)
		}
		if err := cmds[i].Err(); err != nil {
			if failed++; first == nil {
				first = fmt.Errorf("redis presence script on %s: %w", c.keys[0], err)
			}
		}
	}
	if failed > 1 {
		first = fmt.Errorf("%w (and %d more calls failed)", first, failed-1)
	}
	return cmds, first
}
