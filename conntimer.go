package caddychat

import (
	"math"
	"sync/atomic"
	"time"
)

// A connection has three deadlines: the write under way (write_timeout),
// the next ping (ping_interval) and its token's expiry. Each on a timer of
// its own, an idle connection held two or three runtime timers and their
// callbacks; one timer serves them all, set for the earliest, and its
// callback works out which are due.

// connTimer is the connection's one timer and its deadlines, in monoNow
// nanoseconds; 0 is none.
type connTimer struct {
	t                          *time.Timer // made by the first arm
	writeDue, pingAt, expiryAt atomic.Int64
	// armedAt is when t fires: 0 while the callback works out the next,
	// -1 once stopped for good. It is read without the lock (a write that
	// is already covered takes no lock) but changed only under conn.opMu:
	// arming only brings it earlier and only the callback moves it later,
	// so a deadline set while the callback runs is never missed.
	armedAt atomic.Int64
}

// monoBase makes monoNow monotonic: a wall clock step must neither fire a
// deadline early nor hold one back.
var monoBase = time.Now()

// monoNow is a monotonic clock in nanoseconds, never 0 (0 marks no deadline).
func monoNow() int64 { return int64(time.Since(monoBase)) + 1 }

// armTimer makes the timer fire at at or earlier.
func (c *conn) armTimer(at int64) {
	if a := c.timer.armedAt.Load(); a > 0 && a <= at {
		// It fires in time, and reads the deadlines then; a callback that
		// runs now has taken armedAt to 0 first, so it reads them too.
		return
	}
	c.opMu.Lock()
	c.armTimerLocked(at)
	c.opMu.Unlock()
}

func (c *conn) armTimerLocked(at int64) {
	ct := &c.timer
	if a := ct.armedAt.Load(); a < 0 || (a > 0 && a <= at) {
		return
	}
	ct.armedAt.Store(at)
	d := time.Duration(at - monoNow())
	if ct.t == nil {
		ct.t = time.AfterFunc(d, c.timerFired)
		return
	}
	ct.t.Reset(d)
}

// stopTimer ends the timer for good once the connection has ended.
func (c *conn) stopTimer() {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	ct := &c.timer
	ct.armedAt.Store(-1)
	ct.writeDue.Store(0)
	ct.pingAt.Store(0)
	ct.expiryAt.Store(0)
	if ct.t != nil {
		ct.t.Stop()
	}
}

// startWriteDeadline bounds the write that starts now by write_timeout;
// endWriteDeadline ends that bound. The timer is left as it is: firing
// early, it finds nothing due and waits for the next deadline.
func (c *conn) startWriteDeadline() {
	at := monoNow() + int64(c.route.writeTimeout)
	c.timer.writeDue.Store(at)
	c.armTimer(at)
}

func (c *conn) endWriteDeadline() { c.timer.writeDue.Store(0) }

// startPings schedules the first ping, ping_interval from now.
func (c *conn) startPings() {
	at := monoNow() + int64(c.route.pingInterval)
	c.timer.pingAt.Store(at)
	c.armTimer(at)
}

// armExpiry closes the connection when its token expires; a refresh calls
// it again with the new token.
func (c *conn) armExpiry() {
	if c.identity.expires.IsZero() {
		c.timer.expiryAt.Store(0)
		return
	}
	// The leeway that let the token in also keeps it valid that much longer.
	deadline := c.identity.expires.Add(c.route.tokenLeeway)
	now, left := monoNow(), time.Until(deadline)
	if left >= time.Duration(math.MaxInt64-now) {
		// Further than the clock can count (time.Until caps at ~292
		// years, an exp of 9999-12-31 is past that): no deadline, where
		// the sum would wrap below zero and read as already expired.
		c.timer.expiryAt.Store(0)
		return
	}
	at := max(now+int64(left), 1)
	c.timer.expiryAt.Store(at)
	c.armTimer(at)
}

// takeDue clears the deadline d if it has passed; a deadline that changed
// meanwhile (a refresh moved the expiry) is not taken.
func takeDue(d *atomic.Int64, now int64) bool {
	v := d.Load()
	return v != 0 && v <= now && d.CompareAndSwap(v, 0)
}

// timerFired acts on the deadlines that have passed and sets the timer for
// the earliest of those left. It re-arms before acting: a ping write that
// waits on a full socket must not hold back a write deadline (each firing
// runs on a goroutine of its own).
func (c *conn) timerFired() {
	defer c.recoverPanic("timer")
	ct := &c.timer
	c.opMu.Lock()
	if ct.armedAt.Load() < 0 {
		c.opMu.Unlock()
		return
	}
	ct.armedAt.Store(0)
	now := monoNow()
	writeLate := takeDue(&ct.writeDue, now)
	expired := takeDue(&ct.expiryAt, now)
	ping := false
	if p := ct.pingAt.Load(); p != 0 && p <= now {
		// A closing connection pings no more.
		next := int64(0)
		if !c.closing.Load() {
			next = now + int64(c.route.pingInterval)
		}
		ping = ct.pingAt.CompareAndSwap(p, next) && next != 0
	}
	next := int64(0)
	for _, d := range [...]int64{ct.writeDue.Load(), ct.pingAt.Load(), ct.expiryAt.Load()} {
		if d != 0 && (next == 0 || d < next) {
			next = d
		}
	}
	if next != 0 {
		c.armTimerLocked(next)
	}
	c.opMu.Unlock()
	if writeLate {
		c.writeTimedOut()
	}
	if expired {
		c.fail(closeTokenExpired, "token expired")
	}
	if ping {
		c.ping()
	}
}

// writeTimedOut runs when a write took longer than write_timeout: the peer
// is not reading, so the connection is cut without a close handshake.
func (c *conn) writeTimedOut() {
	c.fail(closeSlowConsumer, "write timed out")
	c.tr.closeNow()
}

// ping pings unless a ping is still being written.
func (c *conn) ping() {
	if !c.pinging.CompareAndSwap(false, true) {
		return
	}
	defer c.pinging.Store(false)
	if err := c.tr.ping(); err != nil && !c.closing.Load() {
		c.fail(closePingTimeout, "ping timeout")
	}
}
