package caddychat

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// The SSE transport (PROTOCOL.md, "SSE transport"): the server's frames go
// out as the events of one long GET response, and the client's frames come
// in as POSTs (sse_session.go) that are queued here for the conn's reading
// side. Everything else (queue, limits, ops, metrics) is the conn's, as for
// a WebSocket.

// sseInbox bounds the POSTed frames waiting for the conn's reading side; a
// client that POSTs faster than its frames are run gets 429 (the frames
// that were let in still count against rate_limit).
const sseInbox = 32

// ssePosition is where a stream stands in one history channel: the last
// kept message written to it, for the event ids a resume starts from.
type ssePosition struct {
	channel, id, epoch string
}

// sseTransport writes a conn's frames as server-sent events.
type sseTransport struct {
	c            *conn // set once the conn exists; pruning positions asks it
	w            http.ResponseWriter
	rc           *http.ResponseController
	writeTimeout time.Duration

	mu     sync.Mutex
	buf    []byte
	corked bool
	done   bool // the close event is out (or was tried): nothing more is written
	// positions are written by the writer alone (under mu).
	positions []ssePosition
	// seeding: the stream's first subscribes run; positions a resume
	// brought are not pruned while their channels are being subscribed.
	seeding atomic.Bool

	inbox chan []byte
	// gone ends with the request: the client went away.
	gone <-chan struct{}
	// stop is closed when the stream ends; it ends read and the handler.
	stop     chan struct{}
	stopOnce sync.Once
	// cut is set by closeNow: writes fail from then on, without a new deadline.
	cut atomic.Bool

	// streamSession and streamSubs are the stream's: the secret its POSTs
	// name, and the subscribes its query asked for (sse_session.go). They
	// are here, not in conn, which every WebSocket holds too.
	streamSession string
	streamSubs    []clientFrame
}

var _ transport = (*sseTransport)(nil)

func newSSETransport(w http.ResponseWriter, r *http.Request, writeTimeout time.Duration, resume []ssePosition) *sseTransport {
	t := &sseTransport{
		w: w, rc: http.NewResponseController(w), writeTimeout: writeTimeout,
		positions: resume,
		inbox:     make(chan []byte, sseInbox),
		gone:      r.Context().Done(),
		stop:      make(chan struct{}),
	}
	t.seeding.Store(true)
	return t
}

// errSSEClosed: the stream ended.
var errSSEClosed = errors.New("event stream closed")

func (t *sseTransport) read() ([]byte, bool, error) {
	select {
	case f := <-t.inbox:
		return f, true, nil
	case <-t.gone:
		return nil, false, errSSEClosed
	case <-t.stop:
		return nil, false, errSSEClosed
	}
}

// deliver queues a POSTed frame for the reading side; false when the inbox
// is full. It never blocks: the control worker calls it too.
func (t *sseTransport) deliver(frame []byte) (ok, open bool) {
	select {
	case <-t.stop:
		return false, false
	default:
	}
	select {
	case t.inbox <- frame:
		return true, true
	default:
		return false, true
	}
}

func (t *sseTransport) cork() {
	t.mu.Lock()
	t.corked = true
	t.mu.Unlock()
}

func (t *sseTransport) uncork() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.corked = false
	return t.flushLocked()
}

func (t *sseTransport) writeFrame(d *delivery, frame []byte) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return net.ErrClosed
	}
	if t.buf == nil {
		t.buf = takeCorkBuf()
	}
	if d != nil && d.own == nil && d.kept {
		t.buf = t.appendID(t.buf, d)
	}
	t.buf = appendSSEData(t.buf, frame)
	if t.corked {
		return nil
	}
	return t.flushLocked()
}

// appendID moves the stream's position in d's channel to d and writes the
// event id naming every position: what Last-Event-ID brings back.
func (t *sseTransport) appendID(b []byte, d *delivery) []byte {
	epoch := messageEpoch(d.channel, d.payload)
	id := d.keptID.String()
	found := false
	keep := t.positions[:0]
	for _, p := range t.positions {
		if p.channel == d.channel {
			p.id, p.epoch, found = id, string(epoch), true
		} else if !t.seeding.Load() && t.c != nil && !t.c.isSubscribed(p.channel) {
			continue // left: a resume must not subscribe it again
		}
		keep = append(keep, p)
	}
	t.positions = keep
	if !found {
		t.positions = append(t.positions, ssePosition{d.channel, id, string(epoch)})
	}
	b = append(b, "id: "...)
	for i, p := range t.positions {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, p.channel...)
		b = append(b, '=')
		b = append(b, p.id...)
		b = append(b, '~')
		b = append(b, p.epoch...)
	}
	return append(b, '\n')
}

// appendSSEData writes frame as one event's data. A JSON frame is one line;
// one that holds line breaks anyway (a backend's payload) is split into data
// lines, which the client joins with "\n": JSON white space either way.
func appendSSEData(b, frame []byte) []byte {
	for {
		i := bytes.IndexAny(frame, "\r\n")
		b = append(b, "data: "...)
		if i < 0 {
			b = append(b, frame...)
			return append(b, "\n\n"...)
		}
		b = append(b, frame[:i]...)
		b = append(b, '\n')
		if frame[i] == '\r' && i+1 < len(frame) && frame[i+1] == '\n' {
			i++
		}
		frame = frame[i+1:]
	}
}

func (t *sseTransport) flushLocked() error {
	if len(t.buf) == 0 {
		return nil
	}
	if t.cut.Load() {
		return net.ErrClosed
	}
	// A deadline per write, so that a client that stops reading cannot hold
	// the writer past write_timeout (the conn's timer cuts the stream too).
	_ = t.rc.SetWriteDeadline(time.Now().Add(t.writeTimeout))
	_, err := t.w.Write(t.buf)
	if err == nil {
		err = t.rc.Flush()
	}
	releaseCorkBuf(t.buf)
	t.buf = nil
	return err
}

// sseClose is the last event of a stream, with the WebSocket close code.
type sseClose struct {
	Type   string `json:"type"`
	Code   int    `json:"code"`
	Reason string `json:"reason"`
}

func (t *sseTransport) close(code websocket.StatusCode, reason string) {
	t.mu.Lock()
	if !t.done {
		ev, _ := json.Marshal(sseClose{Type: "close", Code: int(code), Reason: closeReasonText(reason)})
		if t.buf == nil {
			t.buf = takeCorkBuf()
		}
		t.buf = appendSSEData(t.buf, ev)
		_ = t.flushLocked()
		t.done = true
	}
	t.mu.Unlock()
	t.stopOnce.Do(func() { close(t.stop) })
}

func (t *sseTransport) closeNow() {
	t.cut.Store(true)
	// No deadline moved here: the writer may hold the lock in a write, and
	// Caddy's idle-timeout writer is not safe for concurrent use. The
	// deadline flushLocked set before that write (write_timeout) ends it.
	t.stopOnce.Do(func() { close(t.stop) })
}

// ping sends a comment: it keeps proxies from timing the stream out, and a
// client that went away makes it fail.
func (t *sseTransport) ping() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return nil
	}
	if t.buf == nil {
		t.buf = takeCorkBuf()
	}
	t.buf = append(t.buf, ":\n\n"...)
	if t.corked {
		return nil // goes out with the writer's batch
	}
	return t.flushLocked()
}

func (t *sseTransport) name() string { return "sse" }

// formatPositions is the Last-Event-ID form of positions (tests, docs).
func formatPositions(ps []ssePosition) string {
	var b []byte
	for i, p := range ps {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, p.channel+"="+p.id+"~"+p.epoch...)
	}
	return string(b)
}

// Last-Event-ID bounds: a forged header cannot make a stream subscribe or
// parse without limit.
const (
	maxResumePositions = 100
	maxLastEventID     = 16 << 10
	maxEpochLen        = 64
)

// parsePositions reads a Last-Event-ID header.
func parsePositions(s string) ([]ssePosition, error) {
	if s == "" {
		return nil, nil
	}
	if len(s) > maxLastEventID {
		return nil, errors.New("Last-Event-ID is longer than " + strconv.Itoa(maxLastEventID) + " bytes")
	}
	parts := bytes.Split([]byte(s), []byte{','})
	if len(parts) > maxResumePositions {
		return nil, errors.New("Last-Event-ID names more than " + strconv.Itoa(maxResumePositions) + " channels")
	}
	out := make([]ssePosition, 0, len(parts))
	seen := make(map[string]bool, len(parts))
	for _, p := range parts {
		ch, rest, ok1 := bytes.Cut(p, []byte{'='})
		id, epoch, ok2 := bytes.Cut(rest, []byte{'~'})
		if !ok1 || !ok2 {
			return nil, errors.New(`Last-Event-ID entries are channel=msgid~epoch`)
		}
		if err := validateChannel(string(ch)); err != nil {
			return nil, errors.New("Last-Event-ID: " + err.Error())
		}
		if _, ok := parseStreamID(string(id)); !ok {
			return nil, errors.New("Last-Event-ID: bad message id for " + string(ch))
		}
		if len(epoch) == 0 || len(epoch) > maxEpochLen || !isEpochText(epoch) {
			return nil, errors.New("Last-Event-ID: bad epoch for " + string(ch))
		}
		if seen[string(ch)] {
			return nil, errors.New("Last-Event-ID names " + string(ch) + " twice")
		}
		seen[string(ch)] = true
		out = append(out, ssePosition{string(ch), string(id), string(epoch)})
	}
	return out, nil
}

func isEpochText(b []byte) bool {
	for _, c := range b {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}
