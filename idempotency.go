package caddychat

import (
	"errors"
	"fmt"
	"strconv"
	"time"
)

// Idempotent publish: a publish may carry an idempotency key. Within the
// route's idempotency_window a publish with the same key, by the same
// publisher, on the same channel, is not delivered again: it is answered
// with the first publish's message id. On Redis the check, the record and
// the publish are one script (broker_redis.go, history_redis.go), so the
// guarantee holds across nodes; the memory broker keeps the keys in a
// bounded map (idemMemory). A publish without a key costs nothing more.

// maxIdempotencyKeyLen bounds an idempotency key.
const maxIdempotencyKeyLen = 128

// defaultIdempotencyWindow is how long a key is remembered by default,
// maxIdempotencyWindow the longest an operator may set.
const (
	defaultIdempotencyWindow = 5 * time.Minute
	maxIdempotencyWindow     = 24 * time.Hour
)

// idempotency is a publish's key, set on a Publication; the broker sets
// duplicate when the key was seen within window, and then returns the
// first publish's message id without delivering anything.
type idempotency struct {
	// scope is the publisher ("u"+user, "c"+connection for anonymous
	// clients, "s" for the publish key); key the client's key.
	scope, key string
	window     time.Duration
	duplicate  bool
}

// validateIdempotencyKey checks a client's key: 1 to 128 bytes of
// visible ASCII (no spaces, no control characters).
func validateIdempotencyKey(key string) error {
	if key == "" {
		return errors.New("idempotency_key is empty")
	}
	if len(key) > maxIdempotencyKeyLen {
		return fmt.Errorf("idempotency_key is longer than %d bytes", maxIdempotencyKeyLen)
	}
	for i := 0; i < len(key); i++ {
		if key[i] < 0x21 || key[i] > 0x7e {
			return fmt.Errorf("idempotency_key contains %q; allowed is visible ASCII (0x21-0x7e)", key[i])
		}
	}
	return nil
}

// idemScope is the scope of an identity's keys.
func idemScope(id *identity, connID string) string {
	switch {
	case id.server:
		return "s"
	case id.user != "":
		return "u" + id.user
	default:
		return "c" + connID
	}
}

// redisKey is the key's Redis key: under the channel's hash tag (as its
// history is), so on a cluster it lives in the channel's slot. The key's
// length comes first so that a key and a scope can never be confused.
func (i *idempotency) redisKey(pubsubName string) string {
	return "{" + pubsubName + "}:idem:" + strconv.Itoa(len(i.key)) + ":" + i.key + ":" + i.scope
}

// idemMemoryLimit bounds the bytes the memory broker's remembered keys
// take (counted as their strings plus idemEntryOverhead each). Past it the
// oldest keys are forgotten before their window ends.
const (
	idemMemoryLimit   = 16 << 20
	idemEntryOverhead = 128
)

type idemMapKey struct{ channel, scope, key string }

type idemEntry struct {
	id      string
	expires time.Time
	seq     uint64 // the entry's place in order
}

type idemQueued struct {
	key idemMapKey
	seq uint64
}

// idemMemory is the memory broker's keys, oldest first in order; its
// caller holds the broker's lock.
type idemMemory struct {
	entries map[idemMapKey]idemEntry
	order   []idemQueued
	seq     uint64
	bytes   int
}

func idemCost(k idemMapKey, id string) int {
	return len(k.channel) + len(k.scope) + len(k.key) + len(id) + idemEntryOverhead
}

// seen returns the id a key got within its window.
func (m *idemMemory) seen(channel string, i *idempotency, now time.Time) (string, bool) {
	m.expire(now)
	e, ok := m.entries[idemMapKey{channel, i.scope, i.key}]
	if !ok || !now.Before(e.expires) {
		return "", false
	}
	return e.id, true
}

// record remembers a key's id for its window.
func (m *idemMemory) record(channel string, i *idempotency, id string, now time.Time) {
	if m.entries == nil {
		m.entries = make(map[idemMapKey]idemEntry)
	}
	k := idemMapKey{channel, i.scope, i.key}
	if old, ok := m.entries[k]; ok {
		m.bytes -= idemCost(k, old.id)
	}
	m.seq++
	m.entries[k] = idemEntry{id: id, expires: now.Add(i.window), seq: m.seq}
	m.order = append(m.order, idemQueued{k, m.seq})
	m.bytes += idemCost(k, id)
	for m.bytes > idemMemoryLimit && len(m.order) > 0 {
		m.drop()
	}
}

// expire forgets the oldest keys whose window has ended. (Windows differ
// between routes, so a key may outlive its window behind a longer one;
// seen checks the expiry itself, and the byte bound holds regardless.)
func (m *idemMemory) expire(now time.Time) {
	for len(m.order) > 0 {
		q := m.order[0]
		if e, ok := m.entries[q.key]; ok && e.seq == q.seq && now.Before(e.expires) {
			return
		}
		m.drop()
	}
}

// drop takes the oldest place of order, and its key if it is still there.
func (m *idemMemory) drop() {
	q := m.order[0]
	m.order[0] = idemQueued{}
	m.order = m.order[1:]
	if e, ok := m.entries[q.key]; ok && e.seq == q.seq {
		m.bytes -= idemCost(q.key, e.id)
		delete(m.entries, q.key)
	}
	if len(m.order) == 0 {
		m.order = nil
	}
}

// clear forgets every key.
func (m *idemMemory) clear() { *m = idemMemory{} }
