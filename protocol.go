package caddychat

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
)

// Close codes sent to clients. The 1xxx ones are RFC 6455's; 4000–4999 are ours.
const (
	closeNormal         = websocket.StatusNormalClosure
	closeGoingAway      = websocket.StatusGoingAway
	closeUnsupported    = websocket.StatusUnsupportedData
	closeInvalidPayload = websocket.StatusInvalidFramePayloadData
	closeInternal       = websocket.StatusInternalError
	closeServiceRestart = websocket.StatusServiceRestart
	closeTryAgainLater  = websocket.StatusTryAgainLater
	// closeSlowConsumer: the connection's send queue was full.
	closeSlowConsumer websocket.StatusCode = 4000
	// closePingTimeout: the peer did not answer a ping in time.
	closePingTimeout websocket.StatusCode = 4001
	// closeTokenExpired: the connection's token expired without a refresh.
	closeTokenExpired websocket.StatusCode = 4002
	// closeRateLimited: the client kept sending over its rate limit.
	closeRateLimited websocket.StatusCode = 4003
	// closeRefused: the application's backend refused the connection
	// (connect_hook) or, on a raw route, a message (publish_hook); the
	// close reason is the backend's reason.
	closeRefused websocket.StatusCode = 4004
	// closePolicyViolation: a raw client published where it may not.
	closePolicyViolation = websocket.StatusPolicyViolation
)

// Error codes of JSON-protocol error replies.
const (
	errBadRequest  = "bad_request"
	errForbidden   = "forbidden"
	errTooLarge    = "too_large"
	errRateLimited = "rate_limited"
	errUnavailable = "unavailable"
	errInternal    = "internal"
	// errUnauthorized: a refresh token was refused.
	errUnauthorized = "unauthorized"
	// errLimitExceeded: a per-connection limit (subscriptions) was reached.
	errLimitExceeded = "limit_exceeded"
	// errRejected: the publish hook rejected the message; the message is
	// the backend's reason.
	errRejected = "rejected"
	// errNotFound: the server API has no such op, or no such chat.
	errNotFound = "not_found"
)

// maxChannelLen bounds channel names so that a name can never grow a Redis key
// or a log line without limit.
const maxChannelLen = 128

// validateChannel accepts 1..128 bytes of A-Z a-z 0-9 _ - . : @ /. The charset
// leaves out Redis glob characters (* ? [ ]), white space and control bytes, so
// a client-supplied name can never act as a pattern or break out of the
// channel prefix's key space.
func validateChannel(name string) error {
	if name == "" {
		return errors.New("channel name is empty")
	}
	if len(name) > maxChannelLen {
		return fmt.Errorf("channel name is longer than %d bytes", maxChannelLen)
	}
	for i := 0; i < len(name); i++ {
		if !channelByte(name[i]) {
			return fmt.Errorf("channel name contains %q; allowed are letters, digits and _ - . : @ /", name[i])
		}
	}
	return nil
}

func channelByte(b byte) bool {
	switch {
	case 'a' <= b && b <= 'z', 'A' <= b && b <= 'Z', '0' <= b && b <= '9':
		return true
	}
	switch b {
	case '_', '-', '.', ':', '@', '/':
		return true
	}
	return false
}

// clientFrame is one JSON-protocol frame from a client. Unknown fields are
// ignored so that newer clients can talk to older nodes.
type clientFrame struct {
	Op      string          `json:"op"`
	Channel string          `json:"channel"`
	ID      json.RawMessage `json:"id,omitempty"`
	Data    json.RawMessage `json:"data,omitempty"`
	Token   string          `json:"token,omitempty"`
	// IdempotencyKey makes a publish idempotent (idempotency.go).
	IdempotencyKey *string `json:"idempotency_key,omitempty"`
	// Ephemeral: a publish for the current subscribers only (typing
	// indicators), never kept nor echoed to the sender (ephemeral.go).
	Ephemeral bool `json:"ephemeral,omitempty"`

	// Subscribe with history: Since resumes after the last message id the
	// client saw (with the Epoch that message carried); History starts
	// with the channel's last History messages.
	Since   string `json:"since,omitempty"`
	Epoch   string `json:"epoch,omitempty"`
	History int    `json:"history,omitempty"`
	// The history op: Limit messages older than Before (default: newest).
	Limit  int    `json:"limit,omitempty"`
	Before string `json:"before,omitempty"`

	// initial: not the client's frame; the node subscribes to a channel
	// the connect hook named (its replies carry the channel, not an id).
	initial bool
}

// decodeClientFrame parses a text frame. The returned id is echoed in the reply
// even when the rest of the frame is invalid, so the client can match it.
func decodeClientFrame(frame []byte) (clientFrame, error) {
	var f clientFrame
	trimmed := bytes.TrimLeft(frame, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return f, errors.New("frame must be a JSON object")
	}
	if err := json.Unmarshal(frame, &f); err != nil {
		return clientFrame{}, fmt.Errorf("malformed JSON: %v", err)
	}
	if len(f.ID) > 0 && !validCorrelationID(f.ID) {
		f.ID = nil
		return f, errors.New("id must be a number or a string of at most 64 bytes")
	}
	return f, nil
}

func validCorrelationID(id json.RawMessage) bool {
	if len(id) > 66 {
		return false
	}
	switch c := id[0]; {
	case c == '"':
		return true
	case c == '-' || ('0' <= c && c <= '9'):
		return true
	}
	return false
}

// reply is a server→client answer to one client frame.
type reply struct {
	Type      string          `json:"type"`
	ID        json.RawMessage `json:"id,omitempty"`
	Channel   string          `json:"channel,omitempty"`
	MessageID string          `json:"message_id,omitempty"`
	// Duplicate: a publish whose idempotency key was already used; nothing
	// was delivered, MessageID is the first publish's.
	Duplicate bool   `json:"duplicate,omitempty"`
	Code      string `json:"code,omitempty"`
	Message   string `json:"message,omitempty"`

	// A subscribe with since or history: whether every message after since
	// was replayed (only with since), the channel's history epoch, how many
	// messages were replayed, and whether the replay limit left some out.
	Recovered *bool  `json:"recovered,omitempty"`
	Epoch     string `json:"epoch,omitempty"`
	Replayed  *int   `json:"replayed,omitempty"`
	Limited   bool   `json:"limited,omitempty"`
}

// historyReply answers the history op: kept messages, oldest first.
type historyReply struct {
	Type     string            `json:"type"`
	ID       json.RawMessage   `json:"id,omitempty"`
	Channel  string            `json:"channel"`
	Epoch    string            `json:"epoch,omitempty"`
	Messages []json.RawMessage `json:"messages"`
	// More: older messages remain; page on with before = messages[0].id.
	More bool `json:"more"`
}

type welcome struct {
	Type string `json:"type"`
	Conn string `json:"conn"`
	Node string `json:"node"`
	User string `json:"user"`
	// Guest, Name: the connection's guest id and name (guest_names).
	Guest string `json:"guest,omitempty"`
	Name  string `json:"name,omitempty"`
	// Info: what the connect hook said of the user (name, avatar...).
	Info json.RawMessage `json:"info,omitempty"`
	// Transport and Session: an SSE stream's (sse_session.go).
	Transport string `json:"transport,omitempty"`
	Session   string `json:"session,omitempty"`
}

// delivery is one message from the broker, shared by every local subscriber.
// Each wire form is encoded at most once per node, however many clients get it.
type delivery struct {
	// own, when set, is a frame for one connection alone (a reply); the
	// other fields are then unused.
	own []byte

	channel string
	// payload is what the broker carried, without the stamp.
	payload []byte
	// stamped: a node made payload (an envelope or a presence event);
	// otherwise it is a backend's message, to be wrapped.
	stamped bool
	// kept: payload is a kept message with id keptID (only ever read
	// from stamped payloads).
	kept   bool
	keptID streamID
	ids    *idGenerator

	// born is a live message's publish time (Unix ns), 0 for a frame that
	// has no deadline; a writer drops the message once it is older than
	// max_lag (late.go). ephemeral: dropped then without a count.
	born      int64
	ephemeral bool
	// gap, when set, is no frame: it adds gap missed messages of channel to
	// the gap frame the connection owes (late.go).
	gap int

	jsonOnce  sync.Once
	jsonFrame []byte
	rawOnce   sync.Once
	rawFrame  []byte
	// The frames compressed, for compression on (compression.go).
	deflate deflateCache
}

// newDelivery is one message of channel for every local subscriber: body
// is the broker's payload after the stamp, if it had one.
func newDelivery(channel string, body []byte, stamped bool, ids *idGenerator) *delivery {
	d := &delivery{channel: channel, payload: body, stamped: stamped, ids: ids}
	if stamped {
		d.keptID, d.kept = messageID(channel, body)
	}
	return d
}

// jsonForm is the frame JSON-protocol clients receive. A node's envelope
// or presence event goes out as it is; a backend's payload is wrapped in an
// envelope marked as the server's, with a node-local id.
func (d *delivery) jsonForm() []byte {
	d.jsonOnce.Do(func() {
		if d.stamped {
			d.jsonFrame = d.payload
			return
		}
		data := json.RawMessage(d.payload)
		// Text frames must be UTF-8: marshalling as a string replaces bad bytes.
		if !utf8.Valid(d.payload) || !json.Valid(d.payload) {
			data, _ = json.Marshal(string(d.payload))
		}
		now := time.Now()
		server := sender{Server: true}
		frame, err := encodeEnvelope(d.channel, d.ids.next(now), server, now.UnixMilli(), data)
		if err != nil {
			// Cannot happen for valid JSON data; deliver the text rather than nothing.
			frame, _ = encodeEnvelope(d.channel, d.ids.next(now), server, now.UnixMilli(), json.RawMessage(`null`))
		}
		d.jsonFrame = frame
	})
	return d.jsonFrame
}

// rawForm is the text raw-protocol clients receive: a backend's payload as
// is, an envelope's data (a JSON string's content, otherwise the JSON text).
func (d *delivery) rawForm() []byte {
	d.rawOnce.Do(func() {
		e, ok := envelope{}, false
		if d.stamped {
			e, ok = parseEnvelope(d.channel, d.payload)
		}
		if !ok {
			d.rawFrame = d.payload
			if !utf8.Valid(d.payload) {
				// A backend's bytes must not make the client drop the connection.
				d.rawFrame = []byte(strings.ToValidUTF8(string(d.payload), "\uFFFD"))
			}
			return
		}
		var s string
		if len(e.Data) > 0 && e.Data[0] == '"' && json.Unmarshal(e.Data, &s) == nil {
			d.rawFrame = []byte(s)
			return
		}
		d.rawFrame = e.Data
	})
	return d.rawFrame
}
