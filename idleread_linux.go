package caddychat

import "syscall"

// canPeekSocket: takePongs works here, so an idle connection can wait on its
// socket.
const canPeekSocket = true

// takePongs takes the complete pong frames at the head of the socket's
// receive queue, without waiting, and returns their length. again is true
// when nothing waits (wait for the socket to become readable), false when
// something other than a pong waits, or the socket failed: the library reads
// it then and sees the same.
func takePongs(fd uintptr) (n int, again bool) {
	var b [64]byte
	got, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	if err == syscall.EAGAIN {
		return 0, true
	}
	if err != nil || got <= 0 {
		return 0, false
	}
	k := pongFrames(b[:got])
	if k == 0 {
		return 0, false
	}
	// Peeked, so there: the read takes exactly those bytes.
	if m, err := syscall.Read(int(fd), b[:k]); err != nil || m != k {
		return 0, false
	}
	return k, false
}
