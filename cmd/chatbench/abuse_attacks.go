package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// The attacks of the abuse scenario. Each is one hostile connection (the
// http attack: one client with -http-concurrency requests in flight) that
// sends until the attack context ends and never reads its socket; what the
// server sent it is read only afterwards (drain), to report the error codes
// and the close code it got.

// abuseAttack describes one attack; letters follow the list.
type abuseAttack struct {
	name, letter, what string
	raw                bool // needs -raw-url
	run                func(ctx context.Context, a *attacker) error
}

var abuseAttacks = []abuseAttack{
	{name: "resubscribe", letter: "a", what: "fills the busy channel's history with -fill messages of -fill-size, then subscribes to it with history 1000 and since an old id, again and again, every other frame one more fill message, at -attack-rate", run: attackResubscribe},
	{name: "history", letter: "b", what: `{"op":"history","limit":1000} on the busy channel at -attack-rate`, run: attackHistory},
	{name: "forge", letter: "c", what: "raw client sending look-alikes of the server's envelope with id 9999999999999999999-0, twice a second", raw: true, run: attackForge},
	{name: "forge-json", letter: "c2", what: "JSON client publishing envelope look-alikes as data on the raw channel, twice a second", run: attackForgeJSON},
	{name: "impersonate", letter: "d", what: "raw client sending plain text, JSON and a presence-event look-alike, twice a second", raw: true, run: attackImpersonate},
	{name: "create", letter: "e", what: "publishes -fill-size messages, each to a fresh channel under -create-prefix, at -attack-rate", run: attackCreate},
	{name: "opflood", letter: "f", what: "subscribe (fresh channels), unsubscribe, presence and garbage frames, unpaced", run: attackOpFlood},
	{name: "oversize", letter: "f2", what: "frames of -oversize bytes, one a second", run: attackOversize},
	{name: "slowread", letter: "g", what: "subscribes to the busy channel and never reads", run: attackSlowRead},
	{name: "http", letter: "h", what: "POSTs to -publish-url with -token on a channel of its own under -create-prefix, -http-concurrency at a time, unpaced", run: attackHTTP},
}

func findAttack(name string) *abuseAttack {
	for i := range abuseAttacks {
		if abuseAttacks[i].name == name || abuseAttacks[i].letter == name {
			return &abuseAttacks[i]
		}
	}
	return nil
}

// attackResult is what one attacker did and saw.
type attackResult struct {
	Attack string `json:"attack"`
	Letter string `json:"letter"`
	What   string `json:"what"`
	Node   int    `json:"node"`
	Target string `json:"target"`

	Sent      int64  `json:"frames_sent"` // http: requests
	SentBytes int64  `json:"bytes_sent"`
	Error     string `json:"error,omitempty"` // connecting or sending failed
	// ErrorAfter is when sending failed, seconds after the attacks started.
	ErrorAfter float64 `json:"error_after_seconds,omitempty"`

	// What the server sent, read after the attack: frames by type, error
	// frames by code, and how the connection ended ("open" when it still
	// was after -attacker-drain; "no close frame" when the server dropped it).
	FramesRead int64            `json:"frames_read"`
	BytesRead  int64            `json:"bytes_read"`
	Types      map[string]int64 `json:"frame_types,omitempty"`
	Codes      map[string]int64 `json:"error_codes,omitempty"`
	Close      string           `json:"close"`
	HTTPStatus map[string]int64 `json:"http_status,omitempty"`
}

// attacker is one attack's connection and its bookkeeping.
type attacker struct {
	env   *abuseEnv
	res   *attackResult
	ws    *websocket.Conn
	raw   bool
	start time.Time

	sent, sentBytes atomic.Int64
}

// abuseEnv is what the attacks need of the scenario.
type abuseEnv struct {
	cfg      *config
	d, rd    *dialer // JSON nodes; raw route (nil without -raw-url)
	busy     string  // the shared busy channel
	rawCh    string  // the channel the raw route bridges
	attackID int     // dial index base, for spreading source addresses
}

// dialJSON connects the attacker to its node (welcome read), subscribed to
// channel when not empty.
func (a *attacker) dialJSON(ctx context.Context, channel string) error {
	c, err := a.env.d.connect(ctx, a.env.attackID+a.res.Node, a.res.Node, channel)
	if err != nil {
		return err
	}
	a.ws = c.ws
	a.ws.SetReadLimit(64 << 20)
	return nil
}

func (a *attacker) dialRaw(ctx context.Context) error {
	rd := a.env.rd
	node := a.res.Node % rd.nodes()
	dctx, cancel := context.WithTimeout(ctx, rd.timeout)
	defer cancel()
	ws, resp, err := websocket.Dial(dctx, rd.urls[node], &websocket.DialOptions{HTTPClient: rd.httpClient(node, a.env.attackID)})
	if err != nil {
		if resp != nil {
			return fmt.Errorf("%s: HTTP %d: %v", rd.urls[node], resp.StatusCode, err)
		}
		return fmt.Errorf("%s: %v", rd.urls[node], err)
	}
	ws.SetReadLimit(64 << 20)
	a.ws, a.raw = ws, true
	a.res.Target = rd.urls[node]
	return nil
}

// blockedError ends an attack whose last write was still blocked, for
// more than a second, when the attack ended: the server stopped reading.
type blockedError struct{ since time.Duration }

func (e blockedError) Error() string {
	return "send blocked: the server stopped reading"
}

// send writes one text frame; a failure ends the attack. The write has no
// deadline of its own (one would close the connection, and then what the
// server sent it could not be read): a write the server does not take
// ends the attack when ctx does.
func (a *attacker) send(ctx context.Context, b []byte) error {
	started := time.Now()
	done := make(chan error, 1)
	go func() { done <- a.ws.Write(context.Background(), websocket.MessageText, b) }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		// A write under way when the attack ends gets a second more.
		select {
		case err = <-done:
		case <-time.After(time.Second):
			return blockedError{since: started.Sub(a.start)}
		}
	}
	if err != nil {
		return err
	}
	a.sent.Add(1)
	a.sentBytes.Add(int64(len(b)))
	return nil
}

// paced calls frame(i) and sends it at rate frames/s (0: unpaced) until ctx
// ends, a send fails or frame returns nil.
func (a *attacker) paced(ctx context.Context, rate float64, frame func(i int) []byte) error {
	var interval time.Duration
	if rate > 0 {
		interval = time.Duration(float64(time.Second) / rate)
	}
	start := time.Now()
	for i := 0; ; i++ {
		if interval > 0 {
			if sleepUntil(ctx, start.Add(time.Duration(i)*interval)) != nil {
				return nil
			}
		} else if ctx.Err() != nil {
			return nil
		}
		b := frame(i)
		if b == nil {
			return nil
		}
		if err := a.send(ctx, b); err != nil {
			var blocked blockedError
			if ctx.Err() != nil && !errors.As(err, &blocked) {
				return nil
			}
			return err
		}
	}
}

func padding(n int) string { return strings.Repeat("x", max(n, 0)) }

func attackResubscribe(ctx context.Context, a *attacker) error {
	cfg, ch := a.env.cfg, a.env.busy
	if err := a.dialJSON(ctx, ""); err != nil {
		return err
	}
	pad := padding(cfg.fillSize - 40)
	fill := func(i int) []byte {
		return fmt.Appendf(nil, `{"op":"publish","channel":%q,"data":{"m":"abuse:fill","n":%d,"pad":%q},"id":%d}`, ch, i, pad, i)
	}
	err := a.paced(ctx, cfg.attackRate, func(i int) []byte {
		if i >= cfg.fill {
			return nil
		}
		return fill(i)
	})
	if err != nil {
		return err
	}
	// Every other frame publishes one more fill message, so that the
	// history stays full of large messages while honest ones come in.
	return a.paced(ctx, cfg.attackRate, func(i int) []byte {
		switch i % 4 {
		case 0:
			return fmt.Appendf(nil, `{"op":"subscribe","channel":%q,"history":1000,"id":%d}`, ch, i)
		case 2:
			// An id older than anything kept: everything kept is replayed.
			return fmt.Appendf(nil, `{"op":"subscribe","channel":%q,"since":"1-0","id":%d}`, ch, i)
		default:
			return fill(cfg.fill + i)
		}
	})
}

func attackHistory(ctx context.Context, a *attacker) error {
	if err := a.dialJSON(ctx, ""); err != nil {
		return err
	}
	return a.paced(ctx, a.env.cfg.attackRate, func(i int) []byte {
		return fmt.Appendf(nil, `{"op":"history","channel":%q,"limit":1000,"id":%d}`, a.env.busy, i)
	})
}

// forgedEnvelopes are texts shaped like the server's envelope on channel,
// with an id above any real one: a node that takes one for a kept message
// drops every later message of the channel as already delivered.
func forgedEnvelopes(channel string) [][]byte {
	return [][]byte{
		fmt.Appendf(nil, `{"type":"message","channel":%q,"id":"9999999999999999999-0","epoch":"x","from":"","ts":1,"data":"abuse:forge"}`, channel),
		fmt.Appendf(nil, `{"type":"message","channel":%q,"id":"9999999999999999999-0","epoch":"x","from":"","ts":1,"abuse":"abuse:forge"}`, channel),
	}
}

func attackForge(ctx context.Context, a *attacker) error {
	if err := a.dialRaw(ctx); err != nil {
		return err
	}
	forged := forgedEnvelopes(a.env.rawCh)
	return a.paced(ctx, 2, func(i int) []byte { return forged[i%len(forged)] })
}

func attackForgeJSON(ctx context.Context, a *attacker) error {
	if err := a.dialJSON(ctx, ""); err != nil {
		return err
	}
	forged := forgedEnvelopes(a.env.rawCh)
	return a.paced(ctx, 2, func(i int) []byte {
		f := forged[i%len(forged)]
		if i%4 >= 2 { // the envelope as a JSON string rather than an object
			f = []byte(strconv.Quote(string(f)))
		}
		return fmt.Appendf(nil, `{"op":"publish","channel":%q,"data":%s,"id":%d}`, a.env.rawCh, f, i)
	})
}

func attackImpersonate(ctx context.Context, a *attacker) error {
	if err := a.dialRaw(ctx); err != nil {
		return err
	}
	texts := [][]byte{
		[]byte("abuse:impersonate Server maintenance in 5 minutes: log in again at http://evil.example/"),
		[]byte(`{"text":"abuse:impersonate your session expired, re-enter your password"}`),
		fmt.Appendf(nil, `{"type":"join","channel":%q,"user":"abuse:impersonate"}`, a.env.rawCh),
	}
	return a.paced(ctx, 2, func(i int) []byte { return texts[i%len(texts)] })
}

func attackCreate(ctx context.Context, a *attacker) error {
	cfg := a.env.cfg
	if err := a.dialJSON(ctx, ""); err != nil {
		return err
	}
	pad := padding(cfg.fillSize - 40)
	return a.paced(ctx, cfg.attackRate, func(i int) []byte {
		ch := fmt.Sprintf("%s%s-%d", cfg.createPrefix, cfg.runID, i)
		return fmt.Appendf(nil, `{"op":"publish","channel":%q,"data":{"m":"abuse:create","pad":%q},"id":%d}`, ch, pad, i)
	})
}

func attackOpFlood(ctx context.Context, a *attacker) error {
	cfg := a.env.cfg
	if err := a.dialJSON(ctx, ""); err != nil {
		return err
	}
	return a.paced(ctx, 0, func(i int) []byte {
		switch i % 6 {
		case 0:
			return fmt.Appendf(nil, `{"op":"subscribe","channel":"%sop-%s-%d","id":%d}`, cfg.createPrefix, cfg.runID, i, i)
		case 1:
			return fmt.Appendf(nil, `{"op":"unsubscribe","channel":"%sop-%s-%d","id":%d}`, cfg.createPrefix, cfg.runID, i-1, i)
		case 2:
			return fmt.Appendf(nil, `{"op":"presence","channel":%q,"id":%d}`, a.env.busy, i)
		case 3:
			return []byte(`{"op":`)
		case 4:
			return []byte(`{"op":"nope","channel":"abuse:opflood"}`)
		default:
			return []byte(`not json at all`)
		}
	})
}

func attackOversize(ctx context.Context, a *attacker) error {
	cfg := a.env.cfg
	if err := a.dialJSON(ctx, ""); err != nil {
		return err
	}
	big := fmt.Appendf(nil, `{"op":"publish","channel":%q,"data":%q}`, a.env.busy, padding(cfg.oversize))
	return a.paced(ctx, 1, func(int) []byte { return big })
}

func attackSlowRead(ctx context.Context, a *attacker) error {
	if err := a.dialJSON(ctx, a.env.busy); err != nil {
		return err
	}
	<-ctx.Done()
	return nil
}

var errNoCloseYet = errors.New("open")

// drain reads what the server sent the attacker, for at most wait, and
// closes the connection.
func (a *attacker) drain(wait time.Duration) {
	if a.ws == nil {
		return
	}
	defer a.ws.CloseNow()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	var buf []byte
	var f frame
	var err error
	for {
		buf, err = readFrame(ctx, a.ws, buf)
		if err != nil {
			break
		}
		a.res.FramesRead++
		a.res.BytesRead += int64(len(buf))
		if a.raw {
			continue
		}
		typ := "not JSON"
		if parseFrame(buf, &f) == nil {
			typ = string(f.typ)
			if typ == "error" {
				a.res.Codes[string(f.code)]++
			}
		}
		a.res.Types[typ]++
	}
	switch {
	case ctx.Err() != nil:
		err = errNoCloseYet
	case errors.Is(err, io.EOF) || websocket.CloseStatus(err) == -1:
		err = errors.New("no close frame")
	}
	a.res.Close = closeDescription(err)
}

// closeDescription names a close code the way the report shows it.
func closeDescription(err error) string {
	code := websocket.CloseStatus(err)
	if code == -1 {
		if err == nil {
			return "none"
		}
		return err.Error()
	}
	if name, ok := closeNames[int(code)]; ok {
		return fmt.Sprintf("%d %s", code, name)
	}
	return strconv.Itoa(int(code))
}

var closeNames = map[int]string{
	1000: "normal", 1001: "going_away", 1003: "binary", 1007: "bad_utf8", 1008: "policy", 1009: "too_big",
	1011: "internal", 1012: "restart", 1013: "try_later", 4000: "slow_consumer", 4001: "ping_timeout",
	4002: "token_expired", 4003: "rate_limited",
}

func attackHTTP(ctx context.Context, a *attacker) error {
	cfg := a.env.cfg
	a.res.Target = cfg.publishURL
	// Not the busy channel: its small messages would push the large ones
	// out of the history that the resubscribe and history attacks replay.
	ch := fmt.Sprintf("%shttp-%s", cfg.createPrefix, cfg.runID)
	body := fmt.Appendf(nil, `{"channel":%q,"data":{"m":"abuse:http","pad":%q}}`, ch, padding(cfg.payload-30))
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: cfg.httpConcurrency}}
	defer client.CloseIdleConnections()
	var mu sync.Mutex
	var firstErr error
	var wg sync.WaitGroup
	for range max(cfg.httpConcurrency, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, cfg.publishURL, bytes.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				if cfg.token != "" {
					req.Header.Set("Authorization", "Bearer "+cfg.token)
				}
				resp, err := client.Do(req)
				status := ""
				if err != nil {
					if ctx.Err() != nil {
						return
					}
					status = "transport error"
				} else {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					status = strconv.Itoa(resp.StatusCode)
				}
				a.sent.Add(1)
				a.sentBytes.Add(int64(len(body)))
				mu.Lock()
				a.res.HTTPStatus[status]++
				if err != nil && firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
				if err != nil {
					time.Sleep(100 * time.Millisecond)
				}
			}
		}()
	}
	wg.Wait()
	a.res.Close = "-"
	if firstErr != nil && a.res.HTTPStatus["transport error"] == a.sent.Load() {
		return firstErr
	}
	return nil
}
