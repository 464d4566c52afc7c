#!/usr/bin/env bash
# Runs every chatbench scenario against real Caddy nodes and one redis-server
# on loopback, and writes bench/results.md. Sized for a 2-core machine.
#
#   bash bench/run.sh            # the full run (about 15 minutes on 2 cores)
#   QUICK=1 bash bench/run.sh    # smaller sizes, for a smoke test
#   ONLY="fanout rooms" bash bench/run.sh   # some parts only, in this order:
#       idle         18,000 idle connections on one node, and on the bare
#                    server (baseline-idle) for the ratio (~1 min)
#       idle3        3 nodes × 16,600 idle connections (~0.7 min)
#       fanout       two nodes through Redis, 2,000 and 10,000 subscribers,
#                    stepping the rate, against the baseline (~2 min)
#       history hook   (on the fanout part's two nodes)
#       rooms        on the fanout part's two nodes, the bare server
#                    (baseline-rooms), two bare servers bridged through the
#                    Redis (baseline-rooms-redis) and the nodes (rooms):
#                    5,000 clients three times, 10,000 once (~6 min)
#       broker       one node, the memory broker (/wsm) against Redis (/ws)
#                    and the baseline, 2,000 and 10,000 subscribers, below
#                    saturation and unpaced (~2 min)
#       overload     one node, 10,000 subscribers at 50 and 200 msgs/s
#                    offered, each phase bounded (-publish-for, -drain-max):
#                    delivered, reported (gap frames), lost, refused
#                    (~1.5 min; ~2.5 on a build without max_lag)
#       abuse (~0.5 min) sse (~1 min) compression (~0.5 min)
#       capacity     bench/capacity.sh: 3 nodes on Redis and on a 3-shard
#                    Redis Cluster, the README's capacity model (~3 min)
#   ONLY=sse bash bench/run.sh   # SSE against WebSocket: the same fan-out over
#                                # both, idle memory per connection over both;
#                                # replaces only the "SSE and WebSocket" section
#                                # of bench/results.md (about 1 minute)
#   ONLY=compression bash bench/run.sh   # permessage-deflate off, on and
#                                # context_takeover on one fan-out; replaces
#                                # only the "Compression" section (about 1 minute)
#   CADDY_BIN=/tmp/caddy-old ONLY=rooms bash bench/run.sh
#                                # another build of the nodes (e.g. an older
#                                # commit's), to compare two builds on one machine
set -euo pipefail
cd "$(dirname "$0")/.."
out=$PWD/bench/out
rm -rf "$out" && mkdir -p "$out"
results=bench/results.md
# A partial run or another build does not replace the committed results
# (but a run of the sse part on this tree's build replaces that section).
if [ -n "${ONLY:-}${CADDY_BIN:-}${QUICK:-}" ]; then results=$out/results.md; fi

echo "building caddy and chatbench" >&2
# caddy-cli is this tree's build, for `caddy chat token`: another build of
# the nodes (CADDY_BIN) may predate the command.
if [ -n "${CADDY_BIN:-}" ]; then
	cp "$CADDY_BIN" "$out/caddy"
	go build -o "$out/caddy-cli" ./cmd/caddy
else
	go build -o "$out/caddy" ./cmd/caddy
	ln -s caddy "$out/caddy-cli"
fi
go build -o "$out/chatbench" ./cmd/chatbench

# want PART: whether this run includes PART (all of them unless ONLY is set).
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() {
	local p
	for p in $(seq "$1" $(($1 + 200))); do
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			echo "$p"
			return
		fi
	done
	echo "no free port near $1" >&2
	exit 1
}

redis_port=$(free_port 16400)
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
	--daemonize no --dir "$out" --logfile "$out/redis.log" &
pids+=($!)
for _ in $(seq 50); do
	redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
	sleep 0.1
done
redis-cli -p "$redis_port" ping >/dev/null || { echo "redis-server did not start:" >&2; cat "$out/redis.log" >&2; exit 1; }

# The abuse part's nodes: production settings (the default rate_limit,
# send_queue and limits), history and presence on room:**, a raw route, the
# publish endpoint, and anonymous clients allowed to publish on room:** so
# that the attacks need no token (the http attack uses a minted one).
abuse_secret=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
abuse_routes() {
	cat <<ROUTES
	chat /ws {
		redis redis://127.0.0.1:$redis_port/0
		jwt {
			secret $abuse_secret
		}
		anonymous {
			subscribe room:**
			publish room:**
		}
		presence on
		history room:** 100 1h
		publish_endpoint /chat/publish
	}
	chat /raw/* {
		redis redis://127.0.0.1:$redis_port/0
		protocol raw
		channel room:{http.request.uri.path.1}
		jwt {
			secret $abuse_secret
		}
		anonymous {
			subscribe room:**
			publish room:**
		}
	}
ROUTES
}

bench_routes() {
	cat <<ROUTES
	chat /ws {
		redis redis://127.0.0.1:$redis_port/0
		rate_limit off
	}
	# The same with the in-process broker (no redis option): it serves this
	# node only, so the broker and overload parts compare it with /ws on one
	# node. max_lag stays at its default on both.
	chat /wsm {
		rate_limit off
	}
	# The same, keeping history: the cost of history on publishing.
	chat /wsh {
		redis redis://127.0.0.1:$redis_port/0
		rate_limit off
		history 1000 1h
	}
	# The same, asking a backend before each message: the cost of a
	# publish hook (the backend is a Caddy that allows everything).
	chat /wsk {
		redis redis://127.0.0.1:$redis_port/0
		rate_limit off
		publish_hook http://127.0.0.1:${hook_port:-1}/hook
	}
	# The same with permessage-deflate, without and with context takeover.
	chat /wsz {
		redis redis://127.0.0.1:$redis_port/0
		rate_limit off
		compression on
	}
	chat /wszt {
		redis redis://127.0.0.1:$redis_port/0
		rate_limit off
		compression context_takeover
	}
ROUTES
}

# hook_routes: the publish hook's backend, answering allow at once, so that
# what the hook part measures is the node's side of a hook call.
hook_routes() {
	printf '\trespond `{"result":"allow"}` 200\n'
}

# start_node NAME [ROUTES]: a Caddy node sharing the Redis, with the chat
# routes bench_routes (default) or abuse_routes prints; sets node_url,
# node_pid, node_port and node_admin.
start_node() {
	local name=$1 routes=${2:-bench_routes} port admin
	port=$(free_port $((18100 + ${#pids[@]} * 10)))
	admin=$(free_port $((19100 + ${#pids[@]} * 10)))
	node_port=$port node_admin=$admin
	mkdir -p "$out/$name"
	cat >"$out/$name/Caddyfile" <<CADDY
{
	admin 127.0.0.1:$admin
	default_bind 127.0.0.1
	persist_config off
	auto_https off
	storage file_system $out/$name/storage
	log {
		level WARN
	}
}
http://127.0.0.1:$port {
$($routes)
}
CADDY
	XDG_DATA_HOME="$out/$name" XDG_CONFIG_HOME="$out/$name" HOME="$out/$name" \
		"$out/caddy" run --config "$out/$name/Caddyfile" --adapter caddyfile >"$out/$name/caddy.log" 2>&1 &
	node_pid=$!
	pids+=("$node_pid")
	node_url="ws://127.0.0.1:$port/ws"
	for _ in $(seq 100); do
		(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return
		sleep 0.1
	done
	echo "node $name did not start; log:" >&2
	cat "$out/$name/caddy.log" >&2
	exit 1
}

stop_nodes() {
	for p in "${node_pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${node_pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
	node_pids=()
}
node_pids=()
start() { start_node "$@"; node_pids+=("$node_pid"); }

if [ -n "${QUICK:-}" ]; then
	fan_small=500 fan_large=2000 rooms=2000 idle_one=3000 idle_each=2000 hold=5s history_msgs=2000
	sse_subs=500 sse_idle=2000 sse_hold=5s sse_msgs=100
	over_for=2s over_drain=5s sat_msgs=500
else
	fan_small=2000 fan_large=10000 rooms=10000 idle_one=18000 idle_each=16600 hold=20s history_msgs=100000
	sse_subs=2000 sse_idle=10000 sse_hold=10s sse_msgs=300
	# Publishing for longer than max_lag (5s), so that publishers are refused
	# while the node skips.
	over_for=10s over_drain=10s sat_msgs=2000
fi

bench() { # name, then chatbench flags
	local name=$1
	shift
	echo "== $name: chatbench $*" >&2
	{
		echo
		echo "### $name"
		echo
		echo '```'
		local shown="chatbench $*"
		[ -n "${TOKEN_SHOWN:-}" ] && shown=${shown//"$abuse_token"/$TOKEN_SHOWN}
		echo "$shown"
		"$out/chatbench" -quiet -out "$out/$name.json" "$@" 2>"$out/$name.err" || echo "(exit $?: $(tail -3 "$out/$name.err"))"
		echo '```'
	} >>"${tables:-$out/tables.md}"
}

# splice_section TITLE FILE: a partial run of a part with its own section
# ("## TITLE"), on this tree's build, replaces that section of the committed
# results (appends it when missing) and leaves the others as they are.
splice_section() {
	awk -v title="## $1" -v section="$2" '
		$0 == title { skip = 1; done = 1; while ((getline l < section) > 0) if (started || l != "") { print l; started = 1 }; print ""; next }
		skip && /^## / { skip = 0 }
		!skip { print }
		END { if (!done) { while ((getline l < section) > 0) print l } }
	' bench/results.md >"$out/results.spliced" && mv "$out/results.spliced" bench/results.md
	echo "replaced the $1 section of bench/results.md" >&2
}

# add_section TITLE FILE: a part's section goes into this run's tables; a
# partial run of it on this tree's build also splices it into the
# committed results.
add_section() {
	cat "$2" >>"$out/tables.md"
	if [ -n "${ONLY:-}" ] && [ -z "${CADDY_BIN:-}${QUICK:-}" ]; then
		splice_section "$1" "$2"
	fi
}

# built: where the nodes under test come from, for a section's first line.
built() {
	echo "nodes built from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench/results.md' || echo '+changes')"
}

# Memory is measured on fresh nodes: Go keeps freed memory for a while, so
# a node that has served a load test shows too little growth.
if want idle; then
start A; url_a=$node_url pid_a=$node_pid
# baseline-idle: the same connections to the bare coder/websocket server in
# a child process, whose VmRSS is its own: the node's cost as a ratio.
bench idle-$idle_one -url "$url_a" -scenario idle,baseline-idle -clients "$idle_one" -hold "$hold" -pids "$pid_a"
stop_nodes
fi

# Three nodes, three load generators (one process holds at most ~19,000 sockets).
if want idle3; then
start A; url_a=$node_url pid_a=$node_pid
start B; url_b=$node_url pid_b=$node_pid
start C; url_c=$node_url pid_c=$node_pid
echo "== idle over three nodes, $((idle_each * 3)) connections" >&2
gens=()
for n in a b c; do
	eval "u=\$url_$n p=\$pid_$n"
	"$out/chatbench" -quiet -out "$out/idle3-$n.json" -url "$u" -scenario idle \
		-clients "$idle_each" -hold "$hold" -pids "$p" >"$out/idle3-$n.txt" 2>"$out/idle3-$n.err" &
	gens+=($!)
done
for g in "${gens[@]}"; do wait "$g" || true; done
{
	echo
	echo "### idle-3x$idle_each (three nodes, three load generators, one per node)"
	echo
	echo '```'
	for n in a b c; do cat "$out/idle3-$n.txt"; done
	echo '```'
} >>"$out/tables.md"
stop_nodes
fi

if want fanout || want history || want hook || want rooms; then
if want hook; then start_node hook hook_routes; hook_port=$node_port; fi
start A; url_a=$node_url pid_a=$node_pid admin_a=$node_admin
start B; url_b=$node_url pid_b=$node_pid admin_b=$node_admin
metrics_ab="http://127.0.0.1:$admin_a/metrics,http://127.0.0.1:$admin_b/metrics"
if want fanout; then
bench fanout-$fan_small -url "$url_a,$url_b" -pids "$pid_a,$pid_b" -metrics-url "$metrics_ab" -scenario baseline,fanout -subs "$fan_small" \
	-step-rates 25,50,100 -max-p99 150ms -messages 300 -inflight 32
bench fanout-$fan_large -url "$url_a,$url_b" -pids "$pid_a,$pid_b" -metrics-url "$metrics_ab" -scenario baseline,fanout -subs "$fan_large" \
	-step-rates 4,8,13 -max-p99 500ms -messages 60 -inflight 32
fi
# Publish throughput with and without history: one publisher as fast as 64
# unanswered publishes allow, one subscriber per node, so that publishing,
# not fan-out, is what limits the rate; the bare baseline first, for fanout's
# ratio to it (fanout-history's and fanout-hook's are to fanout).
want history && bench history-cost -url "$url_a,$url_b" -history-url "${url_a}h,${url_b}h" -pids "$pid_a,$pid_b" \
	-scenario baseline,fanout,fanout-history -subs 2 -rate 0 -messages "$history_msgs" -inflight 64
# The same with a publish hook on every message: a keep-alive HTTP call to
# a backend per publish, before the message reaches Redis.
want hook && bench hook-cost -url "$url_a,$url_b" -hook-url "${url_a}k,${url_b}k" -pids "$pid_a,$pid_b" \
	-scenario baseline,fanout,fanout-hook -subs 2 -rate 0 -messages "$history_msgs" -inflight 64
# Rooms: the bare server broadcasting in process (baseline-rooms), the same
# bare servers bridged through this Redis, two of them as there are two
# nodes (baseline-rooms-redis: the Redis hop and little else), then the
# nodes (rooms), each on fresh connections; three runs at the smaller size
# for the spread between runs, one at the full size.
if want rooms; then
r_load0=$(cut -d' ' -f1-3 /proc/loadavg)
tables=$out/rooms-runs.md
: >"$tables"
rooms_small=$((rooms / 2))
room_flags=(-url "$url_a,$url_b" -pids "$pid_a,$pid_b" -metrics-url "$metrics_ab" -scenario baseline-rooms,baseline-rooms-redis,rooms
	-bridge-redis "redis://127.0.0.1:$redis_port/0" -bridge-nodes 2 -room-size 10 -client-rate 1 -duration 15s)
room_runs=()
for i in 1 2 3; do
	bench rooms-$rooms_small-$i "${room_flags[@]}" -clients "$rooms_small"
	room_runs+=(rooms-$rooms_small-$i)
done
bench rooms-$rooms "${room_flags[@]}" -clients "$rooms"
room_runs+=(rooms-$rooms)
unset tables
r_load1=$(cut -d' ' -f1-3 /proc/loadavg)
jq_r2='def r2: if . == null then "-" else (. * 100 | round) as $c | "\($c / 100 | floor).\($c % 100 | tostring | if length < 2 then "0" + . else . end)" end;'
# One row per run: the three scenarios side by side.
rooms_row() {
	jq -r "$jq_r2"'
		def s($n): first(.scenarios[] | select(.scenario == $n) | .phases[0]) // null;
		def lat: if . == null then "-" else "\(.latency.p50_ms | r2) / \(.latency.p99_ms | r2)" end;
		def f($k): if . == null then "-" else .[$k] end;
		s("baseline-rooms") as $b | s("baseline-rooms-redis") as $r | s("rooms") as $n |
		"| \(input_filename | sub(".*/"; "") | sub("\\.json$"; "")) | \($n | f("subscribers")) | \($b | lat) | \($r | lat) | \($n | lat)" +
		" | \($b | f("refused")) / \($r | f("refused")) / \($n | f("refused")) | \($b | f("lost")) / \($r | f("lost")) / \($n | f("lost")) | \($b | f("deliveries_per_sec") | floor? // "-") / \($r | f("deliveries_per_sec") | floor? // "-") / \($n | f("deliveries_per_sec") | floor? // "-")" +
		" | \($r | f("p99_baseline_ratio") | r2) | \($n | f("p99_baseline_ratio") | r2) | \($n | f("p99_bridged_baseline_ratio") | r2) |"' "$out/$1.json" 2>/dev/null || echo "| $1: no result |"
}
# rooms_p99 RUN SCENARIO: that scenario's p99 in ms (empty if none).
rooms_p99() {
	jq -r --arg s "$2" "$jq_r2"'first(.scenarios[] | select(.scenario == $s) | .phases[0].latency.p99_ms) // empty | r2' "$out/$1.json" 2>/dev/null || true
}
# rooms_ratio RUN: rooms' p99 over the bridged baseline's.
rooms_ratio() {
	jq -r "$jq_r2"'first(.scenarios[] | select(.scenario == "rooms") | .phases[0].p99_bridged_baseline_ratio) // empty | r2' "$out/$1.json" 2>/dev/null || true
}
# median of the arguments (numbers), "n/a" when there are none.
median() { printf '%s\n' "$@" | grep . | sort -g | awk '{v[NR] = $1} END {print NR ? v[int((NR + 1) / 2)] : "n/a"}'; }
{
	echo
	echo "## Rooms"
	echo
	echo "Run by \`${ONLY:+ONLY=\"$ONLY\" }${QUICK:+QUICK=1 }bash bench/run.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $(built): $(nproc) cores shared by the two nodes, redis-server, chatbench and the bare servers (load average $r_load0 when the part started, $r_load1 when it ended)."
	echo "Clients in rooms of 10, each publishing 1 msg/s for 15 s, spread over two servers so that a room spans both. Each run measures, on fresh connections: **bare**, the bare coder/websocket server broadcasting in process (\`baseline-rooms\`); **bridged**, two such servers bridged through this Redis (\`baseline-rooms-redis\`: each publish through go-redis's autopipeline, answered after Redis; one SUBSCRIBE per room and server), the Redis hop and little else; **rooms**, the two Caddy nodes through the same Redis. $rooms_small clients three times (the spread between runs), $rooms once."
	p_b=() p_r=() p_n=() p_x=()
	for i in 1 2 3; do
		p_b+=("$(rooms_p99 rooms-$rooms_small-$i baseline-rooms)") p_r+=("$(rooms_p99 rooms-$rooms_small-$i baseline-rooms-redis)") p_n+=("$(rooms_p99 rooms-$rooms_small-$i rooms)")
		p_x+=("$(rooms_ratio rooms-$rooms_small-$i)")
	done
	echo "**p99 at $rooms_small clients, runs 1-3 (median): bare ${p_b[*]:-n/a} ms ($(median "${p_b[@]}")), bridged ${p_r[*]:-n/a} ms ($(median "${p_r[@]}")), rooms ${p_n[*]:-n/a} ms ($(median "${p_n[@]}")), rooms / bridged ${p_x[*]:-n/a} ($(median "${p_x[@]}")); at $rooms clients: bare $(rooms_p99 rooms-$rooms baseline-rooms) ms, bridged $(rooms_p99 rooms-$rooms baseline-rooms-redis) ms, rooms $(rooms_p99 rooms-$rooms rooms) ms, rooms / bridged $(rooms_ratio rooms-$rooms).**"
	echo "lost: expected − delivered − reported, where delivered leaves out deliveries of publishes answered \`unavailable\`; the ratios are p99 over p99 of the same run (bridged / bare is the Redis hop's cost, rooms / bridged caddychat's beyond it)."
	echo
	echo "| run | clients | bare p50 / p99 ms | bridged p50 / p99 ms | rooms p50 / p99 ms | refused bare / bridged / rooms | lost bare / bridged / rooms | deliveries/s bare / bridged / rooms | p99 bridged / bare | p99 rooms / bare | p99 rooms / bridged |"
	echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
	for run in "${room_runs[@]}"; do rooms_row "$run"; done
	echo
	echo "The runs:"
	sed 's/^### /#### /' "$out/rooms-runs.md"
} >"$out/rooms.md"
add_section "Rooms" "$out/rooms.md"
fi
stop_nodes
fi

# The memory broker against Redis on ONE node (the memory broker serves one
# node only): the same subscribers and rates on /wsm (in-process broker) and
# /ws (Redis), each scenario on fresh connections, with the bare baseline
# first; the node's broker lag from its admin /metrics.
if want broker || want overload; then
b_load0=$(cut -d' ' -f1-3 /proc/loadavg)
tables=$out/broker-runs.md
: >"$tables"
start A; url_a=$node_url pid_a=$node_pid admin_a=$node_admin
one=(-url "$url_a" -memory-url "${url_a}m" -pids "$pid_a" -metrics-url "http://127.0.0.1:$admin_a/metrics" -scenario baseline,fanout-memory,fanout -inflight 32)
broker_runs=()
if want broker; then
# Below saturation and above it, then unpaced on its own (the ratio of the
# Redis path to the memory path is issue 21's "≥ 0.85" at 2,000
# subscribers): with enough messages that the phase lasts seconds, not one.
bench broker-$fan_small "${one[@]}" -subs "$fan_small" -step-rates 50,200 -max-p99 1h -messages 400 -drain-max 20s
bench broker-$fan_small-max "${one[@]}" -subs "$fan_small" -rate 0 -messages "$sat_msgs" -drain-max 30s
bench broker-$fan_large "${one[@]}" -subs "$fan_large" -step-rates 5,max -max-p99 1h -messages 40 -drain-max 20s
broker_runs+=(broker-$fan_small broker-$fan_small-max broker-$fan_large)
fi
if want overload; then
# Offered far above what the node delivers, for a bounded time: publishing
# stops after $over_for, waiting for deliveries $over_drain after the last
# publish; one run per rate, so that a rate's backlog does not reach the next.
for r in 50 200; do
	bench overload-$fan_large-$r "${one[@]}" -subs "$fan_large" -rate $r -messages $((r * 60)) -publish-for $over_for -drain-max $over_drain
	broker_runs+=(overload-$fan_large-$r)
done
fi
stop_nodes
unset tables
b_load1=$(cut -d' ' -f1-3 /proc/loadavg)
# One row per phase and path, from the JSON results; phases of a run side
# by side (baseline, memory, Redis).
broker_rows() {
	jq -r '
		def r2: if . == null then "-" else (. * 100 | round) as $c | "\($c / 100 | floor).\($c % 100 | tostring | if length < 2 then "0" + . else . end)" end;
		[.scenarios[] | . as $s | .phases[]? | {s: $s.scenario, p: .}] | group_by(.p.phase)[] | .[] | .s as $s | .p |
		"| \(.subscribers) | \(if .rate == 0 then "max" else .rate end) | \({"baseline": "bare baseline", "fanout-memory": "memory", "fanout": "Redis"}[$s] // $s)" +
		" | \(.publish_rate | floor) | \(.publish_ok) | \(.refused) | \(.received) | \(.reported) | \(.lost)\(if .drain_capped then " (capped)" else "" end) | \(.subscribers_disconnected)" +
		" | \(.deliveries_per_sec | floor) | \(.latency.p50_ms | r2) / \(.latency.p99_ms | r2) | \(.latency.max_ms | r2) | \(.node_lag.lag_max_seconds | r2) / \(.node_lag.lag_bucket_le_seconds | if . == null then "-" elif . < 0 then "+Inf" else "≤ \(.)" end)" +
		" | \(.baseline_ratio | r2) / \(.p99_baseline_ratio | r2) | \(.memory_ratio | r2) |"' "$out/$1.json" 2>/dev/null || echo "| $1: no result |"
}
mem_ratio() { # run, rate (0: unpaced)
	jq -r --argjson r "$2" 'first(.scenarios[] | select(.scenario == "fanout") | .phases[] | select(.rate == $r) | .memory_ratio // empty) | (. * 100 | round) as $c | "\($c / 100 | floor).\($c % 100 | tostring | if length < 2 then "0" + . else . end)"' \
		"$out/$1.json" 2>/dev/null || true
}
{
	echo
	echo "## Fan-out on one node: memory broker and Redis"
	echo
	echo "Run by \`${ONLY:+ONLY=\"$ONLY\" }${QUICK:+QUICK=1 }bash bench/run.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $(built): $(nproc) cores shared by the node, redis-server and chatbench (load average $b_load0 when the part started, $b_load1 when it ended)."
	echo "One node with two routes: \`/wsm\` without a redis option (the in-process broker, which back-pressures the publisher) and \`/ws\` through Redis, \`max_lag\` at its default on both; for each size, the bare coder/websocket baseline, then the memory route, then the Redis route, each on fresh connections; one publisher with 32 unanswered publishes at most, on the same node."
	if want broker; then
		r_small=$(mem_ratio broker-$fan_small-max 0)
		echo "**Redis path / memory path at $fan_small subscribers, unpaced ($sat_msgs messages): ${r_small:-n/a}** (issue 21's target: ≥ 0.85 at 2,000 subscribers); at 200 msgs/s offered: $(mem_ratio broker-$fan_small 200); at $fan_large subscribers unpaced (40 messages): $(mem_ratio broker-$fan_large 0)."
	fi
	if want overload; then
		echo "Overload ($fan_large subscribers at 50 and 200 msgs/s offered): publishing stops after $over_for (\`-publish-for\`), deliveries are waited for $over_drain after the last publish (\`-drain-max\`); what neither arrived by then nor was reported in a gap frame counts as lost, marked (capped)."
	fi
	echo "acked: publishes answered ok; refused: answered \`unavailable\` (not known to be published: one that reached Redis before \`publish_timeout\` ran out is still delivered, beyond expected); delivered: distinct messages received over all subscribers; reported: messages the node said it did not send (gap frames' \`missed\`); lost = expected − delivered − reported, where delivered leaves out deliveries of refused publishes; node lag: the highest \`caddy_chat_broker_lag_max_seconds\` during the phase (its 10–20 s window may carry the previous run's) / the bucket bound of \`caddy_chat_broker_lag_seconds\` that holds every lag observed during the phase; vs baseline: deliveries/s and p99 relative to the bare server's at the same rate; Redis / memory: deliveries/s relative to the memory route's."
	echo
	echo "| subs | rate msgs/s | path | pub/s | acked | refused | delivered | reported | lost | disc | deliveries/s | p50 / p99 ms | max ms | node lag max s (gauge / histogram) | vs baseline (throughput / p99) | Redis / memory |"
	echo "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
	for run in "${broker_runs[@]}"; do broker_rows "$run"; done
	echo
	echo "The runs:"
	sed 's/^### /#### /' "$out/broker-runs.md"
} >"$out/broker.md"
add_section "Fan-out on one node: memory broker and Redis" "$out/broker.md"
fi

# One hostile connection per attack for 20 s against two fresh nodes with
# production settings, honest clients on both; -max-rss stops the attacks
# before a node that does not bound its memory takes the machine down.
if want abuse; then
start A abuse_routes; url_a=$node_url pid_a=$node_pid port_a=$node_port admin_a=$node_admin
start B abuse_routes; url_b=$node_url pid_b=$node_pid port_b=$node_port admin_b=$node_admin
{
	echo
	echo "## Abuse"
	echo
	echo "Two fresh nodes with production limits (rate_limit 50/s, send_queue 1 MiB, max_message_size 64 KiB), history and presence on room:**,"
	echo "a raw route; one hostile connection per attack for 20 s while 2 honest subscribers per node per shared channel and one"
	echo "honest publisher per node per channel (5 msgs/s) run. See \`chatbench -h\` for each attack."
} >>"$out/tables.md"
redis_mem() { redis-cli -p "$redis_port" info memory | tr -d '\r' | awk -F: '/^used_memory:/ {printf "%.1f MiB", $2/1048576}'; }
redis_before="$(redis_mem), $(redis-cli -p "$redis_port" dbsize) keys"
abuse_token=$(CHAT_JWT_SECRET=$abuse_secret "$out/caddy-cli" chat token --sub mallory --publish 'room:**' --subscribe 'room:**')
# The token stays out of results.md: the command shown names it $TOKEN.
TOKEN_SHOWN='$TOKEN' bench abuse -url "$url_a,$url_b" -pids "$pid_a,$pid_b" -scenario abuse -duration 20s -max-rss 2GiB \
	-raw-url "ws://127.0.0.1:$port_a/raw/abuse-raw,ws://127.0.0.1:$port_b/raw/abuse-raw" -raw-channel room:abuse-raw \
	-metrics-url "http://127.0.0.1:$admin_a/metrics,http://127.0.0.1:$admin_b/metrics" \
	-publish-url "http://127.0.0.1:$port_a/chat/publish" -token "$abuse_token"
echo "Redis used_memory before the attacks $redis_before; after $(redis_mem), $(redis-cli -p "$redis_port" dbsize) keys." >>"$out/tables.md"
stop_nodes
fi

# SSE against WebSocket: the same fan-out (subscribers, rates, messages) on
# the same two nodes over each transport (publisher on WebSocket both
# times), then idle memory per connection over each, each on a fresh node.
if want sse; then
sse_rates=50,100
sse_load0=$(cut -d' ' -f1-3 /proc/loadavg)
tables=$out/sse-runs.md
: >"$tables"
start A; url_a=$node_url pid_a=$node_pid
start B; url_b=$node_url pid_b=$node_pid
for tr in websocket sse; do
	bench sse-fanout-$tr -url "$url_a,$url_b" -pids "$pid_a,$pid_b" -scenario fanout -transport $tr -subs "$sse_subs" \
		-step-rates $sse_rates -max-p99 10s -messages "$sse_msgs" -inflight 32
done
stop_nodes
for tr in websocket sse; do
	start A; url_a=$node_url pid_a=$node_pid
	bench sse-idle-$tr -url "$url_a" -pids "$pid_a" -scenario idle -transport $tr -clients "$sse_idle" -hold "$sse_hold"
	stop_nodes
done
unset tables
sse_load1=$(cut -d' ' -f1-3 /proc/loadavg)
# The comparison, from the JSON results: phase by phase, and idle totals.
fan_row() { # transport, phase index
	jq -r --argjson i "$2" '.scenarios[0].phases[$i] // empty |
		"\(.deliveries_per_sec | floor) | \(.latency.p50_ms * 100 | round / 100) / \(.latency.p99_ms * 100 | round / 100) | \(.lost)" +
		(if .subscribers_disconnected > 0 then " (\(.subscribers_disconnected) disconnected)" else "" end)' \
		"$out/sse-fanout-$1.json" 2>/dev/null || true
}
idle_row() { # transport
	jq -r '.scenarios[0] | if .idle.total then
		"\(.connections) | \(.idle.total.kib_per_conn_settled * 100 | round / 100) | \(.idle.total.kib_per_conn_end * 100 | round / 100) | \(.connects_per_sec | floor) | \(.idle.disconnected)"
		else "failed: \(.error)" end' "$out/sse-idle-$1.json" 2>/dev/null || echo "no result"
}
{
	echo
	echo "## SSE and WebSocket"
	echo
	echo "Run by \`${ONLY:+ONLY=\"$ONLY\" }${QUICK:+QUICK=1 }bash bench/run.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $(built): $(nproc) cores, the nodes, redis-server and chatbench sharing them (load average $sse_load0 when the part started, $sse_load1 when it ended: other work on the machine makes the figures noisy)."
	echo "Fan-out: one channel, $sse_subs subscribers spread over two nodes, one publisher (WebSocket both times) sending $sse_msgs messages per rate, $sse_rates msgs/s on the same"
	echo "two nodes, first with WebSocket subscribers (\`-transport websocket\`), then with one SSE stream each (\`-transport sse\`); latency is publish → receive, from the publisher's send time in the payload."
	echo "A rate whose pub/s (in the runs below) stays under it saturated the machine: the publisher waited for its window of 32 unanswered publishes."
	echo "Idle: $sse_idle connections, each subscribed to its own channel, held $sse_hold on a fresh node per transport; RSS growth of the node per connection, after 5 s (settled) and at the end of the hold."
	echo
	echo "| rate msgs/s | WebSocket deliveries/s | SSE deliveries/s | WebSocket p50 / p99 ms | SSE p50 / p99 ms | lost WebSocket / SSE |"
	echo "|---:|---:|---:|---:|---:|---:|"
	i=0
	for r in ${sse_rates//,/ }; do
		IFS='|' read -r w_d w_l w_lost <<<"$(fan_row websocket $i)"
		IFS='|' read -r s_d s_l s_lost <<<"$(fan_row sse $i)"
		echo "| $r | ${w_d:--} | ${s_d:--} | ${w_l:--} | ${s_l:--} | ${w_lost:--} / ${s_lost:--} |" | tr -s ' '
		i=$((i + 1))
	done
	echo
	echo "| transport | idle connections | RSS KiB per connection (settled) | RSS KiB per connection (end of hold) | connects/s | disconnected |"
	echo "|---|---:|---:|---:|---:|---:|"
	echo "| WebSocket | $(idle_row websocket) |"
	echo "| SSE | $(idle_row sse) |"
	echo
	echo "The runs (\`chatbench\` tables; the scenario is labelled fanout/sse and idle/sse when the subscribers read SSE):"
	sed 's/^### /#### /' "$out/sse-runs.md"
} >"$out/sse.md"
add_section "SSE and WebSocket" "$out/sse.md"
fi

# Compression: the same fan-out of a ~200-byte chat text on the same two
# nodes, to routes with compression off, on and context_takeover, the
# subscribers offering the same mode (-compression).
if want compression; then
z_subs=500 z_rate=50 z_msgs=300
[ -n "${QUICK:-}" ] && z_subs=200 z_msgs=100
z_load0=$(cut -d' ' -f1-3 /proc/loadavg)
tables=$out/compression-runs.md
: >"$tables"
start A; url_a=$node_url pid_a=$node_pid
start B; url_b=$node_url pid_b=$node_pid
declare -A z_path=([off]="" [on]=z [context_takeover]=zt)
for mode in off on context_takeover; do
	bench compression-$mode -url "${url_a}${z_path[$mode]},${url_b}${z_path[$mode]}" -pids "$pid_a,$pid_b" -scenario fanout \
		-compression $mode -subs "$z_subs" -rate "$z_rate" -messages "$z_msgs" -payload 250 -inflight 32
done
stop_nodes
unset tables
z_load1=$(cut -d' ' -f1-3 /proc/loadavg)
z_row() {
	jq -r '.scenarios[0].phases[0] | "\(.deliveries) | \(.wire_bytes_per_delivery // 0 | floor) | \(.server_cpu_us_per_delivery // 0 | . * 100 | floor / 100) | \(.latency.p99_ms) | \((.cpu.server_rss_peak_kib // 0) / 1024 | floor) | \(.lost)"' \
		"$out/compression-$1.json" 2>/dev/null || echo "no result | | | | |"
}
{
	echo
	echo "## Compression"
	echo
	echo "Run by \`${ONLY:+ONLY=\"$ONLY\" }${QUICK:+QUICK=1 }bash bench/run.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $(built): **$(nproc) cores shared** by the two nodes, redis-server, chatbench and other work on the machine (load average $z_load0 when the part started, $z_load1 when it ended), so CPU figures are noisy; compare the rows with one another."
	echo "One channel, $z_subs subscribers over two nodes, one publisher sending $z_msgs messages at $z_rate msgs/s, each a JSON object whose text is ~200 bytes of chat prose (\`-payload 250\`: a delivery frame of ~320 bytes)."
	echo "Each row is a route with \`compression\` set to the mode and subscribers offering it (\`chatbench -compression\`). Wire bytes: what chatbench's connections read during the phase (frames, the publisher's replies too) per delivery; node CPU: both nodes' CPU time per delivery (\`-pids\`). Every message carries the same text, so context takeover's figure is its best case: a chat whose messages differ compresses less against its window."
	echo
	echo "| compression | deliveries | wire bytes/delivery | node CPU µs/delivery | p99 ms | nodes' peak RSS MiB | lost |"
	echo "|---|---:|---:|---:|---:|---:|---:|"
	for mode in off on context_takeover; do echo "| \`$mode\` | $(z_row $mode) |"; done
	echo
	echo "The runs:"
	sed 's/^### /#### /' "$out/compression-runs.md"
} >"$out/compression.md"
add_section "Compression" "$out/compression.md"
fi

# Capacity: 3 nodes on this Redis and on a 3-shard Redis Cluster, Redis CPU
# per message, and the README's capacity model with these figures
# (bench/capacity.sh; about 3 minutes). Run after idle/idle3 to use their
# memory per connection.
if want capacity; then
	out=$out caddy=$out/caddy chatbench=$out/chatbench redis_port=$redis_port QUICK=${QUICK:-} ONLY=${ONLY:-} \
		bash bench/capacity.sh || printf '\n## Capacity\n\nThe part failed (exit %s): see its output above.\n' $? >"$out/capacity.md"
	cat "$out/capacity.md" >>"$out/tables.md"
fi

{
	echo "# Benchmark results"
	echo
	echo "Run by \`bash bench/run.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) memory, $(go version | cut -d' ' -f3), redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')."
	echo "Caddy nodes, redis-server and the load generator share the machine; nodes log at WARN."
	[ -n "${CADDY_BIN:-}" ] && echo "Nodes: $CADDY_BIN (not this tree's build)."
	[ -n "${ONLY:-}" ] && echo "Parts: $ONLY."
	cat "$out/tables.md"
} >"$results"
echo "wrote $results" >&2
