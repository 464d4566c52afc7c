package caddychat

import (
	"fmt"
	"slices"
	"testing"
)

// TestChannelSet: the set behaves the same below and past the size where
// it moves from a slice to a map.
func TestChannelSet(t *testing.T) {
	var s channelSet
	want := map[string]bool{}
	check := func(step string) {
		t.Helper()
		if s.len() != len(want) {
			t.Fatalf("%s: len %d, want %d", step, s.len(), len(want))
		}
		got := s.list()
		slices.Sort(got)
		var w []string
		for ch := range want {
			w = append(w, ch)
		}
		slices.Sort(w)
		if !slices.Equal(got, w) {
			t.Fatalf("%s: list %v, want %v", step, got, w)
		}
		for ch := range want {
			if !s.has(ch) {
				t.Fatalf("%s: has(%s) false", step, ch)
			}
		}
		if s.has("room:none") {
			t.Fatalf("%s: has a channel never added", step)
		}
	}
	for i := range 3 * smallSetSlice {
		ch := fmt.Sprintf("room:%d", i)
		s.add(ch)
		want[ch] = true
		check("add " + ch)
		if i%3 == 0 {
			if !s.remove(ch) || s.remove(ch) {
				t.Fatalf("remove %s: want true once, then false", ch)
			}
			delete(want, ch)
			check("remove " + ch)
		}
	}
	if s.many == nil {
		t.Fatal("past smallSetSlice channels the set is still a slice")
	}
	list := s.list()
	list[0] = "changed"
	if s.has("changed") {
		t.Fatal("list shares the set's storage")
	}
}
