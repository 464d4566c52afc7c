package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Webhook receiver: checks the Caddychat-Signature header (with a time
// tolerance against replays), deduplicates events by id (delivery is at
// least once) within a bounded memory of recent ids, and records them.

const (
	signatureTolerance = 5 * time.Minute
	maxRememberedIDs   = 100000
	maxWebhookBody     = 16 << 20
)

// webhookEvent is one event of a webhook batch (PROTOCOL.md, Webhooks).
type webhookEvent struct {
	ID        string          `json:"id"`
	Type      string          `json:"type"`
	TS        int64           `json:"ts"`
	Node      string          `json:"node"`
	Route     string          `json:"route,omitempty"`
	User      string          `json:"user,omitempty"`
	Conn      string          `json:"conn,omitempty"`
	Channel   string          `json:"channel,omitempty"`
	MessageID string          `json:"message_id,omitempty"`
	Data      json.RawMessage `json:"data,omitempty"`
}

// webhookReceiver records each event once.
type webhookReceiver struct {
	secret []byte
	now    func() time.Time

	mu     sync.Mutex
	seen   map[string]struct{}
	order  []string // ids in the order seen, to forget the oldest
	events []webhookEvent
}

// newWebhookReceiver returns the handler of the webhook URL.
func newWebhookReceiver(secret []byte) http.Handler {
	return &webhookReceiver{secret: secret, now: time.Now, seen: make(map[string]struct{})}
}

func (wr *webhookReceiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxWebhookBody+1))
	if err != nil || len(body) > maxWebhookBody {
		http.Error(w, "body unreadable or too large", http.StatusBadRequest)
		return
	}
	if !validSignature(wr.secret, r.Header.Get("Caddychat-Signature"), body, wr.now()) {
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	var batch struct {
		Events []webhookEvent `json:"events"`
	}
	if err := json.Unmarshal(body, &batch); err != nil {
		http.Error(w, "bad JSON", http.StatusBadRequest)
		return
	}
	wr.mu.Lock()
	defer wr.mu.Unlock()
	for _, e := range batch.Events {
		if _, dup := wr.seen[e.ID]; dup || e.ID == "" {
			continue
		}
		wr.remember(e.ID)
		wr.events = append(wr.events, e) // a real app stores it in its database
	}
	w.WriteHeader(http.StatusNoContent) // 2xx: the whole batch is taken
}

// remember adds id to the ids seen, forgetting the oldest past the bound.
func (wr *webhookReceiver) remember(id string) {
	wr.seen[id] = struct{}{}
	wr.order = append(wr.order, id)
	if len(wr.order) > maxRememberedIDs {
		delete(wr.seen, wr.order[0])
		wr.order[0] = ""
		wr.order = wr.order[1:]
	}
}

// recorded returns the events recorded so far.
func (wr *webhookReceiver) recorded() []webhookEvent {
	wr.mu.Lock()
	defer wr.mu.Unlock()
	return append([]webhookEvent(nil), wr.events...)
}

// validSignature checks "t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
// "<t>.<body>")>" and that t is within signatureTolerance of now.
func validSignature(secret []byte, header string, body []byte, now time.Time) bool {
	var ts, v1 string
	for _, part := range strings.Split(header, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(part), "=")
		switch k {
		case "t":
			ts = v
		case "v1":
			v1 = v
		}
	}
	t, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || v1 == "" {
		return false
	}
	if d := now.Sub(time.Unix(t, 0)); d > signatureTolerance || d < -signatureTolerance {
		return false
	}
	got, err := hex.DecodeString(v1)
	if err != nil {
		return false
	}
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(ts))
	mac.Write([]byte("."))
	mac.Write(body)
	return hmac.Equal(got, mac.Sum(nil))
}
