package caddychat

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
	"go.uber.org/zap"
)

// The connect hook (connect_hook): at the handshake the node POSTs what it
// knows of the request to the backend, which answers who the connection
// is and what it may do, or refuses it. A refusal reaches the client in the
// close frame (4004 and the backend's reason): a browser cannot read the
// body of a refused handshake, so the upgrade is accepted and closed at
// once. With a connect hook a token is optional: an app with session
// cookies passes the Cookie header (headers Cookie) and needs no JWT.

// connectHookRequest is the body of a connect hook call.
type connectHookRequest struct {
	Type    string              `json:"type"`
	Route   string              `json:"route"`
	Remote  string              `json:"remote"`
	Headers map[string][]string `json:"headers,omitempty"`
	// User and Claims: only when a valid token came with the request.
	User   string         `json:"user,omitempty"`
	Claims map[string]any `json:"claims,omitempty"`
}

// maxInitialChannels bounds the channels a connect answer subscribes to.
const maxInitialChannels = 100

// maxCloseReason is RFC 6455's limit on a close frame's reason: 125 bytes
// of payload, 2 of them the code.
const maxCloseReason = 123

// connectRefusal is a connection the connect hook refused (or could not
// decide): it is upgraded, then closed with code and reason.
type connectRefusal struct {
	code   websocket.StatusCode
	reason string
}

func (e *connectRefusal) Error() string { return e.reason }

// hookIdentity is admit's authentication on a route with a connect hook: a
// token, if the request carries one, must be valid (else 401, as without
// the hook); then the backend decides. A refusal is a *connectRefusal.
func (h *Handler) hookIdentity(r *http.Request) (*identity, error) {
	hook := h.route.connectHook
	req := connectHookRequest{Type: "connect", Route: r.URL.Path, Remote: r.RemoteAddr}
	var tokenID *identity
	if h.JWT != nil {
		token, _, err := h.auth.requestToken(r)
		if err == nil && token != "" {
			var claims map[string]any
			tokenID, claims, err = h.auth.verifyClaims(token)
			req.User, req.Claims = tokenID.userOrEmpty(), claims
		}
		if err != nil {
			return nil, err
		}
	}
	for _, name := range h.route.connectHeaders {
		if v := r.Header.Values(name); len(v) > 0 {
			if req.Headers == nil {
				req.Headers = map[string][]string{}
			}
			req.Headers[name] = v
		}
	}
	ans, err := hook.decide(r.Context(), req, checkConnectAnswer)
	if err != nil {
		var f *hookFailure
		errors.As(err, &f)
		return nil, &connectRefusal{code: closeTryAgainLater, reason: "the application did not answer (connect_hook " + f.outcome + "); try again later"}
	}
	if ans.failedOpen {
		if tokenID != nil {
			return tokenID, nil
		}
		return h.auth.anonymousIdentity(), nil
	}
	if ans.Result == hookDeny {
		reason := ans.Reason
		if reason == "" {
			reason = "refused by the application"
		}
		h.logger.Debug("connect hook refused a connection", zap.String("remote", r.RemoteAddr), zap.String("reason", reason))
		return nil, &connectRefusal{code: closeRefused, reason: reason}
	}
	return h.hookedIdentity(ans, tokenID), nil
}

func (id *identity) userOrEmpty() string {
	if id == nil {
		return ""
	}
	return id.user
}

// hookedIdentity is the identity an allow answer gives: the answer's user
// (else the token's; neither: anonymous), its patterns with the route's
// subscribe and publish rules (without patterns: the token's permissions
// for the token's user, else the rules alone, or the anonymous ones), its
// info, channels and expiry (else the token's).
func (h *Handler) hookedIdentity(ans *hookAnswer, tokenID *identity) *identity {
	user := ans.User
	if user == "" && tokenID != nil {
		user = tokenID.user
	}
	id := &identity{user: user, anonymous: user == "", hooked: true, channels: ans.Channels}
	if len(ans.Info) > 0 {
		id.info = ans.Info
	} else if tokenID != nil && tokenID.user == user {
		id.info = tokenID.info // user_info_claim's, about this same user
	}
	anon := h.auth.anonymousIdentity()
	acl := func(answered []string, rules []string, fromToken, fromAnon channelACL) channelACL {
		switch {
		case answered != nil:
			return compileACL(append(append([]string(nil), answered...), rules...), user)
		case tokenID != nil && tokenID.user == user:
			return fromToken
		case user == "":
			return fromAnon
		}
		return compileACL(rules, user)
	}
	var tokenSub, tokenPub channelACL
	if tokenID != nil {
		tokenSub, tokenPub = tokenID.subscribe, tokenID.publish
		id.expires = tokenID.expires
	}
	id.subscribe = acl(ans.Subscribe, h.Subscribe, tokenSub, anon.subscribe)
	id.publish = acl(ans.Publish, h.Publish, tokenPub, anon.publish)
	switch {
	case ans.ExpiresAt > 0:
		id.expires = time.Unix(ans.ExpiresAt, 0)
	case ans.ExpiresIn != "":
		d, _ := time.ParseDuration(ans.ExpiresIn) // checked by checkConnectAnswer
		id.expires = time.Now().Add(d)
	}
	return id
}

// checkConnectAnswer checks an allow answer of the connect hook; what it
// refuses is the backend's error, and compacts its info.
func checkConnectAnswer(ans *hookAnswer) error {
	if len(ans.User) > 256 {
		return fmt.Errorf("user is %d bytes (at most 256)", len(ans.User))
	}
	if err := checkHookPatterns("subscribe", ans.Subscribe); err != nil {
		return err
	}
	if err := checkHookPatterns("publish", ans.Publish); err != nil {
		return err
	}
	if len(ans.Info) > 0 && !bytes.Equal(ans.Info, []byte("null")) {
		var buf bytes.Buffer
		if err := json.Compact(&buf, ans.Info); err != nil || buf.Len() == 0 || buf.Bytes()[0] != '{' {
			return errors.New("info must be a JSON object")
		}
		if buf.Len() > maxHookInfo {
			return fmt.Errorf("info is %d bytes (at most %d)", buf.Len(), maxHookInfo)
		}
		ans.Info = buf.Bytes()
	} else {
		ans.Info = nil
	}
	if len(ans.Channels) > maxInitialChannels {
		return fmt.Errorf("channels: %d (at most %d)", len(ans.Channels), maxInitialChannels)
	}
	for _, ch := range ans.Channels {
		if err := validateChannel(ch); err != nil {
			return fmt.Errorf("channels: %v", truncateErr(err))
		}
	}
	if ans.ExpiresIn != "" {
		d, err := time.ParseDuration(ans.ExpiresIn)
		if err != nil || d <= 0 {
			return fmt.Errorf("expires_in %q: want a positive duration such as 1h", truncate(ans.ExpiresIn, 32))
		}
	}
	if ans.ExpiresAt < 0 {
		return errors.New("expires_at must be a Unix time in seconds")
	}
	return nil
}

// refuseInBand accepts the upgrade and closes it at once with the
// refusal's code and reason, which a browser can read (it cannot read a
// refused handshake's body). Origin checks still apply: a foreign origin
// gets 403 from Accept.
func (h *Handler) refuseInBand(w http.ResponseWriter, r *http.Request, refusal *connectRefusal) {
	ws, err := websocket.Accept(w, r, &h.acceptOptions)
	if err != nil {
		h.logger.Debug("websocket upgrade refused", zap.Error(err))
		return
	}
	m := moduleMetrics()
	m.connectionsClosed.WithLabelValues(closeReason(refusal.code)).Inc()
	// The close handshake waits for the client's answer (5s at most):
	// not on the request's goroutine.
	go func() { _ = ws.Close(refusal.code, closeReasonText(refusal.reason)) }()
}

// closeReasonText fits reason into a close frame: valid UTF-8, at most
// maxCloseReason bytes, cut at a character boundary with "…" when longer.
func closeReasonText(reason string) string {
	reason = strings.ToValidUTF8(reason, "\uFFFD")
	if len(reason) <= maxCloseReason {
		return reason
	}
	const ellipsis = "…"
	cut := maxCloseReason - len(ellipsis)
	for cut > 0 && !utf8.RuneStart(reason[cut]) {
		cut--
	}
	return reason[:cut] + ellipsis
}

// joinInitial subscribes the connection to the channels its connect
// answer named, as if the client had asked (permissions and the subscribe
// hook apply). Each gets an ok or error reply without id, after the
// welcome.
func (c *conn) joinInitial() {
	for _, ch := range c.identity.channels {
		if c.closing.Load() {
			return
		}
		c.opSubscribe(clientFrame{Op: "subscribe", Channel: ch, initial: true})
	}
}
