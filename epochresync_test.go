package caddychat

import "testing"

func TestMessageEpochOfEnvelope(t *testing.T) {
	tail := `"from":"alice","ts":1,"data":{"epoch":"not-this","text":"\",\"epoch\":\"nor-this"}}`
	env := historyEnvelope("room:a", streamID{5, 1}, "9f2c41d07a3b", tail)
	if _, ok := messageID("room:a", env); !ok {
		t.Fatalf("not a kept envelope: %s", env)
	}
	if got := string(messageEpoch("room:a", env)); got != "9f2c41d07a3b" {
		t.Fatalf("epoch of %s: got %q", env, got)
	}
	// A channel whose name looks like an epoch field does not fool it.
	env = historyEnvelope(`x","epoch":"fake`, streamID{5, 1}, "e2", tail)
	if got := string(messageEpoch(`x","epoch":"fake`, env)); got != "e2" {
		t.Fatalf("epoch of %s: got %q", env, got)
	}
	if got := messageEpoch("room:a", []byte(`{"type":"message"}`)); got != nil {
		t.Fatalf("a short payload: got %q", got)
	}
}
