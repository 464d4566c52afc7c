package main

import (
	"encoding/json"
	"math"
	"math/rand/v2"
	"testing"
	"time"
)

// TestParseFrameMatchesEncodingJSON checks the hand-written scanner against
// encoding/json on the frames the server sends and on awkward variants.
func TestParseFrameMatchesEncodingJSON(t *testing.T) {
	frames := []string{
		`{"type":"welcome","conn":"c-1","node":"n1","user":""}`,
		`{"type":"ok","id":1,"channel":"room:x"}`,
		`{"type":"ok","id":12345,"channel":"room:x","message_id":"1764060000000-k3j9x-42"}`,
		`{"type":"error","id":7,"code":"unavailable","message":"broker \"down\", retry"}`,
		`{"type":"error","code":"bad_request","message":"bad id"}`,
		`{"type":"message","channel":"room:x","id":"1764-a-1","from":"","ts":1764060000000,"data":{"seq":3,"t":1764060000000123456,"pad":"xx}x\"x"}}`,
		` { "data" : {"pad":[1,{"a":"]"}],"t":5,"c":9,"seq":0} , "type" : "message" , "extra":[true,null,-1.5e3]}`,
		`{"type":"message","id":"s","data":"just a string"}`,
		`{"id":"abc","type":"ok"}`,
		`{}`,
	}
	for _, s := range frames {
		var f frame
		if err := parseFrame([]byte(s), &f); err != nil {
			t.Errorf("%s: %v", s, err)
			continue
		}
		var want struct {
			Type string          `json:"type"`
			ID   json.RawMessage `json:"id"`
			Code string          `json:"code"`
			Data json.RawMessage `json:"data"`
			Conn string          `json:"conn"`
		}
		if err := json.Unmarshal([]byte(s), &want); err != nil {
			t.Fatal(err)
		}
		var wantID int64
		wantHasID := json.Unmarshal(want.ID, &wantID) == nil
		if string(f.typ) != want.Type || f.hasID != wantHasID || f.id != wantID || string(f.code) != want.Code || string(f.data) != string(want.Data) || string(f.conn) != want.Conn {
			t.Errorf("%s: got type %q id %d/%v code %q data %s conn %q", s, f.typ, f.id, f.hasID, f.code, f.data, f.conn)
		}
		var p payload
		var wantP struct {
			Seq *int64 `json:"seq"`
			T   *int64 `json:"t"`
			C   int64  `json:"c"`
		}
		perr := parsePayload(f.data, &p)
		werr := json.Unmarshal(want.Data, &wantP)
		isPayload := werr == nil && wantP.Seq != nil && wantP.T != nil
		if (perr == nil) != isPayload {
			t.Errorf("%s: payload error %v, encoding/json %v", s, perr, werr)
		} else if isPayload && (p.seq != *wantP.Seq || p.t != *wantP.T || p.c != wantP.C) {
			t.Errorf("%s: payload %+v", s, p)
		}
	}
	for _, bad := range []string{``, `[]`, `{"type"}`, `{"type":"ok"`, `{"type":"ok",}`, `{"a":"unterminated}`, `{"a":{"b":1}`, `{"a":}`} {
		var f frame
		if parseFrame([]byte(bad), &f) == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestHistQuantiles(t *testing.T) {
	var h hist
	var s shardedHist
	// 1..100000 µs, uniformly.
	for i := 1; i <= 100000; i++ {
		h.record(time.Duration(i) * time.Microsecond)
		s.shard(i).record(time.Duration(i) * time.Microsecond)
	}
	for _, hh := range []*hist{&h, s.merged()} {
		sum := hh.summary()
		for _, c := range []struct{ got, want float64 }{{sum.P50MS, 50}, {sum.P90MS, 90}, {sum.P99MS, 99}, {sum.MaxMS, 100}, {sum.MeanMS, 50}} {
			if math.Abs(c.got-c.want)/c.want > 0.01 {
				t.Errorf("got %v ms, want %v ms within 1%%", c.got, c.want)
			}
		}
		if sum.Count != 100000 {
			t.Errorf("count %d", sum.Count)
		}
	}
	// Every bucket's value maps back to the bucket, and buckets are ordered.
	for i := 0; i < histBucketsLen-1; i++ {
		if histIndex(uint64(histValue(i))) != i || histValue(i+1) <= histValue(i) {
			t.Fatalf("bucket %d: value %v maps to %d", i, histValue(i), histIndex(uint64(histValue(i))))
		}
	}
	// Random values are within 1% of their bucket's value.
	for range 10000 {
		v := rand.Uint64N(1 << 36)
		got := histValue(histIndex(v))
		if math.Abs(got-float64(v)) > 0.01*float64(v)+1 {
			t.Fatalf("%d µs recorded as %v", v, got)
		}
	}
}

func TestSubStateCounts(t *testing.T) {
	s := newSubState(2)
	var h hist
	s.reset(100, 10, &h)
	now := time.Now()
	for _, d := range []struct {
		slot int
		seq  int64
	}{{0, 100}, {0, 102}, {0, 101}, {0, 102}, {1, 100}, {0, 99}, {0, 110}, {1, 109}} {
		s.deliver(d.slot, d.seq, now.UnixNano(), now)
	}
	// unique: 100 102 101 (out of order) | 100 109 → 5; dup: 102; stray: 99 and 110.
	if s.unique != 5 || s.dups != 1 || s.outOfOrder != 1 || s.stray != 2 || s.deliveries != 6 || h.n.Load() != 5 {
		t.Errorf("unique %d dups %d ooo %d stray %d deliveries %d latencies %d", s.unique, s.dups, s.outOfOrder, s.stray, s.deliveries, h.n.Load())
	}
}
