package caddychat

import (
	"encoding/json"
	"fmt"
)

// User info from the token (user_info_claim): the claims an operator names
// (a display name, an avatar URL...) become the identity's info, which the
// welcome and the user's messages carry, as the connect hook's info does,
// so that pages show names without asking a backend. It is bounded like
// the hook's, because every message the user sends carries it.

// maxUserInfo bounds the JSON of a token's info: a token with more is
// refused at the handshake rather than trimmed, so what peers see is what
// the issuer wrote.
const maxUserInfo = maxHookInfo

// maxPresenceInfo bounds the info a presence entry holds (in Redis: per
// user and channel); the node and the scripts both check it, so no larger
// info is kept whatever made it.
const maxPresenceInfo = 1 << 10

// userInfo is the object of claims' values under names (the claims a
// token lacks are left out); nil when names is empty or the token has
// none of them.
func userInfo(claims map[string]any, names []string) (json.RawMessage, error) {
	if len(names) == 0 {
		return nil, nil
	}
	info := make(map[string]any, len(names))
	for _, name := range names {
		if v := lookupClaim(claims, name); v != nil {
			info[name] = v
		}
	}
	if len(info) == 0 {
		return nil, nil
	}
	b, err := json.Marshal(info)
	if err != nil {
		return nil, authErr("user info is not JSON")
	}
	if len(b) > maxUserInfo {
		return nil, authErr(fmt.Sprintf("user info too large (%d bytes of claims %v, at most %d)", len(b), names, maxUserInfo))
	}
	return b, nil
}
