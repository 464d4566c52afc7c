package caddychat

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"time"
)

// signatureHeader carries the signature of a hook or webhook request, so
// that the backend can check that the request comes from a node that knows
// the secret, and is recent:
//
//	Caddychat-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
//
// The time is signed with the body, so a captured request cannot be
// replayed later than the backend's tolerance (a few minutes).
const signatureHeader = "Caddychat-Signature"

// signature is the signatureHeader value of body sent at t.
func signature(secret, body []byte, t time.Time) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(ts))
	mac.Write([]byte("."))
	mac.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}
