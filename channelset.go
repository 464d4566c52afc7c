package caddychat

import (
	"iter"
	"slices"
)

// smallSet is a set that most of the time holds one or a few values: a
// connection's channels, a channel's local members on a node. A short
// slice costs one small allocation where a map costs a table of eight
// slots (about 250 bytes more per idle connection, for each of the two).
// Past smallSetSlice values it moves to a map, so that a large set still
// finds, adds and removes a value at once.
type smallSet[T comparable] struct {
	few  []T
	many map[T]struct{}
}

// channelSet is a connection's channels; memberSet a channel's local
// subscribers.
type (
	channelSet = smallSet[string]
	memberSet  = smallSet[subscriber]
)

const smallSetSlice = 8

func (s *smallSet[T]) len() int {
	if s.many != nil {
		return len(s.many)
	}
	return len(s.few)
}

func (s *smallSet[T]) has(v T) bool {
	if s.many != nil {
		_, ok := s.many[v]
		return ok
	}
	return slices.Contains(s.few, v)
}

// add adds v, which must not be in s yet.
func (s *smallSet[T]) add(v T) {
	if s.many != nil {
		s.many[v] = struct{}{}
		return
	}
	if len(s.few) < smallSetSlice {
		s.few = append(s.few, v)
		return
	}
	s.many = make(map[T]struct{}, 2*smallSetSlice)
	for _, x := range s.few {
		s.many[x] = struct{}{}
	}
	s.many[v] = struct{}{}
	s.few = nil
}

// remove removes v and reports whether it was there.
func (s *smallSet[T]) remove(v T) bool {
	if s.many != nil {
		_, ok := s.many[v]
		delete(s.many, v)
		return ok
	}
	i := slices.Index(s.few, v)
	if i < 0 {
		return false
	}
	s.few = slices.Delete(s.few, i, i+1)
	return true
}

// all iterates over the values; s must not change meanwhile.
func (s *smallSet[T]) all() iter.Seq[T] {
	return func(yield func(T) bool) {
		if s.many == nil {
			for _, v := range s.few {
				if !yield(v) {
					return
				}
			}
			return
		}
		for v := range s.many {
			if !yield(v) {
				return
			}
		}
	}
}

// list returns the values, in no particular order, as a new slice.
func (s *smallSet[T]) list() []T {
	return slices.Collect(s.all())
}
