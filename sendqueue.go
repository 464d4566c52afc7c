package caddychat

import "sync"

// sendQueue is a connection's FIFO of frames to write, bounded in bytes
// (send_queue). Unlike a buffered channel, which allocates all its slots up
// front, it grows with what is waiting and gives the memory back once
// drained: an idle connection's queue costs nothing.
type sendQueue struct {
	mu     sync.Mutex
	frames []*delivery
	head   int   // frames[head:] wait
	bytes  int64 // what frames[head:] count for (delivery.size)

	// A replay (a resume's reply and the history after it) does not count
	// against the limit of push: a client that keeps reading must not look
	// slow because it was sent what it missed. pushed and popped count the
	// bytes that ever went in and out; since the queue is a FIFO, replays
	// are the byte ranges [start, end) of pushed that were replays, and
	// replayBytes is what of them still waits.
	pushed, popped int64
	replays        []byteRange
	replayBytes    int64
}

type byteRange struct{ start, end int64 }

// shrinkAbove is the capacity (in frames, 8 bytes each) a drained queue may
// keep for the next burst: enough that steady traffic never reallocates.
const shrinkAbove = 1024

// frameOverhead is what a queued frame counts for beyond its bytes: the
// queue's slot, the frame header, and for a backend's payload the envelope
// it is wrapped in. It keeps a flood of tiny frames bounded too.
const frameOverhead = 128

// size is what d counts for in a send queue. A broadcast delivery is shared
// by every subscriber, but each queue counts it in full: the bound holds
// whatever the others do.
func (d *delivery) size() int64 {
	return int64(len(d.own)+len(d.payload)) + frameOverhead
}

// push appends d unless the frames waiting, other than replays, and d would
// count for more than limit bytes. A queue where nothing but a replay waits
// takes any one frame, so that a message larger than the limit (a
// backend's) still reaches a client that keeps up.
func (q *sendQueue) push(d *delivery, limit int64) bool {
	size := d.size()
	q.mu.Lock()
	defer q.mu.Unlock()
	if live := q.bytes - q.replayBytes; live > 0 && live+size > limit {
		return false
	}
	q.appendLocked(d, size)
	return true
}

// pushAll appends ds whatever the limit: the caller has bounded them (a
// catch-up's reply, replay and held messages, see resume.go). The first
// replay of them are a replay: until popped they do not count against the
// limit of push.
func (q *sendQueue) pushAll(ds []*delivery, replay int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	start := q.pushed
	for i, d := range ds {
		q.appendLocked(d, d.size())
		if i == replay-1 {
			q.replays = append(q.replays, byteRange{start, q.pushed})
			q.replayBytes += q.pushed - start
		}
	}
}

func (q *sendQueue) appendLocked(d *delivery, size int64) {
	if q.head > 0 && q.head >= len(q.frames)/2 {
		// Reuse the consumed front rather than growing without bound under
		// a steady flow that never fully drains.
		n := copy(q.frames, q.frames[q.head:])
		clear(q.frames[n:])
		q.frames, q.head = q.frames[:n], 0
	}
	q.frames = append(q.frames, d)
	q.bytes += size
	q.pushed += size
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
	size := d.size()
	q.bytes -= size
	if len(q.replays) > 0 && q.popped >= q.replays[0].start {
		q.replayBytes -= size
	}
	q.popped += size
	if len(q.replays) > 0 && q.popped >= q.replays[0].end {
		if q.replays = q.replays[1:]; len(q.replays) == 0 {
			q.replays = nil
		}
	}
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

// queuedBytes is what the waiting frames count for.
func (q *sendQueue) queuedBytes() int64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.bytes
}

// queuedReplayBytes is what the waiting frames of replays count for.
func (q *sendQueue) queuedReplayBytes() int64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.replayBytes
}

// queuedLiveBytes is what the waiting frames other than replays count for:
// what the limit of push bounds.
func (q *sendQueue) queuedLiveBytes() int64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.bytes - q.replayBytes
}
