package caddychat

import "testing"

func TestSendQueueIsABoundedFIFO(t *testing.T) {
	var q sendQueue
	frames := make([]*delivery, 10)
	for i := range frames {
		frames[i] = &delivery{own: []byte{byte(i)}}
	}
	if q.pop() != nil || q.len() != 0 {
		t.Fatal("a new queue is not empty")
	}
	for i := range 4 {
		if !q.push(frames[i], 4) {
			t.Fatalf("push %d refused below the limit", i)
		}
	}
	if q.push(frames[4], 4) {
		t.Fatal("push accepted over the limit")
	}
	// Interleave pops and pushes past the compaction point: order holds.
	next := 0
	for i := 4; i < len(frames); i++ {
		if got := q.pop(); got != frames[next] {
			t.Fatalf("pop %d: got frame %v, want %d", next, got.own, next)
		}
		next++
		if !q.push(frames[i], 4) {
			t.Fatalf("push %d refused after a pop", i)
		}
		if q.len() != 4 {
			t.Fatalf("len = %d, want 4", q.len())
		}
	}
	for ; next < len(frames); next++ {
		if got := q.pop(); got != frames[next] {
			t.Fatalf("pop %d: got frame %v", next, got.own)
		}
	}
	if q.pop() != nil || q.len() != 0 {
		t.Fatal("drained queue not empty")
	}
	if cap(q.frames) == 0 {
		t.Fatal("a small drained queue dropped its capacity")
	}

	// After a burst beyond shrinkAbove, the drained queue lets its memory go.
	for range shrinkAbove + 1 {
		q.push(frames[0], shrinkAbove+1)
	}
	for q.pop() != nil {
	}
	if q.frames != nil {
		t.Fatalf("kept %d slots after a burst", cap(q.frames))
	}
}
