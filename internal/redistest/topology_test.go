package redistest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// TestClusterFacts pins what the chat module's cluster support relies on:
// a script may SPUBLISH to the channel its keys' hash tag names, and one
// SSUBSCRIBE of channels of two slots is refused (CROSSSLOT), which is why
// the module sends one SSUBSCRIBE per channel.
func TestClusterFacts(t *testing.T) {
	start := time.Now()
	c := StartCluster(t, 3, 0)
	t.Logf("cluster of 3 masters ready in %v", time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	const channel = "chat:room:a"
	owner := c.Owner(channel)
	script := redis.NewScript(`redis.call('SET', KEYS[1], '1'); return redis.call('SPUBLISH', ARGV[1], 'x')`)
	if err := script.Run(ctx, owner.Client(), []string{"{" + channel + "}:history"}, channel).Err(); err != nil {
		t.Errorf("SPUBLISH inside a script on the channel's slot: %v", err)
	}

	var other string
	for _, ch := range []string{"chat:room:b", "chat:room:c", "chat:room:d", "chat:room:e", "chat:room:f", "chat:room:g"} {
		if c.Owner(ch) == owner && c.Slot(ch) != c.Slot(channel) {
			other = ch
			break
		}
	}
	if other == "" {
		t.Fatal("no second channel on the same shard")
	}
	ps := owner.Client().SSubscribe(ctx, channel, other)
	defer ps.Close()
	_, err := ps.ReceiveTimeout(ctx, time.Second)
	if err == nil || !strings.HasPrefix(err.Error(), "CROSSSLOT") {
		t.Errorf("SSUBSCRIBE of two slots at once: %v, want CROSSSLOT", err)
	}
}

func TestSentinelStarts(t *testing.T) {
	start := time.Now()
	s := StartSentinel(t)
	t.Logf("master, replica and 3 sentinels ready in %v", time.Since(start).Round(time.Millisecond))
	addr, err := s.MasterAddr()
	if err != nil || addr != s.Master.Addr() {
		t.Fatalf("sentinels name %q as master (%v), want %s", addr, err, s.Master.Addr())
	}
}
