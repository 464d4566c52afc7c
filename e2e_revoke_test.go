package caddychat

// End-to-end: token revocation through the server API (POST revoke, GET
// revocations): by jti and by user, on two Caddy nodes sharing a real
// redis-server (and a third node started afterwards), and on one node with
// the memory broker. Helpers are in e2e_admin_test.go.

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"

	"github.com/caddychat/caddychat/internal/redistest"
)

// revokeAnswer is what POST revoke answers.
type revokeAnswer struct {
	Revoked      string `json:"revoked"`
	Disconnected *int   `json:"disconnected"`
	Nodes        int    `json:"nodes"`
	MissingNodes int    `json:"missing_nodes"`
	Until        int64  `json:"until"`
}

// jtiToken is user's token with jti.
func jtiToken(t testing.TB, user, jti string) string {
	return newToken(t, user).with(jwt.MapClaims{"jti": jti}).sign()
}

// handshake tries a connection with token on n and returns the HTTP status
// (101 when it was accepted).
func handshake(t testing.TB, n *caddyNode, token string) int {
	t.Helper()
	return wsAttempt(t, n.wsURL("/ws?token="+token), &websocket.DialOptions{})
}

// revoke posts body to api's revoke and checks the answer's kind, count of
// disconnected connections and nodes.
func revoke(t testing.TB, api chatAPI, body map[string]any, kind string, disconnected, nodes int) (revokeAnswer, time.Time) {
	t.Helper()
	var r revokeAnswer
	api.post(t, "revoke", body, &r)
	at := time.Now()
	if r.Revoked != kind || r.Disconnected == nil || *r.Disconnected != disconnected || r.Nodes != nodes || r.MissingNodes != 0 {
		t.Fatalf("%s: revoke %v: %+v, want revoked %q, disconnected %d, nodes %d", api.name, body, r, kind, disconnected, nodes)
	}
	return r, at
}

// closedRevoked requires c to be closed with 4006 within 1s of answered.
func closedRevoked(t testing.TB, c *wsClient, answered time.Time) {
	t.Helper()
	if _, err := c.waitClosed(time.Until(answered.Add(time.Second))); err != nil {
		t.Fatalf("%s: not closed within 1s of the revoke's answer: %v", c.name, err)
	}
	if code, reason := closeOf(c); code != 4006 || !strings.Contains(reason, "revoked") {
		t.Fatalf("%s: closed with %d %q (%v), want 4006 \"token revoked\"", c.name, code, reason, c.readErr)
	}
}

// stillServed requires c to still get messages: a publish of api on room:1
// (c is subscribed) is its next message.
func stillServed(t testing.TB, api chatAPI, cs ...*wsClient) {
	t.Helper()
	id := publishVia(t, api, "room:1", "still served")
	receives(t, "room:1", id, cs...)
}

func TestRevokeTwoNodes(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	a := startCaddy(t, "A", apiRoutes(rs.URL()))
	b := startCaddy(t, "B", apiRoutes(rs.URL()))
	waitNodes(t, adminOf(a), 2)
	tokens := testRevoke(t, []*caddyNode{a, b})

	// A node started after the revocations knows them (from Redis).
	c := startCaddy(t, "C", apiRoutes(rs.URL()))
	for _, tok := range tokens.refused {
		if got := handshake(t, c, tok); got != http.StatusUnauthorized {
			t.Errorf("new node C: handshake with a revoked token: HTTP %d, want 401", got)
		}
	}
	for _, tok := range tokens.accepted {
		if got := handshake(t, c, tok); got != http.StatusSwitchingProtocols {
			t.Errorf("new node C: handshake with a token not revoked: HTTP %d, want 101", got)
		}
	}
	var list struct{ Revocations []map[string]any }
	adminOf(c).get(t, "revocations", &list)
	if len(list.Revocations) < 2 {
		t.Fatalf("new node C: revocations %+v, want the jti and the user", list)
	}
}

func TestRevokeMemory(t *testing.T) {
	t.Parallel()
	testRevoke(t, []*caddyNode{startCaddy(t, "A", apiRoutes(""))})
}

type revokedTokens struct{ refused, accepted []string }

// testRevoke revokes by jti and by user, asked of the first node, with the
// connections on the last, and returns tokens that are refused and accepted
// from then on.
func testRevoke(t *testing.T, nodes []*caddyNode) revokedTokens {
	first, last := nodes[0], nodes[len(nodes)-1]
	// By jti: carol's token X, in use on the last node, is revoked; her
	// token Y (on the first node) and bob are not.
	tokX, tokY := jtiToken(t, "carol", "jti-x"), jtiToken(t, "carol", "jti-y")
	victim := dialAs(t, "carol X", last, tokX)
	keeper := dialAs(t, "carol Y", first, tokY)
	bob := dialAs(t, "bob", last, newToken(t, "bob").sign())
	for _, c := range []*wsClient{victim, keeper, bob} {
		c.subscribe("room:1")
	}
	before := time.Now().Unix()
	r, answered := revoke(t, adminOf(first), map[string]any{"jti": "jti-x"}, "jti", 1, len(nodes))
	if day := int64(24 * 3600); r.Until < before+day-5 || r.Until > time.Now().Unix()+day+5 {
		t.Errorf("revoke without until: until %d, want now + 24h (%d)", r.Until, before+day)
	}
	closedRevoked(t, victim, answered)
	for _, n := range nodes {
		if got := handshake(t, n, tokX); got != http.StatusUnauthorized {
			t.Errorf("%s: handshake with the revoked token: HTTP %d, want 401", n.name, got)
		}
	}
	m, err := keeper.request(map[string]any{"op": "refresh", "token": tokX}, 5*time.Second)
	if err != nil || m.Type != "error" || m.Code != "unauthorized" || !strings.Contains(m.Message, "revoked") {
		t.Fatalf("refresh with the revoked token: %v %v, want unauthorized \"token revoked\"", m, err)
	}
	stillServed(t, adminOf(last), keeper, bob)

	// By user: dave's tokens issued before issued_before (and one without
	// iat) are revoked; one issued after is not.
	now := time.Now().Unix()
	oldTok := newToken(t, "dave").with(jwt.MapClaims{"iat": now - 120}).sign()
	noIat := newToken(t, "dave").with(jwt.MapClaims{"iat": nil}).sign()
	newTok := newToken(t, "dave").sign()
	daveOld := dialAs(t, "dave old", last, oldTok)
	daveNoIat := dialAs(t, "dave no iat", first, noIat)
	daveNew := dialAs(t, "dave new", first, newTok)
	daveNew.subscribe("room:1")
	until := now + 3600
	r, answered = revoke(t, adminOf(first), map[string]any{"user": "dave", "issued_before": now - 60, "until": until}, "user", 2, len(nodes))
	if r.Until != until {
		t.Errorf("revoke by user: until %d, want %d", r.Until, until)
	}
	closedRevoked(t, daveOld, answered)
	closedRevoked(t, daveNoIat, answered)
	for _, n := range nodes {
		for _, tok := range []string{oldTok, noIat} {
			if got := handshake(t, n, tok); got != http.StatusUnauthorized {
				t.Errorf("%s: handshake with dave's token issued before: HTTP %d, want 401", n.name, got)
			}
		}
		if got := handshake(t, n, newTok); got != http.StatusSwitchingProtocols {
			t.Errorf("%s: handshake with dave's token issued after: HTTP %d, want 101", n.name, got)
		}
	}
	m, err = daveNew.request(map[string]any{"op": "refresh", "token": oldTok}, 5*time.Second)
	if err != nil || m.Type != "error" || m.Code != "unauthorized" {
		t.Fatalf("refresh with dave's revoked token: %v %v, want unauthorized", m, err)
	}
	stillServed(t, adminOf(first), keeper, bob, daveNew)

	var list struct {
		Revocations []struct {
			JTI          string `json:"jti"`
			User         string `json:"user"`
			IssuedBefore int64  `json:"issued_before"`
			Until        int64  `json:"until"`
		}
	}
	adminOf(last).get(t, "revocations", &list)
	if got := fmt.Sprintf("%+v", list.Revocations); !strings.Contains(got, "{JTI:jti-x User: IssuedBefore:0 Until:") ||
		!strings.Contains(got, fmt.Sprintf("{JTI: User:dave IssuedBefore:%d Until:%d}", now-60, until)) {
		t.Fatalf("revocations: %s", got)
	}

	// A revocation ends at until; one asked past 30 days is kept 30 days
	// at most (or refused).
	tokShort := jtiToken(t, "erin", "jti-short")
	revoke(t, adminOf(first), map[string]any{"jti": "jti-short", "until": time.Now().Unix() + 2}, "jti", 0, len(nodes))
	if got := handshake(t, last, tokShort); got != http.StatusUnauthorized {
		t.Errorf("handshake with a token revoked for 2s: HTTP %d, want 401", got)
	}
	eventually(t, 6*time.Second, "the short revocation ends", func() (bool, string) {
		got := handshake(t, last, tokShort)
		return got == http.StatusSwitchingProtocols, fmt.Sprint("HTTP ", got)
	})
	far := time.Now().Unix() + 60*24*3600
	resp := adminOf(first).do(t, http.MethodPost, "revoke", fmt.Sprintf(`{"jti":"jti-far","until":%d}`, far))
	if resp.status == http.StatusOK {
		if !strings.Contains(resp.body, `"until":`) || strings.Contains(resp.body, fmt.Sprint(far)) {
			t.Errorf("revoke until now+60d: %s, want until at most now+30d", resp.body)
		}
	} else {
		expectAPIError(t, "revoke until now+60d", resp, http.StatusBadRequest, "bad_request")
	}
	for _, bad := range []string{`{}`, `{"jti":""}`, `{"user":"dave","issued_before":"yesterday"}`} {
		expectAPIError(t, "revoke "+bad, adminOf(first).do(t, http.MethodPost, "revoke", bad), http.StatusBadRequest, "bad_request")
	}
	return revokedTokens{refused: []string{tokX, oldTok, noIat}, accepted: []string{tokY, newTok}}
}
