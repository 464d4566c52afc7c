package caddychat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Token revocation (the server API's revoke): by a token's id (jti), or of
// a user's tokens issued before a time. Every node keeps the revocations in
// memory, so a handshake or a refresh checks them without a round trip; with
// Redis they are also kept in one hash, which a node reads when it starts
// and again every revocationReload, and a revoke reaches the running nodes
// at once through the control channel (control.go).
//
//	<prefix>#revoked  HASH  "j:<jti>" -> JSON revocation
//	                        "u:<user>" -> JSON revocation

// revocation is one revoke: JTI or User is set.
type revocation struct {
	JTI  string `json:"jti,omitempty"`
	User string `json:"user,omitempty"`
	// IssuedBefore (Unix ms): a user's tokens issued before it are revoked.
	IssuedBefore int64 `json:"issued_before,omitempty"`
	// Until (Unix ms): when the revocation is forgotten.
	Until int64 `json:"until"`
}

const (
	// maxRevocations bounds the revocations a node keeps: each is at most
	// ~600 bytes (a 256-byte id, its map entry and the Redis field), so
	// at most ~60 MB.
	maxRevocations = 100000
	// maxTokenIDLen bounds a jti the API takes.
	maxTokenIDLen = 256
	// revocationReload is how often a node reads the revocations from Redis
	// again: revokes it missed while its control channel was down arrive
	// then.
	revocationReload = 30 * time.Second
	// defaultRevocationKeep and maxRevocationKeep: how long a revocation is
	// kept when the API's caller does not say, and at most.
	defaultRevocationKeep = 24 * time.Hour
	maxRevocationKeep     = 30 * 24 * time.Hour
)

var errTooManyRevocations = fmt.Errorf("this chat already keeps %d revocations: let some expire (set until to the tokens' exp)", maxRevocations)

// field is the revocation's field in the Redis hash and key in memory.
func (r revocation) field() string {
	if r.JTI != "" {
		return "j:" + r.JTI
	}
	return "u:" + r.User
}

// covers reports whether the revocation refuses cred of user.
func (r revocation) covers(user string, cred credential) bool {
	if time.Now().UnixMilli() >= r.Until {
		return false
	}
	if r.JTI != "" {
		return cred.tokenID == r.JTI
	}
	return user == r.User && cred.issuedAt.UnixMilli() < r.IssuedBefore
}

// tokenCredential is the credential of a verified token's claims. A token
// without iat counts as issued at the epoch: any revocation of its user
// covers it.
func tokenCredential(claims jwt.MapClaims) *credential {
	cred := &credential{issuedAt: time.Unix(0, 0)}
	if jti, ok := claims["jti"].(string); ok {
		cred.tokenID = jti
	}
	if iat, err := claims.GetIssuedAt(); err == nil && iat != nil {
		cred.issuedAt = iat.Time
	}
	return cred
}

// revocations is a hub's set of revocations.
type revocations struct {
	mu      sync.RWMutex
	byField map[string]revocation

	// client and key: the Redis hash; nil client for the in-memory broker.
	client redis.UniversalClient
	key    string
	log    *zap.Logger
}

func newRevocations(client redis.UniversalClient, prefix string, log *zap.Logger) *revocations {
	return &revocations{byField: make(map[string]revocation), client: client, key: prefix + "#revoked", log: log}
}

// revoked reports whether a token of user with cred is revoked. A nil set
// revokes nothing.
func (s *revocations) revoked(user string, cred credential, now time.Time) bool {
	if s == nil {
		return false
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if len(s.byField) == 0 {
		return false
	}
	if cred.tokenID != "" {
		if r, ok := s.byField["j:"+cred.tokenID]; ok && r.covers(user, cred) {
			return true
		}
	}
	r, ok := s.byField["u:"+user]
	return ok && r.covers(user, cred)
}

// add keeps r in memory (a control request from the node that stored it).
func (s *revocations) add(r revocation) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.byField[r.field()]; !ok && len(s.byField) >= maxRevocations {
		s.pruneLocked(time.Now())
		if len(s.byField) >= maxRevocations {
			return // the storing node refused it already; a forged flood stops here
		}
	}
	s.byField[r.field()] = r
}

// store keeps r where every node finds it: the Redis hash (nothing more for
// the in-memory broker: the control request adds it to the node's set).
func (s *revocations) store(ctx context.Context, r revocation) error {
	s.mu.RLock()
	_, known := s.byField[r.field()]
	full := len(s.byField) >= maxRevocations
	s.mu.RUnlock()
	if full && !known {
		return errTooManyRevocations
	}
	if s.client == nil {
		s.add(r)
		return nil
	}
	value, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if err := s.client.HSet(ctx, s.key, r.field(), value).Err(); err != nil {
		return fmt.Errorf("redis HSET %s: %w", s.key, err)
	}
	s.add(r)
	return nil
}

// list is the revocations in force.
func (s *revocations) list(now time.Time) []revocation {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]revocation, 0, len(s.byField))
	for _, r := range s.byField {
		if now.UnixMilli() < r.Until {
			out = append(out, r)
		}
	}
	slices.SortFunc(out, func(a, b revocation) int { return strings.Compare(a.field(), b.field()) })
	return out
}

// load adds the Redis hash's revocations in force to the set, forgets the
// expired ones and deletes them from the hash.
func (s *revocations) load(ctx context.Context) error {
	if s.client == nil {
		s.prune(time.Now())
		return nil
	}
	all, err := s.client.HGetAll(ctx, s.key).Result()
	if err != nil {
		return fmt.Errorf("redis HGETALL %s: %w", s.key, err)
	}
	now := time.Now().UnixMilli()
	fresh := make(map[string]revocation, len(all))
	var expired []string
	for field, value := range all {
		var r revocation
		if json.Unmarshal([]byte(value), &r) != nil || r.field() != field {
			s.log.Warn("malformed revocation in Redis; ignored", zap.String("key", s.key), zap.String("field", truncate(field, 64)))
			continue
		}
		if now >= r.Until {
			expired = append(expired, field)
			continue
		}
		if len(fresh) < maxRevocations {
			fresh[field] = r
		}
	}
	s.mu.Lock()
	// A revoke that arrived while the hash was read stays: revocations are
	// never taken back, only forgotten when they expire.
	for f, r := range s.byField {
		if _, ok := fresh[f]; !ok && now < r.Until && len(fresh) < maxRevocations {
			fresh[f] = r
		}
	}
	s.byField = fresh
	s.mu.Unlock()
	if len(expired) > 0 {
		if err := s.client.HDel(ctx, s.key, expired...).Err(); err != nil && !errors.Is(err, context.Canceled) {
			s.log.Debug("deleting expired revocations", zap.Error(err))
		}
	}
	return nil
}

// prune forgets the expired revocations of an in-memory set.
func (s *revocations) prune(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pruneLocked(now)
}

func (s *revocations) pruneLocked(now time.Time) {
	for f, r := range s.byField {
		if now.UnixMilli() >= r.Until {
			delete(s.byField, f)
		}
	}
}

// keepLoading reads the set again every revocationReload until stop.
func (s *revocations) keepLoading(stop <-chan struct{}, timeout time.Duration) {
	t := time.NewTicker(revocationReload)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		if err := s.load(ctx); err != nil {
			s.log.Debug("reading revocations", zap.Error(err))
		}
		cancel()
	}
}
