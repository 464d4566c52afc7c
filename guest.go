package caddychat

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"unicode"
	"unicode/utf8"
)

// Guest names (guest_names on): a connection without a token may pick a
// display name, with ?name=<name> on the upgrade URL, and the node gives it
// a guest id of its own. Neither is a user id: envelopes keep "from":"" and
// say "anonymous":true, and carry the name and the guest id beside it, so no
// client (and no page that checks "from") can take a guest for a verified
// user, whatever name it picked. The guest id is random and made by the
// node, per connection: a page that remembers the ids it was given knows
// its own messages across reloads, and nobody can publish under another
// guest's id. Presence lists guests as {"user":"","anonymous":true,
// "guest":…,"name":…}. Off by default: a route without it ignores ?name=.

const (
	// guestNameParam is the upgrade URL's query parameter holding the name.
	guestNameParam = "name"
	// maxGuestNameRunes and maxGuestNameBytes bound a name, so that it can
	// neither fill a page nor grow an envelope much.
	maxGuestNameRunes = 24
	maxGuestNameBytes = 64
	// guestIDBytes random bytes, hex-encoded, are a guest id.
	guestIDBytes = 8
	guestIDLen   = 2 * guestIDBytes
	// guestKeyMark starts a guest's presence key. Verified user ids come
	// from JSON (the token's claims), so they are valid UTF-8 and never
	// hold a 0xff byte: no user id can be mistaken for a guest's key.
	guestKeyMark = "\xff"
)

// validateGuestName accepts 1..24 characters (at most 64 bytes) of letters,
// digits, combining marks (not first), single inner spaces and _ - . ' .
// Everything that could hide or reorder text (control and format
// characters: bidi overrides, zero-width ones), pose as markup or as a
// separator of the page's own text, is refused.
func validateGuestName(name string) error {
	if name == "" {
		return errors.New("name is empty")
	}
	if !utf8.ValidString(name) {
		return errors.New("name is not UTF-8")
	}
	if len(name) > maxGuestNameBytes || utf8.RuneCountInString(name) > maxGuestNameRunes {
		return fmt.Errorf("name is longer than %d characters (%d bytes)", maxGuestNameRunes, maxGuestNameBytes)
	}
	hasAlnum := false
	prev := ' ' // a leading space counts as a double one
	for i, r := range name {
		switch {
		case unicode.IsLetter(r) || unicode.IsDigit(r):
			hasAlnum = true
		case unicode.Is(unicode.Mn, r) || unicode.Is(unicode.Mc, r):
			if i == 0 {
				return errors.New("name starts with a combining mark")
			}
		case r == ' ':
			if prev == ' ' {
				return errors.New("name has a leading or doubled space")
			}
		case r == '_' || r == '-' || r == '.' || r == '\'':
		default:
			return fmt.Errorf("name contains %U; allowed are letters, digits, single spaces and _ - . '", r)
		}
		prev = r
	}
	if prev == ' ' {
		return errors.New("name ends with a space")
	}
	if !hasAlnum {
		return errors.New("name has no letter or digit")
	}
	return nil
}

// newGuestID is a fresh random guest id: 16 lowercase hex digits.
func newGuestID() string {
	var b [guestIDBytes]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand since Go 1.24)
	return hex.EncodeToString(b[:])
}

// guestIdentity gives an anonymous connection on a guest_names route its
// guest id and the name it asked for; a bad name is refused with 400. Any
// other identity, or a route without guest_names, is returned unchanged
// (the name parameter is ignored).
func (h *Handler) guestIdentity(r *http.Request, id *identity) (*identity, error) {
	if !h.GuestNames || !id.anonymous || id.server {
		return id, nil
	}
	guest := *id // the anonymous identity is shared: copy it
	guest.guest = newGuestID()
	if names, ok := r.URL.Query()[guestNameParam]; ok {
		if len(names) != 1 {
			return nil, refused(http.StatusBadRequest, "bad name: give one name parameter")
		}
		if err := validateGuestName(names[0]); err != nil {
			return nil, refused(http.StatusBadRequest, "bad name: "+err.Error())
		}
		guest.name = names[0]
	}
	return &guest, nil
}

// presenceKey is how id is counted in presence: its user id, a guest's key
// (guestKeyMark, the guest id, the name), or "" (not listed).
func (id *identity) presenceKey() string {
	if id.guest != "" {
		return guestKeyMark + id.guest + id.name
	}
	return id.user
}

// parseGuestKey splits a guest's presence key; ok is false for a user id.
func parseGuestKey(key string) (guest, name string, ok bool) {
	if len(key) < 1+guestIDLen || key[0] != guestKeyMark[0] {
		return "", "", false
	}
	return key[1 : 1+guestIDLen], key[1+guestIDLen:], true
}

// guestPresenceFields is what follows "user": in a guest's presence event,
// as the Redis scripts write it too: "","anonymous":true,"guest":…,"name":….
func guestPresenceFields(guest, name string) []byte {
	n, _ := json.Marshal(name)
	b := make([]byte, 0, 48+len(guest)+len(n))
	b = append(b, `"","anonymous":true,"guest":"`...)
	b = append(b, guest...)
	b = append(b, `","name":`...)
	return append(b, n...)
}

// guestPresenceLua is the Lua twin of guestPresenceFields, for the presence
// scripts: it returns the JSON after "user": for a presence key.
const guestPresenceLua = `
local function user_json(u)
	if string.byte(u, 1) == 255 and #u >= 17 then
		return '"","anonymous":true,"guest":"' .. string.sub(u, 2, 17) .. '","name":' .. cjson.encode(string.sub(u, 18))
	end
	return cjson.encode(u)
end
`
