package caddychat

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/coder/websocket"
	"go.uber.org/zap"
)

// ServeHTTP upgrades the request to a WebSocket and serves it until it closes.
// Authentication, origin and connection limits are all checked before the
// upgrade, so a refused client gets a plain HTTP status (see refuse).
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	// A token in the URL or in Sec-WebSocket-Protocol would reach Caddy's
	// access log (which redacts only Authorization and Cookie): such requests
	// (upgrades, publishes and plain GETs alike) are logged here instead,
	// without the token. See tokenlog.go.
	if h.carriesLoggableToken(r) {
		caddyhttp.SetVar(r.Context(), caddyhttp.LogSkipVar, true)
		status := http.StatusOK
		defer func() { h.logRedactedUpgrade(r, status) }()
		w = &statusRecorder{ResponseWriter: w, status: &status}
	}
	if h.PublishEndpoint != "" && (r.URL.Path == h.PublishEndpoint || strings.HasPrefix(r.URL.Path, h.PublishEndpoint+"/")) {
		h.servePublish(w, r)
		return nil
	}
	if !isWebSocketUpgrade(r) {
		if isStreamRequest(r) {
			return h.serveStream(w, r)
		}
		if isStreamPost(r) {
			h.serveStreamPost(w, r)
			return nil
		}
		return h.serveBrowser(w, r)
	}
	id, rawChannel, err := h.admit(r)
	if refusal := (*connectRefusal)(nil); errors.As(err, &refusal) {
		h.refuseInBand(w, r, refusal)
		return nil
	}
	if err != nil {
		return refuse(w, r, err)
	}
	if err := h.reserveConnection(w, id); err != nil {
		return refuse(w, r, err)
	}
	if err := h.upgrade(w, r, id, rawChannel); err != nil {
		h.hub.release(id.user)
		h.logger.Debug("websocket upgrade refused", zap.Error(err))
	}
	return nil
}

// admit decides who the upgrade is from and, on a raw route, which channel
// it bridges; a refusal is a caddyhttp.Error with the status to answer.
func (h *Handler) admit(r *http.Request) (id *identity, rawChannel string, err error) {
	if _, ok := subprotocolToken(r.Header); ok && !offersAppSubprotocol(r.Header) {
		return nil, "", refused(http.StatusBadRequest, "a bearer.<token> subprotocol must come with the "+appSubprotocol+" subprotocol")
	}
	if h.route.connectHook != nil {
		id, err = h.hookIdentity(r)
		if errors.As(err, new(*connectRefusal)) {
			return nil, "", err
		}
	} else {
		id, err = h.auth.authenticate(r)
	}
	if err != nil {
		moduleMetrics().authFailures.WithLabelValues(authFailureLabel(err)).Inc()
		h.logger.Debug("authentication failed", zap.String("reason", err.Error()), zap.String("remote", r.RemoteAddr))
		return nil, "", caddyhttp.Error(http.StatusUnauthorized, fmt.Errorf("unauthorized: %w", err))
	}
	if id, err = h.guestIdentity(r, id); err != nil {
		return nil, "", err
	}
	if h.Protocol != protocolRaw {
		return id, "", nil
	}
	rawChannel = h.Channel
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		rawChannel = repl.ReplaceAll(h.Channel, "")
	}
	if err := validateChannel(rawChannel); err != nil {
		return nil, "", refused(http.StatusBadRequest, "bad channel: "+err.Error())
	}
	if !id.subscribe.allows(rawChannel) {
		return nil, "", refused(http.StatusForbidden, "forbidden: may not subscribe to "+rawChannel)
	}
	return id, rawChannel, nil
}

// reserveConnection takes a connection slot of the hub for id (WebSocket
// or SSE alike), or gives the refusal: 503 when the node is full, 429 when
// the user is, with Retry-After set on w. h.hub.release(id.user) gives the
// slot back.
func (h *Handler) reserveConnection(w http.ResponseWriter, id *identity) error {
	err := h.hub.admit(id.user, h.MaxConnections, h.MaxConnectionsPerUser)
	if err == nil {
		return nil
	}
	status := http.StatusServiceUnavailable
	if err == errTooManyUserConnections {
		status = http.StatusTooManyRequests
	}
	w.Header().Set("Retry-After", "5")
	return caddyhttp.Error(status, err)
}

// upgrade completes the WebSocket handshake and starts the connection,
// which gives its slot back (hub.release) when it ends. An error means the
// handshake was refused, and answered, by the WebSocket library (403 for a
// foreign origin, 400 for a malformed handshake).
func (h *Handler) upgrade(w http.ResponseWriter, r *http.Request, id *identity, rawChannel string) error {
	tr := &wsTransport{}
	cw := &corkingResponseWriter{ResponseWriter: w, cork: &tr.cw, idle: &tr.idleReader}
	opts := h.acceptOptions
	opts.OnPongReceived = pongRead
	ws, err := websocket.Accept(cw, r, &opts)
	if err != nil {
		return err
	}
	if tr.cw.conn == nil {
		_ = ws.CloseNow()
		return errors.New("the connection cannot be corked")
	}
	if !tr.unseen {
		// The library reads through a wrapper of the socket (for what the
		// client sent early, golang.org/issue/32314) that every idle
		// connection would keep; with nothing sent early, the buffer reads
		// the socket itself.
		tr.br.Reset(tr.cw.conn)
	}
	// From here on w belongs to the WebSocket, and r's context ends with
	// ServeHTTP: the connection runs on contexts of its own, on a goroutine
	// of its own. Returning lets net/http's goroutine end, and with it the
	// stack that Caddy's handler chain grew: an idle connection then costs
	// one small goroutine stack (conn.readIdle), not a large one.
	ws.SetReadLimit(h.MaxMessageSize)
	tr.ws = ws
	tr.deflate, tr.library = negotiatedCompression(w.Header())
	c := newConn(h.route, tr, r.URL.Path, rawChannel, id)
	c.admitted = true
	go c.serve()
	return nil
}

// refused is a refused request: its status and the reason the client reads.
func refused(status int, reason string) error {
	return caddyhttp.Error(status, errors.New(reason))
}

// refuse answers a refused request (a caddyhttp.HandlerError). When the site has
// handle_errors routes it goes to them (they see the status, and the
// reason as {http.error.message}); otherwise the client gets the reason as
// plain text, which is what a WebSocket client can show of a refused
// handshake. A 401 carries its Bearer challenge either way.
func refuse(w http.ResponseWriter, r *http.Request, err error) error {
	var he caddyhttp.HandlerError
	if !errors.As(err, &he) {
		he = caddyhttp.Error(http.StatusInternalServerError, err)
	}
	if he.StatusCode == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="chat", error="invalid_token"`)
	}
	if srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && srv.Errors != nil && len(srv.Errors.Routes) > 0 {
		return he
	}
	http.Error(w, he.Err.Error(), he.StatusCode)
	return nil
}

// carriesLoggableToken reports whether r has a token where Caddy's access
// log would record it.
func (h *Handler) carriesLoggableToken(r *http.Request) bool {
	if _, ok := subprotocolToken(r.Header); ok {
		return true
	}
	return r.URL.RawQuery != "" && h.queryCarriesToken(r.URL.RawQuery)
}

func (h *Handler) logRedactedUpgrade(r *http.Request, status int) {
	msg := "websocket request (token redacted; left out of the access log)"
	if !isWebSocketUpgrade(r) {
		msg = "http request (token redacted; left out of the access log)"
	}
	h.logger.Info(msg,
		zap.String("remote", r.RemoteAddr), zap.String("host", r.Host),
		zap.String("method", r.Method), zap.String("uri", h.redactTokenQuery(r.URL)),
		zap.String("origin", r.Header.Get("Origin")), zap.Int("status", status))
}

// statusRecorder notes the status written before an upgrade. It passes
// Hijack and Unwrap through, so the WebSocket upgrade still works.
type statusRecorder struct {
	http.ResponseWriter
	status *int
}

func (s *statusRecorder) WriteHeader(code int) {
	*s.status = code
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (s *statusRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(s.ResponseWriter).Hijack()
}

func isWebSocketUpgrade(r *http.Request) bool {
	return headerHasToken(r.Header, "Connection", "upgrade") && headerHasToken(r.Header, "Upgrade", "websocket")
}

func headerHasToken(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}
