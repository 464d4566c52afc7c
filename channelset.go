package caddychat

import (
	"iter"
	"slices"
)

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

// memberSet is the local subscribers of one channel: like channelSet, a
// short slice for the one or few members most channels have on a node, a
// map past memberSetSlice.
type memberSet struct {
	few  []subscriber
	many map[subscriber]struct{}
}

const memberSetSlice = 8

func (m *memberSet) len() int {
	if m.many != nil {
		return len(m.many)
	}
	return len(m.few)
}

func (m *memberSet) has(s subscriber) bool {
	if m.many != nil {
		_, ok := m.many[s]
		return ok
	}
	return slices.Contains(m.few, s)
}

// add adds s, which must not be in m yet.
func (m *memberSet) add(s subscriber) {
	if m.many != nil {
		m.many[s] = struct{}{}
		return
	}
	if len(m.few) < memberSetSlice {
		m.few = append(m.few, s)
		return
	}
	m.many = make(map[subscriber]struct{}, 2*memberSetSlice)
	for _, x := range m.few {
		m.many[x] = struct{}{}
	}
	m.many[s] = struct{}{}
	m.few = nil
}

// remove removes s and reports whether it was there.
func (m *memberSet) remove(s subscriber) bool {
	if m.many != nil {
		_, ok := m.many[s]
		delete(m.many, s)
		return ok
	}
	i := slices.Index(m.few, s)
	if i < 0 {
		return false
	}
	m.few = slices.Delete(m.few, i, i+1)
	return true
}

// all iterates over the members; m must not change meanwhile.
func (m *memberSet) all() iter.Seq[subscriber] {
	return func(yield func(subscriber) bool) {
		if m.many == nil {
			for _, s := range m.few {
				if !yield(s) {
					return
				}
			}
			return
		}
		for s := range m.many {
			if !yield(s) {
				return
			}
		}
	}
}
