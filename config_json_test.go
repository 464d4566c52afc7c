package caddychat

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// TestJWTConfigQueryTokenJSON: the JSON name of query_token is query_token,
// and the deprecated query_param still reads.
func TestJWTConfigQueryTokenJSON(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{`{"query_token":"t"}`, "t", ""},
		{`{"query_param":"t"}`, "t", ""},
		{`{"query_param":"t","query_token":"t"}`, "t", ""},
		{`{"query_param":"a","query_token":"b"}`, "", `jwt: query_param "a" and query_token "b": query_param is the deprecated name of query_token; set query_token only`},
		{`{"secret":"x","bogus":1}`, "", `json: unknown field "bogus"`},
	} {
		var j JWTConfig
		err := json.Unmarshal([]byte(tc.in), &j)
		switch {
		case tc.err != "" && (err == nil || err.Error() != tc.err):
			t.Errorf("%s: error %v, want %s", tc.in, err, tc.err)
		case tc.err == "" && err != nil:
			t.Errorf("%s: %v", tc.in, err)
		case tc.err == "" && j.QueryParam != tc.want:
			t.Errorf("%s: query_token %q, want %q", tc.in, j.QueryParam, tc.want)
		}
	}
	// As Caddy loads the handler: strictly, the jwt object within it.
	var h Handler
	if err := caddy.StrictUnmarshalJSON([]byte(`{"jwt":{"secret":"s","query_param":"access_token","leeway":"3s"}}`), &h); err != nil {
		t.Fatal(err)
	}
	if h.JWT.QueryParam != "access_token" || h.JWT.Secret != "s" || time.Duration(h.JWT.Leeway) != 3*time.Second {
		t.Errorf("decoded %+v", *h.JWT)
	}
	if err := caddy.StrictUnmarshalJSON([]byte(`{"jwt":{"secret":"s","querytoken":"t"}}`), &h); err == nil {
		t.Error("an unknown jwt field decodes without error")
	}
	out, err := json.Marshal(JWTConfig{Secret: "s", QueryParam: "t"})
	if err != nil || string(out) != `{"secret":"s","query_token":"t"}` {
		t.Errorf("encoded %s, %v; want query_token", out, err)
	}
}
