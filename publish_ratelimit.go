package caddychat

import (
	"container/list"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The HTTP publish endpoint applies the route's rate_limit (the figures
// that bound a WebSocket connection's frames) to the requests of token
// holders, per user on this node: each user has one token bucket, and each
// message of a request (every item of a batch) takes one token. A request
// whose messages do not all fit is refused whole with 429 and Retry-After,
// and publishes nothing, so that retrying it cannot publish a message
// twice. The publish key (a backend) is not limited.

// maxRateLimitedUsers bounds the users whose buckets a route keeps. A user
// costs about 400 bytes at most: its id (at most 256 bytes, see
// authenticator.verify), the bucket (48), its list element (48) and its map
// slot with the map's spare room; TestPublishRateLimiterMemoryBound
// measures 395 bytes per user with 256-byte ids. 10,000 users are thus at
// most about 4 MB per route with a publish endpoint and jwt (the test holds
// it under 5 MB).
//
// Users whose bucket has refilled (idle for burst/rate seconds, 2 s by
// default) carry no state worth keeping and are evicted as requests come.
// Past the bound the least recently seen user is evicted even if its
// bucket is not full: it would start again with a full burst, which takes
// more than maxRateLimitedUsers users publishing within one refill time.
const maxRateLimitedUsers = 10000

// userRateLimiter is a token bucket per user, bounded in memory.
type userRateLimiter struct {
	rate  float64 // tokens per second
	burst float64
	max   int

	mu    sync.Mutex
	users map[string]*list.Element // values are *userBucket
	lru   list.List                // front: most recently used
}

type userBucket struct {
	user   string
	tokens float64
	last   time.Time
}

// newUserRateLimiter is nil (no limit) when rl turns the limit off.
func newUserRateLimiter(rl *RateLimit, maxUsers int) *userRateLimiter {
	if rl == nil || rl.PerSecond <= 0 {
		return nil
	}
	return &userRateLimiter{rate: rl.PerSecond, burst: float64(rl.Burst), max: maxUsers, users: make(map[string]*list.Element)}
}

// take takes n tokens from user's bucket at now. When they are not all
// there it takes none and says how long until they are (zero when n is
// more than the burst: they never will be).
func (l *userRateLimiter) take(user string, n int, now time.Time) (ok bool, retryAfter time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.evictIdle(now, 2)
	var b *userBucket
	if e := l.users[user]; e != nil {
		b = e.Value.(*userBucket)
		l.lru.MoveToFront(e)
		b.tokens = min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
		b.last = now
	} else {
		if len(l.users) >= l.max {
			l.remove(l.lru.Back())
		}
		b = &userBucket{user: strings.Clone(user), tokens: l.burst, last: now}
		l.users[b.user] = l.lru.PushFront(b)
	}
	need := float64(n)
	if need > l.burst {
		return false, 0
	}
	if b.tokens >= need {
		b.tokens -= need
		return true, 0
	}
	return false, time.Duration((need - b.tokens) / l.rate * float64(time.Second))
}

// evictIdle removes up to n least recently used users whose buckets are
// full again: forgetting them changes nothing.
func (l *userRateLimiter) evictIdle(now time.Time, n int) {
	refill := time.Duration(l.burst / l.rate * float64(time.Second))
	for range n {
		e := l.lru.Back()
		if e == nil || now.Sub(e.Value.(*userBucket).last) < refill {
			return
		}
		l.remove(e)
	}
}

func (l *userRateLimiter) remove(e *list.Element) {
	delete(l.users, e.Value.(*userBucket).user)
	l.lru.Remove(e)
}

func (l *userRateLimiter) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.users)
}

// allowPublish applies the rate limit to a request of n messages by id,
// answering 429 itself when it refuses.
func (h *Handler) allowPublish(w http.ResponseWriter, id *identity, n int) bool {
	// The publish key's identity has no user; a token's always has one.
	if h.publishLimit == nil || id.user == "" {
		return true
	}
	ok, wait := h.publishLimit.take(id.user, n, time.Now())
	if ok {
		return true
	}
	moduleMetrics().httpPublishes.WithLabelValues(errRateLimited).Add(float64(n))
	rl := h.RateLimit
	if wait == 0 {
		writePublishError(w, http.StatusTooManyRequests, errRateLimited,
			fmt.Sprintf("a request of %d messages is more than the rate limit's burst (%d): send at most %d per request", n, rl.Burst, rl.Burst))
		return false
	}
	w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(wait.Seconds()))))
	writePublishError(w, http.StatusTooManyRequests, errRateLimited,
		fmt.Sprintf("more than %g messages per second (burst %d) for this user; nothing was published, retry later", rl.PerSecond, rl.Burst))
	return false
}
