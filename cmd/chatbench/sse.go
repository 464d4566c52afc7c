package main

// The SSE transport of subscribers (-transport sse): one HTTP GET stream per
// client, GET <route>?channel=... with Accept: text/event-stream; every
// event's data is one JSON server frame, the welcome first, then the ok of
// the query's subscribe. Publishers stay on WebSocket.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"
)

// sseReadBuffer is the size of a stream's reader: a bench delivery is one
// line of a few hundred bytes; longer lines are gathered piece by piece.
const sseReadBuffer = 4096

// sseURL turns a node's WebSocket URL into the URL of a stream subscribed to
// channel (none when empty): ws → http, wss → https, same path and query.
func sseURL(raw, channel string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", err
	}
	switch u.Scheme {
	case "ws":
		u.Scheme = "http"
	case "wss":
		u.Scheme = "https"
	}
	if channel != "" {
		q := u.Query()
		q.Add("channel", channel)
		u.RawQuery = q.Encode()
	}
	return u.String(), nil
}

// sseClosed is why a stream ended when the server said so with a close
// event: its WebSocket close code.
type sseClosed struct{ code string }

func (e *sseClosed) Error() string { return "close event " + e.code }

// connectSSE opens a stream on node subscribed to channel, waits for the
// welcome and the subscribe's ok. The reader goroutine is not started yet:
// call run.
func (d *dialer) connectSSE(ctx context.Context, idx int, node int, channel string) (*client, error) {
	u, err := sseURL(d.urls[node], channel)
	if err != nil {
		return nil, err
	}
	// The request's context lives as long as the stream: the connect timeout
	// and ctx only apply until the subscribe's ok.
	sctx, cancel := context.WithCancel(context.Background())
	timer := time.AfterFunc(d.timeout, cancel)
	stopCtx := context.AfterFunc(ctx, cancel)
	fail := func(err error) (*client, error) {
		timer.Stop()
		stopCtx()
		cancel()
		if ctx.Err() != nil {
			err = fmt.Errorf("%v (%v)", err, ctx.Err())
		}
		return nil, fmt.Errorf("%s: %v", u, err)
	}
	req, err := http.NewRequestWithContext(sctx, http.MethodGet, u, nil)
	if err != nil {
		return fail(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	resp, err := d.httpClient(node, idx).Do(req)
	if err != nil {
		return fail(err)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
		resp.Body.Close()
		return fail(fmt.Errorf("HTTP %d: %s", resp.StatusCode, bytes.TrimSpace(body)))
	}
	c := &client{idx: idx, node: node, body: resp.Body, br: bufio.NewReaderSize(resp.Body, sseReadBuffer), cancel: cancel, done: make(chan struct{})}
	failBody := func(err error) (*client, error) {
		resp.Body.Close()
		return fail(err)
	}
	var buf []byte
	var f frame
	buf, err = readEvent(c.br, buf)
	if err != nil {
		return failBody(fmt.Errorf("waiting for welcome: %v", err))
	}
	if err := parseFrame(buf, &f); err != nil || string(f.typ) != "welcome" {
		return failBody(fmt.Errorf("expected a welcome, got %.200s", buf))
	}
	c.connID, c.nodeID = string(f.conn), string(f.node)
	for channel != "" {
		buf, err = readEvent(c.br, buf)
		if err != nil {
			return failBody(fmt.Errorf("waiting for the subscribe reply: %v", err))
		}
		if err := parseFrame(buf, &f); err != nil {
			return failBody(fmt.Errorf("bad event %.200s: %v", buf, err))
		}
		if string(f.typ) == "ok" {
			break
		}
		if string(f.typ) == "error" || string(f.typ) == "close" {
			return failBody(fmt.Errorf("subscribe %s refused: %s", channel, buf))
		}
	}
	if !timer.Stop() {
		return failBody(errors.New("connect timeout"))
	}
	stopCtx()
	return c, nil
}

// readEvent reads the stream up to the end of the next event that has data
// and returns its data in buf (reusing its memory): the values of its data
// lines, joined with "\n". Comments (the keep-alive ":"), other fields (id,
// event, retry) and events without data are skipped, as EventSource does.
// An event cut off by the end of the stream is not returned.
func readEvent(br *bufio.Reader, buf []byte) ([]byte, error) {
	buf = buf[:0]
	have := false // a data line was seen
	var long []byte
	for {
		line, err := br.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			// Longer than the reader's buffer: gather it (rare).
			long = append(long[:0], line...)
			for err == bufio.ErrBufferFull {
				line, err = br.ReadSlice('\n')
				long = append(long, line...)
			}
			line = long
		}
		if err != nil {
			return buf[:0], err
		}
		line = line[:len(line)-1] // the '\n'
		if n := len(line); n > 0 && line[n-1] == '\r' {
			line = line[:n-1]
		}
		if len(line) == 0 {
			if have {
				return buf, nil
			}
			continue
		}
		if len(line) < 4 || string(line[:4]) != "data" {
			continue // a comment or another field
		}
		v := line[4:]
		if len(v) > 0 {
			if v[0] != ':' {
				continue // another field whose name starts with "data"
			}
			v = v[1:]
			if len(v) > 0 && v[0] == ' ' {
				v = v[1:]
			}
		}
		if have {
			buf = append(buf, '\n')
		}
		buf = append(buf, v...)
		have = true
	}
}

// subscriberConnect is how subscribers (and idle clients) connect over
// transport.
func (d *dialer) subscriberConnect(transport string) func(ctx context.Context, idx, node int, channel string) (*client, error) {
	if transport == "sse" {
		return d.connectSSE
	}
	return d.connect
}
