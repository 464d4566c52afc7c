// Command backend is a small application behind caddychat's hooks (issue
// 18), standard library only: a session-cookie login, the connect hook
// (cookie → user, permissions, info), a membership subscribe hook, and a
// publish hook that rejects a banned word and stores every message before
// anyone sees it. Run it beside Caddy with the Caddyfile of this directory:
//
//	CHAT_HOOK_SECRET=$(openssl rand -hex 32) go run ./examples/backend &
//	CHAT_HOOK_SECRET=... caddy run --config examples/backend/Caddyfile
//
// then open http://localhost:8080/login. See the README's walk-through.
package main

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"html/template"
	"io"
	"log"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

// app is the application's state: sessions, room membership and the
// stored messages, all in memory.
type app struct {
	secret []byte // the hooks' secret; nil: signatures not checked

	mu       sync.Mutex
	sessions map[string]string // session cookie → user
	messages []storedMessage   // every published message, oldest first
	nextID   int
}

type storedMessage struct {
	ID      int             `json:"id"`
	User    string          `json:"user"`
	Channel string          `json:"channel"`
	Data    json.RawMessage `json:"data"`
	At      time.Time       `json:"at"`
}

const (
	sessionCookie = "session"
	maxMessages   = 10000 // the oldest are dropped past this
	bannedWord    = "spam"
)

// members is who may join which private room: the membership the
// subscribe hook checks. Rooms not listed are open to every user.
var members = map[string][]string{
	"room:staff": {"alice"},
}

func main() {
	addr := flag.String("addr", "127.0.0.1:3000", "address to listen on")
	flag.Parse()
	a := &app{sessions: map[string]string{}}
	if s := os.Getenv("CHAT_HOOK_SECRET"); s != "" {
		a.secret = []byte(s)
	} else {
		log.Print("CHAT_HOOK_SECRET is not set: hook requests are not authenticated")
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /login", a.loginForm)
	mux.HandleFunc("POST /login", a.login)
	mux.HandleFunc("POST /logout", a.logout)
	mux.HandleFunc("GET /messages", a.listMessages)
	mux.Handle("POST /hooks/connect", a.hook(a.connectHook))
	mux.Handle("POST /hooks/subscribe", a.hook(a.subscribeHook))
	mux.Handle("POST /hooks/publish", a.hook(a.publishHook))

	// The webhooks: events after the fact (webhooks.go), signed with the
	// same secret, deduplicated by event id.
	mux.Handle("POST /webhooks", newWebhookReceiver(a.secret))

	log.Printf("backend listening on %s", *addr)
	srv := &http.Server{Addr: *addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(srv.ListenAndServe())
}

var loginPage = template.Must(template.New("login").Parse(`<!doctype html>
<meta charset="utf-8"><title>Log in</title>
<h1>Log in to the chat</h1>
{{if .}}<p>Logged in as <b>{{.}}</b>. <a href="/ws">Open the chat</a>.</p>
<form method="post" action="/logout"><button>Log out</button></form>{{end}}
<form method="post" action="/login">
<label>Name <input name="user" pattern="[a-z0-9_]{1,32}" required autofocus></label>
<button>Log in</button>
</form>
<p>Any name works (a demo); <i>alice</i> is a member of room:staff.</p>
`))

func (a *app) currentUser(r *http.Request) string {
	c, err := r.Cookie(sessionCookie)
	if err != nil {
		return ""
	}
	return a.sessionUser(c.Value)
}

func (a *app) sessionUser(session string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.sessions[session]
}

func (a *app) loginForm(w http.ResponseWriter, r *http.Request) {
	_ = loginPage.Execute(w, a.currentUser(r))
}

// login starts a session for the name typed: the cookie is the session id.
func (a *app) login(w http.ResponseWriter, r *http.Request) {
	user := strings.ToLower(strings.TrimSpace(r.FormValue("user")))
	if user == "" || len(user) > 32 || strings.Trim(user, "abcdefghijklmnopqrstuvwxyz0123456789_") != "" {
		http.Error(w, "a name is 1 to 32 of a-z 0-9 _", http.StatusBadRequest)
		return
	}
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	session := hex.EncodeToString(b)
	a.mu.Lock()
	a.sessions[session] = user
	a.mu.Unlock()
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: session, Path: "/", HttpOnly: true, SameSite: http.SameSiteLaxMode})
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

func (a *app) logout(w http.ResponseWriter, r *http.Request) {
	if c, err := r.Cookie(sessionCookie); err == nil {
		a.mu.Lock()
		delete(a.sessions, c.Value)
		a.mu.Unlock()
	}
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: "", Path: "/", MaxAge: -1})
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

func (a *app) listMessages(w http.ResponseWriter, r *http.Request) {
	if a.currentUser(r) == "" {
		http.Error(w, "log in first", http.StatusUnauthorized)
		return
	}
	a.mu.Lock()
	out := append([]storedMessage(nil), a.messages...)
	a.mu.Unlock()
	writeJSON(w, out)
}

// hookRequest is what caddychat POSTs to the hooks (PROTOCOL.md, Hooks).
type hookRequest struct {
	Type    string              `json:"type"`
	Route   string              `json:"route"`
	Remote  string              `json:"remote"`
	Headers map[string][]string `json:"headers"`
	User    string              `json:"user"`
	Conn    string              `json:"conn"`
	Channel string              `json:"channel"`
	Data    json.RawMessage     `json:"data"`
}

// hook checks a hook request's signature and decodes it for h.
func (a *app) hook(h func(hookRequest) any) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			http.Error(w, "bad body", http.StatusBadRequest)
			return
		}
		if a.secret != nil && !validSignature(a.secret, r.Header.Get("Caddychat-Signature"), body, time.Now()) {
			http.Error(w, "bad signature", http.StatusUnauthorized)
			return
		}
		var req hookRequest
		if err := json.Unmarshal(body, &req); err != nil {
			http.Error(w, "bad JSON", http.StatusBadRequest)
			return
		}
		writeJSON(w, h(req))
	})
}

// connectHook: the session cookie is the user; no JWT anywhere.
func (a *app) connectHook(req hookRequest) any {
	user := ""
	for _, header := range req.Headers["Cookie"] {
		r := http.Request{Header: http.Header{"Cookie": {header}}}
		if c, err := r.Cookie(sessionCookie); err == nil {
			user = a.sessionUser(c.Value)
		}
	}
	if user == "" {
		return map[string]any{"result": "deny", "reason": "not logged in: open /login first"}
	}
	return map[string]any{
		"result":     "allow",
		"user":       user,
		"subscribe":  []string{"room:*", "user:{user}"},
		"publish":    []string{"room:*"},
		"info":       map[string]any{"name": strings.ToUpper(user[:1]) + user[1:]},
		"channels":   []string{"user:" + user, "room:lobby"},
		"expires_in": "8h",
	}
}

// subscribeHook: private rooms are for their members.
func (a *app) subscribeHook(req hookRequest) any {
	list, private := members[req.Channel]
	if !private {
		return map[string]any{"result": "allow"}
	}
	for _, m := range list {
		if m == req.User {
			return map[string]any{"result": "allow"}
		}
	}
	return map[string]any{"result": "deny", "reason": req.Channel + " is for its members only"}
}

// publishHook: a message with the banned word is rejected; any other is
// stored first, and published with its id in the application's store.
func (a *app) publishHook(req hookRequest) any {
	var msg struct {
		Text string `json:"text"`
	}
	if json.Unmarshal(req.Data, &msg) != nil {
		// Not an object with text (e.g. a raw route's string).
		_ = json.Unmarshal(req.Data, &msg.Text)
	}
	if strings.Contains(strings.ToLower(msg.Text), bannedWord) {
		return map[string]any{"result": "deny", "reason": "no " + bannedWord + " here, please"}
	}
	a.mu.Lock()
	a.nextID++
	id := a.nextID
	a.messages = append(a.messages, storedMessage{ID: id, User: req.User, Channel: req.Channel, Data: req.Data, At: time.Now()})
	if len(a.messages) > maxMessages {
		a.messages = a.messages[len(a.messages)-maxMessages:]
	}
	a.mu.Unlock()
	return map[string]any{"result": "allow", "data": map[string]any{"text": msg.Text, "id": id}}
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}
