package caddychat

import (
	"context"
	"encoding/json"
	"errors"
)

// The broker between a hub and the other nodes. broker_memory.go serves a
// single node from process memory; broker_redis.go a standalone Redis or a
// Sentinel-watched master, redis_cluster.go a Redis Cluster. What they
// carry is encoded in envelope.go.

// Broker carries published messages between the nodes of a deployment. A hub
// owns one broker and is its only caller: it subscribes a channel when the
// first local client wants it and unsubscribes when the last one leaves.
//
// Incoming messages reach the hub through the deliverFunc given to the
// broker's constructor, called from one goroutine per broker, in the order
// the broker received them; it never blocks.
type Broker interface {
	// Publish sends msg to every node subscribed to its channel and returns
	// the message id the broker assigned.
	Publish(ctx context.Context, msg Publication) (id string, err error)
	// Subscribe makes this node receive the channel's messages. It returns once
	// the subscription is active, so a message published after it returns is
	// delivered.
	Subscribe(ctx context.Context, channel string) error
	// Unsubscribe stops the channel's messages for this node.
	Unsubscribe(ctx context.Context, channel string) error
	// Close releases the broker's connections and stops its goroutines.
	Close() error
	// signal publishes payload as it is on channel, one of the node's
	// control channels (control.go), and reports how many nodes got it.
	signal(ctx context.Context, channel string, payload []byte) (receivers int64, err error)

	historyStore
}

// deliverFunc hands one message of channel to the hub. payload is either the
// module's envelope or a backend's plain payload.
type deliverFunc func(channel string, payload []byte)

// Publication is a message to publish.
type Publication struct {
	Channel string
	// From is the sender as authenticated by the node; empty for anonymous.
	From string
	// Origin says whether From is a user, an anonymous client or a backend.
	Origin origin
	// Guest and Name: an anonymous publisher's guest id and name (guest.go).
	Guest, Name string
	// Info is what the connect hook said of the sender (a small JSON
	// object), carried by the envelope.
	Info json.RawMessage
	// Data is the JSON value of a JSON-protocol publish.
	Data json.RawMessage
	// Raw, when set, is a raw-protocol text frame: it travels as an
	// envelope whose data is the text as a JSON string, so JSON clients see
	// who sent it and raw clients get the text back.
	Raw []byte
	// History, when set, keeps the message in the channel's history, and
	// its id is the history's.
	History *historyPolicy
	// Ephemeral: delivered to the current subscribers but the publishing
	// connection (conn), never kept (ephemeral.go). History and idem are nil.
	Ephemeral bool
	// event marks Raw as the node's own presence event, published as it is.
	event bool
	// newHistory, when set, says whether the publish may create the
	// channel's history (history_new_channels; see history_limit.go).
	newHistory *historyCreation
	// idem, when set, makes the publish idempotent (idempotency.go): a
	// repeat within its window delivers nothing, returns the first id and
	// sets idem.duplicate.
	idem *idempotency
	// conn is the publishing connection's id and path the request path of
	// the connection or HTTP publish, for the webhook event (and conn for
	// skipping the sender of an ephemeral publish).
	conn, path string
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

var errBrokerClosed = errors.New("broker is closed")
