package caddychat

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"

	"go.uber.org/zap"
)

// The SSE transport's two requests (PROTOCOL.md, "SSE transport"): a GET
// that opens a stream and stays open while it lasts (the stream is a conn
// like a WebSocket's, with an sseTransport: sse.go), and POSTs that carry
// the client's frames to it, on whichever node they reach (the control
// channel hands them to the node that holds the stream).

// sessionHeader names the stream a POSTed frame is for.
const sessionHeader = "Caddychat-Session"

// maxStreamChannels bounds the channels one GET may name; max_subscriptions
// still applies to them, this only keeps a forged query from costing work.
const maxStreamChannels = 100

// maxSessionLen bounds a session id a POST may name (ours are far shorter).
const maxSessionLen = 128

// isStreamRequest reports whether r opens an SSE stream.
func isStreamRequest(r *http.Request) bool {
	return r.Method == http.MethodGet && headerHasToken(r.Header, "Accept", "text/event-stream")
}

// isStreamPost reports whether r carries a frame for an SSE stream.
func isStreamPost(r *http.Request) bool {
	return r.Method == http.MethodPost && r.Header.Get(sessionHeader) != ""
}

// streamRegistry holds a node's SSE streams by session.
type streamRegistry struct {
	mu sync.Mutex
	m  map[string]*sseTransport
}

func (s *streamRegistry) add(session string, t *sseTransport) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = make(map[string]*sseTransport)
	}
	s.m[session] = t
}

func (s *streamRegistry) remove(session string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, session)
}

// feed hands frame to session's stream: found false when the node has no
// such open stream, accepted false when its inbox is full.
func (s *streamRegistry) feed(session string, frame []byte) (accepted, found bool) {
	s.mu.Lock()
	t := s.m[session]
	s.mu.Unlock()
	if t == nil {
		return false, false
	}
	return t.deliver(frame)
}

// feedCounts is feed as a control request's answer (control_ops.go): only
// the node the session names looks it up.
func (s *streamRegistry) feedCounts(node, session string, frame []byte) (count, refused int) {
	if sessionNode(session) != node || len(frame) == 0 {
		return 0, 0
	}
	accepted, found := s.feed(session, frame)
	switch {
	case accepted:
		return 1, 0
	case found:
		return 0, 1
	}
	return 0, 0
}

// newStreamSession is a fresh session id: the node's name, so that any node
// knows where to send a POST, and 128 random bits, so that only the stream's
// client can name it.
func newStreamSession(node string) string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return node + "." + hex.EncodeToString(b[:])
}

func sessionNode(session string) string {
	node, _, _ := strings.Cut(session, ".")
	return node
}

// serveStream opens an SSE stream and serves it until it ends, on the
// request's goroutine: the response writer is only valid until ServeHTTP
// returns.
func (h *Handler) serveStream(w http.ResponseWriter, r *http.Request) error {
	if h.Protocol == protocolRaw {
		return refuse(w, r, refused(http.StatusBadRequest, "this route speaks the raw protocol, over WebSocket only; the SSE transport needs a JSON-protocol route"))
	}
	if !h.acceptOptions.InsecureSkipVerify {
		if err := checkOrigin(r, h.acceptOptions.OriginPatterns); err != nil {
			return refuse(w, r, refused(http.StatusForbidden, err.Error()))
		}
	}
	subs, seed, err := streamSubscribes(r)
	if err != nil {
		return refuse(w, r, refused(http.StatusBadRequest, err.Error()))
	}
	id, _, err := h.admit(r)
	if refusal := (*connectRefusal)(nil); errors.As(err, &refusal) {
		h.refuseStream(w, refusal)
		return nil
	}
	if err != nil {
		return refuse(w, r, err)
	}
	if err := h.reserveConnection(w, id); err != nil {
		return refuse(w, r, err)
	}
	defer h.hub.release(id.user)

	startStream(w)
	t := newSSETransport(w, r, h.route.writeTimeout, seed)
	c := newConn(h.route, t, r.URL.Path, "", id)
	t.c = c
	t.streamSession = newStreamSession(h.hub.node)
	t.streamSubs = subs
	h.hub.streams.add(t.streamSession, t)
	defer h.hub.streams.remove(t.streamSession)
	m := moduleMetrics()
	m.sseStreams.Inc()
	defer m.sseStreams.Dec()
	c.serve()
	return nil
}

// startStream answers 200 with the headers that keep proxies (and Caddy's
// own encode) from buffering the events, and sends them at once.
func startStream(w http.ResponseWriter) {
	hdr := w.Header()
	hdr.Set("Content-Type", "text/event-stream")
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	_ = http.NewResponseController(w).Flush()
}

// refuseStream is the connect hook's refusal on a stream: as on a
// WebSocket, it is told in band (a close event with 4004 and the reason).
func (h *Handler) refuseStream(w http.ResponseWriter, refusal *connectRefusal) {
	moduleMetrics().connectionsClosed.WithLabelValues(closeReason(refusal.code)).Inc()
	startStream(w)
	ev, _ := json.Marshal(sseClose{Type: "close", Code: int(refusal.code), Reason: closeReasonText(refusal.reason)})
	_, _ = w.Write(appendSSEData(nil, ev))
	_ = http.NewResponseController(w).Flush()
}

// streamSubscribes reads a GET's channels, history and Last-Event-ID into
// the subscribes the stream starts with, and the positions it resumes.
func streamSubscribes(r *http.Request) (subs []clientFrame, seed []ssePosition, err error) {
	q := r.URL.Query()
	channels := q["channel"]
	if len(channels) > maxStreamChannels {
		return nil, nil, fmt.Errorf("at most %d channels per stream", maxStreamChannels)
	}
	history := 0
	if s := q.Get("history"); s != "" {
		if history, err = strconv.Atoi(s); err != nil || history < 0 {
			return nil, nil, errors.New(`"history" must be a number of messages`)
		}
	}
	positions, err := parsePositions(r.Header.Get("Last-Event-ID"))
	if err != nil {
		return nil, nil, err
	}
	seen := make(map[string]bool, len(channels))
	for _, ch := range channels {
		if seen[ch] {
			continue
		}
		seen[ch] = true
		f := clientFrame{Op: "subscribe", Channel: ch, History: history, initial: true}
		for _, p := range positions {
			if p.channel == ch {
				f.Since, f.Epoch, f.History = p.id, p.epoch, 0
				seed = append(seed, p)
			}
		}
		subs = append(subs, f)
	}
	return subs, seed, nil
}

// joinStream runs the subscribes an SSE stream's query asked for; each gets
// its ok or error (with the channel, without an id), after the welcome.
func (c *conn) joinStream() {
	t := c.stream()
	if t == nil || t.streamSession == "" {
		return
	}
	defer t.seeding.Store(false)
	for _, f := range t.streamSubs {
		if c.closing.Load() {
			return
		}
		if err := validateChannel(f.Channel); err != nil {
			c.subscribeError(f, errBadRequest, err.Error())
			continue
		}
		c.opSubscribe(f)
	}
	t.streamSubs = nil
}

// stream is the connection's SSE transport; nil on a WebSocket.
func (c *conn) stream() *sseTransport {
	t, _ := c.tr.(*sseTransport)
	return t
}

// serveStreamPost hands a POSTed frame to its stream, here or on the node
// that holds it. The frame's answer goes out on the stream; the POST only
// says whether the frame was taken.
func (h *Handler) serveStreamPost(w http.ResponseWriter, r *http.Request) {
	m := moduleMetrics()
	answer := func(status int, result, code, message string) {
		m.ssePosts.WithLabelValues(result).Inc()
		if status == http.StatusAccepted {
			writeJSON(w, status, map[string]bool{"accepted": true})
			return
		}
		if status == http.StatusTooManyRequests {
			w.Header().Set("Retry-After", "1")
		}
		writePublishError(w, status, code, message)
	}
	if h.Protocol == protocolRaw {
		answer(http.StatusBadRequest, "bad_request", errBadRequest, "this route speaks the raw protocol; it has no SSE transport")
		return
	}
	session := r.Header.Get(sessionHeader)
	if len(session) > maxSessionLen || !strings.Contains(session, ".") {
		answer(http.StatusNotFound, "not_found", errNotFound, "no such stream (it ended, or never was)")
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, h.MaxMessageSize))
	if err != nil {
		if errors.As(err, new(*http.MaxBytesError)) {
			answer(http.StatusRequestEntityTooLarge, "too_large", errTooLarge, fmt.Sprintf("a frame is at most max_message_size (%d bytes)", h.MaxMessageSize))
			return
		}
		answer(http.StatusBadRequest, "bad_request", errBadRequest, "reading the body: "+err.Error())
		return
	}
	if trimmed := bytes.TrimLeft(body, " \t\r\n"); len(trimmed) == 0 || trimmed[0] != '{' || !utf8.Valid(body) || !json.Valid(body) {
		answer(http.StatusBadRequest, "bad_request", errBadRequest, "the body must be one client frame: a JSON object")
		return
	}
	accepted, found := h.hub.streams.feed(session, body)
	if !found && sessionNode(session) != h.hub.node {
		accepted, found, err = h.forwardStreamPost(r.Context(), session, body)
		if err != nil {
			h.logger.Debug("handing a POSTed frame to its node", zap.Error(err))
			answer(http.StatusServiceUnavailable, "unavailable", errUnavailable, "the node holding the stream could not be reached; retry later")
			return
		}
	}
	switch {
	case accepted:
		answer(http.StatusAccepted, "accepted", "", "")
	case found:
		answer(http.StatusTooManyRequests, "busy", errRateLimited, "the stream's earlier frames are still being run; slow down")
	default:
		answer(http.StatusNotFound, "not_found", errNotFound, "no such stream (it ended, or never was)")
	}
}

// forwardStreamPost asks every node, over the control channel, to feed
// frame to session's stream; the node the session names answers.
func (h *Handler) forwardStreamPost(ctx context.Context, session string, frame []byte) (accepted, found bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, h.route.publishTimeout)
	defer cancel()
	replies, _, err := h.hub.control.call(ctx, controlRequest{Op: "sse_frame", Session: session, Frame: frame})
	if err != nil {
		return false, false, fmt.Errorf("control call: %w", err)
	}
	for _, rep := range replies {
		if rep.Count > 0 {
			return true, true, nil
		}
		if rep.Refused > 0 {
			found = true
		}
	}
	return false, found, nil
}

// checkOrigin applies the WebSocket library's origin rule to a stream: no
// Origin, the request's own host, or a host matching an origins pattern.
func checkOrigin(r *http.Request, patterns []string) error {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return nil
	}
	u, err := url.Parse(origin)
	if err != nil {
		return fmt.Errorf("failed to parse Origin header %q: %w", origin, err)
	}
	if strings.EqualFold(r.Host, u.Host) {
		return nil
	}
	for _, p := range patterns {
		target := u.Host
		if strings.Contains(p, "://") {
			target = u.Scheme + "://" + u.Host
		}
		if ok, err := path.Match(strings.ToLower(p), strings.ToLower(target)); err == nil && ok {
			return nil
		}
	}
	return fmt.Errorf("request Origin %q is not authorized for Host %q", u.Host, r.Host)
}
