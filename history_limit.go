package caddychat

import (
	"errors"
	"fmt"
	"hash/maphash"
	"math"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// history_new_channels: how fast one publisher may create history channels
// that do not exist yet. A channel exists while its history does (the
// in-process ring, the Redis stream); publishing on it costs nothing here.

// Defaults and bounds of history_new_channels.
const (
	defaultNewChannels    = 30
	defaultNewChannelsPer = time.Minute
	maxNewChannels        = 100000

	// maxCreationBuckets bounds the publishers a route tracks at once. A
	// publisher's entry is dropped once its bucket is full again (idle for
	// Per at most), so this many publishers must have created channels
	// within one Per for the bound to matter; then new publishers are
	// refused until entries go idle.
	maxCreationBuckets = 100000
	// creationBucketBytes is what one tracked publisher costs at most: the
	// map slot (a 64-bit hash of the publisher, whatever the length of its
	// user id, and the bucket), at the map's load factor and growth.
	creationBucketBytes = 64
)

// NewChannelLimit bounds how fast one publisher creates history channels:
// Count at once, then Count per Per (a token bucket refilled evenly).
type NewChannelLimit struct {
	// History channels one publisher may create at once, and per Per; -1
	// turns the limit off.
	Count int `json:"count,omitempty"`
	// Period over which Count new channels are allowed again. Default: 1m.
	Per caddy.Duration `json:"per,omitempty"`
}

// errNewHistoryLimited: the publish would have created a history channel
// and its publisher may not create one now.
var errNewHistoryLimited = errors.New("creating history channels faster than history_new_channels allows")

// historyCreation is a publish's say on creating its channel's history.
type historyCreation struct {
	// allowed: the publish may create the history if it does not exist.
	allowed bool
	// created is set by the broker when the publish created it.
	created bool
}

// publisherKey names whose budget a publish spends: an authenticated user
// (every connection of it on this node, and its HTTP publishes), or an
// anonymous connection on its own.
type publisherKey struct{ user, conn string }

type creationBucket struct {
	tokens float64
	at     int64 // unix ns of the last update
}

// creationLimiter holds a route's per-publisher buckets.
type creationLimiter struct {
	burst float64
	rate  float64 // tokens per second
	desc  string

	// buckets are by a hash of the publisherKey, so an entry costs the same
	// whatever the user id (two publishers sharing a hash, one chance in
	// 2^64 per pair, would share a budget).
	seed      maphash.Seed
	mu        sync.Mutex
	buckets   map[uint64]creationBucket
	lastSweep time.Time
}

func newCreationLimiter(l *NewChannelLimit) *creationLimiter {
	if l == nil || l.Count < 0 {
		return nil
	}
	per := time.Duration(l.Per)
	return &creationLimiter{
		burst:   float64(l.Count),
		rate:    float64(l.Count) / per.Seconds(),
		desc:    fmt.Sprintf("%d new history channels per %v", l.Count, per),
		seed:    maphash.MakeSeed(),
		buckets: make(map[uint64]creationBucket),
	}
}

// refilled is b's content at now.
func (l *creationLimiter) refilled(b creationBucket, now time.Time) float64 {
	elapsed := float64(now.UnixNano()-b.at) / 1e9
	return math.Min(l.burst, b.tokens+math.Max(0, elapsed)*l.rate)
}

// mayCreate reports whether key may create a history channel now. It
// takes nothing: a publish is charged only when it did create one.
func (l *creationLimiter) mayCreate(key publisherKey, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sweep(now, false)
	b, ok := l.buckets[maphash.Comparable(l.seed, key)]
	if !ok {
		if len(l.buckets) >= maxCreationBuckets {
			l.sweep(now, true)
			return len(l.buckets) < maxCreationBuckets
		}
		return true
	}
	return l.refilled(b, now) >= 1
}

// charge takes one creation from key's bucket. Concurrent publishes of one
// user may each have been allowed: the bucket then goes below zero, and the
// debt is refilled before the next creation.
func (l *creationLimiter) charge(key publisherKey, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	h := maphash.Comparable(l.seed, key)
	tokens := l.burst
	if b, ok := l.buckets[h]; ok {
		tokens = l.refilled(b, now)
	}
	l.buckets[h] = creationBucket{tokens: tokens - 1, at: now.UnixNano()}
}

// sweep drops the buckets that are full again (their publishers are idle):
// once a minute, or when forced (the map is full), at most once a second.
func (l *creationLimiter) sweep(now time.Time, force bool) {
	since := now.Sub(l.lastSweep)
	if since < time.Second || (!force && since < time.Minute) {
		return
	}
	l.lastSweep = now
	for k, b := range l.buckets {
		if l.refilled(b, now) >= l.burst {
			delete(l.buckets, k)
		}
	}
}

func (l *creationLimiter) tracked() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.buckets)
}

func validateNewChannelLimit(l *NewChannelLimit) []error {
	if l == nil || l.Count == -1 {
		return nil
	}
	var errs []error
	if l.Count < 1 || l.Count > maxNewChannels {
		errs = append(errs, optionErr("history_new_channels", "", "chat: history_new_channels %d: must be between 1 and %d channels, or off", l.Count, maxNewChannels))
	}
	// A zero period is the default (applied by Provision).
	if per := time.Duration(l.Per); per != 0 && (per < time.Second || per > 24*time.Hour) {
		errs = append(errs, optionErr("history_new_channels", "", "chat: history_new_channels period %s: must be between 1s and 24h", formatDuration(per)))
	}
	return errs
}
