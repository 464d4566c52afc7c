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
	"time"

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
func (h *Handler) servePublish(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writePublishError(w, http.StatusMethodNotAllowed, errBadRequest, "use POST")
		return
	}
	id, err := h.publisherIdentity(r)
	if err != nil {
		moduleMetrics().authFailures.WithLabelValues(authFailureLabel(err)).Inc()
		h.logger.Debug("publish endpoint: authentication failed", zap.String("reason", err.Error()), zap.String("remote", r.RemoteAddr))
		w.Header().Set("WWW-Authenticate", `Bearer realm="chat publish"`)
		writePublishError(w, http.StatusUnauthorized, errUnauthorized, err.Error())
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			writePublishError(w, http.StatusUnsupportedMediaType, errBadRequest, "Content-Type must be application/json")
			return
		}
	}
	limit := min(int64(maxPublishBatch)*h.MaxMessageSize, 16<<20)
	body := http.MaxBytesReader(w, r.Body, limit)
	var req publishRequest
	dec := json.NewDecoder(body)
	if err := dec.Decode(&req); err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			writePublishError(w, http.StatusRequestEntityTooLarge, errTooLarge, fmt.Sprintf("body larger than %d bytes", limit))
			return
		}
		writePublishError(w, http.StatusBadRequest, errBadRequest, "body must be a JSON object: "+err.Error())
		return
	}
	// Only white space may follow the object. (dec.More would miss a stray
	// closing ']' or '}'.)
	if _, err := dec.Token(); err != io.EOF {
		writePublishError(w, http.StatusBadRequest, errBadRequest, "body must hold one JSON object")
		return
	}

	if req.Messages == nil {
		if req.Channel == "" && len(req.Data) == 0 && req.IdempotencyKey == nil {
			writePublishError(w, http.StatusBadRequest, errBadRequest, `body needs "channel" and "data", or "messages"`)
			return
		}
		if !h.allowPublish(w, id, 1) {
			return
		}
		res, status := h.publishOne(r.Context(), id, publishItem{Channel: req.Channel, Data: req.Data, IdempotencyKey: req.IdempotencyKey})
		if res.Error != nil {
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
	if !h.allowPublish(w, id, len(req.Messages)) {
		return
	}
	results := make([]publishResult, len(req.Messages))
	brokerDown := false
	for i, item := range req.Messages {
		if brokerDown {
			// One outage fails the rest at once: a batch never waits
			// publish_timeout once per message.
			results[i] = publishResult{Channel: item.Channel, Error: &publishError{Code: errUnavailable, Message: "message not published: the broker did not accept it within publish_timeout (down or overloaded); retry later"}}
			continue
		}
		results[i], _ = h.publishOne(r.Context(), id, item)
		brokerDown = results[i].Error != nil && results[i].Error.Code == errUnavailable
	}
	writeJSON(w, http.StatusOK, map[string]any{"results": results})
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
		return &identity{server: true, publish: compileACL([]string{"**"}, "")}, nil
	}
	if h.JWT == nil {
		return nil, authErr("wrong publish key")
	}
	return h.auth.verify(token)
}

// publishOne validates and publishes one message, returning its result and
// the HTTP status a single-message request answers with.
func (h *Handler) publishOne(ctx context.Context, id *identity, item publishItem) (publishResult, int) {
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
	if int64(len(item.Data)) > h.MaxMessageSize {
		return fail(http.StatusRequestEntityTooLarge, errTooLarge, fmt.Sprintf("data larger than max_message_size (%d bytes)", h.MaxMessageSize))
	}
	if !id.publish.allows(item.Channel) {
		return fail(http.StatusForbidden, errForbidden, "may not publish on "+item.Channel)
	}
	data := item.Data
	if !id.server && h.route.publishHook.applies(item.Channel) {
		// A token holder's message goes by the publish hook as a client's
		// does; the publish key is the backend's own and does not.
		var verdict publishVerdict
		var reason string
		data, verdict, reason = h.route.checkPublish(ctx, channelHookRequest{Type: "publish", Route: h.PublishEndpoint, User: id.user, Channel: item.Channel, Data: item.Data})
		switch verdict {
		case publishRejected:
			return fail(http.StatusForbidden, errRejected, reason)
		case publishFailed:
			return fail(http.StatusServiceUnavailable, errUnavailable, reason)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(h.PublishTimeout))
	defer cancel()
	var key *publisherKey // the publish key is not limited
	if id.user != "" {
		key = &publisherKey{user: id.user}
	}
	// The HTTP endpoint has no connection: a token holder's keys are its
	// user's, the publish key's are the backend's.
	idem := h.route.idempotent(idemScope(id, ""), idemKey)
	msgID, err := h.route.publish(ctx, key, Publication{Channel: item.Channel, From: id.user, Origin: originOf(id), Data: data, path: h.PublishEndpoint, idem: idem})
	if errors.Is(err, errNewHistoryLimited) {
		return fail(http.StatusTooManyRequests, errLimitExceeded, h.route.newChannelsRefusal(item.Channel))
	}
	if err != nil {
		h.logger.Debug("publish endpoint: publish failed", zap.String("channel", item.Channel), zap.Error(err))
		return fail(http.StatusServiceUnavailable, errUnavailable, "message not published: the broker did not accept it within publish_timeout (down or overloaded); retry later")
	}
	res.ID = msgID
	res.Duplicate = idem != nil && idem.duplicate
	moduleMetrics().httpPublishes.WithLabelValues("ok").Inc()
	return res, http.StatusOK
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
