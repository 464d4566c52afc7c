package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

func sign(secret, body string, t time.Time) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts + "." + body))
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

func post(h http.Handler, body, sig string) int {
	req := httptest.NewRequest(http.MethodPost, "/webhook", strings.NewReader(body))
	req.Header.Set("Caddychat-Signature", sig)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code
}

func TestWebhookReceiver(t *testing.T) {
	h := newWebhookReceiver([]byte("s3cret"))
	wr := h.(*webhookReceiver)
	body := `{"events":[{"id":"n1-1","type":"publish","ts":1,"node":"n1","channel":"room:a","data":{"text":"hi"}},{"id":"n1-2","type":"connect","ts":2,"node":"n1"}]}`
	now := time.Now()
	if code := post(h, body, sign("s3cret", body, now)); code != http.StatusNoContent {
		t.Fatalf("signed batch: %d", code)
	}
	// A redelivery (at least once) is taken but not recorded twice.
	if code := post(h, body, sign("s3cret", body, now)); code != http.StatusNoContent {
		t.Fatalf("redelivered batch: %d", code)
	}
	if got := wr.recorded(); len(got) != 2 || got[0].ID != "n1-1" || got[1].Type != "connect" {
		t.Fatalf("recorded %+v, want the two events once", got)
	}
	for name, sig := range map[string]string{
		"wrong secret":  sign("other", body, now),
		"too old":       sign("s3cret", body, now.Add(-10*time.Minute)),
		"in the future": sign("s3cret", body, now.Add(10*time.Minute)),
		"missing":       "",
		"garbage":       "t=x,v1=zz",
	} {
		if code := post(h, body, sig); code != http.StatusUnauthorized {
			t.Errorf("%s: %d, want 401", name, code)
		}
	}
	tampered := strings.Replace(body, "hi", "ho", 1)
	if code := post(h, tampered, sign("s3cret", body, now)); code != http.StatusUnauthorized {
		t.Errorf("tampered body: %d, want 401", code)
	}
	if len(wr.recorded()) != 2 {
		t.Fatal("a refused request recorded events")
	}
}

func TestWebhookReceiverForgetsBounded(t *testing.T) {
	wr := newWebhookReceiver(nil).(*webhookReceiver)
	for i := range maxRememberedIDs + 10 {
		wr.remember(strconv.Itoa(i))
	}
	if len(wr.seen) != maxRememberedIDs || len(wr.order) != maxRememberedIDs {
		t.Fatalf("remembers %d ids, want %d", len(wr.seen), maxRememberedIDs)
	}
	if _, ok := wr.seen["0"]; ok {
		t.Fatal("the oldest id is still remembered")
	}
}
