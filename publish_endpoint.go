package caddychat

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"

	"go.uber.org/zap"
)

// maxPublishBatch bounds the messages of one HTTP publish request.
const maxPublishBatch = 100

// publishRequest is one message of an HTTP publish: the body itself, or an
// element of its "messages" list for a batch.
type publishRequest struct {
	Channel        string          `json:"channel"`
	Data           json.RawMessage `json:"data"`
	IdempotencyKey *string         `json:"idempotency_key"`
	Messages       []publishItem   `json:"messages"`
}

type publishItem struct {
	Channel        string          `json:"channel"`
	Data           json.RawMessage `json:"data"`
	IdempotencyKey *string         `json:"idempotency_key"`
}

type publishResult struct {
	Channel   string        `json:"channel"`
	ID        string        `json:"id,omitempty"`
	Duplicate bool          `json:"duplicate,omitempty"`
	Error     *publishError `json:"error,omitempty"`
}

type publishError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// servePublish is the HTTP publish endpoint for backends: POST a JSON
// {"channel","data"} (or {"messages":[...]}) with the publish key or a JWT
// with publish rights as a Bearer token; the answer carries the message ids.
// Below it (<publish_endpoint>/<op>) is the server API, for the publish key
// (api.go).
func (h *Handler) servePublish(w http.ResponseWriter, r *http.Request) {
	op, below := strings.CutPrefix(r.URL.Path, h.PublishEndpoint+"/")
	if below && op != "publish" {
		h.serveSiteAPI(w, r, op)
		return
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writePublishError(w, http.StatusMethodNotAllowed, errBadRequest, "use POST")
		return
	}
	id, err := h.publisherIdentity(r)
	if err != nil {
		h.refusePublisher(w, r, err)
		return
	}
	p := publisher{id: id, path: h.PublishEndpoint, routeFor: func(string) *route { return h.route },
		allow: func(w http.ResponseWriter, n int) bool { return h.allowPublish(w, id, n) }}
	// The endpoint's own publish ignores unknown fields, as it always has;
	// the API's ops (<publish_endpoint>/publish too) refuse them.
	p.serve(w, r, min(int64(maxPublishBatch)*h.MaxMessageSize, 16<<20), below)
}

// refusePublisher answers a request whose publish key or token was refused.
func (h *Handler) refusePublisher(w http.ResponseWriter, r *http.Request, err error) {
	moduleMetrics().authFailures.WithLabelValues(authFailureLabel(err)).Inc()
	h.logger.Debug("publish endpoint: authentication failed", zap.String("reason", err.Error()), zap.String("remote", r.RemoteAddr))
	w.Header().Set("WWW-Authenticate", `Bearer realm="chat publish"`)
	writePublishError(w, http.StatusUnauthorized, errUnauthorized, err.Error())
}

// publisher is who publishes through HTTP (the publish endpoint, the
// server API) and with which route's rules.
type publisher struct {
	id   *identity
	path string // named in webhook events and hook requests
	// routeFor is the route whose rules (history, limits, hooks) a
	// message on channel follows.
	routeFor func(channel string) *route
	// allow spends the rate limit of n messages, or answers 429.
	allow func(w http.ResponseWriter, n int) bool
}

// serve reads a publish request's body (at most limit bytes; strict:
// without unknown fields) and publishes its message or messages.
func (p publisher) serve(w http.ResponseWriter, r *http.Request, limit int64, strict bool) {
	var req publishRequest
	if !decodeBody(w, r, limit, &req, strict) {
		return
	}
	if req.Messages == nil {
		if req.Channel == "" && len(req.Data) == 0 && req.IdempotencyKey == nil {
			writePublishError(w, http.StatusBadRequest, errBadRequest, `body needs "channel" and "data", or "messages"`)
			return
		}
		if !p.allow(w, 1) {
			return
		}
		res, status := p.publishOne(r.Context(), publishItem{Channel: req.Channel, Data: req.Data, IdempotencyKey: req.IdempotencyKey})
		if res.Error != nil {
			if status == http.StatusServiceUnavailable {
				w.Header().Set("Retry-After", "1")
			}
			writePublishError(w, status, res.Error.Code, res.Error.Message)
			return
		}
		writeJSON(w, http.StatusOK, res)
		return
	}
	if req.Channel != "" || len(req.Data) > 0 || req.IdempotencyKey != nil {
		writePublishError(w, http.StatusBadRequest, errBadRequest, `use either "channel" and "data", or "messages"`)
		return
	}
	if len(req.Messages) == 0 || len(req.Messages) > maxPublishBatch {
		writePublishError(w, http.StatusBadRequest, errBadRequest, fmt.Sprintf(`"messages" must hold 1 to %d messages`, maxPublishBatch))
		return
	}
	if !p.allow(w, len(req.Messages)) {
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"results": p.publishAll(r.Context(), req.Messages)})
}

// publishAll publishes items in order; one broker outage fails the rest at
// once, so a batch never waits publish_timeout once per message.
func (p publisher) publishAll(ctx context.Context, items []publishItem) []publishResult {
	results := make([]publishResult, len(items))
	brokerDown := false
	for i, item := range items {
		if brokerDown {
			results[i] = publishResult{Channel: item.Channel, Error: &publishError{Code: errUnavailable, Message: "message not published: the broker did not accept it within publish_timeout (down or overloaded); retry later"}}
			continue
		}
		results[i], _ = p.publishOne(ctx, item)
		brokerDown = results[i].Error != nil && results[i].Error.Code == errUnavailable
	}
	return results
}

// decodeBody reads one JSON object of at most limit bytes into v,
// answering the client itself when it cannot (false). strict refuses
// unknown fields.
func decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any, strict bool) bool {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			writePublishError(w, http.StatusUnsupportedMediaType, errBadRequest, "Content-Type must be application/json")
			return false
		}
	}
	body := http.MaxBytesReader(w, r.Body, limit)
	dec := json.NewDecoder(body)
	if strict {
		dec.DisallowUnknownFields()
	}
	if err := dec.Decode(v); err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			writePublishError(w, http.StatusRequestEntityTooLarge, errTooLarge, fmt.Sprintf("body larger than %d bytes", limit))
			return false
		}
		writePublishError(w, http.StatusBadRequest, errBadRequest, "body must be a JSON object: "+err.Error())
		return false
	}
	// Only white space may follow the object. (dec.More would miss a stray
	// closing ']' or '}'.)
	if _, err := dec.Token(); err != io.EOF {
		writePublishError(w, http.StatusBadRequest, errBadRequest, "body must hold one JSON object")
		return false
	}
	return true
}

// publisherIdentity authenticates a backend: the publish key grants every
// channel; otherwise a JWT grants what its claims and the rules allow.
func (h *Handler) publisherIdentity(r *http.Request) (*identity, error) {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	token = strings.TrimSpace(token)
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		return nil, authErr("missing Authorization: Bearer <publish key or token>")
	}
	if h.PublishKey != "" && subtle.ConstantTimeCompare([]byte(token), []byte(h.PublishKey)) == 1 {
		return serverIdentity(), nil
	}
	if h.JWT == nil {
		return nil, authErr("wrong publish key")
	}
	return h.auth.verify(token)
}

// publishOne validates and publishes one message, returning its result and
// the HTTP status a single-message request answers with.
func (p publisher) publishOne(ctx context.Context, item publishItem) (publishResult, int) {
	id := p.id
	res := publishResult{Channel: item.Channel}
	fail := func(status int, code, message string) (publishResult, int) {
		moduleMetrics().httpPublishes.WithLabelValues(code).Inc()
		res.Error = &publishError{Code: code, Message: message}
		return res, status
	}
	if err := validateChannel(item.Channel); err != nil {
		return fail(http.StatusBadRequest, errBadRequest, err.Error())
	}
	if len(item.Data) == 0 {
		return fail(http.StatusBadRequest, errBadRequest, `message needs "data"`)
	}
	var idemKey string
	if item.IdempotencyKey != nil {
		if err := validateIdempotencyKey(*item.IdempotencyKey); err != nil {
			return fail(http.StatusBadRequest, errBadRequest, err.Error())
		}
		idemKey = *item.IdempotencyKey
	}
	rt := p.routeFor(item.Channel)
	if int64(len(item.Data)) > rt.maxMessageSize {
		return fail(http.StatusRequestEntityTooLarge, errTooLarge, fmt.Sprintf("data larger than max_message_size (%d bytes)", rt.maxMessageSize))
	}
	if !id.publish.allows(item.Channel) {
		return fail(http.StatusForbidden, errForbidden, "may not publish on "+item.Channel)
	}
	data := item.Data
	if !id.server && rt.publishHook.applies(item.Channel) {
		// A token holder's message goes by the publish hook as a client's
		// does; the publish key is the backend's own and does not.
		var verdict publishVerdict
		var reason string
		data, verdict, reason = rt.checkPublish(ctx, channelHookRequest{Type: "publish", Route: p.path, User: id.user, Channel: item.Channel, Data: item.Data})
		switch verdict {
		case publishRejected:
			return fail(http.StatusForbidden, errRejected, reason)
		case publishFailed:
			return fail(http.StatusServiceUnavailable, errUnavailable, reason)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, rt.publishTimeout)
	defer cancel()
	var key *publisherKey // the publish key is not limited
	if id.user != "" {
		key = &publisherKey{user: id.user}
	}
	// The HTTP endpoint has no connection: a token holder's keys are its
	// user's, the publish key's are the backend's.
	idem := rt.idempotent(idemScope(id, ""), idemKey)
	msgID, err := rt.publish(ctx, key, Publication{Channel: item.Channel, From: id.user, Origin: originOf(id), Data: data, path: p.path, idem: idem})
	if errors.Is(err, errNewHistoryLimited) {
		return fail(http.StatusTooManyRequests, errLimitExceeded, rt.newChannelsRefusal(item.Channel))
	}
	if errors.Is(err, errDeliveriesLate) {
		return fail(http.StatusServiceUnavailable, errUnavailable, lateReason)
	}
	if err != nil {
		rt.log.Debug("publish endpoint: publish failed", zap.String("channel", item.Channel), zap.Error(err))
		return fail(http.StatusServiceUnavailable, errUnavailable, "message not published: the broker did not accept it within publish_timeout (down or overloaded); retry later")
	}
	res.ID = msgID
	res.Duplicate = idem != nil && idem.duplicate
	moduleMetrics().httpPublishes.WithLabelValues("ok").Inc()
	return res, http.StatusOK
}

// serverIdentity is the backend's: what it publishes is the server's own
// message, on any channel.
func serverIdentity() *identity {
	return &identity{server: true, publish: compileACL([]string{"**"}, "")}
}

func writePublishError(w http.ResponseWriter, status int, code, message string) {
	writeJSON(w, status, map[string]any{"error": publishError{Code: code, Message: message}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}
