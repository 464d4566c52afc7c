package caddychat

import (
	"encoding/json"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/caddychat/caddychat/internal/redistest"
)

// TestOverloadStoppedNodeReportsWhatItMissed: two real nodes on one Redis
// with max_lag 300ms. Node A is stopped (SIGSTOP) for 1.5 s while B's
// publisher has 100 messages acknowledged: when A runs again its backlog is
// far past the bound. A's subscribers get each acknowledged message once or
// count it in a gap frame, the newer messages arrive on time, and A's
// /metrics shows the lag and the skipped deliveries.
func TestOverloadStoppedNodeReportsWhatItMissed(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	routes := fmt.Sprintf("\tchat /ws {\n\t\tredis %s\n\t\trate_limit off\n\t\tmax_lag 300ms\n\t}", rs.URL())
	a := startCaddy(t, "A", routes)
	b := startCaddy(t, "B", routes)
	const channel, during, after = "room:overload", 100, 5

	subs := make([]*wsClient, 3)
	for i := range subs {
		subs[i] = dialJSON(t, fmt.Sprintf("sub%d", i), a.wsURL("/ws"))
		subs[i].subscribe(channel)
	}
	pub := dialJSON(t, "pub", b.wsURL("/ws"))
	// One message through, so A's subscription is known to be live.
	acked := []string{pub.mustPublish(channel, "first").MessageID}
	for _, s := range subs {
		s.expectMessage(channel, 5*time.Second)
	}
	before := a.scrapeMetrics(t)

	if err := a.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	t.Cleanup(func() {
		if stopped {
			_ = a.cmd.Process.Signal(syscall.SIGCONT)
		}
	})
	acked = acked[:0]
	for i := range during {
		acked = append(acked, pub.mustPublish(channel, i).MessageID)
	}
	time.Sleep(1500 * time.Millisecond)
	if err := a.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	stopped = false
	// After the backlog: these are on time and must arrive.
	var fresh []string
	time.Sleep(500 * time.Millisecond)
	for i := range after {
		fresh = append(fresh, pub.mustPublish(channel, fmt.Sprint("after ", i)).MessageID)
	}
	acked = append(acked, fresh...)

	for _, s := range subs {
		var got accounting
		for len(got.ids)+got.missed < len(acked) {
			m, err := s.readMsg(10 * time.Second)
			if err != nil {
				t.Fatalf("%s: after %d delivered and %d reported missed of %d: %v", s.name, len(got.ids), got.missed, len(acked), err)
			}
			switch m.Type {
			case "message":
				var id string
				if err := json.Unmarshal(m.ID, &id); err != nil {
					t.Fatalf("%s: message without a string id: %s", s.name, m.raw)
				}
				got.ids = append(got.ids, id)
			case "gap":
				var g gapFrame
				if err := json.Unmarshal([]byte(m.raw), &g); err != nil || g.Channel != channel || g.Missed < 1 {
					t.Fatalf("%s: bad gap frame %s", s.name, m.raw)
				}
				got.missed += g.Missed
			default:
				t.Fatalf("%s: unexpected frame %s", s.name, m.raw)
			}
		}
		if total := len(got.ids) + got.missed; total != len(acked) {
			t.Fatalf("%s: %d delivered + %d missed = %d, want %d", s.name, len(got.ids), got.missed, total, len(acked))
		}
		checkAccounting(t, s.name, got, acked)
		if got.missed < during/2 {
			t.Errorf("%s: only %d of the %d messages published while A was stopped reported missed", s.name, got.missed, during)
		}
		if n := len(got.ids); n < after || got.ids[n-1] != fresh[after-1] {
			t.Errorf("%s: the messages published after A caught up were not all delivered: %v", s.name, got.ids)
		}
	}
	now := a.scrapeMetrics(t)
	delta := func(name string) float64 { return now[name] - before[name] }
	if got := delta(`caddy_chat_late_skipped_total{where="hub"}`); got < float64(3*during/2) {
		t.Errorf(`late_skipped_total{where="hub"} grew by %v, want at least %d`, got, 3*during/2)
	}
	if got := delta("caddy_chat_broker_lag_seconds_count"); got < during+after {
		t.Errorf("broker_lag_seconds_count grew by %v, want at least %d", got, during+after)
	}
	if got := delta("caddy_chat_broker_lag_seconds_sum"); got < 1 {
		t.Errorf("broker_lag_seconds_sum grew by %v s, want over 1 s (messages waited out a 1.5 s stop)", got)
	}
	if got := now["caddy_chat_broker_backlog_bytes"]; got != 0 {
		t.Errorf("broker_backlog_bytes = %v after catching up, want 0", got)
	}
}
