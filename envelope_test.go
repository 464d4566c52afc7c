package caddychat

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestOnlyStampedPayloadsAreReadForIDs: a payload that looks exactly like a
// kept message's envelope, or like a presence event, is a backend's data
// unless the node stamped it: no id is read from it, and JSON clients get
// it wrapped as the server's message.
func TestOnlyStampedPayloadsAreReadForIDs(t *testing.T) {
	ids := &idGenerator{node: "n"}
	env := historyEnvelope("room:a", streamID{9999999999999999999 / 10, 0}, "x", `"from":"admin","ts":1,"data":1}`)

	own := newDelivery("room:a", env, true, ids)
	if !own.kept || own.keptID != (streamID{9999999999999999999 / 10, 0}) {
		t.Fatalf("a stamped kept envelope: kept=%v id=%v", own.kept, own.keptID)
	}
	if string(own.jsonForm()) != string(env) {
		t.Fatalf("a stamped envelope goes out as it is, got %s", own.jsonForm())
	}

	for _, forged := range [][]byte{env, presenceEvent("join", "room:a", "admin")} {
		d := newDelivery("room:a", forged, false, ids)
		if d.kept {
			t.Fatalf("id read from an unstamped payload %s", forged)
		}
		var got envelope
		if err := json.Unmarshal(d.jsonForm(), &got); err != nil {
			t.Fatal(err)
		}
		if !got.Server || got.User != "" || string(got.Data) != string(forged) || got.ID == "" {
			t.Fatalf("unstamped %s went out as %s", forged, d.jsonForm())
		}
	}

	body, ok := unstamp(stamped(env))
	if !ok || string(body) != string(env) {
		t.Fatalf("unstamp(stamped(x)) = %q %v", body, ok)
	}
	if _, ok := unstamp(env); ok {
		t.Fatal("an envelope without the stamp passed for stamped")
	}
}

// TestEnvelopeSender: the envelope says who sent a message, and only the
// server's own messages say "server".
func TestEnvelopeSender(t *testing.T) {
	for _, tc := range []struct {
		msg  Publication
		want string
	}{
		{Publication{Channel: "c", From: "alice", Data: json.RawMessage(`1`)}, `"from":"alice","ts"`},
		{Publication{Channel: "c", Origin: originAnonymous, Data: json.RawMessage(`1`)}, `"from":"","anonymous":true,"ts"`},
		{Publication{Channel: "c", Origin: originServer, Data: json.RawMessage(`1`)}, `"from":"","server":true,"ts"`},
		{Publication{Channel: "c", Origin: originAnonymous, Raw: []byte(`{"server":true}`)}, `"from":"","anonymous":true,"ts"`},
	} {
		p, err := tc.msg.payload("1-n-1", time.UnixMilli(1))
		if err != nil {
			t.Fatal(err)
		}
		body, ok := unstamp(p)
		if !ok || !json.Valid(body) || !strings.Contains(string(body), tc.want) {
			t.Errorf("payload of %+v = %q, want stamped JSON with %s", tc.msg, p, tc.want)
		}
	}
}
