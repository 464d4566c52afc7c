package caddychat

import (
	"fmt"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap"
)

func TestRevocationCovers(t *testing.T) {
	now := time.Now()
	later := now.Add(time.Hour).UnixMilli()
	issued := func(at time.Time) credential { return credential{tokenID: "t1", issuedAt: at} }
	for _, tc := range []struct {
		name string
		r    revocation
		user string
		cred credential
		want bool
	}{
		{"jti matches", revocation{JTI: "t1", Until: later}, "alice", issued(now), true},
		{"other jti", revocation{JTI: "t2", Until: later}, "alice", issued(now), false},
		{"jti of a token without one", revocation{JTI: "t1", Until: later}, "alice", credential{issuedAt: now}, false},
		{"expired revocation", revocation{JTI: "t1", Until: now.Add(-time.Second).UnixMilli()}, "alice", issued(now), false},
		{"user, issued before", revocation{User: "alice", IssuedBefore: now.UnixMilli(), Until: later}, "alice", issued(now.Add(-time.Minute)), true},
		{"user, issued after", revocation{User: "alice", IssuedBefore: now.UnixMilli(), Until: later}, "alice", issued(now.Add(time.Second)), false},
		{"other user", revocation{User: "alice", IssuedBefore: now.UnixMilli(), Until: later}, "bob", issued(now.Add(-time.Minute)), false},
		{"user, token without iat", revocation{User: "alice", IssuedBefore: now.UnixMilli(), Until: later}, "alice", *tokenCredential(jwt.MapClaims{}), true},
	} {
		if got := tc.r.covers(tc.user, tc.cred); got != tc.want {
			t.Errorf("%s: covers = %v, want %v", tc.name, got, tc.want)
		}
	}
	cred := tokenCredential(jwt.MapClaims{"jti": "abc", "iat": float64(now.Unix())})
	if cred.tokenID != "abc" || cred.issuedAt.Unix() != now.Unix() {
		t.Fatalf("tokenCredential: %+v", cred)
	}
}

// TestRevocationsBounded: a set never holds more than maxRevocations; the
// API refuses the next one, and a forged flood through the control channel
// adds nothing once the set is full (unless some expired).
func TestRevocationsBounded(t *testing.T) {
	s := newRevocations(nil, "t:", zap.NewNop())
	until := time.Now().Add(time.Hour).UnixMilli()
	for i := range maxRevocations {
		s.add(revocation{JTI: fmt.Sprint(i), Until: until})
	}
	if err := s.store(t.Context(), revocation{JTI: "one more", Until: until}); err != errTooManyRevocations {
		t.Fatalf("store past the bound: %v", err)
	}
	s.add(revocation{JTI: "forged", Until: until})
	if s.revoked("", credential{tokenID: "forged"}, time.Now()) || len(s.list(time.Now())) != maxRevocations {
		t.Fatal("a full set took one more")
	}
	// Known revocations may be stored again (a longer until).
	if err := s.store(t.Context(), revocation{JTI: "7", Until: until + 1000}); err != nil {
		t.Fatalf("storing a known revocation again: %v", err)
	}
}

// TestRevocationsLoadFromRedis: a node reads what another stored, keeps
// what it heard of meanwhile, and deletes the expired and ignores the
// malformed entries of the hash.
func TestRevocationsLoadFromRedis(t *testing.T) {
	rs := redistest.Start(t)
	client := rs.Client()
	writer := newRevocations(client, "t:", zap.NewNop())
	reader := newRevocations(client, "t:", zap.NewNop())
	until := time.Now().Add(time.Hour).UnixMilli()
	if err := writer.store(t.Context(), revocation{User: "alice", IssuedBefore: time.Now().UnixMilli(), Until: until}); err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	client.HSet(ctx, "t:#revoked", "j:old", fmt.Sprintf(`{"jti":"old","until":%d}`, time.Now().Add(-time.Minute).UnixMilli()))
	client.HSet(ctx, "t:#revoked", "j:bad", `{"jti":"other","until":9999999999999}`)
	client.HSet(ctx, "t:#revoked", "j:worse", `not json`)
	reader.add(revocation{JTI: "heard", Until: until})
	if err := reader.load(ctx); err != nil {
		t.Fatal(err)
	}
	got := reader.list(time.Now())
	if len(got) != 2 || got[0].JTI != "heard" || got[1].User != "alice" {
		t.Fatalf("after load: %+v", got)
	}
	if client.HExists(ctx, "t:#revoked", "j:old").Val() {
		t.Fatal("the expired revocation was not deleted from Redis")
	}
	if !reader.revoked("alice", credential{issuedAt: time.Now().Add(-time.Minute)}, time.Now()) {
		t.Fatal("alice's older token is not revoked on the reader")
	}
}
