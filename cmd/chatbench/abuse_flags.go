package main

import (
	"flag"
	"fmt"
	"strings"
	"time"
)

// The abuse scenario's part of the usage text, its flags and their checks.

const abuseUsage = `  abuse     an operator's check of a deployment (at least two -url nodes,
            rate limits as in production): for -duration, one hostile
            connection per attack of -attacks, never reading its socket,
            while honest clients use the same channels: -honest-subs
            subscribers per node on each shared channel (-abuse-channel, and
            -raw-channel when a raw attack runs) and one publisher per node
            per channel at -honest-rate. The attacks (letters as in the
            report):
              a resubscribe  publishes -fill messages of -fill-size to
                             -abuse-channel (a history channel), then
                             subscribes to it with "history":1000 and with
                             "since" an old id, again and again, every
                             other frame one more fill message
              b history      {"op":"history","limit":1000} again and again
              c forge        raw client (-raw-url, bridging -raw-channel)
                             sending the server's envelope shape with id
                             9999999999999999999-0 (it can silence a channel)
              c2 forge-json  the same as a JSON client's data
              d impersonate  raw client text that reaches JSON subscribers
                             looking like the server's (from "")
              e create       publishes to a fresh channel under
                             -create-prefix each time
              f opflood      subscribe/unsubscribe/presence/garbage, unpaced
              f2 oversize    frames of -oversize bytes
              g slowread     subscribes to -abuse-channel, never reads
              h http         POSTs to -publish-url with -token, unpaced,
                             on a channel of its own under -create-prefix
            a, b and e send at -attack-rate (keep it under the nodes'
            rate_limit). Reported: per node VmRSS (-pids) before, peak
            (every 250 ms) and -after the attacks stopped, the gauges
            caddy_chat_queued_bytes and caddy_chat_history_bytes ("n/a"
            when a node lacks them) and the closes by reason during the
            run (-metrics-url, the nodes' admin /metrics); per attacker
            what it sent, the error codes and close code it got (read after
            the attack, for at most -attacker-drain); per honest subscriber
            expected, received, lost, duplicated, out of order; the attack
            frames honest subscribers got, with their from, server and
            anonymous fields. A node over -max-rss stops the attacks
            ("STOPPED EARLY").
`

// abuseConfig is the abuse scenario's flags.
type abuseConfig struct {
	abuseChannel, rawChannel, createPrefix string
	rawURLs, metricsURLs, attacks          []string
	publishURL, token                      string
	attackRate, honestRate                 float64
	fill, fillSize, oversize, honestSubs   int
	httpConcurrency                        int
	maxRSS                                 int64 // bytes; 0: no limit
	after, attackerDrain                   time.Duration
}

func defaultAbuseConfig() abuseConfig {
	return abuseConfig{
		abuseChannel:    "room:abuse-busy",
		rawChannel:      "room:abuse-raw",
		createPrefix:    "room:abuse-",
		attackRate:      40,
		honestRate:      5,
		fill:            100,
		fillSize:        60 << 10,
		oversize:        1 << 20,
		honestSubs:      2,
		httpConcurrency: 4,
		maxRSS:          2 << 30,
		after:           3 * time.Second,
		attackerDrain:   3 * time.Second,
	}
}

// addAbuseFlags defines the abuse flags on fs; the function it returns,
// called after parsing when the abuse scenario runs, checks them.
func addAbuseFlags(fs *flag.FlagSet, cfg *config) (check func() error) {
	fs.StringVar(&cfg.abuseChannel, "abuse-channel", cfg.abuseChannel, "abuse: the busy shared channel (one with history on the -url route)")
	fs.StringVar(&cfg.rawChannel, "raw-channel", cfg.rawChannel, "abuse: the channel the -raw-url route bridges, shared by honest JSON clients")
	rawURLs := fs.String("raw-url", "", "abuse: WebSocket URLs of a raw-protocol route bridging -raw-channel, comma separated (needed by forge and impersonate)")
	fs.StringVar(&cfg.createPrefix, "create-prefix", cfg.createPrefix, "abuse: prefix of the fresh channels of create and opflood (under a history pattern)")
	attacks := fs.String("attacks", "all", "abuse: comma list of attacks by name or letter; all: every one whose flags are given (forge, impersonate need -raw-url; http needs -publish-url)")
	fs.StringVar(&cfg.publishURL, "publish-url", "", "abuse: the HTTP publish endpoint, for the http attack")
	fs.StringVar(&cfg.token, "token", "", "abuse: a JWT for the http attack (`caddy chat token` mints one)")
	fs.IntVar(&cfg.httpConcurrency, "http-concurrency", cfg.httpConcurrency, "abuse: requests in flight of the http attack")
	fs.Float64Var(&cfg.attackRate, "attack-rate", cfg.attackRate, "abuse: frames/s of the resubscribe, history and create attacks (0: unpaced)")
	fs.Float64Var(&cfg.honestRate, "honest-rate", cfg.honestRate, "abuse: publishes/s of each honest publisher")
	fs.IntVar(&cfg.honestSubs, "honest-subs", cfg.honestSubs, "abuse: honest subscribers per node per shared channel")
	fs.IntVar(&cfg.fill, "fill", cfg.fill, "abuse: messages the resubscribe attack first publishes to -abuse-channel")
	fs.IntVar(&cfg.fillSize, "fill-size", cfg.fillSize, "abuse: approximate bytes of a fill or create message")
	fs.IntVar(&cfg.oversize, "oversize", cfg.oversize, "abuse: bytes of an oversize frame")
	maxRSS := fs.String("max-rss", "2GiB", "abuse: stop the attacks when a node's VmRSS (read with -pids) or this tool's exceeds this (0: never)")
	fs.DurationVar(&cfg.after, "after", cfg.after, "abuse: wait after the attacks before the last RSS and metrics readings")
	fs.DurationVar(&cfg.attackerDrain, "attacker-drain", cfg.attackerDrain, "abuse: how long to read what each attacker was sent")
	return func() error {
		cfg.rawURLs = splitList(*rawURLs)
		var err error
		if cfg.maxRSS, err = parseSize(*maxRSS); err != nil {
			return fmt.Errorf("-max-rss: %v", err)
		}
		return checkAbuseFlags(cfg, splitList(*attacks))
	}
}

// checkAbuseFlags validates the abuse flags and resolves -attacks.
func checkAbuseFlags(cfg *config, attacks []string) error {
	if len(cfg.urls) < 2 {
		return fmt.Errorf("-scenario abuse needs at least two -url nodes (honest clients on every node), got %d", len(cfg.urls))
	}
	for _, ch := range []string{cfg.abuseChannel, cfg.rawChannel} {
		if ch == "" {
			return fmt.Errorf("-abuse-channel and -raw-channel may not be empty")
		}
	}
	switch {
	case cfg.honestSubs < 1 || cfg.honestRate <= 0:
		return fmt.Errorf("-honest-subs must be at least 1 and -honest-rate above 0")
	case cfg.attackRate < 0 || cfg.fill < 0 || cfg.fillSize < 0 || cfg.oversize < 0:
		return fmt.Errorf("-attack-rate, -fill, -fill-size and -oversize may not be negative")
	}
	cfg.attacks = nil
	if len(attacks) == 1 && attacks[0] == "all" {
		for _, a := range abuseAttacks {
			if (a.raw && len(cfg.rawURLs) == 0) || (a.name == "http" && cfg.publishURL == "") {
				continue
			}
			cfg.attacks = append(cfg.attacks, a.name)
		}
		return nil
	}
	for _, name := range attacks {
		a := findAttack(name)
		switch {
		case a == nil:
			var names []string
			for _, a := range abuseAttacks {
				names = append(names, a.letter+" "+a.name)
			}
			return fmt.Errorf("-attacks: unknown attack %q (%s)", name, strings.Join(names, ", "))
		case a.raw && len(cfg.rawURLs) == 0:
			return fmt.Errorf("-attacks: %s needs -raw-url", a.name)
		case a.name == "http" && cfg.publishURL == "":
			return fmt.Errorf("-attacks: http needs -publish-url")
		}
		cfg.attacks = append(cfg.attacks, a.name)
	}
	return nil
}
