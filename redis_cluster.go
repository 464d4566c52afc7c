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

// clusterBroker is the broker of a Redis Cluster. Publishes, history and
// presence go through the cluster client as they go through a single Redis,
// but with sharded pub/sub: SPUBLISH and SSUBSCRIBE, so that a message
// travels within the shard that owns its channel's slot instead of being
// copied to every node of the cluster (what PUBLISH does there).
//
// Subscriptions are kept here rather than in one go-redis PubSub: the PubSub
// of ClusterClient.SSubscribe is one connection, to the owner of its first
// channel's slot, and when it reconnects it resubscribes all its channels in
// one SSUBSCRIBE, which Redis refuses (CROSSSLOT) as soon as they span more
// than one slot. So the broker holds one pub/sub connection per master
// (shard), whatever the number of channels, sends one SSUBSCRIBE per
// channel, and when a shard's connection fails, Redis answers MOVED or
// CROSSSLOT, or Redis unsubscribes a channel whose slot moved away
// (resharding), it looks the slots' owners up again and resubscribes the
// shard's channels where they now live: a failover inside the cluster and a
// resharding are followed within go-redis's cluster state reload, a few
// hundred milliseconds.
type clusterBroker struct {
	*redisBroker // publishing (sharded), history, confirmation waiters
	cluster      *redis.ClusterClient

	// deliverMu makes the shards' receive loops take turns calling the hub,
	// which expects its deliveries and resyncs from one goroutine at a time.
	deliverMu sync.Mutex

	ctx   context.Context // cancelled by Close
	loops sync.WaitGroup

	// mu guards the bookkeeping below and is held while the SSUBSCRIBE and
	// SUNSUBSCRIBE commands that follow it are written, so Redis sees them
	// in the order the bookkeeping changed.
	mu       sync.Mutex
	closed   bool
	shards   map[string]*shardSubscription // by master address
	channels map[string]*shardSubscription // by Redis channel: the shard it is subscribed on
}

// shardSubscription is the pub/sub connection to one master, and the
// channels subscribed on it.
type shardSubscription struct {
	addr   string
	node   *redis.Client // the master's client, owned by the cluster client
	pubsub *redis.PubSub // replaced when the shard is resubscribed
	count  int           // channels subscribed on it
	// movedIn are channels moved here from another shard: messages
	// published on them in between reached no one here, so once Redis
	// confirms one's subscription the hub reads what it missed from history.
	movedIn map[string]struct{}
}

func newClusterBroker(cluster *redis.ClusterClient, prefix string, ids *idGenerator, log *zap.Logger, deliver deliverFunc, restored func()) (*clusterBroker, error) {
	batched, err := newPublishPipeline(cluster)
	if err != nil {
		return nil, err
	}
	ctx, stop := context.WithCancel(context.Background())
	loopDone := make(chan struct{})
	close(loopDone) // the embedded broker runs no receive loop of its own
	b := &clusterBroker{
		redisBroker: &redisBroker{
			client:   cluster,
			batched:  batched,
			prefix:   prefix,
			sharded:  true,
			deliver:  deliver,
			restored: restored,
			ids:      ids,
			log:      log,
			waiters:  make(map[string][]chan struct{}),
			stop:     stop,
			loopDone: loopDone,
		},
		cluster:  cluster,
		ctx:      ctx,
		shards:   make(map[string]*shardSubscription),
		channels: make(map[string]*shardSubscription),
	}
	return b, nil
}

func (b *clusterBroker) Subscribe(ctx context.Context, channel string) error {
	key := b.prefix + channel
	return b.awaitSubscription(ctx, key, "SSUBSCRIBE",
		func(ctx context.Context) error { return b.subscribe(ctx, key) },
		func(ctx context.Context) { _ = b.Unsubscribe(ctx, channel) })
}

// subscribe sends SSUBSCRIBE for key to the master of its slot.
func (b *clusterBroker) subscribe(ctx context.Context, key string) error {
	master, err := b.cluster.MasterForKey(ctx, key)
	if err != nil {
		return fmt.Errorf("finding the master of its slot: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errBrokerClosed
	}
	if b.channels[key] != nil {
		// Subscribed already (by a resubscribe racing with a failed
		// attempt); a second SSUBSCRIBE still confirms.
		return b.channels[key].pubsub.SSubscribe(ctx, key)
	}
	s := b.shardLocked(master)
	b.channels[key] = s
	s.count++
	return s.pubsub.SSubscribe(ctx, key)
}

// shardLocked returns the subscription of master, starting it if needed;
// b.mu is held.
func (b *clusterBroker) shardLocked(master *redis.Client) *shardSubscription {
	addr := master.Options().Addr
	s := b.shards[addr]
	if s == nil {
		s = &shardSubscription{addr: addr, node: master, pubsub: master.SSubscribe(b.ctx)}
		b.shards[addr] = s
		b.loops.Add(1)
		go b.receiveLoop(s)
	}
	return s
}

func (b *clusterBroker) Unsubscribe(ctx context.Context, channel string) error {
	key := b.prefix + channel
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.channels[key]
	if s == nil {
		return nil
	}
	delete(b.channels, key)
	delete(s.movedIn, key)
	s.count--
	if err := s.pubsub.SUnsubscribe(ctx, key); err != nil {
		// The shard forgets it all the same: a resubscribe will not bring
		// it back.
		return fmt.Errorf("redis SUNSUBSCRIBE %s: %w", key, err)
	}
	return nil
}

func (b *clusterBroker) Close() error {
	b.stop()
	b.mu.Lock()
	b.closed = true
	var errs []error
	for _, s := range b.shards {
		if err := s.pubsub.Close(); err != nil && !errors.Is(err, redis.ErrClosed) {
			errs = append(errs, err)
		}
	}
	b.mu.Unlock()
	b.loops.Wait()
	return errors.Join(errs...)
}

// receiveLoop reads one shard's pub/sub connection until the broker closes
// or the shard has no channel left after a resubscribe.
func (b *clusterBroker) receiveLoop(s *shardSubscription) {
	defer b.loops.Done()
	const minBackoff, maxBackoff = 50 * time.Millisecond, 500 * time.Millisecond
	backoff := minBackoff
	var outageSince time.Time
	for {
		b.mu.Lock()
		pubsub := s.pubsub
		b.mu.Unlock()
		msg, err := pubsub.ReceiveTimeout(b.ctx, receiveIdle)
		if sub, ok := msg.(*redis.Subscription); ok && err == nil && sub.Kind == "sunsubscribe" && b.wanted(s, sub.Channel) {
			// Redis unsubscribes a shard channel's subscribers when its
			// slot moves to another shard (resharding): follow it there.
			err = fmt.Errorf("redis dropped the subscription to %s: its slot moved", sub.Channel)
		}
		if err != nil {
			if b.ctx.Err() != nil {
				return
			}
			var netErr net.Error
			if errors.As(err, &netErr) && netErr.Timeout() {
				_ = pubsub.Ping(b.ctx)
				continue
			}
			// The connection failed (the master may be gone), Redis refused
			// a subscription (MOVED, CROSSSLOT) or dropped one: look the
			// owners up again, once go-redis has reloaded the cluster's state.
			if outageSince.IsZero() {
				outageSince = time.Now()
				b.log.Warn("redis cluster pub/sub connection lost or refused; resubscribing its channels",
					zap.String("shard", s.addr), zap.Error(err))
			}
			b.cluster.ReloadState(b.ctx)
			select {
			case <-b.ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, maxBackoff)
			if !b.resubscribe(s) {
				return
			}
			continue
		}
		backoff = minBackoff
		if !outageSince.IsZero() {
			b.log.Info("redis cluster pub/sub connection restored",
				zap.String("shard", s.addr), zap.Duration("outage", time.Since(outageSince)))
			moduleMetrics().brokerReconnects.Inc()
			outageSince = time.Time{}
			b.runRestored()
		}
		switch m := msg.(type) {
		case *redis.Message:
			channel, ok := strings.CutPrefix(m.Channel, b.prefix)
			if !ok {
				continue
			}
			b.deliverMu.Lock()
			b.deliver(channel, []byte(m.Payload))
			b.deliverMu.Unlock()
		case *redis.Subscription:
			if m.Kind == "ssubscribe" {
				b.confirm(m.Channel)
				if b.confirmedMove(s, m.Channel) {
					b.runRestored()
				}
			}
		}
	}
}

// runRestored lets the hub deliver from history what its channels missed
// while they were not subscribed, in turn with the other shards' deliveries.
func (b *clusterBroker) runRestored() {
	if b.restored == nil {
		return
	}
	b.deliverMu.Lock()
	defer b.deliverMu.Unlock()
	b.restored()
}

// confirmedMove reports whether key's subscription, just confirmed on s,
// is that of a channel moved from another shard (once).
func (b *clusterBroker) confirmedMove(s *shardSubscription, key string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := s.movedIn[key]; !ok {
		return false
	}
	delete(s.movedIn, key)
	return true
}

// wanted reports whether key is still to be subscribed on s.
func (b *clusterBroker) wanted(s *shardSubscription, key string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.channels[key] == s
}

// resubscribe replaces s's connection and subscribes each of its channels
// on the master that owns the channel's slot now, s or another. It reports
// whether s still has channels (else it is dropped, and its loop ends).
func (b *clusterBroker) resubscribe(s *shardSubscription) bool {
	ctx, cancel := context.WithTimeout(b.ctx, b.brokerTimeout())
	defer cancel()
	b.mu.Lock()
	var keys []string
	for key, at := range b.channels {
		if at == s {
			keys = append(keys, key)
		}
	}
	b.mu.Unlock()
	// Owners are looked up without the lock: it may take a round trip.
	owners := make(map[string]*redis.Client, len(keys))
	for _, key := range keys {
		if master, err := b.cluster.MasterForKey(ctx, key); err == nil {
			owners[key] = master
		}
	}

	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	_ = s.pubsub.Close()
	s.pubsub = s.node.SSubscribe(b.ctx)
	var failed error
	// The channels of s now, not the snapshot: a Subscribe may have added
	// one meanwhile, on the connection just closed.
	for key, at := range b.channels {
		if at != s {
			continue
		}
		target := s
		if master := owners[key]; master != nil && master.Options().Addr != s.addr {
			target = b.shardLocked(master)
			s.count--
			target.count++
			b.channels[key] = target
			if target.movedIn == nil {
				target.movedIn = make(map[string]struct{})
			}
			target.movedIn[key] = struct{}{}
		}
		if err := target.pubsub.SSubscribe(ctx, key); err != nil && failed == nil {
			failed = err
		}
	}
	if failed != nil {
		b.log.Debug("resubscribing shard channels", zap.String("shard", s.addr), zap.Error(failed))
	}
	if s.count > 0 || failed != nil {
		return true
	}
	// Every channel lives elsewhere now (the master failed over or gave
	// its slots away): the shard's connection is not needed.
	_ = s.pubsub.Close()
	delete(b.shards, s.addr)
	return false
}

// brokerTimeout bounds a resubscribe's lookups and writes.
func (b *clusterBroker) brokerTimeout() time.Duration {
	if d := b.cluster.Options().WriteTimeout; d > 0 {
		return 2 * d
	}
	return 5 * time.Second
}
