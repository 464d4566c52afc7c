package caddychat

import (
	"fmt"
	"net/http"
	"time"
	"unicode/utf8"
)

// The server API's ops on users' connections, on every node (api.go for
// the rest): disconnect, unsubscribe, subscribe and revoke.

func apiDisconnect(t apiTarget, w http.ResponseWriter, r *http.Request) {
	var req struct {
		User   string `json:"user"`
		Conn   string `json:"conn"`
		Code   int    `json:"code"`
		Reason string `json:"reason"`
	}
	if !decodeBody(w, r, maxAPIBody, &req, true) {
		return
	}
	if (req.User == "") == (req.Conn == "") {
		writePublishError(w, http.StatusBadRequest, errBadRequest, `name either "user" or "conn"`)
		return
	}
	if !validUser(w, req.User) || !validUser(w, req.Conn) {
		return
	}
	if req.Code == 0 {
		req.Code = int(closeDisconnected)
	}
	if req.Code < 4000 || req.Code > 4999 {
		writePublishError(w, http.StatusBadRequest, errBadRequest, `"code" must be an application close code, 4000 to 4999 (default 4005)`)
		return
	}
	if req.Reason == "" {
		req.Reason = "disconnected by the server"
	}
	if len(req.Reason) > maxCloseReason || !utf8.ValidString(req.Reason) {
		writePublishError(w, http.StatusBadRequest, errBadRequest, fmt.Sprintf(`"reason" must be UTF-8 of at most %d bytes (a close frame's limit)`, maxCloseReason))
		return
	}
	if out, ok := callNodes(t, w, r, controlRequest{Op: "disconnect", User: req.User, Conn: req.Conn, Code: req.Code, Reason: req.Reason}, "disconnected"); ok {
		writeJSON(w, http.StatusOK, out)
	}
}

// validUser checks a user (or connection) id the API names; "" passes.
func validUser(w http.ResponseWriter, id string) bool {
	if len(id) > 256 || !utf8.ValidString(id) {
		writePublishError(w, http.StatusBadRequest, errBadRequest, "a user or connection id is UTF-8 of at most 256 bytes")
		return false
	}
	return true
}

// userChannel reads the body of subscribe and unsubscribe.
func userChannel(w http.ResponseWriter, r *http.Request) (user, channel string, ok bool) {
	var req struct {
		User    string `json:"user"`
		Channel string `json:"channel"`
	}
	if !decodeBody(w, r, maxAPIBody, &req, true) {
		return "", "", false
	}
	if req.User == "" {
		writePublishError(w, http.StatusBadRequest, errBadRequest, `"user" is required`)
		return "", "", false
	}
	return req.User, req.Channel, validUser(w, req.User) && validChannel(w, req.Channel)
}

func apiUnsubscribe(t apiTarget, w http.ResponseWriter, r *http.Request) {
	if user, channel, ok := userChannel(w, r); ok {
		if out, ok := callNodes(t, w, r, controlRequest{Op: "unsubscribe", User: user, Channel: channel}, "unsubscribed"); ok {
			writeJSON(w, http.StatusOK, out)
		}
	}
}

func apiSubscribe(t apiTarget, w http.ResponseWriter, r *http.Request) {
	if user, channel, ok := userChannel(w, r); ok {
		if out, ok := callNodes(t, w, r, controlRequest{Op: "subscribe", User: user, Channel: channel}, "subscribed"); ok {
			writeJSON(w, http.StatusOK, out)
		}
	}
}

// callNodes sends req to every node and sums the connections they acted
// on, under the name counted, for the op to answer with; ok false: the
// nodes could not be asked, and the client has been told.
func callNodes(t apiTarget, w http.ResponseWriter, r *http.Request, req controlRequest, counted string) (out map[string]any, ok bool) {
	ctx, cancel := t.brokerContext(r)
	defer cancel()
	replies, nodes, err := t.hub.control.call(ctx, req)
	if err != nil {
		writeUnavailable(w, req.Op+" not sent to the nodes", err)
		return nil, false
	}
	total, refused := 0, 0
	for _, rep := range replies {
		total += rep.Count
		refused += rep.Refused
	}
	out = map[string]any{counted: total}
	if refused > 0 {
		out["refused"] = refused
		out["message"] = "some connections were not subscribed: raw routes, max_subscriptions reached, or the broker did not answer"
	}
	answered(out, replies, nodes)
	return out, true
}

func apiRevoke(t apiTarget, w http.ResponseWriter, r *http.Request) {
	var req struct {
		JTI          string `json:"jti"`
		User         string `json:"user"`
		IssuedBefore *int64 `json:"issued_before"`
		Until        *int64 `json:"until"`
	}
	if !decodeBody(w, r, maxAPIBody, &req, true) {
		return
	}
	now := time.Now()
	rv := revocation{JTI: req.JTI, User: req.User, Until: now.Add(defaultRevocationKeep).UnixMilli()}
	kind := "jti"
	switch {
	case (req.JTI == "") == (req.User == ""):
		writePublishError(w, http.StatusBadRequest, errBadRequest, `name either "jti" or "user"`)
		return
	case len(req.JTI) > maxTokenIDLen:
		writePublishError(w, http.StatusBadRequest, errBadRequest, fmt.Sprintf(`"jti" is at most %d bytes`, maxTokenIDLen))
		return
	case !validUser(w, req.User):
		return
	case req.JTI != "" && req.IssuedBefore != nil:
		writePublishError(w, http.StatusBadRequest, errBadRequest, `"issued_before" goes with "user"`)
		return
	case req.User != "":
		kind = "user"
		rv.IssuedBefore = now.UnixMilli()
		if req.IssuedBefore != nil {
			rv.IssuedBefore = *req.IssuedBefore * 1000
		}
	}
	if req.Until != nil {
		until := time.Unix(*req.Until, 0)
		if !until.After(now) || until.After(now.Add(maxRevocationKeep)) {
			writePublishError(w, http.StatusBadRequest, errBadRequest, `"until" (Unix seconds) must be in the next 30 days: when the revoked tokens expire`)
			return
		}
		rv.Until = until.UnixMilli()
	}
	ctx, cancel := t.brokerContext(r)
	err := t.hub.revocations.store(ctx, rv)
	cancel()
	if err == errTooManyRevocations {
		writePublishError(w, http.StatusConflict, errLimitExceeded, err.Error())
		return
	}
	if err != nil {
		writeUnavailable(w, "token not revoked", err)
		return
	}
	// Kept before the nodes hear of it: a node started meanwhile reads it.
	out, ok := callNodes(t, w, r, controlRequest{Op: "revoke", Revocation: &rv}, "disconnected")
	if !ok {
		return
	}
	out["revoked"] = kind
	out["until"] = rv.Until / 1000
	writeJSON(w, http.StatusOK, out)
}

func apiRevocations(t apiTarget, w http.ResponseWriter, r *http.Request) {
	type entry struct {
		JTI          string `json:"jti,omitempty"`
		User         string `json:"user,omitempty"`
		IssuedBefore int64  `json:"issued_before,omitempty"`
		Until        int64  `json:"until"`
	}
	list := t.hub.revocations.list(time.Now())
	out := make([]entry, len(list))
	for i, rv := range list {
		out[i] = entry{JTI: rv.JTI, User: rv.User, IssuedBefore: rv.IssuedBefore / 1000, Until: rv.Until / 1000}
	}
	writeJSON(w, http.StatusOK, map[string]any{"revocations": out})
}
