package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// dialer opens WebSocket connections to the nodes. Connections to a loopback
// node are bound to one of several source addresses 127.0.0.1..127.0.0.N,
// each with its own http.Transport, so that more connections fit than one
// address's ephemeral port range allows.
type dialer struct {
	urls    []string
	bind    []bool         // per node: bind to a loopback source address
	sources []*http.Client // one per source address
	direct  *http.Client   // for nodes that are not on loopback
	timeout time.Duration
	// compression is what WebSocket clients offer (-compression).
	compression websocket.CompressionMode
}

func newDialer(urls []string, sources int, timeout time.Duration) (*dialer, error) {
	if len(urls) == 0 {
		return nil, errors.New("no node URL")
	}
	if sources < 1 {
		sources = 1
	}
	if sources > 254 {
		return nil, errors.New("-sources: at most 254 loopback addresses")
	}
	d := &dialer{urls: urls, timeout: timeout}
	for _, raw := range urls {
		u, err := url.Parse(raw)
		if err != nil {
			return nil, fmt.Errorf("node URL %q: %v", raw, err)
		}
		if u.Scheme != "ws" && u.Scheme != "wss" && u.Scheme != "http" && u.Scheme != "https" {
			return nil, fmt.Errorf("node URL %q: scheme must be ws or wss", raw)
		}
		d.bind = append(d.bind, isLoopbackV4(u.Hostname()))
	}
	for i := 0; i < sources; i++ {
		src := &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(i+1))}
		nd := &net.Dialer{LocalAddr: src, Timeout: timeout}
		d.sources = append(d.sources, &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				// tcp4: a 127.0.0.x source cannot reach an IPv6 address.
				return counted(nd.DialContext(ctx, "tcp4", addr))
			},
		}})
	}
	d.direct = &http.Client{Transport: &http.Transport{
		Proxy:       http.ProxyFromEnvironment,
		DialContext: countedDial(&net.Dialer{Timeout: timeout}),
	}}
	return d, nil
}

// isLoopbackV4 says whether host is an IPv4 loopback address or localhost.
func isLoopbackV4(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.To4() != nil && ip.IsLoopback()
}

func (d *dialer) nodes() int { return len(d.urls) }

// nodeOf spreads clients round-robin over the nodes.
func (d *dialer) nodeOf(i int) int { return i % len(d.urls) }

// httpClient picks the transport of client i on node node: round-robin over
// the source addresses among the clients of one node.
func (d *dialer) httpClient(node, i int) *http.Client {
	if !d.bind[node] {
		return d.direct
	}
	return d.sources[(i/len(d.urls))%len(d.sources)]
}

// close releases idle transport resources (there are none for upgraded
// connections, but handshakes that failed may leave some).
func (d *dialer) close() {
	for _, c := range d.sources {
		c.Transport.(*http.Transport).CloseIdleConnections()
	}
	d.direct.Transport.(*http.Transport).CloseIdleConnections()
}

// client is one connection speaking the JSON protocol: a WebSocket, or
// (subscribers only) an SSE stream.
type client struct {
	idx    int
	node   int
	ws     *websocket.Conn
	connID string
	nodeID string

	// The SSE transport (ws nil): the stream's body, its reader and what
	// cancels its request.
	body   io.ReadCloser
	br     *bufio.Reader
	cancel context.CancelFunc

	sub  *subState  // deliveries are accounted here (nil: ignored)
	pub  *publisher // replies to publishes go here (nil: ignored)
	slot func(sender int64) int
	// foreign, when set, sees every frame that is neither a bench delivery
	// nor a reply (a delivery whose data is not a bench payload, an event);
	// raw is the reader's buffer, valid during the call only.
	foreign func(raw []byte)

	stopping atomic.Bool // set before we close it ourselves
	done     chan struct{}
	closeErr error // why the reader stopped; read after done
}

// subscribeID is the correlation id of a client's subscribe; publish ids are
// firstPublishID + seq.
const (
	subscribeID    = 1
	firstPublishID = 2
)

// connect dials node url, waits for the welcome and, when channel is not
// empty, subscribes and waits for the ok. The reader goroutine is not
// started yet: call run.
func (d *dialer) connect(ctx context.Context, idx int, node int, channel string) (*client, error) {
	ctx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	ws, resp, err := websocket.Dial(ctx, d.urls[node], &websocket.DialOptions{HTTPClient: d.httpClient(node, idx), CompressionMode: d.compression})
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("%s: HTTP %d: %v", d.urls[node], resp.StatusCode, err)
		}
		return nil, fmt.Errorf("%s: %v", d.urls[node], err)
	}
	ws.SetReadLimit(1 << 20)
	c := &client{idx: idx, node: node, ws: ws, done: make(chan struct{})}
	fail := func(err error) (*client, error) {
		ws.CloseNow()
		return nil, fmt.Errorf("%s: %v", d.urls[node], err)
	}
	var buf []byte
	var f frame
	buf, err = readFrame(ctx, ws, buf)
	if err != nil {
		return fail(fmt.Errorf("waiting for welcome: %v", err))
	}
	if err := parseFrame(buf, &f); err != nil || string(f.typ) != "welcome" {
		return fail(fmt.Errorf("expected a welcome, got %.200s", buf))
	}
	c.connID, c.nodeID = string(f.conn), string(f.node)
	if channel == "" {
		return c, nil
	}
	msg := fmt.Appendf(nil, `{"op":"subscribe","channel":%q,"id":%d}`, channel, subscribeID)
	if err := ws.Write(ctx, websocket.MessageText, msg); err != nil {
		return fail(fmt.Errorf("subscribe: %v", err))
	}
	for {
		buf, err = readFrame(ctx, ws, buf)
		if err != nil {
			return fail(fmt.Errorf("waiting for the subscribe reply: %v", err))
		}
		if err := parseFrame(buf, &f); err != nil {
			return fail(fmt.Errorf("bad frame %.200s: %v", buf, err))
		}
		if f.hasID && f.id == subscribeID {
			if string(f.typ) == "ok" {
				return c, nil
			}
			return fail(fmt.Errorf("subscribe %s refused: %s", channel, buf))
		}
	}
}

// readFrame reads one message into buf, reusing its memory.
func readFrame(ctx context.Context, ws *websocket.Conn, buf []byte) ([]byte, error) {
	_, r, err := ws.Reader(ctx)
	if err != nil {
		return buf[:0], err
	}
	buf = buf[:0]
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

// run starts the reader goroutine: it accounts deliveries in c.sub and
// publish replies in c.pub until the connection ends. Reading also answers
// the server's pings.
func (c *client) run(disconnected func(*client)) {
	go func() {
		defer close(c.done)
		buf := make([]byte, 0, 512)
		var f frame
		var p payload
		var err error
		var closed error // an SSE close event
		for {
			// context.Background: no per-read timer; closing the connection
			// ends the read.
			if c.ws != nil {
				buf, err = readFrame(context.Background(), c.ws, buf)
			} else {
				buf, err = readEvent(c.br, buf)
			}
			if err != nil {
				c.closeErr = err
				if closed != nil {
					c.closeErr = closed
				}
				if !c.stopping.Load() && disconnected != nil {
					disconnected(c)
				}
				return
			}
			now := time.Now()
			if parseFrame(buf, &f) != nil {
				continue
			}
			switch string(f.typ) {
			case "message":
				if c.sub == nil {
					continue
				}
				if parsePayload(f.data, &p) != nil {
					if c.foreign != nil {
						c.foreign(buf)
					}
					c.sub.deliver(-1, 0, 0, now)
					continue
				}
				slot := 0
				if c.slot != nil {
					slot = c.slot(p.c)
				}
				c.sub.deliver(slot, p.seq, p.t, now)
			case "ok", "error":
				if c.pub != nil && f.hasID && f.id >= firstPublishID {
					c.pub.reply(f.id-firstPublishID, f.code, now)
				}
			case "close": // SSE: the stream ends after it
				if c.ws == nil {
					closed = &sseClosed{code: string(f.code)}
				}
				if c.foreign != nil {
					c.foreign(buf)
				}
			default:
				if c.foreign != nil {
					c.foreign(buf)
				}
			}
		}
	}()
}

// closeCode describes why a connection ended, for the report.
func closeCode(err error) string {
	if code := websocket.CloseStatus(err); code != -1 {
		return strconv.Itoa(int(code))
	}
	var sc *sseClosed
	if errors.As(err, &sc) {
		return sc.code
	}
	if err == nil {
		return "none"
	}
	return "no close frame"
}

// stop closes the connection with a normal closure (an SSE stream: cancels
// its request).
func (c *client) stop() {
	c.stopping.Store(true)
	if c.ws == nil {
		c.cancel()
		c.body.Close()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	ch := make(chan struct{})
	go func() {
		c.ws.Close(websocket.StatusNormalClosure, "")
		close(ch)
	}()
	select {
	case <-ch:
	case <-ctx.Done():
		c.ws.CloseNow()
	}
}

// pool is a set of connected clients with the bookkeeping the scenarios share.
type pool struct {
	clients      []*client
	connected    atomic.Int64
	disconnected atomic.Int64
	mu           sync.Mutex
	closeCodes   map[string]int
}

func newPool(n int) *pool {
	return &pool{clients: make([]*client, n), closeCodes: map[string]int{}}
}

// onDisconnect counts a connection that ended without us closing it.
func (p *pool) onDisconnect(c *client) {
	p.disconnected.Add(1)
	p.mu.Lock()
	p.closeCodes[closeCode(c.closeErr)]++
	p.mu.Unlock()
}

func (p *pool) codes() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]int, len(p.closeCodes))
	for k, v := range p.closeCodes {
		out[k] = v
	}
	return out
}

// connectAll opens n connections with at most concurrency handshakes at a
// time. open(i) must return a connected client (not yet running). The first
// failure stops the others; the error says how many connected.
func (p *pool) connectAll(ctx context.Context, concurrency int, open func(ctx context.Context, i int) (*client, error)) error {
	n := len(p.clients)
	if concurrency < 1 {
		concurrency = 1
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var next atomic.Int64
	var once sync.Once
	var firstErr error
	var wg sync.WaitGroup
	for w := 0; w < concurrency && w < n; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				c, err := open(ctx, i)
				if err != nil {
					once.Do(func() {
						firstErr = fmt.Errorf("client %d: %w", i, err)
						cancel()
					})
					return
				}
				p.clients[i] = c
				p.connected.Add(1)
			}
		}()
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return fmt.Errorf("connecting failed: %d of %d connections open: %w", p.connected.Load(), n, firstErr)
	}
	return nil
}

// closeAll closes every open connection, concurrency at a time.
func (p *pool) closeAll(concurrency int) {
	if concurrency < 1 {
		concurrency = 1
	}
	sem := make(chan struct{}, concurrency)
	var wg sync.WaitGroup
	for _, c := range p.clients {
		if c == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func(c *client) {
			defer wg.Done()
			c.stop()
			<-sem
		}(c)
	}
	wg.Wait()
}

// publisher sends publishes on one client with at most inflight of them
// unanswered, and accounts the replies.
type publisher struct {
	c       *client
	channel string
	window  chan struct{} // one token per unanswered publish
	pad     []byte
	buf     []byte // the frame being sent; only the sending goroutine uses it

	mu     sync.Mutex
	sentAt map[int64]int64 // seq → send time (unix nanos), until answered
	stats  pubStats
}

// pubStats are a publisher's counts since the last take.
type pubStats struct {
	sent, ok           int64
	errCodes           map[string]int64
	ack                *hist // publish → ok
	firstSent, lastAck time.Time
}

func newPubStats() pubStats { return pubStats{errCodes: map[string]int64{}, ack: &hist{}} }

func newPublisher(c *client, channel string, inflight, payloadSize int) *publisher {
	if inflight < 1 {
		inflight = 1
	}
	p := &publisher{
		c:       c,
		channel: channel,
		window:  make(chan struct{}, inflight),
		sentAt:  map[int64]int64{},
		stats:   newPubStats(),
	}
	// The payload without pad, {"c":N,"seq":N,"t":N,"pad":""}, is about
	// 50 bytes. The pad is chat text, so that compression sees what it
	// would see in a chat (a run of one letter would compress to nothing).
	if n := payloadSize - 50; n > 0 {
		p.pad = make([]byte, n)
		for i := range p.pad {
			p.pad[i] = chatText[i%len(chatText)]
		}
	}
	c.pub = p
	return p
}

// windowStall is how long a publisher waits for a reply when its window is
// full before it gives up: a node answers every publish within its
// publish_timeout (2 s by default), so this only trips on a stuck node.
const windowStall = 30 * time.Second

// publish waits for room in the window and sends message seq, stamped with
// the send time. sender is put in the payload as "c" when >= 0.
func (p *publisher) publish(ctx context.Context, seq, sender int64) error {
	select {
	case p.window <- struct{}{}:
	default:
		stall := time.NewTimer(windowStall)
		defer stall.Stop()
		select {
		case p.window <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		case <-p.c.done:
			return fmt.Errorf("publisher disconnected (%s)", closeCode(p.c.closeErr))
		case <-stall.C:
			return fmt.Errorf("no reply to any of %d publishes for %v", cap(p.window), windowStall)
		}
	}
	now := time.Now()
	t := now.UnixNano()
	p.mu.Lock()
	p.sentAt[seq] = t
	p.stats.sent++
	if p.stats.firstSent.IsZero() {
		p.stats.firstSent = now
	}
	p.mu.Unlock()
	b := p.buf[:0]
	b = append(b, `{"op":"publish","channel":"`...)
	b = append(b, p.channel...)
	b = append(b, `","id":`...)
	b = strconv.AppendInt(b, seq+firstPublishID, 10)
	b = append(b, `,"data":{`...)
	if sender >= 0 {
		b = append(b, `"c":`...)
		b = strconv.AppendInt(b, sender, 10)
		b = append(b, ',')
	}
	b = append(b, `"seq":`...)
	b = strconv.AppendInt(b, seq, 10)
	b = append(b, `,"t":`...)
	b = strconv.AppendInt(b, t, 10)
	b = append(b, `,"pad":"`...)
	b = append(b, p.pad...)
	b = append(b, `"}}`...)
	p.buf = b
	// Not derived from ctx: a write cut short closes the connection.
	wctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.c.ws.Write(wctx, websocket.MessageText, b); err != nil {
		// The server probably closed the connection: say how, once the
		// reader has seen the close frame.
		select {
		case <-p.c.done:
			return fmt.Errorf("publisher disconnected (close code %s)", closeCode(p.c.closeErr))
		case <-time.After(time.Second):
			return err
		}
	}
	return nil
}

// alive says whether the publisher's connection is still open.
func (p *publisher) alive() bool {
	select {
	case <-p.c.done:
		return false
	default:
		return true
	}
}

// reply accounts the ok or error answering publish seq.
func (p *publisher) reply(seq int64, code []byte, now time.Time) {
	p.mu.Lock()
	t, ok := p.sentAt[seq]
	if !ok {
		p.mu.Unlock()
		return // not ours, or answered twice
	}
	delete(p.sentAt, seq)
	if len(code) == 0 {
		p.stats.ok++
	} else {
		p.stats.errCodes[string(code)]++
	}
	p.stats.lastAck = now
	p.stats.ack.record(now.Sub(time.Unix(0, t)))
	p.mu.Unlock()
	<-p.window
}

// pending is the number of publishes not answered yet.
func (p *publisher) pending() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.sentAt)
}

// counts returns sent, answered ok and answered with an error so far.
func (p *publisher) counts() (sent, ok, errs int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, n := range p.stats.errCodes {
		errs += n
	}
	return p.stats.sent, p.stats.ok, errs
}

// take returns the stats since the last take and starts new ones. Publishes
// still unanswered are forgotten (they are counted as unanswered by the
// caller) and their window slots freed.
func (p *publisher) take() (s pubStats, unanswered int64) {
	p.mu.Lock()
	s, p.stats = p.stats, newPubStats()
	unanswered = int64(len(p.sentAt))
	clear(p.sentAt)
	p.mu.Unlock()
	for range unanswered {
		select {
		case <-p.window:
		default:
		}
	}
	return s, unanswered
}
