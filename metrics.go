package caddychat

import (
	"errors"
	"strings"
	"sync"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
)

// chatMetrics are the module's Prometheus metrics, shown on Caddy's admin
// /metrics endpoint. They are process-wide, as the hubs they describe outlive
// config reloads, and carry no per-channel or per-user labels.
type chatMetrics struct {
	connections       prometheus.Gauge
	connectionsOpened prometheus.Counter
	connectionsClosed *prometheus.CounterVec
	channels          prometheus.Gauge
	received          prometheus.Counter
	delivered         prometheus.Counter
	dropped           prometheus.Counter
	slowConsumers     prometheus.Counter
	publishSeconds    prometheus.Histogram
	publishFailures   prometheus.Counter
	brokerReconnects  prometheus.Counter
	brokerUp          *prometheus.GaugeVec
	presenceFailures  prometheus.Counter
	authFailures      *prometheus.CounterVec
	httpPublishes     *prometheus.CounterVec
	queuedBytes       prometheus.GaugeFunc
	panics            prometheus.Counter
	historyBytes      prometheus.Gauge
	webhookEvents     *prometheus.CounterVec
	webhookSeconds    prometheus.Histogram
	webhookBacklog    prometheus.GaugeFunc
	hookSeconds       *prometheus.HistogramVec
	hookOutcomes      *prometheus.CounterVec
	// sseStreams and ssePosts: the SSE transport's (sse_session.go); its
	// streams count in connections and every other metric too.
	sseStreams prometheus.Gauge
	ssePosts   *prometheus.CounterVec
	// brokerLag and brokerLagMax: how late broker messages reach the hubs (lag.go).
	brokerLag    prometheus.Histogram
	brokerLagMax prometheus.GaugeFunc
	// brokerBacklog, lateSkipped and publishRefusedLate: the max_lag
	// bound (inbox.go, late.go).
	brokerBacklog      prometheus.GaugeFunc
	lateSkipped        *prometheus.CounterVec
	publishRefusedLate prometheus.Counter
}

var (
	metricsOnce sync.Once
	metrics     *chatMetrics
)

// moduleMetrics returns the metrics, creating them on first use.
func moduleMetrics() *chatMetrics {
	metricsOnce.Do(func() {
		const ns, sub = "caddy", "chat"
		counter := func(name, help string) prometheus.Counter {
			return prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
		}
		gauge := func(name, help string) prometheus.Gauge {
			return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
		}
		metrics = &chatMetrics{
			connections:       gauge("connections", "WebSocket connections open now."),
			connectionsOpened: counter("connections_opened_total", "WebSocket connections accepted."),
			connectionsClosed: prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "connections_closed_total",
				Help: "WebSocket connections closed, by reason.",
			}, []string{"reason"}),
			channels:      gauge("channels", "Channels this node is subscribed to at the broker (channels with local subscribers)."),
			received:      counter("messages_received_total", "Frames received from clients."),
			delivered:     counter("messages_delivered_total", "Messages queued to local subscribers (one per subscriber)."),
			dropped:       counter("messages_dropped_total", "Deliveries dropped because a subscriber's send queue was full."),
			slowConsumers: counter("slow_consumers_total", "Clients disconnected because they could not keep up (close 4000)."),
			publishSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
				Namespace: ns, Subsystem: sub, Name: "broker_publish_seconds",
				Help:    "Time a publish takes at the broker.",
				Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
			}),
			publishFailures:  counter("publish_failures_total", "Publishes the broker did not accept in time (answered unavailable); each is logged at debug level, the start of an outage once at warn."),
			brokerReconnects: counter("broker_reconnects_total", "Times the broker's pub/sub connection came back after an outage."),
			brokerUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
				Namespace: ns, Subsystem: sub, Name: "broker_up",
				Help: "Per broker (memory, a Redis URL without its password, sentinel or cluster addresses) and channel prefix: 1 while it answers publishes in time, 0 from the first failed publish until one succeeds again.",
			}, []string{"broker", "channel_prefix"}),
			presenceFailures: counter("presence_failures_total", "Presence joins, leaves, heartbeats and queries the broker did not complete in time; entries heal within presence_ttl."),
			authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "auth_failures_total",
				Help: "Refused authentications, by reason.",
			}, []string{"reason"}),
			httpPublishes: prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "http_publishes_total",
				Help: "Messages published through the HTTP publish endpoint, by result.",
			}, []string{"result"}),
			hookSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
				Namespace: ns, Subsystem: sub, Name: "hook_seconds",
				Help:    "Time a connect, subscribe or publish hook call takes, by hook and outcome (allow, deny, error, timeout, overloaded, fail_open).",
				Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
			}, []string{"hook", "outcome"}),
			hookOutcomes: prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "hook_outcomes_total",
				Help: "Hook calls by hook and outcome: allow, deny, error (unreachable, bad status or bad answer), timeout, overloaded (over max_concurrent), fail_open (a failure let through).",
			}, []string{"hook", "outcome"}),
			historyBytes: gauge("history_bytes", "Bytes of history the in-process broker keeps (messages plus bookkeeping), at most history_memory per hub; 0 with Redis."),
		}
		metrics.webhookEvents = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "webhook_events_total",
			Help: "Webhook events, by result: recorded (queued on this node), delivered (a 2xx took them), retried (in a batch whose POST failed, once per attempt), dropped (max_backlog full, or trimmed from the stream by stream_max_len).",
		}, []string{"result"})
		metrics.webhookSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "webhook_delivery_seconds",
			Help:    "Time from an event's recording to the 2xx that delivered it (retries and backlog included).",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300},
		})
		metrics.webhookBacklog = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "webhook_backlog_bytes",
			Help: "Bytes of webhook events this node holds (with Redis: not yet written to the stream; in process: not yet delivered), at most max_backlog per webhook.",
		}, webhookBacklogBytes)
		metrics.queuedBytes = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "queued_bytes",
			Help: "Bytes waiting to be sent to this node's clients (send queues and held resume messages; each frame counts 128 bytes of overhead). Each client's share is bounded by send_queue.",
		}, liveHubs.queuedBytes)
		metrics.brokerLag = prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "broker_lag_seconds",
			Help:    "Time from a node's publish (the envelope's ts) to the broker handing the message to this node's hub, once per message; includes clock skew between nodes (negative clamped to 0). Backends' plain PUBLISHes are not observed.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		})
		metrics.brokerLagMax = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "broker_lag_max_seconds",
			Help: "Largest broker lag of the last 10 to 20 seconds, over this node's hubs; 0 when no node-stamped message arrived in that time.",
		}, liveHubs.maxLag)
		metrics.brokerBacklog = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "broker_backlog_bytes",
			Help: "Bytes of broker messages read from Redis and waiting for this node's fan-out (at most 64 MiB per hub); 0 with the in-process broker.",
		}, liveHubs.backlogBytes)
		metrics.lateSkipped = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "late_skipped_total",
			Help: "Message deliveries not made because the message was later than max_lag (or the backlog was full), by where: hub (not fanned out; once per subscriber owed it) or queue (a connection's writer). Each is reported to its client in a gap frame.",
		}, []string{"where"})
		metrics.publishRefusedLate = counter("publish_refused_late_total", "Publishes answered unavailable because the node was behind by more than max_lag.")
		metrics.sseStreams = gauge("sse_streams", "SSE streams open now (each also counts in connections).")
		metrics.ssePosts = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "sse_posts_total",
			Help: "Frames POSTed for SSE streams, by result: accepted, busy (the stream's inbox was full), not_found, too_large, bad_request, unavailable.",
		}, []string{"result"})
		metrics.panics = counter("panics_total", "Panics recovered: in a connection's goroutines (the connection is closed with 1011) or while delivering a broker message (the message is dropped). Each is logged at error level with its stack.")
	})
	return metrics
}

// register adds the metrics to a config's registry (each config has its own;
// the collectors are shared, so a second registration is expected).
func (m *chatMetrics) register(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{
		m.connections, m.connectionsOpened, m.connectionsClosed, m.channels,
		m.received, m.delivered, m.dropped, m.slowConsumers, m.publishSeconds, m.publishFailures,
		m.brokerReconnects, m.brokerUp, m.authFailures, m.httpPublishes, m.presenceFailures,
		m.queuedBytes,
		m.brokerLag, m.brokerLagMax, m.brokerBacklog, m.lateSkipped, m.publishRefusedLate,
		m.panics,
		m.historyBytes,
		m.webhookEvents, m.webhookSeconds, m.webhookBacklog,
		m.hookSeconds, m.hookOutcomes,
		m.sseStreams, m.ssePosts,
	} {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}

// closeReason is the connections_closed_total label of a close code.
func closeReason(code websocket.StatusCode) string {
	switch code {
	case closeNormal, -1:
		return "normal"
	case closeGoingAway:
		return "going_away"
	case closeServiceRestart:
		return "service_restart"
	case closeSlowConsumer:
		return "slow_consumer"
	case closePingTimeout:
		return "ping_timeout"
	case closeTokenExpired:
		return "token_expired"
	case closeRateLimited:
		return "rate_limited"
	case closePolicyViolation:
		return "forbidden"
	case closeUnsupported, closeInvalidPayload, websocket.StatusMessageTooBig, websocket.StatusProtocolError:
		return "protocol_error"
	case closeTryAgainLater:
		return "broker_unavailable"
	case closeInternal:
		return "internal"
	case closeRefused:
		return "refused"
	}
	return "other"
}

// authFailureLabel turns an authError's reason into a small, fixed label.
func authFailureLabel(err error) string {
	reason := err.Error()
	switch {
	case reason == "missing token":
		return "missing_token"
	case reason == "token too large":
		return "too_large"
	case reason == "malformed token":
		return "malformed"
	case reason == "invalid token signature":
		return "signature"
	case reason == "token expired":
		return "expired"
	case reason == "token not valid yet":
		return "not_valid_yet"
	case reason == "wrong token issuer":
		return "issuer"
	case reason == "wrong token audience":
		return "audience"
	case strings.HasPrefix(reason, "token lacks"), strings.HasPrefix(reason, "token has no"):
		return "missing_claim"
	case strings.HasPrefix(reason, "token signing method"):
		return "key_or_algorithm"
	case strings.HasPrefix(reason, "authorization header"):
		return "bad_header"
	case reason == "wrong publish key" || strings.HasPrefix(reason, "missing Authorization"):
		return "publish_key"
	case reason == "token revoked":
		return "revoked"
	}
	return "invalid"
}
