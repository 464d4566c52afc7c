package caddychat

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"time"

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
	// info: the user's info (userinfo.go), at most maxPresenceInfo bytes;
	// a user's entry shows its most recent connection's.
	info json.RawMessage
	ttl  time.Duration
	// announced: the store's last join or leave of the entry published
	// the user's join or leave event (its first connection on the
	// channel, or its last), so it is the one the webhooks record.
	// Written by the store under mu.
	announced bool

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
	// Info: the user's info, of its most recent connection (userinfo.go).
	Info json.RawMessage `json:"info,omitempty"`
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
	// join adds e; the user's first entry on the channel publishes join
	// (and sets e.announced).
	join(ctx context.Context, e *presenceEntry) error
	// leave removes entries; a user's last entry on a channel publishes
	// leave (and sets that entry's announced).
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
	info json.RawMessage
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
	if len(info.info) <= maxPresenceInfo {
		e.info = info.info
	}
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
	if e.announced {
		s.recordEvent("join", channel)
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
		e.announced = false
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	err := p.store.leave(ctx, entries)
	cancel()
	for _, e := range entries {
		if e.announced {
			e.sub.recordEvent("leave", e.channel)
		}
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
	e.announced = false
	if err := p.store.join(ctx, e); err != nil {
		p.failed("presence restore", e.channel, err)
	}
	if e.announced {
		e.sub.recordEvent("join", e.channel)
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

// memoryPresence is the in-process broker's store: one process sees every
// connection, so presence is exact and nothing expires.
type memoryPresence struct {
	broker Broker

	// mu also orders the events: a user's join is published before its leave.
	mu       sync.Mutex
	channels map[string]*memoryPresenceChannel
}

type memoryPresenceChannel struct {
	members map[string]string          // member -> user
	users   map[string]int             // user -> connections
	info    map[string]json.RawMessage // user -> info of its latest join
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
		ch = &memoryPresenceChannel{members: make(map[string]string), users: make(map[string]int), info: make(map[string]json.RawMessage)}
		s.channels[e.channel] = ch
	}
	if _, ok := ch.members[e.member]; ok {
		return nil
	}
	ch.members[e.member] = e.user
	if len(e.info) > 0 {
		ch.info[e.user] = e.info
	} else {
		delete(ch.info, e.user)
	}
	if ch.users[e.user]++; ch.users[e.user] == 1 {
		e.announced = true
		return s.publish(ctx, "join", e.channel, e.user, e.info)
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
			info := ch.info[e.user]
			delete(ch.users, e.user)
			delete(ch.info, e.user)
			e.announced = true
			errs = append(errs, s.publish(ctx, "leave", e.channel, e.user, info))
		}
		if len(ch.members) == 0 {
			delete(s.channels, e.channel)
		}
	}
	return errors.Join(errs...)
}

func (s *memoryPresence) publish(ctx context.Context, kind, channel, user string, info json.RawMessage) error {
	_, err := s.broker.Publish(ctx, Publication{Channel: channel, Raw: presenceEvent(kind, channel, user, info), event: true})
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
		pu := newPresenceUser(u, n)
		pu.Info = ch.info[u]
		users = append(users, pu)
	}
	slices.SortFunc(users, comparePresenceUsers)
	return users, nil
}

func (s *memoryPresence) heartbeat(context.Context, []presenceBeat) ([]*presenceEntry, error) {
	return nil, nil
}
