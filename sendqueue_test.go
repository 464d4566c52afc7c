package caddychat

import "testing"

func TestSendQueueIsAFIFOBoundedInBytes(t *testing.T) {
	var q sendQueue
	frames := make([]*delivery, 10)
	for i := range frames {
		frames[i] = &delivery{own: make([]byte, 100+i%2)} // 228 or 229 bytes queued
	}
	const limit = 4 * (100 + 1 + frameOverhead)
	if q.pop() != nil || q.len() != 0 || q.queuedBytes() != 0 {
		t.Fatal("a new queue is not empty")
	}
	for i := range 4 {
		if !q.push(frames[i], limit) {
			t.Fatalf("push %d refused below the limit", i)
		}
	}
	if q.queuedBytes() != 2*228+2*229 {
		t.Fatalf("queued %d bytes", q.queuedBytes())
	}
	if q.push(frames[4], limit) {
		t.Fatal("push accepted over the limit")
	}
	// Interleave pops and pushes past the compaction point: order holds.
	next := 0
	for i := 4; i < len(frames); i++ {
		if got := q.pop(); got != frames[next] {
			t.Fatalf("pop %d: got a frame of %d bytes", next, len(got.own))
		}
		next++
		if !q.push(frames[i], limit) {
			t.Fatalf("push %d refused after a pop", i)
		}
		if q.len() != 4 {
			t.Fatalf("len = %d, want 4", q.len())
		}
	}
	for ; next < len(frames); next++ {
		if got := q.pop(); got != frames[next] {
			t.Fatalf("pop %d: wrong frame", next)
		}
	}
	if q.pop() != nil || q.len() != 0 || q.queuedBytes() != 0 {
		t.Fatalf("drained queue not empty: %d frames, %d bytes", q.len(), q.queuedBytes())
	}
	if cap(q.frames) == 0 {
		t.Fatal("a small drained queue dropped its capacity")
	}

	// An empty queue takes one frame larger than the limit, and nothing after it.
	big := &delivery{own: make([]byte, 2*limit)}
	if !q.push(big, limit) || q.push(frames[0], limit) {
		t.Fatal("an empty queue must take one oversized frame and then refuse")
	}
	q.pop()

	// After a burst beyond shrinkAbove, the drained queue lets its memory go.
	for range shrinkAbove + 1 {
		q.push(frames[0], 1<<30)
	}
	for q.pop() != nil {
	}
	if q.frames != nil {
		t.Fatalf("kept %d slots after a burst", cap(q.frames))
	}
}
