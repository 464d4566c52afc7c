package caddychat

import (
	"testing"
	"time"
)

func TestDrainScheduleSpreadsClosesEvenly(t *testing.T) {
	for _, tc := range []struct {
		n      int
		period time.Duration
		last   time.Duration
	}{
		{0, 10 * time.Second, 0},
		{1, 10 * time.Second, 0},
		{10, 10 * time.Second, 10 * time.Millisecond}, // 1000/s: a few go almost at once
		{5000, 10 * time.Second, 5 * time.Second},
		{50000, 10 * time.Second, 10 * time.Second}, // capped by the period
		{5000, time.Millisecond, time.Millisecond},
	} {
		s := drainSchedule(tc.n, tc.period)
		if len(s) != tc.n {
			t.Fatalf("n=%d: %d offsets", tc.n, len(s))
		}
		if tc.n == 0 {
			continue
		}
		if s[0] != 0 || s[tc.n-1] != tc.last {
			t.Errorf("n=%d period=%v: first %v last %v, want 0 and %v", tc.n, tc.period, s[0], s[tc.n-1], tc.last)
		}
		for i := 1; i < tc.n; i++ {
			if s[i] < s[i-1] {
				t.Fatalf("n=%d: offsets go backwards at %d", tc.n, i)
			}
		}
		if tc.n > 2 {
			// Even: the middle connection closes half way through.
			if mid, want := s[(tc.n-1)/2], tc.last*time.Duration((tc.n-1)/2)/time.Duration(tc.n-1); mid != want {
				t.Errorf("n=%d: middle offset %v, want %v", tc.n, mid, want)
			}
		}
	}
}
