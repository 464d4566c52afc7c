package caddychat

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// brokenCaddyfiles are Caddyfiles with one mistake each, and the message the
// operator gets for it, in full: it names the option (and the block), the
// value, and the expected form, at the mistake's line. Each input is the
// body of a site block ":8080 { … }", so the site's first line is line 1.
var brokenCaddyfiles = []struct{ name, input, want string }{
	{"webhook typo in block",
		"chat /ws {\n\twebhook https://app.internal/e {\n\t\tsecert x\n\t}\n}",
		`chat: unknown webhook option "secert" (did you mean "secret"?), at Caddyfile:4`},
	{"webhook unknown event",
		"chat /ws {\n\twebhook https://app.internal/e {\n\t\tevents publish joined\n\t}\n}",
		`chat: webhook events "joined": want connect, disconnect, subscribe, unsubscribe, publish, join or leave, at Caddyfile:4`},
	{"webhook not a URL",
		"chat /ws {\n\twebhook app.internal/e\n}",
		`chat: webhook "app.internal/e": want an http:// or https:// URL, e.g. https://app.internal/chat/events, at Caddyfile:3`},
	{"webhook claim_idle under twice the timeout",
		"chat /ws {\n\twebhook https://app.internal/e {\n\t\ttimeout 10s\n\t\tclaim_idle 5s\n\t}\n}",
		`chat: webhook claim_idle 5s: must be at least twice the webhook timeout (10s), or events in flight would be claimed by another node, at Caddyfile:5`},
	{"webhook max_backlog too small",
		"chat /ws {\n\twebhook https://app.internal/e {\n\t\tmax_backlog 1KiB\n\t}\n}",
		`chat: webhook max_backlog 1KiB: must be between 64KiB and 1GiB, at Caddyfile:4`},
	{"typo top-level",
		"chat /ws {\n\thistroy room:** 500\n}",
		`chat: unknown option "histroy" (did you mean "history"?), at Caddyfile:3`},
	{"typo top-level, no value",
		"chat /ws {\n\tpresense on\n}",
		`chat: unknown option "presense" (did you mean "presence"?), at Caddyfile:3`},
	{"typo top-level, a letter missing",
		"chat /ws {\n\tmax_connection 10\n}",
		`chat: unknown option "max_connection" (did you mean "max_connections"?), at Caddyfile:3`},
	{"typo top-level, capital",
		"chat /ws {\n\tRedis redis://127.0.0.1:6379\n}",
		`chat: unknown option "Redis" (did you mean "redis"?), at Caddyfile:3`},
	{"unknown top-level, nothing close",
		"chat /ws {\n\tbogus 1\n}",
		`chat: unknown option "bogus", at Caddyfile:3`},
	{"typo in jwt",
		"chat /ws {\n\tjwt {\n\t\tsecert {env.CHAT_JWT_SECRET}\n\t}\n}",
		`chat: unknown jwt option "secert" (did you mean "secret"?), at Caddyfile:4`},
	{"jwt query_param, the old JSON name",
		"chat /ws {\n\tjwt {\n\t\tquery_param token\n\t}\n}",
		`chat: unknown jwt option "query_param" (did you mean "query_token"?), at Caddyfile:4`},
	{"unknown in jwt",
		"chat /ws {\n\tjwt {\n\t\tbogus 1\n\t}\n}",
		`chat: unknown jwt option "bogus" (want secret, public_key, jwks, issuer, audience, user_claim, subscribe_claim, publish_claim, leeway, cookie, query_token, max_token_size or user_info_claim), at Caddyfile:4`},
	{"typo in redis_sentinel",
		"chat /ws {\n\tredis_sentinel m 127.0.0.1:26379 {\n\t\tpasword x\n\t}\n}",
		`chat: unknown redis_sentinel option "pasword" (did you mean "password"?), at Caddyfile:4`},
	{"unknown in redis_sentinel",
		"chat /ws {\n\tredis_sentinel m 127.0.0.1:26379 {\n\t\tbogus 1\n\t}\n}",
		`chat: unknown redis_sentinel option "bogus" (want username, password, db, sentinel_username, sentinel_password or tls), at Caddyfile:4`},
	{"redis_cluster has no db",
		"chat /ws {\n\tredis_cluster 127.0.0.1:7000 {\n\t\tdb 1\n\t}\n}",
		`chat: unknown redis_cluster option "db" (want username, password or tls), at Caddyfile:4`},
	{"typo in redis_cluster",
		"chat /ws {\n\tredis_cluster 127.0.0.1:7000 {\n\t\tusername a\n\t\ttsl\n\t}\n}",
		`chat: unknown redis_cluster option "tsl" (did you mean "tls"?), at Caddyfile:5`},
	{"typo in redis_tls",
		"chat /ws {\n\tredis_tls {\n\t\tservername redis.internal\n\t}\n}",
		`chat: unknown redis_tls option "servername" (did you mean "server_name"?), at Caddyfile:4`},
	{"unknown in redis_tls",
		"chat /ws {\n\tredis_tls {\n\t\tinsecure_skip_verify yes\n\t}\n}",
		`chat: unknown redis_tls option "insecure_skip_verify" (want ca, cert, key or server_name), at Caddyfile:4`},
	{"typo in anonymous",
		"chat /ws {\n\tanonymous {\n\t\tsubscibe public:*\n\t}\n}",
		`chat: unknown anonymous option "subscibe" (did you mean "subscribe"?), at Caddyfile:4`},
	{"unknown in anonymous",
		"chat /ws {\n\tanonymous {\n\t\tread x\n\t}\n}",
		`chat: unknown anonymous option "read" (want subscribe or publish), at Caddyfile:4`},
	{"send_queue, two values",
		"chat /ws {\n\tsend_queue 1 MiB\n}",
		`chat: send_queue takes one size, e.g. send_queue 1MiB; got 2 values, at Caddyfile:3`},
	{"redis, no value",
		"chat /ws {\n\tredis\n}",
		`chat: redis takes one URL, e.g. redis redis://127.0.0.1:6379/0; got none, at Caddyfile:3`},
	{"redis, two values",
		"chat /ws {\n\tredis a b\n}",
		`chat: redis takes one URL, e.g. redis redis://127.0.0.1:6379/0; got 2 values, at Caddyfile:3`},
	{"origins, no value",
		"chat /ws {\n\torigins\n}",
		`chat: origins takes one or more origin patterns, e.g. origins app.example.com *.example.com; got none, at Caddyfile:3`},
	{"subscribe, no value",
		"chat /ws {\n\tsubscribe\n}",
		`chat: subscribe takes one or more channel patterns, e.g. subscribe room:* user:{user}; got none, at Caddyfile:3`},
	{"presence, no value",
		"chat /ws {\n\tpresence\n}",
		`chat: presence takes on or off, e.g. presence on; got none, at Caddyfile:3`},
	{"history, no value",
		"chat /ws {\n\thistory\n}",
		`chat: history takes an optional channel pattern, a count and an optional max age, e.g. history room:* 100 24h; got none, at Caddyfile:3`},
	{"history, four values",
		"chat /ws {\n\thistory room:* 10 1h extra\n}",
		`chat: history takes an optional channel pattern, a count and an optional max age, e.g. history room:* 100 24h; got 4 values, at Caddyfile:3`},
	{"history, a pattern only",
		"chat /ws {\n\thistory room:*\n}",
		`chat: history room:*: want a count after the channel pattern (history [<channel pattern>] <count> [<max age>], e.g. history room:* 100 24h), at Caddyfile:3`},
	{"history, a count and two more",
		"chat /ws {\n\thistory 10 1h 5\n}",
		`chat: history 10 1h 5: a first value that is a number is the count, and only a max age may follow it (history [<channel pattern>] <count> [<max age>], e.g. history room:* 100 24h), at Caddyfile:3`},
	{"history_new_channels, no value",
		"chat /ws {\n\thistory_new_channels\n}",
		`chat: history_new_channels takes a number of channels and an optional period, or off, e.g. history_new_channels 30 1m; got none, at Caddyfile:3`},
	{"history_new_channels, three values",
		"chat /ws {\n\thistory_new_channels 10 1m extra\n}",
		`chat: history_new_channels takes a number of channels and an optional period, or off, e.g. history_new_channels 30 1m; got 3 values, at Caddyfile:3`},
	{"rate_limit, no value",
		"chat /ws {\n\trate_limit\n}",
		`chat: rate_limit takes a number of frames per second and an optional burst, or off, e.g. rate_limit 50 100; got none, at Caddyfile:3`},
	{"rate_limit, three values",
		"chat /ws {\n\trate_limit 10 20 30\n}",
		`chat: rate_limit takes a number of frames per second and an optional burst, or off, e.g. rate_limit 50 100; got 3 values, at Caddyfile:3`},
	{"jwt with a value",
		"chat /ws {\n\tjwt secret\n}",
		`chat: jwt takes no values, only a block, e.g. jwt { secret {env.CHAT_JWT_SECRET} }; got 1 value, at Caddyfile:3`},
	{"jwt secret, no value",
		"chat /ws {\n\tjwt {\n\t\tsecret\n\t}\n}",
		`chat: jwt secret takes one value, e.g. secret {env.CHAT_JWT_SECRET}; got none, at Caddyfile:4`},
	{"jwt query_token, two values",
		"chat /ws {\n\tjwt {\n\t\tquery_token a b\n\t}\n}",
		`chat: jwt query_token takes at most one parameter name, e.g. query_token token; got 2 values, at Caddyfile:4`},
	{"anonymous subscribe, no value",
		"chat /ws {\n\tanonymous {\n\t\tsubscribe\n\t}\n}",
		`chat: anonymous subscribe takes one or more channel patterns, e.g. subscribe public:*; got none, at Caddyfile:4`},
	{"redis_sentinel, no address",
		"chat /ws {\n\tredis_sentinel mymaster\n}",
		`chat: redis_sentinel takes the master name and one or more sentinel addresses, e.g. redis_sentinel mymaster 10.0.0.1:26379 10.0.0.2:26379; got 1 value, at Caddyfile:3`},
	{"redis_sentinel password, no value",
		"chat /ws {\n\tredis_sentinel m 127.0.0.1:26379 {\n\t\tpassword\n\t}\n}",
		`chat: redis_sentinel password takes one value, e.g. password {env.REDIS_PASSWORD}; got none, at Caddyfile:4`},
	{"redis_sentinel tls with a value",
		"chat /ws {\n\tredis_sentinel m 127.0.0.1:26379 {\n\t\ttls yes\n\t}\n}",
		`chat: redis_sentinel tls takes no values, e.g. tls; got 1 value, at Caddyfile:4`},
	{"redis_cluster, no address",
		"chat /ws {\n\tredis_cluster\n}",
		`chat: redis_cluster takes one or more node addresses, e.g. redis_cluster 10.0.1.1:6379 10.0.1.2:6379; got none, at Caddyfile:3`},
	{"redis_cluster username, two values",
		"chat /ws {\n\tredis_cluster 127.0.0.1:7000 {\n\t\tusername a b\n\t}\n}",
		`chat: redis_cluster username takes one value, e.g. username chat; got 2 values, at Caddyfile:4`},
	{"redis_tls with a value",
		"chat /ws {\n\tredis_tls /ca.pem\n}",
		`chat: redis_tls takes no values, only a block, e.g. redis_tls { ca /etc/chat/redis-ca.pem }; got 1 value, at Caddyfile:3`},
	{"redis_tls ca, no value",
		"chat /ws {\n\tredis_tls {\n\t\tca\n\t}\n}",
		`chat: redis_tls ca takes one value, e.g. ca /etc/chat/redis-ca.pem; got none, at Caddyfile:4`},
	{"redis_tls twice",
		"chat /ws {\n\tredis_tls {\n\t\tca a\n\t}\n\tredis_tls {\n\t\tca b\n\t}\n}",
		`chat: redis_tls is set twice, at Caddyfile:6`},
	{"a block after a value option",
		"chat /ws {\n\tsend_queue 1MiB {\n\t\tx\n\t}\n}",
		`chat: send_queue takes no block, e.g. send_queue 1MiB, at Caddyfile:4`},
	{"an argument to the directive",
		"chat /ws extra",
		`chat: unexpected argument "extra": chat takes a matcher and a block of options, e.g. chat /ws { redis redis://127.0.0.1:6379/0 }, at Caddyfile:2`},
	{"max_message_size, not a size",
		"chat /ws {\n\tmax_message_size lots\n}",
		`chat: max_message_size "lots": want a size such as 64KiB, at Caddyfile:3`},
	{"max_message_size 0",
		"chat /ws {\n\tmax_message_size 0\n}",
		`chat: max_message_size "0": want a size such as 64KiB, at Caddyfile:3`},
	{"send_queue, negative",
		"chat /ws {\n\tsend_queue -3\n}",
		`chat: send_queue "-3": want a size such as 1MiB, at Caddyfile:3`},
	{"history_memory, not a size",
		"chat /ws {\n\thistory_memory lots\n}",
		`chat: history_memory "lots": want a size such as 64MiB, at Caddyfile:3`},
	{"history_memory 0",
		"chat /ws {\n\thistory_memory 0\n}",
		`chat: history_memory "0": want a size such as 64MiB, at Caddyfile:3`},
	{"jwt max_token_size, not a size",
		"chat /ws {\n\tjwt {\n\t\tmax_token_size huge\n\t}\n}",
		`chat: jwt max_token_size "huge": want a size such as 8KiB, at Caddyfile:4`},
	{"ping_interval, not a duration",
		"chat /ws {\n\tping_interval soon\n}",
		`chat: ping_interval "soon": want a positive duration such as 25s, at Caddyfile:3`},
	{"write_timeout, negative",
		"chat /ws {\n\twrite_timeout -1s\n}",
		`chat: write_timeout "-1s": want a positive duration such as 10s, at Caddyfile:3`},
	{"publish_timeout, not a duration",
		"chat /ws {\n\tpublish_timeout x\n}",
		`chat: publish_timeout "x": want a positive duration such as 2s, at Caddyfile:3`},
	{"max_lag, not a duration",
		"chat /ws {\n\tmax_lag soon\n}",
		`chat: max_lag "soon": want a positive duration such as 5s, or off, at Caddyfile:3`},
	{"max_lag under 10ms",
		"chat /ws {\n\tmax_lag 1ms\n}",
		`chat: max_lag 1ms: must be off (0) or between 10ms and 1h, at Caddyfile:3`},
	{"drain_period, not a duration",
		"chat /ws {\n\tdrain_period soon\n}",
		`chat: drain_period "soon": want a positive duration such as 10s, at Caddyfile:3`},
	{"drain_period, no unit",
		"chat /ws {\n\tdrain_period 10\n}",
		`chat: drain_period "10": want a positive duration such as 10s, at Caddyfile:3`},
	{"presence_ttl, negative",
		"chat /ws {\n\tpresence_ttl -3s\n}",
		`chat: presence_ttl "-3s": want a positive duration such as 15s, at Caddyfile:3`},
	{"jwt leeway, not a duration",
		"chat /ws {\n\tjwt {\n\t\tleeway never\n\t}\n}",
		`chat: jwt leeway "never": want a duration such as 5s, at Caddyfile:4`},
	{"history max age, not a duration",
		"chat /ws {\n\thistory 10 forever\n}",
		`chat: history max age "forever": want a positive duration such as 24h (history [<channel pattern>] <count> [<max age>], e.g. history room:* 100 24h), at Caddyfile:3`},
	{"history_new_channels period, not a duration",
		"chat /ws {\n\thistory_new_channels 10 soon\n}",
		`chat: history_new_channels period "soon": want a positive duration such as 1m (history_new_channels <n> [<per duration>], e.g. history_new_channels 30 1m, or off), at Caddyfile:3`},
	{"history count, not a number",
		"chat /ws {\n\thistory room:* lots\n}",
		`chat: history count "lots": want a positive number of messages (history [<channel pattern>] <count> [<max age>], e.g. history room:* 100 24h), at Caddyfile:3`},
	{"history count 0",
		"chat /ws {\n\thistory 0\n}",
		`chat: history count "0": want a positive number of messages (history [<channel pattern>] <count> [<max age>], e.g. history room:* 100 24h), at Caddyfile:3`},
	{"history_new_channels, not a number",
		"chat /ws {\n\thistory_new_channels many\n}",
		`chat: history_new_channels "many": want a positive number of channels (history_new_channels <n> [<per duration>], e.g. history_new_channels 30 1m, or off), at Caddyfile:3`},
	{"history_new_channels 0",
		"chat /ws {\n\thistory_new_channels 0\n}",
		`chat: history_new_channels "0": want a positive number of channels (history_new_channels <n> [<per duration>], e.g. history_new_channels 30 1m, or off), at Caddyfile:3`},
	{"max_connections 0",
		"chat /ws {\n\tmax_connections 0\n}",
		`chat: max_connections "0": want a positive number, at Caddyfile:3`},
	{"max_connections_per_user, not a number",
		"chat /ws {\n\tmax_connections_per_user x\n}",
		`chat: max_connections_per_user "x": want a positive number, at Caddyfile:3`},
	{"max_subscriptions, negative",
		"chat /ws {\n\tmax_subscriptions -1\n}",
		`chat: max_subscriptions "-1": want a positive number, at Caddyfile:3`},
	{"max_replay, not a number",
		"chat /ws {\n\tmax_replay none\n}",
		`chat: max_replay "none": want a positive number, at Caddyfile:3`},
	{"rate_limit, not a number",
		"chat /ws {\n\trate_limit fast\n}",
		`chat: rate_limit "fast": want a positive number of frames per second, or off, at Caddyfile:3`},
	{"ephemeral_rate, not a number",
		"chat /ws {\n\tephemeral_rate often\n}",
		`chat: ephemeral_rate "often": want a positive number of ephemeral publishes per second, or off, at Caddyfile:3`},
	{"rate_limit burst, not a number",
		"chat /ws {\n\trate_limit 10 many\n}",
		`chat: rate_limit burst "many": want a positive number of frames, at Caddyfile:3`},
	{"ui, neither on nor off",
		"chat /ws {\n\tui maybe\n}",
		`chat: ui "maybe": want on or off, at Caddyfile:3`},
	{"guest_names, neither on nor off",
		"chat /ws {\n\tguest_names maybe\n}",
		`chat: guest_names "maybe": want on or off, at Caddyfile:3`},
	{"guest_names, two values",
		"chat /ws {\n\tguest_names on off\n}",
		`chat: guest_names takes on or off, e.g. guest_names on; got 2 values, at Caddyfile:3`},
	{"redis_sentinel db, negative",
		"chat /ws {\n\tredis_sentinel m 127.0.0.1:26379 {\n\t\tdb -1\n\t}\n}",
		`chat: redis_sentinel db "-1": want a database number, 0 or more, at Caddyfile:4`},
	{"typo in connect_hook",
		"chat /ws {\n\tconnect_hook http://127.0.0.1:3000/c {\n\t\ttimout 1s\n\t}\n}",
		`chat: unknown connect_hook option "timout" (did you mean "timeout"?), at Caddyfile:4`},
	{"cache in connect_hook",
		"chat /ws {\n\tconnect_hook http://127.0.0.1:3000/c {\n\t\tcache 10s\n\t}\n}",
		`chat: unknown connect_hook option "cache" (want timeout, max_concurrent, secret, headers or fail_open), at Caddyfile:4`},
	{"headers in subscribe_hook",
		"chat /ws {\n\tsubscribe_hook http://127.0.0.1:3000/s {\n\t\theaders Cookie\n\t}\n}",
		`chat: unknown subscribe_hook option "headers" (want timeout, max_concurrent, secret, cache or fail_open), at Caddyfile:4`},
	{"connect_hook without URL",
		"chat /ws {\n\tconnect_hook\n}",
		`chat: connect_hook takes one URL, e.g. connect_hook http://127.0.0.1:3000/chat/connect; got none, at Caddyfile:3`},
	{"connect_hook with patterns",
		"chat /ws {\n\tconnect_hook http://127.0.0.1:3000/c room:*\n}",
		`chat: connect_hook takes one URL, e.g. connect_hook http://127.0.0.1:3000/chat/connect; got 2 values, at Caddyfile:3`},
	{"publish_hook timeout not a duration",
		"chat /ws {\n\tpublish_hook http://127.0.0.1:3000/p {\n\t\ttimeout soon\n\t}\n}",
		`chat: publish_hook timeout "soon": want a positive duration such as 2s, at Caddyfile:4`},
	{"subscribe_hook max_concurrent zero",
		"chat /ws {\n\tsubscribe_hook http://127.0.0.1:3000/s {\n\t\tmax_concurrent 0\n\t}\n}",
		`chat: subscribe_hook max_concurrent "0": want a positive number, at Caddyfile:4`},
	{"fail_open with a value",
		"chat /ws {\n\tpublish_hook http://127.0.0.1:3000/p {\n\t\tfail_open yes\n\t}\n}",
		`chat: publish_hook fail_open takes no values, e.g. fail_open; got 1 value, at Caddyfile:4`},
}

// brokenValues are Caddyfiles whose options and value counts are right but
// whose values cannot work together or alone: checkConfig catches them when
// the whole chat block is read, at `caddy adapt`, and Validate (or
// Provision) catches them again with the same message for a JSON config.
var brokenValues = []struct{ name, input, want string }{
	{"redis and redis_cluster",
		"chat /ws {\n\tredis redis://127.0.0.1:6379\n\tredis_cluster 127.0.0.1:7000\n}",
		`chat: redis and redis_cluster are alternatives, set one of them (standalone Redis, Sentinel or Cluster), at Caddyfile:4`},
	{"redis, redis_sentinel and redis_cluster",
		"chat /ws {\n\tredis redis://127.0.0.1:6379\n\tredis_sentinel m 127.0.0.1:26379\n\tredis_cluster 127.0.0.1:7000\n}",
		`chat: redis, redis_sentinel and redis_cluster are alternatives, set one of them (standalone Redis, Sentinel or Cluster), at Caddyfile:4`},
	{"redis URL, wrong scheme",
		"chat /ws {\n\tredis http://127.0.0.1:6379\n}",
		`chat: redis "http://127.0.0.1:6379": invalid URL scheme: http (want redis://[user:password@]host:port/db or rediss://...), at Caddyfile:3`},
	{"redis URL, bad database, password hidden",
		"chat /ws {\n\tredis redis://:hunter2@127.0.0.1:6379/abc\n}",
		`chat: redis "redis://:xxxxx@127.0.0.1:6379/abc": invalid database number: "abc" (want redis://[user:password@]host:port/db or rediss://...), at Caddyfile:3`},
	{"redis_sentinel address without port",
		"chat /ws {\n\tredis_sentinel m 127.0.0.1:26379 10.0.0.2\n}",
		`chat: redis_sentinel address "10.0.0.2": want host:port, at Caddyfile:3`},
	{"redis_cluster with braces in channel_prefix",
		"chat /ws {\n\tredis_cluster 127.0.0.1:7000\n\tchannel_prefix {app}:\n}",
		`chat: channel_prefix "{app}:": no { or } with redis_cluster (history and presence keys use {<prefix><channel>} as their hash tag, which must hash to the slot of the channel), at Caddyfile:4`},
	{"redis_tls without redis",
		"chat /ws {\n\tredis_tls {\n\t\tca /etc/chat/ca.pem\n\t}\n}",
		`chat: redis_tls applies to redis (rediss://), redis_sentinel or redis_cluster, and none is set, at Caddyfile:3`},
	{"redis_tls with redis://",
		"chat /ws {\n\tredis redis://127.0.0.1:6379\n\tredis_tls {\n\t\tca /etc/chat/ca.pem\n\t}\n}",
		`chat: redis_tls needs a rediss:// URL in redis (redis:// is plaintext), at Caddyfile:4`},
	{"redis_tls cert without key",
		"chat /ws {\n\tredis rediss://127.0.0.1:6379\n\tredis_tls {\n\t\tcert /etc/chat/client.pem\n\t}\n}",
		`chat: redis_tls: cert and key go together (cert "/etc/chat/client.pem", key ""): the client certificate needs its private key, at Caddyfile:4`},
	{"protocol raw without channel",
		"chat /ws {\n\tprotocol raw\n}",
		`chat: protocol raw needs a channel, e.g. channel room:{http.request.uri.path.1}, at Caddyfile:3`},
	{"channel without protocol raw",
		"chat /ws {\n\tchannel room:lobby\n}",
		`chat: channel applies to protocol raw only (JSON clients choose channels themselves); add protocol raw or remove channel, at Caddyfile:3`},
	{"protocol neither json nor raw",
		"chat /ws {\n\tprotocol xml\n}",
		`chat: protocol "xml": must be json or raw, at Caddyfile:3`},
	{"raw channel, bad name",
		"chat /ws {\n\tprotocol raw\n\tchannel room#1\n}",
		`chat: channel "room#1": channel name contains '#'; allowed are letters, digits and _ - . : @ /, at Caddyfile:4`},
	{"channel_prefix with a glob character",
		"chat /ws {\n\tchannel_prefix chat*:\n}",
		`chat: channel_prefix "chat*:": at most 64 bytes, no white space or * ? [ ], at Caddyfile:3`},
	{"channel_prefix with braces and presence",
		"chat /ws {\n\tpresence on\n\tchannel_prefix {chat}:\n}",
		`chat: channel_prefix "{chat}:": no { or } with presence on (presence keys use {<prefix><channel>} as their Redis Cluster hash tag), at Caddyfile:4`},
	{"subscribe pattern, wildcard within a segment",
		"chat /ws {\n\tjwt {\n\t\tsecret " + testSecret + "\n\t}\n\tsubscribe room:* room:x*\n}",
		`chat: subscribe: pattern "room:x*": channel name contains '*'; allowed are letters, digits and _ - . : @ / (a wildcard is a whole segment: * or a final **), at Caddyfile:6`},
	{"publish pattern, empty segment",
		"chat /ws {\n\tjwt {\n\t\tsecret " + testSecret + "\n\t}\n\tpublish room:*\n\tpublish a::b\n}",
		`chat: publish: pattern "a::b" has an empty segment, at Caddyfile:7`},
	{"subscribe without jwt",
		"chat /ws {\n\tsubscribe room:*\n}",
		`chat: subscribe and publish rules apply to authenticated users and need a jwt block or a connect_hook; use anonymous { ... } for a route without tokens, at Caddyfile:3`},
	{"anonymous subscribe pattern",
		"chat /ws {\n\tanonymous {\n\t\tsubscribe public:x*\n\t}\n}",
		`chat: anonymous subscribe: pattern "public:x*": channel name contains '*'; allowed are letters, digits and _ - . : @ / (a wildcard is a whole segment: * or a final **), at Caddyfile:4`},
	{"anonymous publish pattern",
		"chat /ws {\n\tanonymous {\n\t\tpublish public:* public:**:x\n\t}\n}",
		`chat: anonymous publish: pattern "public:**:x": channel name contains '*'; allowed are letters, digits and _ - . : @ / (a wildcard is a whole segment: * or a final **), at Caddyfile:4`},
	{"history pattern, wildcard within a segment",
		"chat /ws {\n\thistory room:* 10\n\thistory dm:x* 10\n}",
		`chat: history dm:x*: pattern "dm:x*": channel name contains '*'; allowed are letters, digits and _ - . : @ / (a wildcard is a whole segment: * or a final **), at Caddyfile:4`},
	{"history pattern with {user}",
		"chat /ws {\n\thistory user:{user} 10\n}",
		`chat: history user:{user}: {user} is not allowed in history patterns (history is shared by the channel's subscribers), at Caddyfile:3`},
	{"history count too large",
		"chat /ws {\n\thistory 2000000\n}",
		`chat: history count 2000000: must be between 1 and 1000000, at Caddyfile:3`},
	{"history max age too long",
		"chat /ws {\n\thistory room:* 10 400d\n}",
		`chat: history max age 9600h: must be between 1s and 365 days (8760h), at Caddyfile:3`},
	{"history_new_channels period too long",
		"chat /ws {\n\thistory_new_channels 10 48h\n}",
		`chat: history_new_channels period 48h: must be between 1s and 24h, at Caddyfile:3`},
	{"max_message_size too large",
		"chat /ws {\n\tmax_message_size 32MiB\n}",
		`chat: max_message_size 32MiB: must be between 1 byte and 16MiB, at Caddyfile:3`},
	{"send_queue too small",
		"chat /ws {\n\tsend_queue 1KiB\n}",
		`chat: send_queue 1KiB: must be a size between 16KiB and 1GiB (bytes that may wait for one client, e.g. 1MiB), at Caddyfile:3`},
	{"history_memory too small",
		"chat /ws {\n\thistory_memory 1000\n}",
		`chat: history_memory 1000 bytes: must be between 1MiB and 1TiB, at Caddyfile:3`},
	{"jwt max_token_size too small",
		"chat /ws {\n\tjwt {\n\t\tsecret " + testSecret + "\n\t\tmax_token_size 100\n\t}\n}",
		`chat: jwt max_token_size 100 bytes: must be between 256 bytes and 64KiB, at Caddyfile:5`},
	{"ping_interval too long",
		"chat /ws {\n\tping_interval 2h\n}",
		`chat: ping_interval 2h: must be between 100ms and 1h, at Caddyfile:3`},
	{"write_timeout too short",
		"chat /ws {\n\twrite_timeout 1ms\n}",
		`chat: write_timeout 1ms: must be between 10ms and 1h, at Caddyfile:3`},
	{"presence_ttl too short",
		"chat /ws {\n\tpresence_ttl 1s\n}",
		`chat: presence_ttl 1s: must be between 3s and 1h, at Caddyfile:3`},
	{"jwt leeway too long",
		"chat /ws {\n\tjwt {\n\t\tsecret " + testSecret + "\n\t\tleeway 10m\n\t}\n}",
		`chat: jwt leeway 10m: must be between 0 and 5m, at Caddyfile:5`},
	{"max_replay too large",
		"chat /ws {\n\tmax_replay 200000\n}",
		`chat: max_replay 200000: must be between 1 and 100000, at Caddyfile:3`},
	{"rate_limit burst too large",
		"chat /ws {\n\trate_limit 10 200000\n}",
		`chat: rate_limit burst 200000: must be between 1 and 100000, at Caddyfile:3`},
	{"jwt, literal secret too short",
		"chat /ws {\n\tjwt {\n\t\tsecret changeme\n\t}\n}",
		`chat: jwt secret: must be at least 32 bytes, got 8 (HS256 keys shorter than the hash are guessable; e.g. openssl rand -base64 48), at Caddyfile:4`},
	{"jwt without a key",
		"chat /ws {\n\tjwt {\n\t\tissuer https://idp.example.com\n\t}\n}",
		`chat: jwt needs exactly one of secret, public_key and jwks; got none (e.g. secret {env.CHAT_JWT_SECRET}), at Caddyfile:3`},
	{"jwt, secret and jwks",
		"chat /ws {\n\tjwt {\n\t\tsecret {env.CHAT_JWT_SECRET}\n\t\tjwks https://idp.example.com/jwks.json\n\t}\n}",
		`chat: jwt needs exactly one of secret, public_key and jwks; got secret and jwks, at Caddyfile:3`},
	{"jwt jwks, not http",
		"chat /ws {\n\tjwt {\n\t\tjwks ftp://idp.example.com/jwks.json\n\t}\n}",
		`chat: jwt jwks "ftp://idp.example.com/jwks.json": want an http(s) URL, e.g. https://idp.example.com/.well-known/jwks.json, at Caddyfile:4`},
	{"publish_endpoint without publish_key or jwt",
		"chat /ws {\n\tpublish_endpoint /chat/publish\n}",
		`chat: publish_endpoint needs publish_key or a jwt block to authenticate backends, at Caddyfile:3`},
	{"publish_endpoint not a path",
		"chat /ws {\n\tpublish_endpoint chat/publish\n\tpublish_key 0123456789abcdef\n}",
		`chat: publish_endpoint "chat/publish": must be a path starting with /, e.g. /chat/publish, at Caddyfile:3`},
	{"connect_hook not http",
		"chat /ws {\n\tconnect_hook ftp://127.0.0.1/c\n}",
		`chat: connect_hook "ftp://127.0.0.1/c": want an http:// or https:// URL, e.g. http://127.0.0.1:3000/chat/connect, at Caddyfile:3`},
	{"subscribe_hook no host",
		"chat /ws {\n\tsubscribe_hook http:///s\n}",
		`chat: subscribe_hook "http:///s": want an http:// or https:// URL, e.g. http://127.0.0.1:3000/chat/subscribe, at Caddyfile:3`},
	{"publish_hook timeout too long",
		"chat /ws {\n\tpublish_hook http://127.0.0.1:3000/p {\n\t\ttimeout 2m\n\t}\n}",
		`chat: publish_hook timeout 2m: must be between 1ms and 1m, at Caddyfile:4`},
	{"subscribe_hook cache too long",
		"chat /ws {\n\tsubscribe_hook http://127.0.0.1:3000/s {\n\t\tcache 2h\n\t}\n}",
		`chat: subscribe_hook cache 2h: must be between 0 and 1h, at Caddyfile:4`},
	{"publish_hook bad pattern",
		"chat /ws {\n\tpublish_hook http://127.0.0.1:3000/p room:* room:x*\n}",
		`chat: publish_hook: pattern "room:x*": channel name contains '*'; allowed are letters, digits and _ - . : @ / (a wildcard is a whole segment: * or a final **), at Caddyfile:3`},
	{"subscribe_hook pattern with {user}",
		"chat /ws {\n\tsubscribe_hook http://127.0.0.1:3000/s user:{user}\n}",
		`chat: subscribe_hook: pattern "user:{user}": {user} has no meaning here (the hook is asked for every user; it decides per user), at Caddyfile:3`},
	{"connect_hook bad header name",
		"chat /ws {\n\tconnect_hook http://127.0.0.1:3000/c {\n\t\theaders Cookie X:Y\n\t}\n}",
		`chat: connect_hook headers "X:Y": want a header name such as Cookie, at Caddyfile:4`},
	{"subscribe_hook on a raw route",
		"chat /ws {\n\tprotocol raw\n\tchannel room:a\n\tsubscribe_hook http://127.0.0.1:3000/s\n}",
		`chat: subscribe_hook applies to protocol json (a raw route's channel is set by the route; use connect_hook to decide who may open it), at Caddyfile:5`},
	{"publish_key, literal too short",
		"chat /ws {\n\tpublish_endpoint /chat/publish\n\tpublish_key secret\n}",
		`chat: publish_key: must be at least 16 bytes, got 6 (e.g. openssl rand -base64 32), at Caddyfile:4`},
}

// TestCaddyfileBrokenConfigs adapts each broken Caddyfile as `caddy adapt`
// does and pins the whole error message.
func TestCaddyfileBrokenConfigs(t *testing.T) {
	adapter := caddyconfig.GetAdapter("caddyfile")
	for _, tc := range append(brokenCaddyfiles[:len(brokenCaddyfiles):len(brokenCaddyfiles)], brokenValues...) {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := adapter.Adapt([]byte(":8080 {\n"+tc.input+"\n}\n"), nil)
			if err == nil {
				t.Fatalf("%q adapts without error; want %s", tc.input, tc.want)
			}
			got := strings.TrimPrefix(err.Error(), "parsing caddyfile tokens for 'chat': ")
			if got != tc.want {
				t.Errorf("%q:\n got: %s\nwant: %s", tc.input, got, tc.want)
			}
		})
	}
}

// TestCaddyfileBrokenValuesAtValidate: each mistake that `caddy adapt`
// catches by checkConfig has the same message (without its Caddyfile line)
// when the same config comes as JSON and only Provision and Validate see
// it.
func TestCaddyfileBrokenValuesAtValidate(t *testing.T) {
	t.Setenv("CHAT_JWT_SECRET", testSecret)
	for _, tc := range brokenValues {
		t.Run(tc.name, func(t *testing.T) {
			var parsed Handler
			input := strings.Replace(tc.input, "chat /ws {", "chat {", 1)
			if err := parsed.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err == nil {
				t.Fatalf("%q: UnmarshalCaddyfile without error", input)
			}
			raw, err := json.Marshal(&parsed)
			if err != nil {
				t.Fatal(err)
			}
			err = provisionAndValidate(t, raw)
			want := tc.want[:strings.LastIndex(tc.want, ", at Caddyfile:")]
			if err == nil || err.Error() != want {
				t.Errorf("%s:\n got: %v\nwant: %s", raw, err, want)
			}
		})
	}
}

// brokenAtValidate are Caddyfiles that adapt, because their mistake is in
// the value a placeholder expands to or in a file, and the message
// `caddy validate` gives for each, in full. env is the environment of the
// check; a variable set to "" is unset.
var brokenAtValidate = []struct {
	name        string
	env         map[string]string
	input, want string
}{
	{"jwt secret from an unset variable",
		map[string]string{"CHAT_JWT_SECRET": ""},
		"chat /ws {\n\tjwt {\n\t\tsecret {env.CHAT_JWT_SECRET}\n\t}\n}",
		`chat: jwt secret is empty: {env.CHAT_JWT_SECRET} expanded to nothing (is CHAT_JWT_SECRET set in the environment of caddy?)`},
	{"jwt secret from a variable that is too short",
		map[string]string{"CHAT_JWT_SECRET": "changeme"},
		"chat /ws {\n\tjwt {\n\t\tsecret {env.CHAT_JWT_SECRET}\n\t}\n}",
		`chat: jwt secret: must be at least 32 bytes, got 8 (HS256 keys shorter than the hash are guessable; e.g. openssl rand -base64 48)`},
	{"jwt secret from a missing file",
		nil,
		"chat /ws {\n\tjwt {\n\t\tsecret {file./nonexistent/chat-jwt-secret}\n\t}\n}",
		`chat: jwt secret is empty: {file./nonexistent/chat-jwt-secret} expanded to nothing (does /nonexistent/chat-jwt-secret exist, readable by caddy, and hold the value?)`},
	{"jwt public_key from an unset variable",
		map[string]string{"CHAT_JWT_PUBLIC_KEY": ""},
		"chat /ws {\n\tjwt {\n\t\tpublic_key {env.CHAT_JWT_PUBLIC_KEY}\n\t}\n}",
		`chat: jwt public_key is empty: {env.CHAT_JWT_PUBLIC_KEY} expanded to nothing (is CHAT_JWT_PUBLIC_KEY set in the environment of caddy?)`},
	{"jwt public_key, no such file",
		nil,
		"chat /ws {\n\tjwt {\n\t\tpublic_key /nonexistent/jwt.pem\n\t}\n}",
		`chat: jwt public_key: open /nonexistent/jwt.pem: no such file or directory`},
	{"jwt jwks from an unset variable",
		map[string]string{"CHAT_JWKS_URL": ""},
		"chat /ws {\n\tjwt {\n\t\tjwks {env.CHAT_JWKS_URL}\n\t}\n}",
		`chat: jwt jwks is empty: {env.CHAT_JWKS_URL} expanded to nothing (is CHAT_JWKS_URL set in the environment of caddy?)`},
	{"jwt jwks from a variable, not http",
		map[string]string{"CHAT_JWKS_URL": "idp.example.com/jwks.json"},
		"chat /ws {\n\tjwt {\n\t\tjwks {env.CHAT_JWKS_URL}\n\t}\n}",
		`chat: jwt jwks "idp.example.com/jwks.json": want an http(s) URL, e.g. https://idp.example.com/.well-known/jwks.json`},
	{"publish_key from an unset variable",
		map[string]string{"CHAT_PUBLISH_KEY": ""},
		"chat /ws {\n\tpublish_endpoint /chat/publish\n\tpublish_key {env.CHAT_PUBLISH_KEY}\n}",
		`chat: publish_key is empty: {env.CHAT_PUBLISH_KEY} expanded to nothing (is CHAT_PUBLISH_KEY set in the environment of caddy?)`},
	{"publish_key from a variable that is too short",
		map[string]string{"CHAT_PUBLISH_KEY": "secret"},
		"chat /ws {\n\tpublish_endpoint /chat/publish\n\tpublish_key {env.CHAT_PUBLISH_KEY}\n}",
		`chat: publish_key: must be at least 16 bytes, got 6 (e.g. openssl rand -base64 32)`},
	{"redis URL from an unset variable",
		map[string]string{"REDIS_URL": ""},
		"chat /ws {\n\tredis {env.REDIS_URL}\n}",
		`chat: redis URL is empty: {env.REDIS_URL} expanded to nothing (is REDIS_URL set in the environment of caddy?)`},
	{"redis URL from two unset variables",
		map[string]string{"REDIS_HOST": "", "REDIS_PORT": ""},
		"chat /ws {\n\tredis {env.REDIS_HOST}{env.REDIS_PORT}\n}",
		`chat: redis URL is empty: {env.REDIS_HOST}{env.REDIS_PORT} expanded to nothing (are REDIS_HOST and REDIS_PORT set in the environment of caddy?)`},
	{"redis URL from a variable, wrong scheme",
		map[string]string{"REDIS_URL": "http://127.0.0.1:6379"},
		"chat /ws {\n\tredis {env.REDIS_URL}\n}",
		`chat: redis "http://127.0.0.1:6379": invalid URL scheme: http (want redis://[user:password@]host:port/db or rediss://...)`},
	{"redis URL from a variable, bad database, password hidden",
		map[string]string{"REDIS_URL": "redis://:hunter2@127.0.0.1:6379/x"},
		"chat /ws {\n\tredis {env.REDIS_URL}\n}",
		`chat: redis "redis://:xxxxx@127.0.0.1:6379/x": invalid database number: "x" (want redis://[user:password@]host:port/db or rediss://...)`},
	{"redis_sentinel address from an unset variable",
		map[string]string{"SENTINEL_ADDR": ""},
		"chat /ws {\n\tredis_sentinel mymaster {env.SENTINEL_ADDR}\n}",
		`chat: redis_sentinel address is empty: {env.SENTINEL_ADDR} expanded to nothing (is SENTINEL_ADDR set in the environment of caddy?)`},
	{"redis_cluster address from a variable, no port",
		map[string]string{"CLUSTER_ADDR": "10.0.1.1"},
		"chat /ws {\n\tredis_cluster {env.CLUSTER_ADDR}\n}",
		`chat: redis_cluster address "10.0.1.1": want host:port`},
	{"redis_cluster and channel_prefix from a variable with braces",
		map[string]string{"CHAT_PREFIX": "{app}:"},
		"chat /ws {\n\tredis_cluster 127.0.0.1:7000\n\tchannel_prefix {env.CHAT_PREFIX}\n}",
		`chat: channel_prefix "{app}:": no { or } with redis_cluster (history and presence keys use {<prefix><channel>} as their hash tag, which must hash to the slot of the channel)`},
	{"redis_tls ca from an unset variable",
		map[string]string{"REDIS_CA": ""},
		"chat /ws {\n\tredis rediss://127.0.0.1:6379\n\tredis_tls {\n\t\tca {env.REDIS_CA}\n\t}\n}",
		`chat: redis_tls ca is empty: {env.REDIS_CA} expanded to nothing (is REDIS_CA set in the environment of caddy?)`},
	{"redis_tls ca, no such file",
		nil,
		"chat /ws {\n\tredis rediss://127.0.0.1:6379\n\tredis_tls {\n\t\tca /nonexistent/redis-ca.pem\n\t}\n}",
		`chat: redis_tls ca: open /nonexistent/redis-ca.pem: no such file or directory`},
	{"redis_tls with a redis:// URL from a variable",
		map[string]string{"REDIS_URL": "redis://127.0.0.1:6379"},
		"chat /ws {\n\tredis {env.REDIS_URL}\n\tredis_tls {\n\t\tserver_name redis.internal\n\t}\n}",
		`chat: redis_tls needs a rediss:// URL in redis (redis:// is plaintext)`},
	{"channel_prefix from a variable, white space",
		map[string]string{"CHAT_PREFIX": "my chat:"},
		"chat /ws {\n\tchannel_prefix {env.CHAT_PREFIX}\n}",
		`chat: channel_prefix "my chat:": at most 64 bytes, no white space or * ? [ ]`},
	{"channel_prefix from a variable, braces with presence",
		map[string]string{"CHAT_PREFIX": "{chat}:"},
		"chat /ws {\n\tpresence on\n\tchannel_prefix {env.CHAT_PREFIX}\n}",
		`chat: channel_prefix "{chat}:": no { or } with presence on (presence keys use {<prefix><channel>} as their Redis Cluster hash tag)`},
	{"connect_hook URL from an unset variable",
		map[string]string{"CHAT_HOOK_URL": ""},
		"chat /ws {\n\tconnect_hook {env.CHAT_HOOK_URL}\n}",
		`chat: connect_hook is empty: {env.CHAT_HOOK_URL} expanded to nothing (is CHAT_HOOK_URL set in the environment of caddy?)`},
	{"publish_hook URL from a variable, not http",
		map[string]string{"CHAT_HOOK_URL": "redis://127.0.0.1:6379"},
		"chat /ws {\n\tpublish_hook {env.CHAT_HOOK_URL}\n}",
		`chat: publish_hook "redis://127.0.0.1:6379": want an http:// or https:// URL, e.g. http://127.0.0.1:3000/chat/publish`},
	{"origins from an unset variable",
		map[string]string{"CHAT_ORIGIN": ""},
		"chat /ws {\n\torigins app.example.com {env.CHAT_ORIGIN}\n}",
		`chat: origins pattern is empty: {env.CHAT_ORIGIN} expanded to nothing (is CHAT_ORIGIN set in the environment of caddy?)`},
}

// TestCaddyfileBrokenAtValidate runs each Caddyfile of brokenAtValidate as
// `caddy validate` does (adapt, load the handler's JSON, Provision,
// Validate; no network) and pins the whole message; each adapts without
// error, so that nothing caught here could have been caught at adapt.
func TestCaddyfileBrokenAtValidate(t *testing.T) {
	adapter := caddyconfig.GetAdapter("caddyfile")
	for _, tc := range brokenAtValidate {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
				if v == "" {
					os.Unsetenv(k) // restored by t.Setenv's cleanup
				}
			}
			cfg, _, err := adapter.Adapt([]byte(":8080 {\n"+tc.input+"\n}\n"), nil)
			if err != nil {
				t.Fatalf("%q: adapt: %v", tc.input, err)
			}
			err = provisionAndValidate(t, chatHandlerJSON(t, cfg))
			if err == nil {
				t.Fatalf("%q validates without error; want %s", tc.input, tc.want)
			}
			if err.Error() != tc.want {
				t.Errorf("%q:\n got: %s\nwant: %s", tc.input, err, tc.want)
			}
		})
	}
}

// chatHandlerJSON is the chat handler's JSON in an adapted config, without
// its "handler" key, as Caddy hands it to the module.
func chatHandlerJSON(t *testing.T, cfg []byte) []byte {
	t.Helper()
	var find func(v any) map[string]any
	find = func(v any) map[string]any {
		switch v := v.(type) {
		case map[string]any:
			if v["handler"] == "chat" {
				return v
			}
			for _, e := range v {
				if m := find(e); m != nil {
					return m
				}
			}
		case []any:
			for _, e := range v {
				if m := find(e); m != nil {
					return m
				}
			}
		}
		return nil
	}
	var root any
	if err := json.Unmarshal(cfg, &root); err != nil {
		t.Fatal(err)
	}
	h := find(root)
	if h == nil {
		t.Fatalf("no chat handler in %s", cfg)
	}
	delete(h, "handler")
	raw, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// provisionAndValidate loads a handler from its JSON and provisions and
// validates it as Caddy does, returning the first error.
func provisionAndValidate(t *testing.T, raw []byte) error {
	t.Helper()
	var h Handler
	if err := caddy.StrictUnmarshalJSON(raw, &h); err != nil {
		t.Fatalf("%s: %v", raw, err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	if err := h.Provision(ctx); err != nil {
		if h.hubKey != "" {
			t.Errorf("a failed Provision holds a hub")
		}
		return err
	}
	defer func() {
		if err := h.Cleanup(); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
	}()
	return h.Validate()
}
