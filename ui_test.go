package caddychat

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func httpGet(t *testing.T, url string, header http.Header) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(body)
}

func TestClientLibraryServedWithCachingHeaders(t *testing.T) {
	n := startNode(t, &Handler{})
	base := n.srv.URL + "/ws"
	resp, body := httpGet(t, base+"/caddychat.js", nil)
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "export class CaddyChat") {
		t.Fatalf("GET caddychat.js: %d %.80q", resp.StatusCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/javascript") {
		t.Errorf("Content-Type %q", ct)
	}
	if cc := resp.Header.Get("Cache-Control"); cc != "public, max-age=3600" {
		t.Errorf("Cache-Control %q", cc)
	}
	etag := resp.Header.Get("ETag")
	if etag == "" {
		t.Fatal("no ETag")
	}
	resp, _ = httpGet(t, base+"/caddychat.js", http.Header{"If-None-Match": {etag}})
	if resp.StatusCode != http.StatusNotModified {
		t.Errorf("revalidation with the ETag: %d, want 304", resp.StatusCode)
	}
	resp, body = httpGet(t, base+"/caddychat.d.ts", nil)
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "CaddyChat") {
		t.Errorf("GET caddychat.d.ts: %d", resp.StatusCode)
	}
	// Without ui, the route itself still wants a WebSocket.
	if resp, _ := httpGet(t, base, nil); resp.StatusCode != http.StatusUpgradeRequired {
		t.Errorf("GET of the route without ui: %d, want 426", resp.StatusCode)
	}
}

func TestChatPageServedWithCSP(t *testing.T) {
	n := startNode(t, &Handler{UI: true})
	resp, body := httpGet(t, n.srv.URL+"/chat/", nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /chat/: %d", resp.StatusCode)
	}
	csp := resp.Header.Get("Content-Security-Policy")
	for _, want := range []string{"default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"} {
		if !strings.Contains(csp, want) {
			t.Errorf("CSP %q lacks %q", csp, want)
		}
	}
	if strings.Contains(csp, "unsafe-inline") || strings.Contains(csp, "unsafe-eval") {
		t.Errorf("CSP allows inline code: %q", csp)
	}
	// The page refers to its assets under the route's own path.
	if !strings.Contains(body, `content="/chat"`) || !strings.Contains(body, `src="/chat/chat-ui.js"`) {
		t.Errorf("page does not use the route path /chat:\n%s", body)
	}
	if strings.Contains(body, "{{") {
		t.Errorf("template not rendered:\n%s", body)
	}
	// A route path is data to the template, never markup.
	_, body = httpGet(t, n.srv.URL+`/x"><script>alert(1)</script>`, nil)
	if strings.Contains(body, "<script>alert(1)") {
		t.Errorf("route path injected into the page:\n%s", body)
	}
	for _, asset := range []string{"chat-ui.js", "chat-ui.css"} {
		if resp, _ := httpGet(t, n.srv.URL+"/chat/"+asset, nil); resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s: %d", asset, resp.StatusCode)
		}
	}
	// POST is not a page view.
	resp, err := http.Post(n.srv.URL+"/chat", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Errorf("POST: %d, want 426", resp.StatusCode)
	}
}

func TestCaddyfileUIOption(t *testing.T) {
	var h Handler
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("chat {\n ui on\n}")); err != nil || !h.UI {
		t.Fatalf("ui on: %v %v", err, h.UI)
	}
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("chat {\n ui maybe\n}")); err == nil || !strings.Contains(err.Error(), `ui "maybe"`) {
		t.Fatalf("ui maybe: %v", err)
	}
}
