//go:build !linux

package caddychat

// canPeekSocket is false: without takePongs a pong would leave the waiting
// goroutine in the library's Read, so connections read as they always did.
const canPeekSocket = false

// takePongs is Linux-only (it peeks at the socket); elsewhere every wake
// goes through the library.
func takePongs(uintptr) (int, bool) { return 0, false }
