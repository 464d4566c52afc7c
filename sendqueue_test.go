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

// TestSendQueueReplayIsAnAllowance: frames queued as a replay do not count
// against the limit of push while they wait; as they are popped the
// allowance shrinks with them, and live frames count in full.
func TestSendQueueReplayIsAnAllowance(t *testing.T) {
	var q sendQueue
	frame := func() *delivery { return &delivery{own: make([]byte, 72)} } // 200 bytes queued
	const limit = 600
	live := frame()
	if !q.push(live, limit) {
		t.Fatal("push refused on an empty queue")
	}
	replay := []*delivery{frame(), frame(), frame(), frame(), frame(), frame()}
	held := frame()
	q.pushAll(append(replay[:len(replay):len(replay)], held), len(replay))
	if q.queuedBytes() != 1600 || q.queuedReplayBytes() != 1200 || q.queuedLiveBytes() != 400 {
		t.Fatalf("queued %d, replay %d, live %d", q.queuedBytes(), q.queuedReplayBytes(), q.queuedLiveBytes())
	}
	// 400 live bytes wait: one more frame fits the limit of 600, two do not.
	if !q.push(frame(), limit) || q.push(frame(), limit) {
		t.Fatal("the replay counted against the limit, or the live frames did not")
	}
	// Popping the live frame before the replay frees live room; popping the
	// replay only shrinks the allowance.
	if q.pop() != live || q.queuedReplayBytes() != 1200 || q.queuedLiveBytes() != 400 {
		t.Fatalf("after the first pop: replay %d, live %d", q.queuedReplayBytes(), q.queuedLiveBytes())
	}
	for i, want := range replay {
		if q.pop() != want {
			t.Fatalf("replay frame %d out of order", i)
		}
		if got := q.queuedReplayBytes(); got != int64(1000-200*i) {
			t.Fatalf("after replay frame %d: replay %d bytes", i, got)
		}
		if q.queuedLiveBytes() != 400 {
			t.Fatalf("after replay frame %d: live %d bytes", i, q.queuedLiveBytes())
		}
	}
	if q.pop() != held || q.replays != nil {
		t.Fatalf("the held frame follows the replay; replay ranges left: %v", q.replays)
	}
	// Nothing but a replay waits: any one frame goes in, whatever its size.
	q.pop()
	q.pushAll([]*delivery{frame()}, 1)
	if !q.push(&delivery{own: make([]byte, 2*limit)}, limit) || q.push(frame(), limit) {
		t.Fatal("a queue holding only a replay must take one oversized frame and then refuse")
	}
}
