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
			case "gap":
				if c.sub != nil {
					c.sub.gap(f.missed)
				}
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
