package caddychat

// End-to-end: the HTTP publish endpoint reaches subscribers of both nodes.

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
)

// httpPublish POSTs body to url with "Authorization: Bearer <key>" and
// returns the status and the raw response body.
func httpPublish(t testing.TB, url, key, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+key)
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("POST %s: reading the response: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

// TestHTTPPublishReachesBothNodes: a backend POSTs to node A's publish
// endpoint (a path outside the directive's /ws matcher) and the subscribers
// on both nodes get the message, with the id the response returned. A wrong
// key gets 401 and publishes nothing.
func TestHTTPPublishReachesBothNodes(t *testing.T) {
	const key = "test-publish-key-0123456789"
	rs := redistest.Start(t)
	routes := fmt.Sprintf(`	chat /ws {
		redis %s
		rate_limit off
		publish_endpoint /chat/publish
		publish_key %s
	}`, rs.URL(), key)
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)
	subA := dialJSON(t, "sub@A", a.wsURL("/ws"))
	subB := dialJSON(t, "sub@B", b.wsURL("/ws"))
	subA.subscribe("room:http")
	subB.subscribe("room:http")

	body := `{"channel":"room:http","data":{"text":"from the backend"}}`
	status, resp := httpPublish(t, a.httpURL("/chat/publish"), "wrong-publish-key-0123456789", body)
	var refused struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	if err := json.Unmarshal([]byte(resp), &refused); status != http.StatusUnauthorized || err != nil || refused.Error.Code != "unauthorized" {
		t.Fatalf("POST /chat/publish with a wrong key: got HTTP %d %q, want 401 with error code unauthorized", status, resp)
	}

	status, resp = httpPublish(t, a.httpURL("/chat/publish"), key, body)
	var ok struct {
		Channel string `json:"channel"`
		ID      string `json:"id"`
	}
	if err := json.Unmarshal([]byte(resp), &ok); status != http.StatusOK || err != nil || ok.Channel != "room:http" || ok.ID == "" {
		t.Fatalf("POST /chat/publish: got HTTP %d %q, want 200 {\"channel\":\"room:http\",\"id\":...}", status, resp)
	}
	// The next frame of each subscriber is this message: the refused request
	// published nothing.
	for _, c := range []*wsClient{subA, subB} {
		m := c.expectMessage("room:http", 5*time.Second)
		var id string
		if err := json.Unmarshal(m.ID, &id); err != nil || id != ok.ID {
			t.Errorf("%s: delivery id %s, want %q from the HTTP response", c.name, m.ID, ok.ID)
		}
		if m.From == nil || *m.From != "" {
			t.Errorf("%s: from: want \"\", got %s", c.name, m)
		}
		if string(m.Data) != `{"text":"from the backend"}` {
			t.Errorf("%s: data: got %s", c.name, m.Data)
		}
	}
}
