package caddychat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

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
	// Data is the JSON value of a JSON-protocol publish.
	Data json.RawMessage
	// Raw, when set, is a raw-protocol text frame: it travels as an
	// envelope whose data is the text as a JSON string, so JSON clients see
	// who sent it and raw clients get the text back.
	Raw []byte
	// History, when set, keeps the message in the channel's history, and
	// its id is the history's.
	History *historyPolicy
	// event marks Raw as the node's own presence event, published as it is.
	event bool
	// newHistory, when set, says whether the publish may create the
	// channel's history (history_new_channels; see history_limit.go).
	newHistory *historyCreation
}

// payload encodes msg as it travels through the broker, with the id it
// gets: stamped, since the node vouches for it (trust.go).
func (msg Publication) payload(id string, now time.Time) ([]byte, error) {
	if msg.event {
		return stamped(msg.Raw), nil
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
	return s
}

// memoryBroker serves a single node from process memory.
type memoryBroker struct {
	deliver deliverFunc
	ids     *idGenerator

	// mu serialises publishes so that every subscriber sees one order, and
	// history ids follow it.
	mu         sync.Mutex
	subscribed map[string]bool
	closed     bool
	lastSweep  time.Time

	memoryHistory
}

// historySweepEvery is how often expired in-memory histories are deleted.
const historySweepEvery = time.Minute

func newMemoryBroker(ids *idGenerator, deliver deliverFunc) *memoryBroker {
	return &memoryBroker{deliver: deliver, ids: ids, subscribed: make(map[string]bool)}
}

func (b *memoryBroker) Publish(_ context.Context, msg Publication) (string, error) {
	now := time.Now()
	if msg.History != nil {
		return b.publishKept(msg, now)
	}
	id := b.ids.next(now)
	payload, err := msg.payload(id, now)
	if err != nil {
		return "", fmt.Errorf("encoding message: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return "", errBrokerClosed
	}
	if b.subscribed[msg.Channel] {
		b.deliver(msg.Channel, payload)
	}
	return id, nil
}

// publishKept keeps msg in its channel's ring and delivers it, under the
// publish lock, so history order is delivery order.
func (b *memoryBroker) publishKept(msg Publication, now time.Time) (string, error) {
	data, err := msg.historyData()
	if err != nil {
		return "", fmt.Errorf("encoding message: %w", err)
	}
	tail, err := envelopeTail(msg.sender(), now.UnixMilli(), data)
	if err != nil {
		return "", fmt.Errorf("encoding message: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return "", errBrokerClosed
	}
	if now.Sub(b.lastSweep) > historySweepEvery {
		b.memoryHistory.sweep(now)
		b.lastSweep = now
	}
	id, payload, err := b.memoryHistory.append(msg.Channel, msg.History, now, tail, msg.newHistory)
	if err != nil {
		return "", err
	}
	if b.subscribed[msg.Channel] {
		b.deliver(msg.Channel, stamped(payload))
	}
	return id.String(), nil
}

func (b *memoryBroker) Subscribe(_ context.Context, channel string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errBrokerClosed
	}
	b.subscribed[channel] = true
	return nil
}

func (b *memoryBroker) Unsubscribe(_ context.Context, channel string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.subscribed, channel)
	return nil
}

func (b *memoryBroker) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	b.memoryHistory.clear()
	return nil
}

var errBrokerClosed = errors.New("broker is closed")

// redisBroker bridges channels to Redis Pub/Sub through one pub/sub connection
// per node, whatever the number of channels and clients.
type redisBroker struct {
	client redis.UniversalClient
	// batched carries publishes: concurrent PUBLISH calls from every
	// connection of the node share pipelined round trips instead of each
	// holding a pooled connection for its own, so under load a node makes a
	// few Redis writes per batch rather than one per message, and a burst no
	// longer waits for a free pool connection.
	batched *redis.AutoPipeliner
	pubsub  *redis.PubSub
	prefix  string
	deliver deliverFunc
	ids     *idGenerator
	log     *zap.Logger
	// restored runs on the receive goroutine when the subscription
	// connection is back after an outage, before any newer message.
	restored func()

	// waiters are the Subscribe calls waiting for Redis to confirm, by Redis channel.
	waitersMu sync.Mutex
	waiters   map[string][]chan struct{}

	stop     context.CancelFunc
	loopDone chan struct{}

	// sharded: a Redis Cluster's broker, which publishes with SPUBLISH and
	// whose subscriptions clusterBroker keeps (pubsub is nil); see cluster.go.
	sharded bool
}

// maxQueuedPublishes bounds the publishes a node has sent to Redis and not
// yet had answered: past it (Redis stalled or gone, publishers piling up) a
// publish is refused at once as unavailable instead of holding memory.
const maxQueuedPublishes = 10000

// receiveIdle is how long the receive loop waits for a message before it
// pings Redis, so that a silently dead connection is noticed.
const receiveIdle = 15 * time.Second

func newRedisBroker(client redis.UniversalClient, prefix string, ids *idGenerator, log *zap.Logger, deliver deliverFunc, restored func()) (*redisBroker, error) {
	batched, err := newPublishPipeline(client)
	if err != nil {
		return nil, err
	}
	ctx, stop := context.WithCancel(context.Background())
	b := &redisBroker{
		client:   client,
		batched:  batched,
		pubsub:   client.Subscribe(ctx),
		prefix:   prefix,
		deliver:  deliver,
		restored: restored,
		ids:      ids,
		log:      log,
		waiters:  make(map[string][]chan struct{}),
		stop:     stop,
		loopDone: make(chan struct{}),
	}
	go b.receiveLoop(ctx)
	return b, nil
}

func (b *redisBroker) Publish(ctx context.Context, msg Publication) (string, error) {
	now := time.Now()
	if msg.History != nil {
		return b.publishKept(ctx, msg, now)
	}
	id := b.ids.next(now)
	payload, err := msg.payload(id, now)
	if err != nil {
		return "", fmt.Errorf("encoding message: %w", err)
	}
	name, command := b.prefix+msg.Channel, "publish"
	if b.sharded {
		command = "spublish"
	}
	if err := b.run(ctx, redis.NewIntCmd(ctx, command, name, payload)); err != nil {
		return "", fmt.Errorf("redis %s %s: %w", strings.ToUpper(command), name, err)
	}
	return id, nil
}

func newPublishPipeline(client redis.UniversalClient) (*redis.AutoPipeliner, error) {
	batched, err := client.AsyncAutoPipelineWithOptions(&redis.AutoPipelineOptions{MaxQueuedCommands: maxQueuedPublishes})
	if err != nil {
		return nil, fmt.Errorf("starting the redis publish pipeline: %w", err)
	}
	return batched, nil
}

// run sends cmd through the publish pipeline and waits for its reply until
// ctx ends. The pipeline does not watch a queued command's context, so the
// wait does: a publish never outlasts publish_timeout, even while a stalled
// Redis holds the batch it is in.
func (b *redisBroker) run(ctx context.Context, cmd redis.Cmder) error {
	return b.batched.Submit(ctx, onceOnly{cmd}).WaitContext(ctx)
}

// onceOnly keeps the pipeline from retrying a publish. A batch retried after
// a read timeout would run twice once a stalled Redis resumes (the first
// copy was already written to it), and every subscriber would get the
// message twice; a publish that fails is answered unavailable instead, and
// the client decides.
type onceOnly struct{ redis.Cmder }

func (onceOnly) NoRetry() bool { return true }

// runScript runs script (EVALSHA) through the publish pipeline. A Redis
// that does not have the script yet (first use, a restart, a failover: the
// script cache is not replicated) is given it, and the call is made again.
func (b *redisBroker) runScript(ctx context.Context, script *redis.Script, keys []string, args ...any) (*redis.Cmd, error) {
	cmdArgs := make([]any, 0, 3+len(keys)+len(args))
	cmdArgs = append(cmdArgs, "evalsha", script.Hash(), len(keys))
	for _, k := range keys {
		cmdArgs = append(cmdArgs, k)
	}
	cmdArgs = append(cmdArgs, args...)
	for loaded := false; ; loaded = true {
		cmd := redis.NewCmd(ctx, cmdArgs...)
		err := b.run(ctx, cmd)
		if err == nil {
			return cmd, nil
		}
		if loaded || !redis.HasErrorPrefix(err, "NOSCRIPT") {
			return nil, err
		}
		if err := script.Load(ctx, b.client).Err(); err != nil {
			return nil, fmt.Errorf("loading the script: %w", err)
		}
	}
}

func (b *redisBroker) Subscribe(ctx context.Context, channel string) error {
	key := b.prefix + channel
	// go-redis keeps a failed channel in its list and would subscribe it on
	// the next reconnect: take it out, nobody here wants it.
	return b.awaitSubscription(ctx, key, "SUBSCRIBE",
		func(ctx context.Context) error { return b.pubsub.Subscribe(ctx, key) },
		func(ctx context.Context) { _ = b.pubsub.Unsubscribe(ctx, key) })
}

// awaitSubscription sends a subscription to key and waits until Redis
// confirms it (the receive loop calls confirm) or ctx ends. A subscription
// that failed or was not confirmed in time is undone.
func (b *redisBroker) awaitSubscription(ctx context.Context, key, command string, send func(context.Context) error, undo func(context.Context)) error {
	confirmed := make(chan struct{})
	b.waitersMu.Lock()
	b.waiters[key] = append(b.waiters[key], confirmed)
	b.waitersMu.Unlock()

	err := send(ctx)
	if err == nil {
		select {
		case <-confirmed:
			return nil
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	b.dropWaiter(key, confirmed)
	undoCtx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	undo(undoCtx)
	return fmt.Errorf("redis %s %s: %w", command, key, err)
}

func (b *redisBroker) dropWaiter(key string, w chan struct{}) {
	b.waitersMu.Lock()
	defer b.waitersMu.Unlock()
	list := b.waiters[key]
	for i, x := range list {
		if x == w {
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(b.waiters, key)
	} else {
		b.waiters[key] = list
	}
}

func (b *redisBroker) confirm(key string) {
	b.waitersMu.Lock()
	defer b.waitersMu.Unlock()
	for _, w := range b.waiters[key] {
		close(w)
	}
	delete(b.waiters, key)
}

func (b *redisBroker) Unsubscribe(ctx context.Context, channel string) error {
	// go-redis forgets the channel even when Redis cannot be told now, so a
	// reconnect will not bring it back.
	if err := b.pubsub.Unsubscribe(ctx, b.prefix+channel); err != nil {
		return fmt.Errorf("redis UNSUBSCRIBE %s: %w", b.prefix+channel, err)
	}
	return nil
}

func (b *redisBroker) Close() error {
	b.stop()
	err := b.pubsub.Close()
	<-b.loopDone
	return err
}

// receiveLoop reads the pub/sub connection for the broker's lifetime. go-redis
// reconnects and resubscribes every channel on the next read after an error,
// so the loop only has to keep reading, with a short backoff while Redis is
// unreachable.
func (b *redisBroker) receiveLoop(ctx context.Context) {
	defer close(b.loopDone)
	const minBackoff, maxBackoff = 50 * time.Millisecond, 500 * time.Millisecond
	backoff := minBackoff
	var outageSince time.Time
	for {
		msg, err := b.pubsub.ReceiveTimeout(ctx, receiveIdle)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, redis.ErrClosed) {
				return
			}
			var netErr net.Error
			if errors.As(err, &netErr) && netErr.Timeout() {
				// Idle: a ping proves the connection is alive (or breaks it).
				_ = b.pubsub.Ping(ctx)
				continue
			}
			if outageSince.IsZero() {
				outageSince = time.Now()
				b.log.Warn("redis pub/sub connection lost; retrying", zap.Error(err))
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, maxBackoff)
			continue
		}
		backoff = minBackoff
		if !outageSince.IsZero() {
			b.log.Info("redis pub/sub connection restored", zap.Duration("outage", time.Since(outageSince)))
			moduleMetrics().brokerReconnects.Inc()
			outageSince = time.Time{}
			if b.restored != nil {
				b.restored()
			}
		}
		switch m := msg.(type) {
		case *redis.Message:
			channel, ok := strings.CutPrefix(m.Channel, b.prefix)
			if !ok {
				continue
			}
			b.deliver(channel, []byte(m.Payload))
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				b.confirm(m.Channel)
			}
		}
	}
}
