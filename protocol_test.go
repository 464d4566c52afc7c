package caddychat

import (
	"encoding/json"
	"testing"
)

// TestOwnEnvelopeFastPathAgreesWithDecoding: the decode-free check used on
// the delivery path accepts what encodeEnvelope makes for the channel, and
// nothing that parseEnvelope would refuse.
func TestOwnEnvelopeFastPathAgreesWithDecoding(t *testing.T) {
	own, err := encodeEnvelope("room:a", "1-n-1", "alice", 1, json.RawMessage(`{"text":"hi \u003c"}`))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		channel string
		payload string
		want    bool
	}{
		{"room:a", string(own), true},
		{"room:b", string(own), false}, // another channel's envelope
		{"room:a", `{"type":"message","channel":"room:a","id":"x","from":"","ts":1}`, false},              // no data
		{"room:a", `{"type":"message","channel":"room:a","id":"","from":"","ts":1,"data":1}`, false},      // no id
		{"room:a", `{"type":"message","channel":"room:a","id":"x","from":"","ts":1,"data":1`, false},      // truncated
		{"room:a", `{"type":"message","channel":"room:ab","id":"x","from":"","ts":1,"data":1}`, false},    // prefix of another name
		{"room:a", "{\"type\":\"message\",\"channel\":\"room:a\",\"id\":\"x\",\"data\":\"\xff\"}", false}, // bad UTF-8
		{"room:a", `hello`, false},
		{"room:a", `{"text":"hi"}`, false},
	}
	for _, tc := range cases {
		got := isOwnEnvelope(tc.channel, []byte(tc.payload))
		if got != tc.want {
			t.Errorf("isOwnEnvelope(%q, %q) = %v, want %v", tc.channel, tc.payload, got, tc.want)
		}
		if _, decoded := parseEnvelope(tc.channel, []byte(tc.payload)); got && !decoded {
			t.Errorf("isOwnEnvelope accepts %q, which parseEnvelope refuses", tc.payload)
		}
	}
}
