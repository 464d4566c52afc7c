package caddychat

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"strconv"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// The envelope: what travels through the broker, encoded and decoded here
// alone. A node publishes stamped payloads: a message's envelope (a kept
// message's carries the id history gave it and the channel's epoch) or a
// presence event; anything else is a backend's plain payload. The frames
// clients send and receive are in protocol.go.

// What a node vouches for. Anyone with Redis access can PUBLISH anything on
// a channel, and clients choose the bytes of what they publish; neither may
// pass for the node. So every payload a node or its Redis scripts publish
// starts with nodeStamp, and only a stamped payload is read for a message id,
// an epoch or a presence event. An unstamped payload is a backend's message:
// delivered as data, with a node-local id, marked as the server's.

// nodeStamp starts every payload that nodes publish: an ASCII record
// separator, which no JSON text and no ordinary text begins with, then a
// version. A backend's plain PUBLISH never carries it by accident.
const nodeStamp = "\x1ecc1\x1e"

// nodeStampLua is nodeStamp as a Lua string literal (decimal escapes), for
// the scripts that publish presence events.
const nodeStampLua = `'\30cc1\30'`

// stamped returns body with the stamp in front, as it travels through the broker.
func stamped(body []byte) []byte {
	out := make([]byte, 0, len(nodeStamp)+len(body))
	out = append(out, nodeStamp...)
	return append(out, body...)
}

// unstamp splits a broker payload into what follows the stamp and whether
// it was there.
func unstamp(payload []byte) (body []byte, ok bool) {
	return bytes.CutPrefix(payload, []byte(nodeStamp))
}

// envelope is a published message as JSON-protocol clients receive it; it
// travels through the broker stamped (nodeStamp), and a node forwards the
// bytes after the stamp unchanged.
type envelope struct {
	Type    string `json:"type"`
	Channel string `json:"channel"`
	ID      string `json:"id"`
	Epoch   string `json:"epoch,omitempty"`
	sender
	TS   int64           `json:"ts"`
	Data json.RawMessage `json:"data"`
}

// sender is who a message comes from, in the envelope's words: "from" is
// the authenticated user, empty otherwise; "anonymous" marks a client
// without a token and "server" a backend. No client can produce "server".
type sender struct {
	User      string `json:"from"`
	Anonymous bool   `json:"anonymous,omitempty"`
	Server    bool   `json:"server,omitempty"`
	// Guest and Name: an anonymous client's guest id (made by its node) and
	// the display name it picked, on routes with guest_names (guest.go).
	Guest string `json:"guest,omitempty"`
	Name  string `json:"name,omitempty"`
	// Info: what the connect hook said of the sender (name, avatar...).
	Info json.RawMessage `json:"info,omitempty"`
}

const envelopeType = "message"

func encodeEnvelope(channel, id string, from sender, ts int64, data json.RawMessage) ([]byte, error) {
	return json.Marshal(envelope{Type: envelopeType, Channel: channel, ID: id, sender: from, TS: ts, Data: data})
}

// parseEnvelope decodes a node's envelope for channel (the payload after
// the stamp); ok is false for anything else.
func parseEnvelope(channel string, payload []byte) (envelope, bool) {
	var e envelope
	if len(payload) == 0 || payload[0] != '{' || !utf8.Valid(payload) {
		return e, false
	}
	if err := json.Unmarshal(payload, &e); err != nil {
		return e, false
	}
	ok := e.Type == envelopeType && e.Channel == channel && e.ID != "" && len(e.Data) > 0
	return e, ok
}

// idGenerator makes message ids unique across nodes without coordination:
// <unix ms>-<node>-<sequence>.
type idGenerator struct {
	node string
	seq  atomic.Uint64
}

func (g *idGenerator) next(now time.Time) string {
	buf := make([]byte, 0, 40)
	buf = strconv.AppendInt(buf, now.UnixMilli(), 10)
	buf = append(buf, '-')
	buf = append(buf, g.node...)
	buf = append(buf, '-')
	buf = strconv.AppendUint(buf, g.seq.Add(1), 10)
	return string(buf)
}

// payload encodes msg as it travels through the broker, with the id it
// gets: stamped, since the node vouches for it (nodeStamp).
func (msg Publication) payload(id string, now time.Time) ([]byte, error) {
	if msg.event {
		return stamped(msg.Raw), nil
	}
	if msg.Ephemeral {
		return msg.ephemeralPayload(now)
	}
	data, err := msg.historyData()
	if err != nil {
		return nil, err
	}
	env, err := encodeEnvelope(msg.Channel, id, msg.sender(), now.UnixMilli(), data)
	if err != nil {
		return nil, err
	}
	return stamped(env), nil
}

// sender is who msg's envelope names as its sender.
func (msg Publication) sender() sender {
	s := sender{User: msg.From, Anonymous: msg.Origin == originAnonymous, Server: msg.Origin == originServer}
	if s.Anonymous {
		s.Guest, s.Name = msg.Guest, msg.Name
	}
	if msg.Origin != originServer {
		s.Info = msg.Info
	}
	return s
}

// Envelopes of kept messages are built from a head naming the channel, the
// id, the channel's epoch and a tail carrying sender, time and data, so that
// the Lua script that stores a message can insert the id Redis assigns.
func envelopeHead(channel string) string {
	return `{"type":"message","channel":"` + channel + `","id":"`
}

func envelopeTail(from sender, ts int64, data json.RawMessage) (string, error) {
	b, err := json.Marshal(struct {
		sender
		TS   int64           `json:"ts"`
		Data json.RawMessage `json:"data"`
	}{from, ts, data})
	if err != nil {
		return "", err
	}
	return string(b[1:]), nil // without '{': it follows the id and epoch
}

func historyEnvelope(channel string, id streamID, epoch, tail string) []byte {
	// Sized exactly: kept envelopes stay in memory for the history's age,
	// and one reallocated by the appends would keep up to a third unused.
	ids := id.String()
	const fixed = len(`{"type":"message","channel":"`) + len(`","id":"`) + len(`","epoch":"`) + len(`",`)
	b := make([]byte, 0, fixed+len(channel)+len(ids)+len(epoch)+len(tail))
	b = append(b, envelopeHead(channel)...)
	b = append(b, ids...)
	b = append(b, `","epoch":"`...)
	b = append(b, epoch...)
	b = append(b, `",`...)
	return append(b, tail...)
}

// historyData is what a kept message carries as data: a raw-protocol frame
// becomes a JSON string so that history holds envelopes only.
func (msg Publication) historyData() (json.RawMessage, error) {
	if msg.Raw == nil {
		return msg.Data, nil
	}
	return json.Marshal(string(msg.Raw))
}

func newEpoch() string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		// crypto/rand does not fail on supported platforms; a time-based
		// epoch still changes whenever the history is recreated.
		return strconv.FormatInt(time.Now().UnixNano(), 36)
	}
	return hex.EncodeToString(b[:])
}

// messageID returns the id of an envelope without decoding it (and without
// allocating: it runs once per delivered message), for the merge of live
// messages with a history read; ok is false for payloads that are not kept
// messages (a backend's plain PUBLISH, an envelope without history).
func messageID(channel string, payload []byte) (streamID, bool) {
	const head, mid = `{"type":"message","channel":"`, `","id":"`
	rest, ok := bytes.CutPrefix(payload, []byte(head))
	if !ok {
		return streamID{}, false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(channel)); !ok {
		return streamID{}, false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(mid)); !ok {
		return streamID{}, false
	}
	var id streamID
	var part *uint64 = &id.ms
	digits := 0
	for i, b := range rest {
		switch {
		case '0' <= b && b <= '9' && digits < 19:
			*part = *part*10 + uint64(b-'0')
			digits++
		case b == '-' && part == &id.ms && digits > 0:
			part, digits = &id.seq, 0
		case b == '"' && part == &id.seq && digits > 0:
			// Only kept messages carry an epoch after the id.
			return id, bytes.HasPrefix(rest[i:], []byte(`","epoch":"`))
		default:
			return streamID{}, false
		}
	}
	return streamID{}, false
}

// presenceEvent encodes a join or leave event as the Redis scripts do; user
// is a presence key (a user id, or a guest's key: guest.go), info the
// user's info (a JSON object; userinfo.go) or nil.
func presenceEvent(kind, channel, user string, info json.RawMessage) []byte {
	u, _ := json.Marshal(user)
	if guest, name, ok := parseGuestKey(user); ok {
		u = guestPresenceFields(guest, name)
	}
	b := make([]byte, 0, 50+len(channel)+len(u)+len(info))
	b = append(b, `{"type":"`...)
	b = append(b, kind...)
	b = append(b, `","channel":"`...)
	b = append(b, channel...)
	b = append(b, `","user":`...)
	b = append(b, u...)
	if len(info) > 0 {
		b = append(b, `,"info":`...)
		b = append(b, info...)
	}
	return append(b, '}')
}

// isPresenceEvent reports whether payload is a join or leave event for
// channel. It runs once per message on the fan-out path, so it decodes
// nothing: a fixed prefix naming the channel, then json.Valid
// (allocation-free) on the user.
func isPresenceEvent(channel string, payload []byte) bool {
	const join, leave, user = `{"type":"join","channel":"`, `{"type":"leave","channel":"`, `","user":`
	rest, ok := bytes.CutPrefix(payload, []byte(join))
	if !ok {
		if rest, ok = bytes.CutPrefix(payload, []byte(leave)); !ok {
			return false
		}
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(channel)); !ok {
		return false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(user)); !ok {
		return false
	}
	name, ok := bytes.CutSuffix(rest, []byte("}"))
	if !ok {
		return false
	}
	// The user's info, if any, follows the name: `,"info":{...}`.
	if i := bytes.Index(name, []byte(`,"info":{`)); i >= 0 {
		if info := name[i+len(`,"info":`):]; !json.Valid(info) {
			return false
		}
		name = name[:i]
	}
	// A guest: "","anonymous":true,"guest":"<16 hex>","name":<string>.
	const guestHead, guestName = `"","anonymous":true,"guest":"`, `","name":`
	if g, isGuest := bytes.CutPrefix(name, []byte(guestHead)); isGuest {
		if len(g) < guestIDLen || !isLowerHex(g[:guestIDLen]) {
			return false
		}
		if name, ok = bytes.CutPrefix(g[guestIDLen:], []byte(guestName)); !ok {
			return false
		}
	}
	return len(name) > 1 && name[0] == '"' && utf8.Valid(name) && json.Valid(name)
}

func isLowerHex(b []byte) bool {
	for _, c := range b {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// messageEpoch returns the epoch of a kept message's envelope (one whose id
// messageID found), without allocating.
func messageEpoch(channel string, body []byte) []byte {
	const head, key = `{"type":"message","channel":"`, `","epoch":"`
	if len(body) < len(head)+len(channel) {
		return nil
	}
	rest := body[len(head)+len(channel):]
	i := bytes.Index(rest, []byte(key))
	if i < 0 {
		return nil
	}
	rest = rest[i+len(key):]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return nil
	}
	return rest[:j]
}
