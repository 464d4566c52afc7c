package main

// A delivery phase reads the nodes' admin /metrics (-metrics-url) while it
// runs: the lag a subscriber's latency cannot show is the one upstream of
// the node's send queues (Redis's output buffer, the node's inbox), which
// only the node measures. Nodes without a metric show "-" for it, so the
// tool also runs against builds that predate it.

import (
	"bufio"
	"context"
	"io"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// nodeLag is what a phase reports of the nodes' metrics; nil fields: no
// node exported the metric (or no -metrics-url).
type nodeLag struct {
	// The highest caddy_chat_broker_lag_max_seconds sampled during the
	// phase, over the nodes. The gauge spans the last 10 to 20 s, so a
	// phase that follows a lagging one within that time inherits its value;
	// LagBucketSeconds does not.
	LagMaxSeconds *float64 `json:"lag_max_seconds,omitempty"`
	// The smallest bucket bound of caddy_chat_broker_lag_seconds under which
	// every lag observed during the phase falls (+Inf: -1), from the
	// histogram's counts before and after it, summed over the nodes.
	LagBucketSeconds *float64 `json:"lag_bucket_le_seconds,omitempty"`
	LagObserved      *float64 `json:"lag_observed,omitempty"` // messages observed during the phase
	// The bounded-latency mechanism's own figures (issue 21): the peak of
	// caddy_chat_broker_backlog_bytes, and the phase's increase of
	// caddy_chat_late_skipped_total by "where" and of
	// caddy_chat_publish_refused_late_total.
	BacklogPeakBytes *float64           `json:"backlog_peak_bytes,omitempty"`
	LateSkipped      map[string]float64 `json:"late_skipped,omitempty"`
	RefusedLate      *float64           `json:"publish_refused_late,omitempty"`
	Errors           []string           `json:"errors,omitempty"` // pages that could not be read
}

// promPage is one node's /metrics reduced to the series chatbench reads.
type promPage struct {
	lagMax, backlog, refusedLate *float64
	lagBuckets                   map[float64]float64 // le → cumulative count
	lateSkipped                  map[string]float64  // where → count
}

const (
	mLagMax      = "caddy_chat_broker_lag_max_seconds"
	mLagBucket   = "caddy_chat_broker_lag_seconds_bucket"
	mBacklog     = "caddy_chat_broker_backlog_bytes"
	mLateSkipped = "caddy_chat_late_skipped_total"
	mRefusedLate = "caddy_chat_publish_refused_late_total"
)

// parsePromPage reads the Prometheus text format, summing series that
// differ in labels chatbench does not look at.
func parsePromPage(r io.Reader) (promPage, error) {
	p := promPage{lagBuckets: map[float64]float64{}, lateSkipped: map[string]float64{}}
	err := scanSamples(r, func(name, labels string, v float64) {
		switch name {
		case mLagMax:
			// Several hubs' gauges would be maxima too.
			if p.lagMax == nil || v > *p.lagMax {
				p.lagMax = &v
			}
		case mBacklog:
			addSample(&p.backlog, v)
		case mRefusedLate:
			addSample(&p.refusedLate, v)
		case mLateSkipped:
			p.lateSkipped[labelValue(labels, "where")] += v
		case mLagBucket:
			le, err := strconv.ParseFloat(labelValue(labels, "le"), 64)
			if err == nil {
				p.lagBuckets[le] += v
			}
		}
	})
	return p, err
}

// scanSamples calls sample for each caddy_chat_ sample of a page in the
// Prometheus text format: its name, its label list (without braces) and
// its value. Lines it cannot read are skipped.
func scanSamples(r io.Reader, sample func(name, labels string, v float64)) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "caddy_chat_") {
			continue
		}
		name, labels, rest := line, "", ""
		if i := strings.IndexAny(line, "{ "); i >= 0 {
			name, rest = line[:i], line[i:]
			if line[i] == '{' {
				if j := strings.LastIndexByte(line, '}'); j > i {
					labels, rest = line[i+1:j], line[j+1:]
				}
			}
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			continue
		}
		sample(name, labels, v)
	}
	return sc.Err()
}

// addSample adds v to *dst, which a first sample creates: nil means the
// node has no such series.
func addSample(dst **float64, v float64) {
	if *dst == nil {
		*dst = new(float64)
	}
	**dst += v
}

func fetchPromPage(ctx context.Context, url string) (promPage, error) {
	return fetchPage(ctx, url, parsePromPage)
}

// fetchPage GETs a node's metrics page at url and parses it.
func fetchPage[T any](ctx context.Context, url string, parse func(io.Reader) (T, error)) (T, error) {
	var zero T
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return zero, err
	}
	resp, err := metricsClient.Do(req)
	if err != nil {
		return zero, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return zero, &httpStatusError{url: url, code: resp.StatusCode}
	}
	return parse(resp.Body)
}

type httpStatusError struct {
	url  string
	code int
}

func (e *httpStatusError) Error() string { return e.url + ": HTTP " + strconv.Itoa(e.code) }

// lagEvery is how often a phase samples the nodes' metrics.
const lagEvery = 500 * time.Millisecond

// lagSampler reads every node's page at the start of a phase, every
// lagEvery during it and once at its end.
type lagSampler struct {
	urls  []string
	first []promPage
	ok    []bool // first page read

	mu      sync.Mutex
	res     nodeLag
	errSeen map[string]bool
	stop    chan struct{}
	wg      sync.WaitGroup
}

func startLagSampler(urls []string) *lagSampler {
	s := &lagSampler{urls: urls, first: make([]promPage, len(urls)), ok: make([]bool, len(urls)), errSeen: map[string]bool{}, stop: make(chan struct{})}
	if len(urls) == 0 {
		return s
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for i, u := range urls {
		p, err := fetchPromPage(ctx, u)
		if s.note(err) {
			continue
		}
		s.first[i], s.ok[i] = p, true
		s.gauges(p)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTicker(lagEvery)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
				s.sampleAll(nil)
			}
		}
	}()
	return s
}

// note keeps the first of each distinct error; it says whether err is one.
func (s *lagSampler) note(err error) bool {
	if err == nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if msg := err.Error(); !s.errSeen[msg] && len(s.errSeen) < 4 {
		s.errSeen[msg] = true
		s.res.Errors = append(s.res.Errors, msg)
	}
	return true
}

// gauges folds one page's gauges into the phase's peaks.
func (s *lagSampler) gauges(p promPage) {
	s.mu.Lock()
	defer s.mu.Unlock()
	peak := func(dst **float64, v *float64) {
		if v != nil && (*dst == nil || *v > **dst) {
			x := *v
			*dst = &x
		}
	}
	peak(&s.res.LagMaxSeconds, p.lagMax)
	peak(&s.res.BacklogPeakBytes, p.backlog)
}

// sampleAll reads every node once; last, when not nil, gets the pages.
func (s *lagSampler) sampleAll(last []promPage) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	for i, u := range s.urls {
		p, err := fetchPromPage(ctx, u)
		if s.note(err) {
			continue
		}
		s.gauges(p)
		if last != nil {
			last[i] = p
		}
	}
}

// finish stops sampling, reads the pages once more and returns the phase's
// figures (nil without -metrics-url).
func (s *lagSampler) finish() *nodeLag {
	if len(s.urls) == 0 {
		return nil
	}
	close(s.stop)
	s.wg.Wait()
	last := make([]promPage, len(s.urls))
	s.sampleAll(last)
	s.mu.Lock()
	defer s.mu.Unlock()
	res := s.res
	buckets := map[float64]float64{}
	for i := range s.urls {
		if !s.ok[i] || last[i].lagBuckets == nil {
			continue
		}
		a, b := s.first[i], last[i]
		for le, n := range b.lagBuckets {
			buckets[le] += n - a.lagBuckets[le]
		}
		deltaOf := func(x, y *float64) *float64 {
			if y == nil {
				return nil
			}
			d := *y
			if x != nil {
				d -= *x
			}
			return &d
		}
		if d := deltaOf(a.refusedLate, b.refusedLate); d != nil {
			if res.RefusedLate == nil {
				res.RefusedLate = new(float64)
			}
			*res.RefusedLate += *d
		}
		for where, n := range b.lateSkipped {
			if res.LateSkipped == nil {
				res.LateSkipped = map[string]float64{}
			}
			res.LateSkipped[where] += n - a.lateSkipped[where]
		}
	}
	res.LagBucketSeconds, res.LagObserved = bucketBound(buckets)
	return &res
}

// bucketBound is the smallest bound whose cumulative count holds every
// observation of the phase (+Inf as -1), and their number; nil for no
// histogram, no bound for no observation.
func bucketBound(delta map[float64]float64) (bound, observed *float64) {
	if len(delta) == 0 {
		return nil, nil
	}
	les := make([]float64, 0, len(delta))
	for le := range delta {
		les = append(les, le)
	}
	sort.Float64s(les)
	total := delta[les[len(les)-1]] // +Inf sorts last
	observed = &total
	if total <= 0 {
		return nil, observed
	}
	for _, le := range les {
		if delta[le] >= total {
			b := le
			if math.IsInf(le, 1) {
				b = -1
			}
			return &b, observed
		}
	}
	return nil, observed
}
