package main

// The publisher: one connection's publishes, its window of unanswered
// ones and the accounting of their replies.

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/coder/websocket"
)

// publisher sends publishes on one client with at most inflight of them
// unanswered, and accounts the replies.
type publisher struct {
	c       *client
	channel string
	window  chan struct{} // one token per unanswered publish
	pad     []byte
	buf     []byte // the frame being sent; only the sending goroutine uses it

	mu     sync.Mutex
	sentAt map[int64]int64 // seq → send time (unix nanos), until answered
	stats  pubStats
}

// pubStats are a publisher's counts since the last take.
type pubStats struct {
	sent, ok           int64
	errCodes           map[string]int64
	errSeqs            []int64 // the seqs answered with an error, in answer order
	ack                *hist   // publish → ok
	firstSent, lastAck time.Time
}

func newPubStats() pubStats { return pubStats{errCodes: map[string]int64{}, ack: &hist{}} }

func newPublisher(c *client, channel string, inflight, payloadSize int) *publisher {
	if inflight < 1 {
		inflight = 1
	}
	p := &publisher{
		c:       c,
		channel: channel,
		window:  make(chan struct{}, inflight),
		sentAt:  map[int64]int64{},
		stats:   newPubStats(),
	}
	// The payload without pad, {"c":N,"seq":N,"t":N,"pad":""}, is about
	// 50 bytes. The pad is chat text, so that compression sees what it
	// would see in a chat (a run of one letter would compress to nothing).
	if n := payloadSize - 50; n > 0 {
		p.pad = make([]byte, n)
		for i := range p.pad {
			p.pad[i] = chatText[i%len(chatText)]
		}
	}
	c.pub = p
	return p
}

// windowStall is how long a publisher waits for a reply when its window is
// full before it gives up: a node answers every publish within its
// publish_timeout (2 s by default), so this only trips on a stuck node.
const windowStall = 30 * time.Second

// publish waits for room in the window and sends message seq, stamped with
// the send time. sender is put in the payload as "c" when >= 0.
func (p *publisher) publish(ctx context.Context, seq, sender int64) error {
	select {
	case p.window <- struct{}{}:
	default:
		stall := time.NewTimer(windowStall)
		defer stall.Stop()
		select {
		case p.window <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		case <-p.c.done:
			return fmt.Errorf("publisher disconnected (%s)", closeCode(p.c.closeErr))
		case <-stall.C:
			return fmt.Errorf("no reply to any of %d publishes for %v", cap(p.window), windowStall)
		}
	}
	now := time.Now()
	t := now.UnixNano()
	p.mu.Lock()
	p.sentAt[seq] = t
	p.stats.sent++
	if p.stats.firstSent.IsZero() {
		p.stats.firstSent = now
	}
	p.mu.Unlock()
	b := p.buf[:0]
	b = append(b, `{"op":"publish","channel":"`...)
	b = append(b, p.channel...)
	b = append(b, `","id":`...)
	b = strconv.AppendInt(b, seq+firstPublishID, 10)
	b = append(b, `,"data":{`...)
	if sender >= 0 {
		b = append(b, `"c":`...)
		b = strconv.AppendInt(b, sender, 10)
		b = append(b, ',')
	}
	b = append(b, `"seq":`...)
	b = strconv.AppendInt(b, seq, 10)
	b = append(b, `,"t":`...)
	b = strconv.AppendInt(b, t, 10)
	b = append(b, `,"pad":"`...)
	b = append(b, p.pad...)
	b = append(b, `"}}`...)
	p.buf = b
	// Not derived from ctx: a write cut short closes the connection.
	wctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.c.ws.Write(wctx, websocket.MessageText, b); err != nil {
		// The server probably closed the connection: say how, once the
		// reader has seen the close frame.
		select {
		case <-p.c.done:
			return fmt.Errorf("publisher disconnected (close code %s)", closeCode(p.c.closeErr))
		case <-time.After(time.Second):
			return err
		}
	}
	return nil
}

// alive says whether the publisher's connection is still open.
func (p *publisher) alive() bool {
	select {
	case <-p.c.done:
		return false
	default:
		return true
	}
}

// reply accounts the ok or error answering publish seq.
func (p *publisher) reply(seq int64, code []byte, now time.Time) {
	p.mu.Lock()
	t, ok := p.sentAt[seq]
	if !ok {
		p.mu.Unlock()
		return // not ours, or answered twice
	}
	delete(p.sentAt, seq)
	if len(code) == 0 {
		p.stats.ok++
	} else {
		p.stats.errCodes[string(code)]++
		p.stats.errSeqs = append(p.stats.errSeqs, seq)
	}
	p.stats.lastAck = now
	p.stats.ack.record(now.Sub(time.Unix(0, t)))
	p.mu.Unlock()
	<-p.window
}

// pending is the number of publishes not answered yet.
func (p *publisher) pending() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.sentAt)
}

// counts returns sent, answered ok and answered with an error so far.
func (p *publisher) counts() (sent, ok, errs int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, n := range p.stats.errCodes {
		errs += n
	}
	return p.stats.sent, p.stats.ok, errs
}

// take returns the stats since the last take and starts new ones. Publishes
// still unanswered are forgotten (they are counted as unanswered by the
// caller) and their window slots freed.
func (p *publisher) take() (s pubStats, unanswered int64) {
	p.mu.Lock()
	s, p.stats = p.stats, newPubStats()
	unanswered = int64(len(p.sentAt))
	clear(p.sentAt)
	p.mu.Unlock()
	for range unanswered {
		select {
		case <-p.window:
		default:
		}
	}
	return s, unanswered
}
