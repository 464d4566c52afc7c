package caddychat

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"
)

// The server API (PROTOCOL.md's Server API): what operators and backends do
// to a live chat. It is served at Caddy's admin endpoint under /chat/
// (api_admin.go) and below a route's publish endpoint for the publish key
// (<publish_endpoint>/<op>), with the same paths, bodies and answers. The
// ops that touch connections go to every node through the control channel
// (control.go); the others read or write the broker's stores.

// apiTarget is the chat an API request acts on.
type apiTarget struct {
	hub *hub
	// routes are the chat's routes (at least one); the publish endpoint's
	// API has its own route alone.
	routes []*route
	// path is what webhook events and hook requests name as the route.
	path string
}

// routeFor is the route whose rules a message on channel follows: the
// first that keeps its history, else the first.
func (t apiTarget) routeFor(channel string) *route {
	for _, r := range t.routes {
		if r.history.policyFor(channel) != nil {
			return r
		}
	}
	return t.routes[0]
}

// apiOp is one op of the API: its method and what serves it.
type apiOp struct {
	method string
	serve  func(t apiTarget, w http.ResponseWriter, r *http.Request)
}

// apiOps are the API's ops by path; apiOpNames lists them for a message.
var (
	apiOps     map[string]apiOp
	apiOpNames string
)

func init() {
	apiOps = map[string]apiOp{
		"stats":          {http.MethodGet, apiStats},
		"channels":       {http.MethodGet, apiChannels},
		"presence":       {http.MethodGet, apiPresence},
		"history":        {http.MethodGet, apiHistory},
		"history/remove": {http.MethodPost, apiHistoryRemove},
		"publish":        {http.MethodPost, apiPublish},
		"broadcast":      {http.MethodPost, apiBroadcast},
		"disconnect":     {http.MethodPost, apiDisconnect},
		"unsubscribe":    {http.MethodPost, apiUnsubscribe},
		"subscribe":      {http.MethodPost, apiSubscribe},
		"revoke":         {http.MethodPost, apiRevoke},
		"revocations":    {http.MethodGet, apiRevocations},
	}
	names := make([]string, 0, len(apiOps))
	for name := range apiOps {
		names = append(names, name)
	}
	slices.Sort(names)
	apiOpNames = strings.Join(names, ", ")
}

// maxAPIBody bounds the body of an op other than publish and broadcast.
const maxAPIBody = 64 << 10

// maxAPIPublishBody bounds a publish or broadcast body.
const maxAPIPublishBody = 16 << 20

// serveAPI runs op for t.
func serveAPI(w http.ResponseWriter, r *http.Request, t apiTarget, op string) {
	o, ok := apiOps[op]
	if !ok {
		writePublishError(w, http.StatusNotFound, errNotFound, fmt.Sprintf("no server API op %q; the ops are %s", truncate(op, 64), apiOpNames))
		return
	}
	if r.Method != o.method {
		w.Header().Set("Allow", o.method)
		writePublishError(w, http.StatusMethodNotAllowed, errBadRequest, op+" takes "+o.method)
		return
	}
	o.serve(t, w, r)
}

// serveSiteAPI is the API below the publish endpoint: for the publish key.
func (h *Handler) serveSiteAPI(w http.ResponseWriter, r *http.Request, op string) {
	id, err := h.publisherIdentity(r)
	if err != nil {
		h.refusePublisher(w, r, err)
		return
	}
	if !id.server {
		writePublishError(w, http.StatusForbidden, errForbidden, "the server API needs the publish key; a token may only publish")
		return
	}
	serveAPI(w, r, apiTarget{hub: h.hub, routes: []*route{h.route}, path: h.PublishEndpoint}, op)
}

// brokerContext bounds an op's broker calls.
func (t apiTarget) brokerContext(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), t.hub.brokerTimeout)
}

func writeUnavailable(w http.ResponseWriter, what string, err error) {
	writePublishError(w, http.StatusServiceUnavailable, errUnavailable,
		fmt.Sprintf("%s: the broker did not answer within publish_timeout (down or overloaded): %v; retry later", what, err))
}

func apiStats(t apiTarget, w http.ResponseWriter, r *http.Request) {
	ctx, cancel := t.brokerContext(r)
	defer cancel()
	stats, err := t.hub.clusterStats(ctx)
	if err != nil {
		writeUnavailable(w, "stats not read", err)
		return
	}
	writeJSON(w, http.StatusOK, stats)
}

// Bounds of the channels op's limit.
const (
	defaultChannelList = 1000
	maxChannelList     = 10000
)

func apiChannels(t apiTarget, w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	pattern := q.Get("pattern")
	if pattern == "" {
		pattern = "**"
	}
	if err := validatePattern(pattern); err != nil {
		writePublishError(w, http.StatusBadRequest, errBadRequest, "pattern: "+err.Error())
		return
	}
	limit, ok := queryCount(w, q.Get("limit"), "limit", defaultChannelList, maxChannelList)
	if !ok {
		return
	}
	ctx, cancel := t.brokerContext(r)
	defer cancel()
	replies, nodes, err := t.hub.control.call(ctx, controlRequest{Op: "channels", Pattern: pattern, Limit: limit})
	if err != nil {
		writeUnavailable(w, "channels not listed", err)
		return
	}
	type channelEntry struct {
		Channel     string `json:"channel"`
		Subscribers int    `json:"subscribers"`
		Nodes       int    `json:"nodes"`
	}
	byName := map[string]*channelEntry{}
	truncated := false
	for _, rep := range replies {
		truncated = truncated || rep.Truncated
		for _, c := range rep.Channels {
			e := byName[c.Channel]
			if e == nil {
				e = &channelEntry{Channel: c.Channel}
				byName[c.Channel] = e
			}
			e.Subscribers += c.Subscribers
			e.Nodes++
		}
	}
	list := make([]channelEntry, 0, len(byName))
	for _, e := range byName {
		list = append(list, *e)
	}
	slices.SortFunc(list, func(a, b channelEntry) int { return strings.Compare(a.Channel, b.Channel) })
	if len(list) > limit {
		list, truncated = list[:limit], true
	}
	out := map[string]any{"channels": list, "nodes": len(replies), "truncated": truncated}
	answered(out, replies, nodes)
	writeJSON(w, http.StatusOK, out)
}

// answered notes in out the nodes that got a control request and did not
// answer in time.
func answered(out map[string]any, replies []controlReply, nodes int) {
	out["nodes"] = len(replies)
	if missing := nodes - len(replies); missing > 0 {
		out["missing_nodes"] = missing
	}
}

// queryCount reads a count parameter in 1..most, def when absent.
func queryCount(w http.ResponseWriter, raw, name string, def, most int) (int, bool) {
	if raw == "" {
		return def, true
	}
	var n int
	if _, err := fmt.Sscan(raw, &n); err != nil || n < 1 || n > most || fmt.Sprint(n) != raw {
		writePublishError(w, http.StatusBadRequest, errBadRequest, fmt.Sprintf("%s must be a number from 1 to %d", name, most))
		return 0, false
	}
	return n, true
}

// queryChannel reads the channel parameter.
func queryChannel(w http.ResponseWriter, r *http.Request) (string, bool) {
	channel := r.URL.Query().Get("channel")
	if err := validateChannel(channel); err != nil {
		writePublishError(w, http.StatusBadRequest, errBadRequest, "channel: "+err.Error())
		return "", false
	}
	return channel, true
}

func apiPresence(t apiTarget, w http.ResponseWriter, r *http.Request) {
	channel, ok := queryChannel(w, r)
	if !ok {
		return
	}
	if !slices.ContainsFunc(t.routes, func(rt *route) bool { return rt.presence }) {
		writePublishError(w, http.StatusBadRequest, errBadRequest, "presence is off on every route of this chat")
		return
	}
	ctx, cancel := t.brokerContext(r)
	defer cancel()
	users, err := t.hub.presence.list(ctx, channel)
	if err != nil {
		writeUnavailable(w, "presence not read", err)
		return
	}
	if users == nil {
		users = []presenceUser{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"channel": channel, "users": users})
}

func apiHistory(t apiTarget, w http.ResponseWriter, r *http.Request) {
	channel, ok := queryChannel(w, r)
	if !ok {
		return
	}
	rt := t.routeFor(channel)
	policy := rt.history.policyFor(channel)
	if policy == nil {
		writePublishError(w, http.StatusBadRequest, errBadRequest, channel+" keeps no history on any route of this chat")
		return
	}
	limit, ok := queryCount(w, r.URL.Query().Get("limit"), "limit", defaultHistoryLimit, rt.maxReplay)
	if !ok {
		return
	}
	var before *streamID
	if raw := r.URL.Query().Get("before"); raw != "" {
		id, ok := parseStreamID(raw)
		if !ok {
			writePublishError(w, http.StatusBadRequest, errBadRequest, `before must be a message id like "1732540000000-0"`)
			return
		}
		before = &id
	}
	ctx, cancel := t.brokerContext(r)
	defer cancel()
	page, err := t.hub.broker.readBefore(ctx, channel, before, min(limit, policy.count))
	if err != nil {
		writeUnavailable(w, "history not read", err)
		return
	}
	entries, aged := withinAge(page.entries, time.Now().Add(-policy.maxAge))
	messages := make([]json.RawMessage, len(entries))
	for i, e := range entries {
		messages[i] = e.payload
	}
	writeJSON(w, http.StatusOK, map[string]any{"channel": channel, "epoch": page.epoch, "messages": messages, "more": page.more && !aged})
}

func apiHistoryRemove(t apiTarget, w http.ResponseWriter, r *http.Request) {
	var req struct {
		Channel string `json:"channel"`
	}
	if !decodeBody(w, r, maxAPIBody, &req, true) || !validChannel(w, req.Channel) {
		return
	}
	ctx, cancel := t.brokerContext(r)
	defer cancel()
	removed, err := t.hub.broker.removeHistory(ctx, req.Channel)
	if err != nil {
		writeUnavailable(w, "history not removed", err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"channel": req.Channel, "removed": removed})
}

func validChannel(w http.ResponseWriter, channel string) bool {
	if err := validateChannel(channel); err != nil {
		writePublishError(w, http.StatusBadRequest, errBadRequest, "channel: "+err.Error())
		return false
	}
	return true
}

// serverPublisher publishes as the backend does with the publish key.
func (t apiTarget) serverPublisher() publisher {
	return publisher{id: serverIdentity(), path: t.path, routeFor: t.routeFor,
		allow: func(http.ResponseWriter, int) bool { return true }}
}

func apiPublish(t apiTarget, w http.ResponseWriter, r *http.Request) {
	t.serverPublisher().serve(w, r, maxAPIPublishBody, true)
}

func apiBroadcast(t apiTarget, w http.ResponseWriter, r *http.Request) {
	var req struct {
		Channels       []string        `json:"channels"`
		Data           json.RawMessage `json:"data"`
		IdempotencyKey *string         `json:"idempotency_key"`
	}
	if !decodeBody(w, r, maxAPIPublishBody, &req, true) {
		return
	}
	if len(req.Channels) == 0 || len(req.Channels) > maxPublishBatch {
		writePublishError(w, http.StatusBadRequest, errBadRequest, fmt.Sprintf(`"channels" must hold 1 to %d channels`, maxPublishBatch))
		return
	}
	items := make([]publishItem, len(req.Channels))
	for i, ch := range req.Channels {
		items[i] = publishItem{Channel: ch, Data: req.Data, IdempotencyKey: req.IdempotencyKey}
	}
	writeJSON(w, http.StatusOK, map[string]any{"results": t.serverPublisher().publishAll(r.Context(), items)})
}
