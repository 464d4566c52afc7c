package caddychat

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"html/template"
	"net/http"
	"path"
	"strings"
	"time"
)

// The browser side ships inside the module, so ops copy no files: the
// client library on every route, and the chat page on routes with ui on.
//
//go:embed client/caddychat.js client/caddychat.d.ts client/ui/index.html client/ui/chat-ui.js client/ui/chat-ui.css
var browserFiles embed.FS

// browserAsset is a file served at <route path>/<name>.
type browserAsset struct {
	file        string
	contentType string
}

// browserAssets are served for GET and HEAD requests whose path ends in
// "/<name>"; the Caddyfile adds these paths to a path matcher by itself.
var browserAssets = map[string]browserAsset{
	"caddychat.js":   {"client/caddychat.js", "text/javascript; charset=utf-8"},
	"caddychat.d.ts": {"client/caddychat.d.ts", "application/typescript; charset=utf-8"},
	"chat-ui.js":     {"client/ui/chat-ui.js", "text/javascript; charset=utf-8"},
	"chat-ui.css":    {"client/ui/chat-ui.css", "text/css; charset=utf-8"},
}

// assetMaxAge is how long browsers may cache the assets without asking; they
// revalidate with the ETag afterwards, so an upgrade reaches them within it.
const assetMaxAge = time.Hour

// uiContentSecurityPolicy allows the page its own scripts, styles and
// WebSocket and nothing else: no inline code, so a message that smuggled
// markup in could not run even if it were rendered as HTML.
const uiContentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

var uiPage = template.Must(template.ParseFS(browserFiles, "client/ui/index.html"))

// assetETags are computed once: the files are part of the binary.
var assetETags = func() map[string]string {
	tags := make(map[string]string, len(browserAssets))
	for name, a := range browserAssets {
		b, err := browserFiles.ReadFile(a.file)
		if err != nil {
			panic(fmt.Sprintf("caddychat: embedded %s: %v", a.file, err))
		}
		sum := sha256.Sum256(b)
		tags[name] = `"` + hex.EncodeToString(sum[:8]) + `"`
	}
	return tags
}()

// serveBrowser answers a plain (non-upgrade) request: an asset, the chat page
// when ui is on, or 426 (Upgrade Required).
func (h *Handler) serveBrowser(w http.ResponseWriter, r *http.Request) error {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		if i := strings.LastIndexByte(r.URL.Path, '/'); i >= 0 {
			if a, ok := browserAssets[r.URL.Path[i+1:]]; ok {
				serveAsset(w, r, r.URL.Path[i+1:], a)
				return nil
			}
		}
		if h.UI {
			serveChatPage(w, r)
			return nil
		}
	}
	w.Header().Set("Upgrade", "websocket")
	w.Header().Set("Connection", "Upgrade")
	return refuse(w, r, refused(http.StatusUpgradeRequired, "this endpoint speaks WebSocket only"))
}

func serveAsset(w http.ResponseWriter, r *http.Request, name string, a browserAsset) {
	b, err := browserFiles.ReadFile(a.file)
	if err != nil {
		http.Error(w, "asset missing", http.StatusInternalServerError)
		return
	}
	hdr := w.Header()
	hdr.Set("Content-Type", a.contentType)
	hdr.Set("Cache-Control", fmt.Sprintf("public, max-age=%d", int(assetMaxAge.Seconds())))
	hdr.Set("ETag", assetETags[name])
	hdr.Set("X-Content-Type-Options", "nosniff")
	// ServeContent answers If-None-Match with 304 and handles HEAD and ranges.
	http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(b))
}

func serveChatPage(w http.ResponseWriter, r *http.Request) {
	base := pageBase(r.URL.Path)
	var page bytes.Buffer
	if err := uiPage.Execute(&page, struct{ Base string }{base}); err != nil {
		http.Error(w, "rendering the chat page failed", http.StatusInternalServerError)
		return
	}
	hdr := w.Header()
	hdr.Set("Content-Type", "text/html; charset=utf-8")
	hdr.Set("Content-Security-Policy", uiContentSecurityPolicy)
	hdr.Set("X-Content-Type-Options", "nosniff")
	hdr.Set("Referrer-Policy", "no-referrer")
	hdr.Set("Cache-Control", "no-cache")
	if r.Method == http.MethodHead {
		return
	}
	_, _ = w.Write(page.Bytes())
}

// pageBase is the path the chat page refers to its assets and WebSocket by:
// the request's path (already unescaped) cleaned so that it can only name a
// path on this site. Backslashes are slashes (as browsers read them), dot
// segments are resolved and repeated slashes collapsed, so it never starts
// with "//" (a protocol-relative URL: "//evil.example/ws" would load the
// page's script from evil.example). No trailing slash; "" for the root. The
// template HTML-escapes it.
func pageBase(p string) string {
	p = path.Clean("/" + strings.ReplaceAll(p, `\`, "/"))
	return strings.TrimRight(p, "/")
}

// assetPaths are the asset paths under a route path, for the Caddyfile to
// add to the directive's path matcher.
func assetPaths(routePath string) []string {
	base := strings.TrimRight(routePath, "/")
	out := make([]string, 0, len(browserAssets))
	for _, name := range []string{"caddychat.js", "caddychat.d.ts", "chat-ui.js", "chat-ui.css"} {
		out = append(out, base+"/"+name)
	}
	return out
}
