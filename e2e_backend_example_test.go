package caddychat

// End-to-end: examples/backend, built and run as its README says, behind a
// Caddy node configured by the chat block of examples/backend/Caddyfile.

import (
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestBackendExample: log in with the form (a session cookie), open the
// WebSocket with that cookie alone (no JWT), get the user and info in the
// welcome and room:lobby joined; a member-only room is refused to a
// non-member; a message with the banned word is rejected, another one is
// stored by the app and delivered with the app's id.
func TestBackendExample(t *testing.T) {
	t.Parallel()
	bin := filepath.Join(t.TempDir(), "backend")
	if out, err := exec.Command("go", "build", "-o", bin, "./examples/backend").CombinedOutput(); err != nil {
		t.Fatalf("building examples/backend: %v\n%s", err, out)
	}
	backendAddr := freeAddr(t)
	const secret = "example-hook-secret-0123456789"
	cmd := exec.Command(bin, "-addr", backendAddr)
	cmd.Env = append(os.Environ(), "CHAT_HOOK_SECRET="+secret)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })

	// The example's site body, on this test's ports and secret.
	caddyfile, err := os.ReadFile("examples/backend/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	site := string(caddyfile)
	site = site[strings.Index(site, "http://localhost:8080 {")+len("http://localhost:8080 {"):]
	site = site[:strings.LastIndex(site, "}")]
	site = strings.ReplaceAll(site, "127.0.0.1:3000", backendAddr)
	site = strings.ReplaceAll(site, "{env.CHAT_HOOK_SECRET}", secret)
	n := startCaddy(t, "node", site)

	login := func(user string) string {
		jar, _ := cookiejar.New(nil)
		client := &http.Client{Jar: jar, Timeout: 10 * time.Second}
		resp, err := client.PostForm(n.httpURL("/login"), url.Values{"user": {user}})
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		u, _ := url.Parse(n.httpURL("/"))
		for _, c := range jar.Cookies(u) {
			if c.Name == "session" {
				return c.String()
			}
		}
		t.Fatalf("login as %s set no session cookie (HTTP %s)", user, resp.Status)
		return ""
	}
	eventually(t, 10*time.Second, "the backend answers", func() (bool, string) {
		resp, err := http.Get("http://" + backendAddr + "/login")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return true, ""
	})
	bob, err := dialHooked(t, "bob", n.wsURL("/ws"), http.Header{"Cookie": {login("bob")}})
	if err != nil {
		t.Fatal(err)
	}
	w, err := bob.readMsg(5 * time.Second)
	if err != nil || *w.User != "bob" || !strings.Contains(w.raw, `"info":{"name":"Bob"}`) {
		t.Fatalf("welcome: %v %v", w, err)
	}
	// The example has presence on: bob's own join events may come with
	// the oks of the channels the hook joined him to.
	for _, ch := range []string{"user:bob", "room:lobby"} {
		m, err := bob.readMsg(5 * time.Second)
		for err == nil && m.Type == "join" {
			m, err = bob.readMsg(5 * time.Second)
		}
		if err != nil || m.Type != "ok" || m.Channel != ch {
			t.Fatalf("joining %s at once: %v %v", ch, m, err)
		}
	}
	if r, _ := bob.request(map[string]any{"op": "subscribe", "channel": "room:staff"}, 5*time.Second); r == nil || r.Code != errForbidden || !strings.Contains(r.Message, "members only") {
		t.Fatalf("room:staff for a non-member: %v", r)
	}
	if r := bob.publish("room:lobby", map[string]any{"text": "buy SPAM"}); r.Code != errRejected {
		t.Fatalf("banned word: %v", r)
	}
	bob.mustPublish("room:lobby", map[string]any{"text": "hello"})
	if m := bob.expectMessage("room:lobby", 5*time.Second); string(m.Data) != `{"id":1,"text":"hello"}` {
		t.Fatalf("stored message: want the app's id in the data, got %s", m.raw)
	}
	anon, err := dialHooked(t, "anon", n.wsURL("/ws"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if code, reason := closedWith(t, anon); code != closeRefused || !strings.Contains(reason, "not logged in") {
		t.Fatalf("without a session: close %d %q", code, reason)
	}
}
