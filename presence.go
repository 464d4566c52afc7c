package caddychat

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Presence: who is subscribed to a channel right now, across all nodes.
//
// Every subscription of an authenticated user on a route with presence on is
// one entry, "<user>\x00<node>\x00<conn>". A user's first entry on a channel
// publishes a join event on the channel, the last one to go a leave event, so
// subscribers hear of each user once however many tabs it has open. Entries
// expire: each node refreshes its own every presence_ttl/3 and sweeps the
// expired ones of the channels it watches, so the users of a crashed node get
// their leave within presence_ttl + presence_ttl/3.

const (
	defaultPresenceTTL = 15 * time.Second
	minPresenceTTL     = 3 * time.Second
	// presenceKeep is how many TTLs the Redis keys of a channel outlive its
	// last update: an abandoned channel's keys go away by themselves.
	presenceKeep = 3
	// presenceCloseTimeout bounds removing a node's entries when its hub closes.
	presenceCloseTimeout = 2 * time.Second
	// presenceChunk bounds the entries one heartbeat script call carries, so
	// that a busy channel does not hold Redis in one long script.
	presenceChunk = 500
)

// presenceEntry is one connection's subscription to a channel on a presence
// route.
type presenceEntry struct {
	sub     subscriber
	channel string
	user    string // empty: anonymous, the connection watches but is not listed
	member  string // "<user>\x00<node>\x00<conn>"; empty when anonymous
	ttl     time.Duration

	// mu orders the entry's join and leave at the store: each waits for the
	// store's answer while holding it, so a heartbeat's restore can never
	// land after the leave and bring back a ghost.
	mu sync.Mutex
}

// presenceUser is one line of a presence reply: a user, or a guest
// (guest_names on; guest.go) with "user":"" and "anonymous":true.
type presenceUser struct {
	User        string `json:"user"`
	Anonymous   bool   `json:"anonymous,omitempty"`
	Guest       string `json:"guest,omitempty"`
	Name        string `json:"name,omitempty"`
	Connections int    `json:"connections"`
}

// newPresenceUser is the reply line of a presence key (a user id or a
// guest's key) with n connections.
func newPresenceUser(key string, n int) presenceUser {
	if guest, name, ok := parseGuestKey(key); ok {
		return presenceUser{Anonymous: true, Guest: guest, Name: name, Connections: n}
	}
	return presenceUser{User: key, Connections: n}
}

// comparePresenceUsers sorts a reply: users by id, then guests by name and id.
func comparePresenceUsers(a, b presenceUser) int {
	if a.Anonymous != b.Anonymous {
		if a.Anonymous {
			return 1
		}
		return -1
	}
	if c := strings.Compare(a.User, b.User); c != 0 {
		return c
	}
	if c := strings.Compare(a.Name, b.Name); c != 0 {
		return c
	}
	return strings.Compare(a.Guest, b.Guest)
}

type presenceReply struct {
	Type    string          `json:"type"`
	ID      json.RawMessage `json:"id,omitempty"`
	Channel string          `json:"channel"`
	Users   []presenceUser  `json:"users"`
}

// presenceBeat is what one heartbeat refreshes on one channel.
type presenceBeat struct {
	channel string
	keep    time.Duration // how long the channel's keys outlive this beat
	entries []*presenceEntry
}

// presenceStore keeps the entries of every node and publishes the join and
// leave events on the channel, atomically with the change that causes them.
type presenceStore interface {
	// join adds e; the user's first entry on the channel publishes join.
	join(ctx context.Context, e *presenceEntry) error
	// leave removes entries; a user's last entry on a channel publishes leave.
	leave(ctx context.Context, entries []*presenceEntry) error
	// list returns the channel's users, sorted, without expired entries.
	list(ctx context.Context, channel string) ([]presenceUser, error)
	// heartbeat refreshes the entries' expiry, sweeps the expired entries of
	// every beat's channel and returns the entries the store no longer had
	// (swept while this node could not reach it, or lost in a restart).
	heartbeat(ctx context.Context, beats []presenceBeat) (missing []*presenceEntry, err error)
	// expires reports whether entries expire, so need heartbeats.
	expires() bool
}

// presence is a hub's registry of its own presence entries, and their
// heartbeat.
type presence struct {
	store presenceStore
	node  string
	log   *zap.Logger

	mu sync.Mutex
	// channels holds, per channel, this node's subscribers on presence
	// routes; their channels are the ones this node sweeps.
	channels map[string]map[subscriber]*presenceEntry
	// interval is the heartbeat period (the smallest ttl/3 among entries);
	// 0 while there is nothing to refresh.
	interval time.Duration
	started  bool
	closed   bool
	kick     chan struct{}
	stop     chan struct{}
	done     chan struct{}
}

func newPresence(store presenceStore, node string, log *zap.Logger) *presence {
	return &presence{
		store:    store,
		node:     node,
		log:      log,
		channels: make(map[string]map[subscriber]*presenceEntry),
		kick:     make(chan struct{}, 1),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
}

// presenceInfo is how a subscriber is listed in presence.
type presenceInfo struct {
	user string // empty: anonymous, the subscriber watches but is not listed
	conn string // the subscriber's id, unique on the node
	ttl  time.Duration
	// timeout bounds removing its entries from the store.
	timeout time.Duration
}

// join records s's subscription to channel once the hub subscribed it;
// ctx bounds the store's answer. A store failure only delays the entry:
// the next heartbeat restores it.
func (p *presence) join(ctx context.Context, s subscriber, channel string) {
	info, ok := s.presenceInfo()
	if !ok {
		return
	}
	e := &presenceEntry{sub: s, channel: channel, user: info.user, ttl: info.ttl}
	if e.user != "" {
		e.member = e.user + "\x00" + p.node + "\x00" + info.conn
	}
	// Held until the store answered: a restore that finds e waits for it.
	e.mu.Lock()
	defer e.mu.Unlock()

	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	watchers := p.channels[channel]
	if watchers == nil {
		watchers = make(map[subscriber]*presenceEntry)
		p.channels[channel] = watchers
	}
	if _, ok := watchers[s]; ok {
		p.mu.Unlock()
		return
	}
	watchers[s] = e
	if p.store.expires() {
		if !p.started {
			p.started = true
			go p.run()
		}
		if beat := e.ttl / 3; p.interval == 0 || beat < p.interval {
			p.interval = beat
			select {
			case p.kick <- struct{}{}:
			default:
			}
		}
	}
	p.mu.Unlock()

	if e.member == "" {
		return
	}
	if err := p.store.join(ctx, e); err != nil {
		p.failed("presence join", channel, err)
	}
}

// leave removes s's entry on channel, if it has one.
func (p *presence) leave(s subscriber, channel string) {
	info, ok := s.presenceInfo()
	if !ok {
		return
	}
	p.mu.Lock()
	e := p.remove(s, channel)
	p.mu.Unlock()
	if e != nil {
		p.leaveEntries(info.timeout, []*presenceEntry{e})
	}
}

// leaveAll removes s's entries on channels in one round trip: a closing
// connection does not wait for the store once per channel.
func (p *presence) leaveAll(s subscriber, channels []string) {
	info, ok := s.presenceInfo()
	if !ok || len(channels) == 0 {
		return
	}
	var entries []*presenceEntry
	p.mu.Lock()
	for _, ch := range channels {
		if e := p.remove(s, ch); e != nil {
			entries = append(entries, e)
		}
	}
	p.mu.Unlock()
	p.leaveEntries(info.timeout, entries)
}

// remove takes s's entry on channel out of the registry; p.mu is held. It
// returns the entry if the store knows it (nil for anonymous watchers).
func (p *presence) remove(s subscriber, channel string) *presenceEntry {
	watchers := p.channels[channel]
	e := watchers[s]
	if e == nil {
		return nil
	}
	delete(watchers, s)
	if len(watchers) == 0 {
		delete(p.channels, channel)
	}
	if e.member == "" {
		return nil
	}
	return e
}

// leaveEntries removes entries from the store. The connection may be closing
// already, so the deadline is a fresh one. A failure leaves the entries to
// expire: other nodes' sweeps publish the leave.
func (p *presence) leaveEntries(timeout time.Duration, entries []*presenceEntry) {
	if len(entries) == 0 {
		return
	}
	for _, e := range entries {
		e.mu.Lock()
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	err := p.store.leave(ctx, entries)
	cancel()
	for _, e := range entries {
		e.mu.Unlock()
	}
	if err != nil {
		p.failed("presence leave", entries[0].channel, err)
	}
}

// list answers the presence op.
func (p *presence) list(ctx context.Context, channel string) ([]presenceUser, error) {
	return p.store.list(ctx, channel)
}

func (p *presence) failed(what, channel string, err error) {
	moduleMetrics().presenceFailures.Inc()
	p.log.Debug(what+" failed", zap.String("channel", channel), zap.Error(err))
}

// run is the heartbeat: every interval it refreshes this node's entries and
// sweeps the channels it watches. It idles while there is nothing to do.
func (p *presence) run() {
	defer close(p.done)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	last := time.Now()
	for {
		p.mu.Lock()
		interval := p.interval
		p.mu.Unlock()
		if interval == 0 {
			select {
			case <-p.stop:
				return
			case <-p.kick:
				// The entry that woke us was just written: its first refresh
				// is one interval away.
				last = time.Now()
				continue
			}
		}
		timer.Reset(time.Until(last.Add(interval)))
		select {
		case <-p.stop:
			return
		case <-p.kick:
			// A shorter interval: wait again, for it.
		case <-timer.C:
			last = time.Now()
			p.beat()
		}
	}
}

// beat runs one heartbeat, bounded by the interval so that beats never pile up.
func (p *presence) beat() {
	p.mu.Lock()
	beats := make([]presenceBeat, 0, len(p.channels))
	var interval time.Duration
	for channel, watchers := range p.channels {
		b := presenceBeat{channel: channel}
		var ttl time.Duration
		for _, e := range watchers {
			ttl = max(ttl, e.ttl)
			if interval == 0 || e.ttl/3 < interval {
				interval = e.ttl / 3
			}
			if e.member != "" {
				b.entries = append(b.entries, e)
			}
		}
		b.keep = presenceKeep * ttl
		beats = append(beats, b)
	}
	p.interval = interval
	p.mu.Unlock()
	if len(beats) == 0 {
		return
	}

	ctx, cancel := context.WithTimeout(context.Background(), interval)
	defer cancel()
	missing, err := p.store.heartbeat(ctx, beats)
	if err != nil {
		p.failed("presence heartbeat", beats[0].channel, err)
	}
	for _, e := range missing {
		p.restore(ctx, e)
	}
}

// restore adds an entry the store lost back, unless it left meanwhile.
func (p *presence) restore(ctx context.Context, e *presenceEntry) {
	e.mu.Lock()
	defer e.mu.Unlock()
	p.mu.Lock()
	current := p.channels[e.channel][e.sub] == e
	p.mu.Unlock()
	if !current {
		return
	}
	if err := p.store.join(ctx, e); err != nil {
		p.failed("presence restore", e.channel, err)
	}
}

// close stops the heartbeat and removes the entries still registered, so that
// their users get leave events now rather than after the TTL.
func (p *presence) close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	started := p.started
	var entries []*presenceEntry
	for _, watchers := range p.channels {
		for _, e := range watchers {
			if e.member != "" {
				entries = append(entries, e)
			}
		}
	}
	clear(p.channels)
	p.mu.Unlock()

	if started {
		close(p.stop)
		<-p.done
	}
	p.leaveEntries(presenceCloseTimeout, entries)
}

// presenceEvent encodes a join or leave event as the Redis scripts do; user
// is a presence key (a user id, or a guest's key: guest.go).
func presenceEvent(kind, channel, user string) []byte {
	u, _ := json.Marshal(user)
	if guest, name, ok := parseGuestKey(user); ok {
		u = guestPresenceFields(guest, name)
	}
	b := make([]byte, 0, 40+len(channel)+len(u))
	b = append(b, `{"type":"`...)
	b = append(b, kind...)
	b = append(b, `","channel":"`...)
	b = append(b, channel...)
	b = append(b, `","user":`...)
	b = append(b, u...)
	return append(b, '}')
}

// isPresenceEvent reports whether payload is a join or leave event for
// channel. It runs once per message on the fan-out path, so it decodes
// nothing: a fixed prefix naming the channel, then json.Valid
// (allocation-free) on the user.
func isPresenceEvent(channel string, payload []byte) bool {
	const join, leave, user = `{"type":"join","channel":"`, `{"type":"leave","channel":"`, `","user":`
	rest, ok := bytes.CutPrefix(payload, []byte(join))
	if !ok {
		if rest, ok = bytes.CutPrefix(payload, []byte(leave)); !ok {
			return false
		}
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(channel)); !ok {
		return false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(user)); !ok {
		return false
	}
	name, ok := bytes.CutSuffix(rest, []byte("}"))
	if !ok {
		return false
	}
	// A guest: "","anonymous":true,"guest":"<16 hex>","name":<string>.
	const guestHead, guestName = `"","anonymous":true,"guest":"`, `","name":`
	if g, isGuest := bytes.CutPrefix(name, []byte(guestHead)); isGuest {
		if len(g) < guestIDLen || !isLowerHex(g[:guestIDLen]) {
			return false
		}
		if name, ok = bytes.CutPrefix(g[guestIDLen:], []byte(guestName)); !ok {
			return false
		}
	}
	return len(name) > 1 && name[0] == '"' && utf8.Valid(name) && json.Valid(name)
}

func isLowerHex(b []byte) bool {
	for _, c := range b {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// memoryPresence is the in-process broker's store: one process sees every
// connection, so presence is exact and nothing expires.
type memoryPresence struct {
	broker Broker

	// mu also orders the events: a user's join is published before its leave.
	mu       sync.Mutex
	channels map[string]*memoryPresenceChannel
}

type memoryPresenceChannel struct {
	members map[string]string // member -> user
	users   map[string]int    // user -> connections
}

func newMemoryPresence(broker Broker) *memoryPresence {
	return &memoryPresence{broker: broker, channels: make(map[string]*memoryPresenceChannel)}
}

func (s *memoryPresence) expires() bool { return false }

func (s *memoryPresence) join(ctx context.Context, e *presenceEntry) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := s.channels[e.channel]
	if ch == nil {
		ch = &memoryPresenceChannel{members: make(map[string]string), users: make(map[string]int)}
		s.channels[e.channel] = ch
	}
	if _, ok := ch.members[e.member]; ok {
		return nil
	}
	ch.members[e.member] = e.user
	if ch.users[e.user]++; ch.users[e.user] == 1 {
		return s.publish(ctx, "join", e.channel, e.user)
	}
	return nil
}

func (s *memoryPresence) leave(ctx context.Context, entries []*presenceEntry) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, e := range entries {
		ch := s.channels[e.channel]
		if ch == nil {
			continue
		}
		if _, ok := ch.members[e.member]; !ok {
			continue
		}
		delete(ch.members, e.member)
		if ch.users[e.user]--; ch.users[e.user] <= 0 {
			delete(ch.users, e.user)
			errs = append(errs, s.publish(ctx, "leave", e.channel, e.user))
		}
		if len(ch.members) == 0 {
			delete(s.channels, e.channel)
		}
	}
	return errors.Join(errs...)
}

func (s *memoryPresence) publish(ctx context.Context, kind, channel, user string) error {
	_, err := s.broker.Publish(ctx, Publication{Channel: channel, Raw: presenceEvent(kind, channel, user), event: true})
	return err
}

func (s *memoryPresence) list(_ context.Context, channel string) ([]presenceUser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := s.channels[channel]
	if ch == nil {
		return nil, nil
	}
	users := make([]presenceUser, 0, len(ch.users))
	for u, n := range ch.users {
		users = append(users, newPresenceUser(u, n))
	}
	slices.SortFunc(users, comparePresenceUsers)
	return users, nil
}

func (s *memoryPresence) heartbeat(context.Context, []presenceBeat) ([]*presenceEntry, error) {
	return nil, nil
}

// redisPresence keeps presence in Redis, in two keys per channel, hash-tagged
// with the channel's pub/sub name so that they share a Redis Cluster slot:
//
//	{<prefix><channel>}:presence  ZSET member -> expiry (Redis time, ms)
//	{<prefix><channel>}:users     HASH user -> connections
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

// presenceLua is shared by the scripts. KEYS: the ZSET and the HASH. ARGV[1]:
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
local function event(kind, user)
	return ` + nodeStampLua + ` .. '{"type":"' .. kind .. '","channel":"' .. ARGV[2] .. '","user":' .. user_json(user) .. '}'
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
			redis.call('HDEL', KEYS[2], u)
			redis.call('PUBLISH', ARGV[1], event('leave', u))
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
	// ARGV[4], ARGV[5]: ttl (ms), member.
	presenceJoinScript = newPubSubScript(presenceLua + `
local now = now_ms()
local m = ARGV[5]
if redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), m) == 1 then
	local u = user_of(m)
	if redis.call('HINCRBY', KEYS[2], u, 1) == 1 then
		redis.call('PUBLISH', ARGV[1], event('join', u))
	end
end
keep()
return 1
`)

	// ARGV[4...]: members.
	presenceLeaveScript = newPubSubScript(presenceLua + `
for i = 4, #ARGV do
	local m = ARGV[i]
	if redis.call('ZREM', KEYS[1], m) == 1 then
		local u = user_of(m)
		if redis.call('HINCRBY', KEYS[2], u, -1) <= 0 then
			redis.call('HDEL', KEYS[2], u)
			redis.call('PUBLISH', ARGV[1], event('leave', u))
		end
	end
end
return 1
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

	// Sweeps first, so the answer never lists a dead node's users.
	presenceListScript = newPubSubScript(presenceLua + `
sweep(now_ms())
return redis.call('HGETALL', KEYS[2])
`)
)

func (s *redisPresence) keys(channel string) []string {
	tag := "{" + s.prefix + channel + "}"
	return []string{tag + ":presence", tag + ":users"}
}

func (s *redisPresence) args(channel string, keep time.Duration, n int) []any {
	args := make([]any, 3, 3+n)
	args[0], args[1], args[2] = s.prefix+channel, channel, keep.Milliseconds()
	return args
}

func (s *redisPresence) join(ctx context.Context, e *presenceEntry) error {
	args := append(s.args(e.channel, presenceKeep*e.ttl, 2), e.ttl.Milliseconds(), e.member)
	if err := presenceJoinScript.get(s.sharded).Run(ctx, s.client, s.keys(e.channel), args...).Err(); err != nil {
		return fmt.Errorf("redis presence join on %s: %w", s.prefix+e.channel, err)
	}
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
	_, err := s.run(ctx, calls)
	return err
}

func (s *redisPresence) list(ctx context.Context, channel string) ([]presenceUser, error) {
	flat, err := presenceListScript.get(s.sharded).Run(ctx, s.client, s.keys(channel), s.args(channel, 0, 0)...).StringSlice()
	if err != nil {
		return nil, fmt.Errorf("redis presence of %s: %w", s.prefix+channel, err)
	}
	users := make([]presenceUser, 0, len(flat)/2)
	for i := 0; i+1 < len(flat); i += 2 {
		n, err := strconv.Atoi(flat[i+1])
		if err != nil || n <= 0 {
			continue
		}
		users = append(users, newPresenceUser(flat[i], n))
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
