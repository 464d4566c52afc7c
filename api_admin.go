package caddychat

import (
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// The server API at Caddy's admin endpoint (as reverse_proxy serves its
// upstreams there): it inherits the admin listener and its access control,
// local by default, remote with mutual TLS; with `admin off` it does not
// exist. The ops are api.go's, at /chat/<op>.

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI is the admin module serving /chat/.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.chat",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes serves the server API under /chat/.
func (adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/chat/", Handler: caddy.AdminHandlerFunc(serveAdminAPI)}}
}

func serveAdminAPI(w http.ResponseWriter, r *http.Request) error {
	t, status, err := adminTarget(r.URL.Query().Get("prefix"))
	if err != nil {
		code := errBadRequest
		if status == http.StatusNotFound {
			code = errNotFound
		}
		writePublishError(w, status, code, err.Error())
		return nil
	}
	serveAPI(w, r, t, strings.TrimPrefix(r.URL.Path, "/chat/"))
	return nil
}

// adminTarget is the chat the request names by its channel prefix, or the
// node's only one.
func adminTarget(prefix string) (apiTarget, int, error) {
	var found []apiTarget
	var prefixes []string
	liveHubs.Range(func(k, _ any) bool {
		h := k.(*hub)
		routes := h.liveRoutes()
		if len(routes) == 0 {
			return true
		}
		prefixes = append(prefixes, fmt.Sprintf("%q", h.prefix))
		if prefix == "" || h.prefix == prefix {
			found = append(found, apiTarget{hub: h, routes: routes, path: "admin"})
		}
		return true
	})
	slices.Sort(prefixes)
	switch {
	case len(prefixes) == 0:
		return apiTarget{}, http.StatusNotFound, fmt.Errorf("no chat route is configured on this node")
	case len(found) == 0:
		return apiTarget{}, http.StatusNotFound, fmt.Errorf("no chat on this node has channel_prefix %q; it has %s", prefix, strings.Join(prefixes, ", "))
	case len(found) > 1 && prefix == "":
		return apiTarget{}, http.StatusBadRequest, fmt.Errorf("this node runs %d chats (channel prefixes %s): name one with ?prefix=", len(found), strings.Join(prefixes, ", "))
	case len(found) > 1:
		return apiTarget{}, http.StatusBadRequest, fmt.Errorf("%d chats on this node share channel_prefix %q (different broker settings); give them different prefixes to manage them apart", len(found), prefix)
	}
	return found[0], 0, nil
}

var _ caddy.AdminRouter = adminAPI{}
