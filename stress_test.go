package caddychat

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
)

// junkFrame returns one random frame an abusive JSON client sends: random
// text, malformed or oversized-id JSON, unknown ops, bad channels, deep
// nesting, wrong types, and some valid operations on junk channels. Every one
// is a valid UTF-8 text frame within maxSize, so each must draw exactly one
// reply (ok or error) and leave the connection open.
func junkFrame(r *mrand.Rand, maxSize int) string {
	randText := func(n int) string {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.UintN(256))
		}
		return strings.ToValidUTF8(string(b), "\uFFFD")
	}
	id := func() string {
		switch r.IntN(6) {
		case 0:
			return fmt.Sprint(r.Int64())
		case 1:
			return `"r` + fmt.Sprint(r.IntN(1e6)) + `"`
		case 2:
			return strings.Repeat("9", 67+r.IntN(300)) // a number too long for an id
		case 3:
			return `"` + strings.Repeat("x", 65+r.IntN(300)) + `"`
		case 4:
			return `{"nested":[1,2,{"x":null}]}`
		default:
			return `-1.5e308`
		}
	}
	junkChannel := func() string { return fmt.Sprintf("junk:%d", r.IntN(8)) }
	badChannel := func() string {
		switch r.IntN(6) {
		case 0:
			return ""
		case 1:
			return "room:*"
		case 2:
			return "with space"
		case 3:
			return strings.Repeat("c", 129+r.IntN(100))
		case 4:
			return `a\u0000b`
		default:
			return `\ud800\udfff[?]`
		}
	}
	var s string
	switch r.IntN(14) {
	case 0:
		s = randText(1 + r.IntN(512))
	case 1:
		s = `{"op":"publish","channel":"` + junkChannel() + `","data":` // truncated
	case 2:
		s = `{"op":"subscribe","channel":"` + junkChannel() + `","id":` + id() + `}`
	case 3:
		s = `{"op":"` + randText(1+r.IntN(64)) + `","channel":"x","id":` + id() + `}`
	case 4:
		ops := []string{"subscribe", "unsubscribe", "publish"}
		s = fmt.Sprintf(`{"op":%q,"channel":"%s","data":1,"id":%s}`, ops[r.IntN(3)], badChannel(), id())
	case 5:
		depth := 1 + r.IntN(12000) // over encoding/json's 10000 sometimes
		// On a channel nobody subscribes to: big deliveries would only slow the test.
		s = `{"op":"publish","channel":"deep:x","data":` + strings.Repeat("[", depth) + strings.Repeat("]", depth) + `,"id":1}`
	case 6:
		depth := 1 + r.IntN(2000)
		s = strings.Repeat(`{"a":`, depth) + "1" + strings.Repeat("}", depth)
	case 7:
		s = `{"op":` + []string{`1`, `null`, `["subscribe"]`, `{}`, `true`}[r.IntN(5)] + `,"channel":5,"id":2}`
	case 8:
		s = []string{``, ` `, `null`, `[]`, `{}`, `"str"`, `123`, `{"op":"publish"} {"op":"publish"}`, `{"op":"refresh","token":"x.y.z","id":3}`}[r.IntN(9)]
	case 9:
		s = fmt.Sprintf(`{"op":"publish","channel":"%s","data":{"t":%q},"id":%s}`, junkChannel(), randText(r.IntN(200)), id())
	case 10:
		s = fmt.Sprintf(`{"op":"unsubscribe","channel":"%s","id":%d}`, junkChannel(), r.IntN(100))
	case 11:
		s = `{"op":"publish","channel":"` + junkChannel() + `","data":"` + randText(r.IntN(64)) // unterminated string
	case 12:
		s = fmt.Sprintf(`{"op":"publish","channel":"%s","id":%d}`, junkChannel(), r.IntN(100)) // no data
	default:
		s = fmt.Sprintf(`{"op":"subscribe","channel":"%s","id":"%s","extra":{"deep":%s}}`, junkChannel(), randText(10), strings.Repeat("[", 50)+strings.Repeat("]", 50))
	}
	if len(s) > maxSize || !utf8.ValidString(s) {
		return `{"op":"oversized-replaced"}`
	}
	return s
}

// TestStressMalformedFramesManyClients: 50 clients send 10,000 random and
// malformed frames in total at one node (rate limit off) while a
// well-behaved pair exchanges numbered messages. Every junk text frame gets
// exactly one reply, binary and oversized frames close their connection
// with 1003 and 1009, the pair loses nothing and sees its messages in order,
// goroutines return to the baseline once the abusers are gone, and the node
// still accepts clients.
func TestStressMalformedFramesManyClients(t *testing.T) {
	const (
		clients        = 50
		framesPer      = 200 // 50 * 200 = 10,000 frames
		maxMessageSize = 32 << 10
		minGood        = 200
	)
	n := startNode(t, &Handler{
		ChannelPrefix:  ptr("stress:"),
		RateLimit:      &RateLimit{PerSecond: -1},
		MaxMessageSize: maxMessageSize,
		SendQueue:      4 << 20,
	})

	var suffix [8]byte
	_, _ = rand.Read(suffix[:])
	goodChannel := "good:" + hex.EncodeToString(suffix[:])
	sub := dial(t, n.url("/ws"), nil)
	sub.next("welcome")
	sub.subscribe(goodChannel, 1)
	pub := dial(t, n.url("/ws"), nil)
	pub.next("welcome")

	runtime.GC()
	baseline := runtime.NumGoroutine()

	seed := mrand.Uint64()
	t.Logf("seed %d", seed)

	// Every tenth client ends with a binary frame, every tenth (another) with
	// an oversized one; the others send valid UTF-8 text only.
	kind := func(i int) string {
		switch i % 10 {
		case 3:
			return "binary"
		case 7:
			return "oversized"
		}
		return "text"
	}
	abusers := make([]*testClient, clients)
	for i := range abusers {
		abusers[i] = dial(t, n.url("/ws"), nil)
	}
	writeErrs := make([]error, clients)
	var wg sync.WaitGroup
	for i, c := range abusers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := mrand.New(mrand.NewPCG(seed, uint64(i)))
			for j := range framesPer {
				typ, frame := websocket.MessageText, []byte(junkFrame(r, maxMessageSize))
				if j == framesPer-1 {
					switch kind(i) {
					case "binary":
						typ = websocket.MessageBinary
					case "oversized":
						frame = []byte(`{"op":"publish","channel":"junk:0","data":"` + strings.Repeat("x", maxMessageSize+r.IntN(4096)) + `"}`)
					}
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err := c.ws.Write(ctx, typ, frame)
				cancel()
				if err != nil {
					if j < framesPer-1 || kind(i) == "text" {
						writeErrs[i] = fmt.Errorf("frame %d: %w", j, err)
					}
					return
				}
			}
			if kind(i) == "text" {
				b, _ := json.Marshal(map[string]any{"op": "unsubscribe", "channel": "sync", "id": fmt.Sprintf("sync-%d", i)})
				if err := c.ws.Write(context.Background(), websocket.MessageText, b); err != nil {
					writeErrs[i] = fmt.Errorf("sync frame: %w", err)
				}
			}
		}()
	}
	abusersDone := make(chan struct{})
	go func() { wg.Wait(); close(abusersDone) }()

	// Meanwhile the well-behaved pair.
	sent := 0
	for running := true; running || sent < minGood; sent++ {
		select {
		case <-abusersDone:
			running = false
		default:
		}
		pub.send(map[string]any{"op": "publish", "channel": goodChannel, "id": sent, "data": map[string]any{"n": sent}})
		if r := pub.reply(float64(sent)); r["type"] != "ok" {
			t.Fatalf("good publish %d: %v", sent, r)
		}
	}
	for want := range sent {
		m := sub.next("message")
		if m["channel"] != goodChannel || m["data"].(map[string]any)["n"] != float64(want) {
			t.Fatalf("good message %d: got %v", want, m)
		}
	}
	t.Logf("good pair exchanged %d messages", sent)

	for i, err := range writeErrs {
		if err != nil {
			t.Fatalf("abuser %d (%s): %v", i, kind(i), err)
		}
	}
	for i, c := range abusers {
		switch kind(i) {
		case "binary":
			if code := c.closeCode(); code != websocket.StatusUnsupportedData {
				t.Fatalf("abuser %d (binary): close code %v, want 1003", i, code)
			}
		case "oversized":
			if code := c.closeCode(); code != websocket.StatusMessageTooBig {
				t.Fatalf("abuser %d (oversized): close code %v, want 1009", i, code)
			}
		default:
			// Exactly one reply per frame, then the sync reply.
			replies := 0
			for {
				m := c.nextAny()
				if m["type"] != "ok" && m["type"] != "error" {
					continue // welcome, deliveries on junk channels
				}
				if m["id"] == fmt.Sprintf("sync-%d", i) {
					break
				}
				replies++
			}
			if replies != framesPer {
				t.Fatalf("abuser %d: %d replies to %d frames", i, replies, framesPer)
			}
			c.assertOpen()
			if err := c.ws.Close(websocket.StatusNormalClosure, ""); err != nil {
				t.Fatalf("abuser %d: close: %v", i, err)
			}
			// Close returned nil: the node answered the close handshake. The
			// background reader either read the node's 1000 itself or found
			// the connection already closed by Close, which read it (-1): the
			// library decides which, not the node (4 in 20 runs before).
			if code := c.closeCode(); code != websocket.StatusNormalClosure && code != -1 {
				t.Fatalf("abuser %d: close code %v, want 1000", i, code)
			}
		}
	}

	// Every abuser's goroutines, client and server side, end.
	const margin = 2
	deadline := time.Now().Add(5 * time.Second)
	for {
		runtime.GC()
		g := runtime.NumGoroutine()
		if g <= baseline+margin {
			t.Logf("goroutines: baseline %d, now %d", baseline, g)
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("goroutines: baseline %d, still %d after the abusers closed\n%s", baseline, g, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(50 * time.Millisecond)
	}
	n.h.hub.mu.RLock()
	conns := len(n.h.hub.subscribers)
	n.h.hub.mu.RUnlock()
	if conns != 2 {
		t.Fatalf("the hub still has %d connections, want the good pair's 2", conns)
	}
	n.h.hub.mu.RLock()
	var channels []string
	for ch := range n.h.hub.channels {
		channels = append(channels, ch)
	}
	n.h.hub.mu.RUnlock()
	if len(channels) != 1 || channels[0] != goodChannel {
		t.Fatalf("the hub still has channels %v, want only %s", channels, goodChannel)
	}

	// The node is still in service.
	c := dial(t, n.url("/ws"), nil)
	c.next("welcome")
	c.subscribe(goodChannel, 1)
	pub.send(map[string]any{"op": "publish", "channel": goodChannel, "id": "last", "data": "after"})
	for _, s := range []*testClient{sub, c} {
		if m := s.next("message"); m["data"] != "after" {
			t.Fatalf("after the stress: got %v", m)
		}
	}
}

// TestStressOversizedFrameBehindQueuedRepliesGets1009: a client whose
// oversized frame arrives while replies to its earlier frames are still
// queued receives the 1009 close frame, not a connection reset. (The writer
// used to tear the socket down when its next write found the library's close
// frame already sent, and the reset could overtake the close frame.)
func TestStressOversizedFrameBehindQueuedRepliesGets1009(t *testing.T) {
	const maxMessageSize = 4 << 10
	n := startNode(t, &Handler{ChannelPrefix: ptr("stress-1009:"), RateLimit: &RateLimit{PerSecond: -1}, MaxMessageSize: maxMessageSize})
	oversized := []byte(`{"op":"publish","channel":"x","data":"` + strings.Repeat("x", 2*maxMessageSize) + `"}`)
	for round := range 10 {
		cs := make([]*testClient, 20)
		for i := range cs {
			cs[i] = dial(t, n.url("/ws"), nil)
		}
		var wg sync.WaitGroup
		for _, c := range cs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range 50 {
					_ = c.ws.Write(context.Background(), websocket.MessageText, []byte(`{"op":"x"}`))
				}
				_ = c.ws.Write(context.Background(), websocket.MessageText, oversized)
			}()
		}
		wg.Wait()
		for i, c := range cs {
			frames, code := c.drain()
			if code != websocket.StatusMessageTooBig {
				t.Fatalf("round %d client %d: close code %v after %d frames, want 1009", round, i, code, len(frames))
			}
		}
	}
}
