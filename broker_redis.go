package caddychat

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// The Redis broker, for a standalone Redis or the master Sentinel names
// (redis_topology.go builds the client); redis_cluster.go builds on it for
// a Redis Cluster. Its Redis history is history_redis.go.

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
	// whose subscriptions clusterBroker keeps (pubsub is nil); see redis_cluster.go.
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
	if msg.idem != nil {
		return b.publishOnce(ctx, name, payload, id, msg.idem)
	}
	if err := b.run(ctx, redis.NewIntCmd(ctx, command, name, payload)); err != nil {
		return "", fmt.Errorf("redis %s %s: %w", strings.ToUpper(command), name, err)
	}
	return id, nil
}

// submit queues a plain publish (no history, no idempotency) on the
// publish pipeline without waiting for Redis: wait waits for its answer.
// Publishes submitted in turn reach Redis in that order, so a connection
// can have several on their way and still publish in order (pipeline.go).
func (b *redisBroker) submit(ctx context.Context, msg Publication) (id string, wait func() error, err error) {
	now := time.Now()
	id = b.ids.next(now)
	payload, err := msg.payload(id, now)
	if err != nil {
		return "", nil, fmt.Errorf("encoding message: %w", err)
	}
	name, command := b.prefix+msg.Channel, "publish"
	if b.sharded {
		command = "spublish"
	}
	reply := b.batched.Submit(ctx, onceOnly{redis.NewIntCmd(ctx, command, name, payload)})
	return id, func() error {
		if err := reply.WaitContext(ctx); err != nil {
			return fmt.Errorf("redis %s %s: %w", strings.ToUpper(command), name, err)
		}
		return nil
	}, nil
}

// signal publishes a control message (control.go) as it is; Redis answers
// with the number of nodes subscribed to it.
func (b *redisBroker) signal(ctx context.Context, channel string, payload []byte) (int64, error) {
	name, command := b.prefix+channel, "publish"
	if b.sharded {
		command = "spublish"
	}
	cmd := redis.NewIntCmd(ctx, command, name, payload)
	if err := b.run(ctx, cmd); err != nil {
		return 0, fmt.Errorf("redis %s %s: %w", strings.ToUpper(command), name, err)
	}
	return cmd.Val(), nil
}

// publishOnceScript publishes a message unless its idempotency key was
// seen within its window, and records the key with the message id; a
// repeat gets the first id back and "1". KEYS: the idempotency key. ARGV:
// pub/sub name, payload, message id, window in ms.
var publishOnceScript = newPubSubScript(`
local first = redis.call('GET', KEYS[1])
if first then
	return {first, '1'}
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return {ARGV[3], '0'}
`)

// publishOnce is Publish with an idempotency key: one script instead of
// PUBLISH, so that the check, the record and the publish are atomic.
func (b *redisBroker) publishOnce(ctx context.Context, name string, payload []byte, id string, i *idempotency) (string, error) {
	cmd, err := b.runScript(ctx, publishOnceScript.get(b.sharded), []string{i.redisKey(name)},
		name, payload, id, max(i.window.Milliseconds(), 1))
	if err != nil {
		return "", fmt.Errorf("redis idempotent PUBLISH %s: %w", name, err)
	}
	res, err := cmd.StringSlice()
	if err != nil || len(res) != 2 {
		return "", fmt.Errorf("redis idempotent PUBLISH %s: unexpected reply %v (%v)", name, cmd.Val(), err)
	}
	i.duplicate = res[1] == "1"
	return res[0], nil
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
	// reached: the connection has worked once. Until then a failure means
	// Redis cannot be reached (a wrong address, a firewall, Redis not yet
	// up), not that a connection was lost, and nothing was missed.
	reached := false
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
				if reached {
					b.log.Warn("redis pub/sub connection lost; retrying", zap.Error(err))
				} else {
					b.log.Warn("cannot reach Redis for pub/sub; retrying until it answers", zap.Error(err))
				}
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
		if !outageSince.IsZero() && !reached {
			b.log.Info("reached Redis for pub/sub", zap.Duration("after", time.Since(outageSince)))
			outageSince = time.Time{}
		} else if !outageSince.IsZero() {
			b.log.Info("redis pub/sub connection restored", zap.Duration("outage", time.Since(outageSince)))
			moduleMetrics().brokerReconnects.Inc()
			outageSince = time.Time{}
			if b.restored != nil {
				b.restored()
			}
		}
		reached = true
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

// pubsubScript is a Lua script that publishes, in both forms: with PUBLISH
// for a standalone Redis or Sentinel, with SPUBLISH for a cluster. A script
// may SPUBLISH on a cluster only to a channel of the slot of its KEYS, which
// holds for every script here: their keys' hash tag is the channel's name.
type pubsubScript struct{ classic, sharded *redis.Script }

func newPubSubScript(src string) pubsubScript {
	sharded := strings.ReplaceAll(src, "redis.call('PUBLISH',", "redis.call('SPUBLISH',")
	if strings.Contains(strings.ReplaceAll(sharded, "'SPUBLISH'", ""), "PUBLISH") {
		// A PUBLISH written another way would go unnoticed on a cluster
		// (its events would reach no node): fail at start-up instead.
		panic("caddychat: a script publishes other than with redis.call('PUBLISH', ...): " + src)
	}
	return pubsubScript{classic: redis.NewScript(src), sharded: redis.NewScript(sharded)}
}

func (s pubsubScript) get(sharded bool) *redis.Script {
	if sharded {
		return s.sharded
	}
	return s.classic
}
