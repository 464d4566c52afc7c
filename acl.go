package caddychat

import (
	"errors"
	"fmt"
	"strings"
)

// Channel permissions: the patterns of the claims, the route's subscribe
// and publish rules, anonymous and the hooks, compiled once per identity
// and matched against each channel a connection names.

// channelACL is a compiled list of channel patterns for one user.
type channelACL []channelPattern

// channelPattern is a pattern split into ':'-separated segments, with {user}
// already replaced. A segment that contained {user} is compared literally,
// even if the user id itself contains ':' or '*'.
type channelPattern struct {
	segments []patternSegment
}

type patternSegment struct {
	literal string
	any     bool // "*": exactly one segment
	rest    bool // final "**": one or more segments
}

// compileACL compiles patterns for user. Patterns with {user} are dropped
// for anonymous users (user == "").
func compileACL(patterns []string, user string) channelACL {
	acl := make(channelACL, 0, len(patterns))
	for _, p := range patterns {
		if strings.Contains(p, "{user}") && user == "" {
			continue
		}
		parts := strings.Split(p, ":")
		pat := channelPattern{segments: make([]patternSegment, 0, len(parts))}
		for i, s := range parts {
			switch {
			case s == "**" && i == len(parts)-1:
				pat.segments = append(pat.segments, patternSegment{rest: true})
			case s == "*":
				pat.segments = append(pat.segments, patternSegment{any: true})
			default:
				pat.segments = append(pat.segments, patternSegment{literal: strings.ReplaceAll(s, "{user}", user)})
			}
		}
		acl = append(acl, pat)
	}
	return acl
}

// allows reports whether any pattern matches channel.
func (acl channelACL) allows(channel string) bool {
	for _, p := range acl {
		if p.matches(channel) {
			return true
		}
	}
	return false
}

func (p channelPattern) matches(channel string) bool {
	rest := channel
	for i, seg := range p.segments {
		if i > 0 {
			if !strings.HasPrefix(rest, ":") {
				return false
			}
			rest = rest[1:]
		}
		switch {
		case seg.rest:
			return rest != ""
		case seg.any:
			end := strings.IndexByte(rest, ':')
			if end < 0 {
				end = len(rest)
			}
			if end == 0 {
				return false
			}
			rest = rest[end:]
		default:
			if !strings.HasPrefix(rest, seg.literal) {
				return false
			}
			rest = rest[len(seg.literal):]
		}
	}
	return rest == ""
}

// validatePattern checks a configured channel pattern.
func validatePattern(p string) error {
	if p == "" {
		return errors.New("empty pattern")
	}
	check := strings.ReplaceAll(p, "{user}", "u")
	parts := strings.Split(check, ":")
	for i, s := range parts {
		if s == "*" || (s == "**" && i == len(parts)-1) {
			continue
		}
		if s == "" {
			return fmt.Errorf("pattern %q has an empty segment", p)
		}
		if err := validateChannel(s); err != nil {
			return fmt.Errorf("pattern %q: %v (a wildcard is a whole segment: * or a final **)", p, err)
		}
	}
	return nil
}
