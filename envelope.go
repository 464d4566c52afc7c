package caddychat

import "bytes"

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

// origin is who a message comes from, as the node knows it.
type origin uint8

const (
	// originUser: a client authenticated as Publication.From.
	originUser origin = iota
	// originAnonymous: a client without a token. Envelopes say
	// "anonymous":true, the same on every node.
	originAnonymous
	// originServer: a backend (a plain Redis PUBLISH, or the publish
	// endpoint with publish_key). Envelopes say "server":true, which only
	// a node writes, and never for what a client sent.
	originServer
)

// originOf is the origin of what a connection with identity id publishes.
func originOf(id *identity) origin {
	if id.server {
		return originServer
	}
	if id.anonymous {
		return originAnonymous
	}
	return originUser
}
