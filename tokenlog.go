package caddychat

import (
	"net/url"
	"strings"
)

// Tokens and Caddy's access log. Caddy redacts the Authorization and Cookie
// headers itself (unless the server's log_credentials is on), but logs the
// request URI and every other header in full. A token in the query string
// or in the "bearer.<token>" subprotocol would land there, so the handler
// leaves such requests out of the access log (log_skip) and logs them
// itself with the token redacted (handler.go, carriesLoggableToken).
//
// Which query parameters are tokens: the route's query_token name, and
// these usual names whether the route reads them or not. A client that puts
// its token in the URL of a route that never reads it (query_token off)
// leaks it just as much; skipping a few harmless parameters of these names
// costs an access log line, logged by the module instead.
var tokenQueryNames = []string{"token", "access_token", "id_token", "jwt", "auth_token", "bearer"}

// isTokenQueryName reports whether a query parameter named name may carry a
// token: one of tokenQueryNames or the configured query_token name, in any
// case.
func (h *Handler) isTokenQueryName(name string) bool {
	if h.JWT != nil && h.JWT.QueryParam != "" && strings.EqualFold(name, h.JWT.QueryParam) {
		return true
	}
	for _, n := range tokenQueryNames {
		if strings.EqualFold(name, n) {
			return true
		}
	}
	return false
}

// queryCarriesToken reports whether raw (a URL's raw query) has a parameter
// named like a token. It splits the query itself, at '&' and ';', rather
// than with url.ParseQuery, which drops the pairs it cannot parse (such as
// "a=1;token=x") while Caddy logs the raw query whole.
func (h *Handler) queryCarriesToken(raw string) bool {
	found := false
	forEachQueryPair(raw, func(pair string) string {
		if h.isTokenQueryName(queryKey(pair)) {
			found = true
		}
		return pair
	})
	return found
}

// redactTokenQuery is u's request URI with the value of every token-like
// parameter replaced by REDACTED, the other parameters as they were, in
// their order.
func (h *Handler) redactTokenQuery(u *url.URL) string {
	c := *u
	c.RawQuery = ""
	c.ForceQuery = false
	var b strings.Builder
	forEachQueryPair(u.RawQuery, func(pair string) string {
		if key := queryKey(pair); h.isTokenQueryName(key) {
			k, _, _ := strings.Cut(pair, "=")
			return k + "=REDACTED"
		}
		return pair
	}, &b)
	c.RawQuery = b.String()
	return c.RequestURI()
}

// forEachQueryPair calls f with each '&'- or ';'-separated piece of raw,
// writing f's results, with the separators, to out (if any).
func forEachQueryPair(raw string, f func(pair string) string, out ...*strings.Builder) {
	for raw != "" {
		i := strings.IndexAny(raw, "&;")
		pair, sep := raw, ""
		if i >= 0 {
			pair, sep, raw = raw[:i], raw[i:i+1], raw[i+1:]
		} else {
			raw = ""
		}
		r := f(pair)
		for _, b := range out {
			b.WriteString(r)
			b.WriteString(sep)
		}
	}
}

// queryKey is the unescaped name of a query pair ("a%5Fb=1" is "a_b").
func queryKey(pair string) string {
	k, _, _ := strings.Cut(pair, "=")
	if u, err := url.QueryUnescape(k); err == nil {
		return u
	}
	return k
}
