package caddychat

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestHandleErrorsShapesRefusals: the route's refusals are Caddy handler
// errors, so a site's handle_errors block answers them: a 401 (no token)
// and a 403 (a raw channel the token may not subscribe to) get the site's
// body, with the status and the route's reason, and the 401 keeps its
// Bearer challenge.
func TestHandleErrorsShapesRefusals(t *testing.T) {
	t.Parallel()
	routes := fmt.Sprintf(`
	route /ws {
		chat {
			jwt {
				secret %[1]s
			}
		}
	}
	route /raw/* {
		chat {
			protocol raw
			channel secret:{http.request.uri.path.1}
			jwt {
				secret %[1]s
			}
			subscribe room:*
			publish room:*
		}
	}
	handle_errors {
		respond "shaped by the site: {err.status_code} ({err.message})"
	}`, testSecret)
	n := startCaddy(t, "errors", routes)

	refused := func(url, token string) (int, string, http.Header) {
		t.Helper()
		header := http.Header{}
		if token != "" {
			header.Set("Authorization", "Bearer "+token)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		ws, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPHeader: header})
		if err == nil {
			_ = ws.CloseNow()
			t.Fatalf("dial %s succeeded, want it refused", url)
		}
		if resp == nil {
			t.Fatalf("dial %s: no HTTP response: %v", url, err)
		}
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body), resp.Header
	}

	status, body, header := refused(n.wsURL("/ws"), "")
	if status != http.StatusUnauthorized || !strings.HasPrefix(body, "shaped by the site: 401 (unauthorized: ") {
		t.Errorf("no token: %d %q, want 401 with the site's body and the reason", status, body)
	}
	if got := header.Get("WWW-Authenticate"); !strings.HasPrefix(got, "Bearer ") {
		t.Errorf("no token: WWW-Authenticate = %q, want the Bearer challenge", got)
	}

	status, body, _ = refused(n.wsURL("/raw/vault"), newToken(t, "alice").sign())
	if want := "shaped by the site: 403 (forbidden: may not subscribe to secret:vault)"; status != http.StatusForbidden || body != want {
		t.Errorf("forbidden raw channel: %d %q, want 403 %q", status, body, want)
	}

	// What the route does let through is not touched by handle_errors.
	c := dialUser(t, "alice", n.wsURL("/ws"), "alice")
	c.closeNormal()
}
