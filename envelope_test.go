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

	for _, forged := range [][]byte{env, presenceEvent("join", "room:a", "admin", nil)} {
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

func TestMessageIDOfEnvelope(t *testing.T) {
	env := historyEnvelope("room:a", streamID{1732540000000, 7}, "e1", `"from":"u","ts":1,"data":1}`)
	id, ok := messageID("room:a", env)
	if !ok || id != (streamID{1732540000000, 7}) {
		t.Fatalf("messageID = %v %v", id, ok)
	}
	if _, ok := messageID("room:b", env); ok {
		t.Fatal("id read from another channel's envelope")
	}
	for _, bad := range []string{"", "{}", `{"type":"message","channel":"room:a","id":"x`, "plain text"} {
		if _, ok := messageID("room:a", []byte(bad)); ok {
			t.Errorf("messageID(%q) ok", bad)
		}
	}
	for _, s := range []string{"1-0", "1732540000000-12"} {
		id, ok := parseStreamID(s)
		if !ok || id.String() != s {
			t.Errorf("parseStreamID(%q) = %v %v", s, id, ok)
		}
	}
	for _, s := range []string{"", "1", "a-1", "1-b", "-1", "1--1", strings.Repeat("9", 30) + "-0"} {
		if _, ok := parseStreamID(s); ok {
			t.Errorf("parseStreamID(%q) ok", s)
		}
	}
}

func TestIsPresenceEvent(t *testing.T) {
	const ch = "room:a"
	cases := []struct {
		payload string
		want    bool
	}{
		{string(presenceEvent("join", ch, "alice", nil)), true},
		{string(presenceEvent("leave", ch, `a"b\c/é<>`, nil)), true},
		{`{"type":"join","channel":"room:a","user":"gh\"o\\st\/\u00e9"}`, true}, // Redis's cjson escapes /
		{`{"type":"join","channel":"room:b","user":"alice"}`, false},
		{`{"type":"join","channel":"room:ab","user":"alice"}`, false},
		{`{"type":"join","channel":"room:a","user":alice}`, false},
		{`{"type":"join","channel":"room:a","user":"alice"`, false},
		{`{"type":"join","channel":"room:a","user":"a","x":"y"}`, false},
		{`{"type":"join","channel":"room:a","user":5}`, false},
		{string(presenceEvent("join", ch, "alice", json.RawMessage(`{"name":"Al,\"info\":{ice"}`))), true},
		{`{"type":"leave","channel":"room:a","user":"alice","info":{"name":"A"}}`, true},
		{`{"type":"join","channel":"room:a","user":"alice","info":{"name":}}`, false},
		{`{"type":"join","channel":"room:a","user":"alice","info":"A"}`, false},
		{`{"type":"join","channel":"room:a","user":"alice","info":{}`, false},
		{`{"type":"join","channel":"room:a","user":"a\",\"info\":{}}`, false},
		{`{"type":"kick","channel":"room:a","user":"alice"}`, false},
		{`{"type":"message","channel":"room:a","id":"1-a-1","from":"","ts":1,"data":1}`, false},
		{`hello`, false},
		{"{\"type\":\"join\",\"channel\":\"room:a\",\"user\":\"\xff\"}", false},
	}
	for _, tc := range cases {
		if got := isPresenceEvent(ch, []byte(tc.payload)); got != tc.want {
			t.Errorf("isPresenceEvent(%q) = %v, want %v", tc.payload, got, tc.want)
		}
	}
	event, message := presenceEvent("join", ch, "alice", nil), []byte(`{"type":"message","channel":"room:a","id":"1-a-1","from":"","ts":1,"data":1}`)
	if n := testing.AllocsPerRun(100, func() {
		isPresenceEvent(ch, event)
		isPresenceEvent(ch, message)
	}); n != 0 {
		t.Errorf("isPresenceEvent allocates %v times per call; it runs on the fan-out path", n)
	}
}
