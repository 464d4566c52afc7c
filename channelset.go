package caddychat

import "slices"

// channelSet is the channels of one connection. Most connections have one
// or a few: a short slice costs one small allocation where a map costs a
// table of eight slots (about 250 bytes more per idle connection). Past
// channelSetSlice channels it moves to a map, so that a connection with
// many subscriptions still finds one at once.
type channelSet struct {
	few  []string
	many map[string]struct{}
}

const channelSetSlice = 16

func (s *channelSet) has(channel string) bool {
	if s.many != nil {
		_, ok := s.many[channel]
		return ok
	}
	return slices.Contains(s.few, channel)
}

// add adds channel, which must not be in s yet.
func (s *channelSet) add(channel string) {
	if s.many != nil {
		s.many[channel] = struct{}{}
		return
	}
	if len(s.few) < channelSetSlice {
		s.few = append(s.few, channel)
		return
	}
	s.many = make(map[string]struct{}, 2*channelSetSlice)
	for _, ch := range s.few {
		s.many[ch] = struct{}{}
	}
	s.many[channel] = struct{}{}
	s.few = nil
}

// remove removes channel and reports whether it was there.
func (s *channelSet) remove(channel string) bool {
	if s.many != nil {
		_, ok := s.many[channel]
		delete(s.many, channel)
		return ok
	}
	i := slices.Index(s.few, channel)
	if i < 0 {
		return false
	}
	s.few = slices.Delete(s.few, i, i+1)
	return true
}

func (s *channelSet) len() int {
	if s.many != nil {
		return len(s.many)
	}
	return len(s.few)
}

// list returns the channels, in no particular order, as a new slice.
func (s *channelSet) list() []string {
	if s.many == nil {
		return slices.Clone(s.few)
	}
	out := make([]string, 0, len(s.many))
	for ch := range s.many {
		out = append(out, ch)
	}
	return out
}
