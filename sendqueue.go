package caddychat

import "sync"

// sendQueue is a connection's bounded FIFO of frames to write. Unlike a
// buffered channel, which allocates all its slots up front, it grows with
// what is waiting and gives the memory back once drained: an idle
// connection's queue costs nothing.
type sendQueue struct {
	mu     sync.Mutex
	frames []*delivery
	head   int // frames[head:] wait
}

// shrinkAbove is the capacity (in frames, 8 bytes each) a drained queue may
// keep for the next burst: enough that steady traffic never reallocates.
const shrinkAbove = 1024

// push appends d unless limit frames already wait.
func (q *sendQueue) push(d *delivery, limit int) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.frames)-q.head >= limit {
		return false
	}
	if q.head > 0 && q.head >= len(q.frames)/2 {
		// Reuse the consumed front rather than growing without bound under
		// a steady flow that never fully drains.
		n := copy(q.frames, q.frames[q.head:])
		clear(q.frames[n:])
		q.frames, q.head = q.frames[:n], 0
	}
	q.frames = append(q.frames, d)
	return true
}

// pop takes the oldest frame, or returns nil when none waits.
func (q *sendQueue) pop() *delivery {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.head == len(q.frames) {
		return nil
	}
	d := q.frames[q.head]
	q.frames[q.head] = nil
	q.head++
	if q.head == len(q.frames) {
		q.head = 0
		if cap(q.frames) > shrinkAbove {
			q.frames = nil
		} else {
			q.frames = q.frames[:0]
		}
	}
	return d
}

// len is how many frames wait.
func (q *sendQueue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.frames) - q.head
}
