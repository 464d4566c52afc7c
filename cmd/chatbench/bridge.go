package main

// baseline-rooms-redis: the bare servers of baseline-rooms, K of them,
// bridged through Redis the way caddychat's nodes are. baseline-rooms
// broadcasts in process, so rooms' ratio to it mixes the Redis hop with
// caddychat's own cost; this baseline pays the Redis hop and little else.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// bridgePrefix is put before every channel the bridged servers publish and
// subscribe to in Redis.
const bridgePrefix = "chatbench-bridge:"

// errNoBridgeRedis: the bridged baseline has no Redis to go through.
var errNoBridgeRedis = errors.New("-scenario baseline-rooms-redis needs -bridge-redis, the Redis the bridged bare servers publish and subscribe through (e.g. -bridge-redis redis://127.0.0.1:6379/0)")

// runBridgedBaseline runs the rooms measurement against cfg.bridgeNodes bare
// servers, each a child process of this binary bridged through Redis at
// cfg.bridgeRedis. Client i is on server i mod K, so a room spans servers.
func runBridgedBaseline(ctx context.Context, cfg *config, name string) (*scenarioResult, error) {
	res := &scenarioResult{Scenario: name}
	if cfg.bridgeRedis == "" {
		return res, errNoBridgeRedis
	}
	var urls []string
	var pids []int
	for k := range cfg.bridgeNodes {
		url, pid, stop, err := startBaselineChild(baselineQueue, cfg.bridgeRedis)
		if err != nil {
			return res, fmt.Errorf("bridged server %d of %d: %v", k+1, cfg.bridgeNodes, err)
		}
		defer stop()
		urls, pids = append(urls, url), append(pids, pid)
	}
	logf(cfg, "[%s] %d servers in child processes %v on %v, bridged through %s", name, len(urls), pids, urls, cfg.bridgeRedis)
	res, err := runRooms(ctx, cfg, name, urls, pids)
	res.Server = fmt.Sprintf("%d child processes %v bridged through Redis", len(pids), pids)
	return res, err
}

// bridge connects one bare server to Redis. A publish goes through
// go-redis's asynchronous autopipeline (as caddychat's publish pipeline,
// newPublishPipeline in broker_redis.go) and is answered ok only once Redis
// answered it; the server holds one SUBSCRIBE per channel it has members
// in, confirmed by Redis before a member's subscribe is answered ok, and
// delivers what Redis sends on it to its members.
type bridge struct {
	client  *redis.Client
	pipe    *redis.AutoPipeliner
	ps      *redis.PubSub
	deliver func(channel string, frame []byte)
	ctx     context.Context
	cancel  context.CancelFunc
	done    chan struct{} // the receive loop ended

	mu   sync.Mutex // also held while a SUBSCRIBE or UNSUBSCRIBE is sent, to keep them in order
	subs map[string]*bridgeSub
}

// bridgeSub is a channel the server has members in.
type bridgeSub struct {
	members   int
	ready     chan struct{} // closed when Redis confirmed the SUBSCRIBE
	confirmed bool
}

// bridgeAck is a publish waiting for Redis, and its two possible answers.
type bridgeAck struct {
	reply   redis.AutoFuture
	ok, err []byte
}

// maxPendingAcks bounds a connection's publishes waiting for Redis, as
// caddychat's maxPipelinedPublishes does; past it the reader waits.
const maxPendingAcks = 64

// bridgeTimeout bounds a subscription's confirmation and a publish's answer.
const bridgeTimeout = 10 * time.Second

func newBridge(redisURL string, deliver func(channel string, frame []byte)) (*bridge, error) {
	opt, err := redis.ParseURL(redisURL)
	if err != nil {
		return nil, fmt.Errorf("-bridge-redis: %w", err)
	}
	client := redis.NewClient(opt)
	pctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := client.Ping(pctx).Err(); err != nil {
		client.Close()
		return nil, fmt.Errorf("bridge: Redis at %s: %w", redisURL, err)
	}
	// The same options as caddychat's publish pipeline.
	pipe, err := client.AsyncAutoPipelineWithOptions(&redis.AutoPipelineOptions{MaxQueuedCommands: 10000})
	if err != nil {
		client.Close()
		return nil, fmt.Errorf("bridge: starting the publish pipeline: %w", err)
	}
	ctx, stop := context.WithCancel(context.Background())
	b := &bridge{client: client, pipe: pipe, ps: client.Subscribe(ctx), deliver: deliver, ctx: ctx, cancel: stop,
		done: make(chan struct{}), subs: map[string]*bridgeSub{}}
	go b.receive()
	return b, nil
}

func (b *bridge) close() {
	b.cancel()
	b.ps.Close()
	<-b.done
	b.pipe.Close()
	b.client.Close()
}

// receive delivers what Redis sends on the subscriptions and confirms them.
func (b *bridge) receive() {
	defer close(b.done)
	for {
		msg, err := b.ps.Receive(b.ctx)
		if err != nil {
			if b.ctx.Err() != nil || errors.Is(err, redis.ErrClosed) {
				return
			}
			select { // go-redis reconnects on the next call
			case <-b.ctx.Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		switch m := msg.(type) {
		case *redis.Message:
			if channel, ok := strings.CutPrefix(m.Channel, bridgePrefix); ok {
				b.deliver(channel, []byte(m.Payload))
			}
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				b.mu.Lock()
				if s := b.subs[strings.TrimPrefix(m.Channel, bridgePrefix)]; s != nil && !s.confirmed {
					s.confirmed = true
					close(s.ready)
				}
				b.mu.Unlock()
			}
		}
	}
}

// join counts a member of channel and returns once the server's one
// subscription to it is confirmed: the first member sends the SUBSCRIBE,
// the others wait for the same confirmation.
func (b *bridge) join(channel string) error {
	ctx, cancel := context.WithTimeout(b.ctx, bridgeTimeout)
	defer cancel()
	b.mu.Lock()
	s := b.subs[channel]
	if s == nil {
		s = &bridgeSub{ready: make(chan struct{})}
		b.subs[channel] = s
		if err := b.ps.Subscribe(ctx, bridgePrefix+channel); err != nil {
			delete(b.subs, channel)
			b.mu.Unlock()
			return fmt.Errorf("redis SUBSCRIBE %s%s: %w", bridgePrefix, channel, err)
		}
	}
	s.members++
	b.mu.Unlock()
	select {
	case <-s.ready:
		return nil
	case <-ctx.Done():
		b.leave(channel)
		return fmt.Errorf("redis SUBSCRIBE %s%s not confirmed: %w", bridgePrefix, channel, ctx.Err())
	}
}

// leave takes a member of channel away; the last one's leaving ends the
// server's subscription to it.
func (b *bridge) leave(channel string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.subs[channel]
	if s == nil {
		return
	}
	if s.members--; s.members > 0 {
		return
	}
	delete(b.subs, channel)
	ctx, cancel := context.WithTimeout(b.ctx, time.Second)
	defer cancel()
	_ = b.ps.Unsubscribe(ctx, bridgePrefix+channel)
}

// publish queues frame, the delivery frame of c's publish, on the
// pipeline; c is answered ok (or err) once Redis answered, in the order of
// its publishes, by a goroutine of c's own (as caddychat's answerPublishes).
func (b *bridge) publish(c *baseConn, channel string, frame, ok, err []byte) {
	cmd := redis.NewIntCmd(b.ctx, "publish", bridgePrefix+channel, frame)
	a := bridgeAck{reply: b.pipe.Submit(b.ctx, onceOnly{cmd}), ok: ok, err: err}
	if c.acks == nil { // only c's reader publishes
		c.acks = make(chan bridgeAck, maxPendingAcks)
		go b.answer(c, c.acks)
	}
	select {
	case c.acks <- a:
	case <-c.gone:
	}
}

func (b *bridge) answer(c *baseConn, acks <-chan bridgeAck) {
	for {
		select {
		case a := <-acks:
			ctx, cancel := context.WithTimeout(b.ctx, bridgeTimeout)
			if a.reply.WaitContext(ctx) == nil {
				c.enqueue(a.ok)
			} else {
				c.enqueue(a.err)
			}
			cancel()
		case <-c.gone:
			return
		}
	}
}

// onceOnly keeps the pipeline from retrying a publish, as caddychat's
// does: a batch retried after a timeout could publish a message twice.
type onceOnly struct{ redis.Cmder }

func (onceOnly) NoRetry() bool { return true }
