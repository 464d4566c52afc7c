#!/usr/bin/env bash
# The capacity part of bench/run.sh (ONLY=capacity): the figures the
# README's capacity model (Production → Sizing) is computed from, and the
# model's answer with them.
#
#   a. three Caddy nodes on the standalone redis-server of run.sh: fan-out
#      (one channel, subscribers spread over the three nodes, stepping the
#      rate until p99 passes a bound: node CPU per delivery), chat rooms of
#      10 spread over the three nodes, and one unpaced publisher with one
#      subscriber on each node or on one node only (Redis as busy as the
#      machine allows: Redis CPU per message and per node it goes to);
#   b. the same three nodes on a 3-shard Redis Cluster (three
#      cluster-enabled redis-servers, no replicas; the route's
#      `redis_cluster`, sharded pub/sub): rooms of 10 over many channels, so
#      that the shards share the load, and rooms of 1 at the same message
#      rate (each message read from Redis by one node instead of three:
#      node CPU per message published and per node it reaches).
#      Each redis-server's main-thread CPU (INFO cpu) and SPUBLISH/PUBLISH
#      calls (INFO commandstats) are read before and after each run;
#   c. memory per idle connection: the idle and idle3 parts' JSON in $out
#      when they ran (else the committed bench/results.md's idle table).
#
# Run from run.sh with, in the environment:
#   out         the output directory (JSON, logs, the section capacity.md)
#   caddy       the Caddy binary of the nodes; chatbench the load generator
#   redis_port  run.sh's standalone redis-server (started here when empty)
#   QUICK       smaller sizes
# Writes $out/capacity.md, the "## Capacity" section, for run.sh to append
# to its tables; $out/capacity.json holds the inputs of the model.
# The model's assumptions can be changed here by environment (see model_*).
# About 3 minutes on 2 cores (QUICK=1: about 1.5).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${out:?out: the output directory}" "${caddy:=$out/caddy}" "${chatbench:=$out/chatbench}"
started=$SECONDS
load0=$(cut -d' ' -f1-3 /proc/loadavg)

# The model's assumptions (README, Sizing); each can be set by environment.
model_conns=${model_conns:-1000000}      # connections, all subscribed
model_msgs=${model_msgs:-100000}         # messages published per second, in rooms
model_room=${model_room:-10}             # members of a room (fan-out of a room message)
model_bcast=${model_bcast:-1}            # broadcast messages/s to every connection
model_node_cores=${model_node_cores:-4}  # cores of one node (one Caddy process)
model_node_gib=${model_node_gib:-8}      # memory of one node
model_node_max=${model_node_max:-100000} # max_connections of one node
model_cpu_util=${model_cpu_util:-0.5}    # planned CPU use of a node or a shard at that load
model_mem_util=${model_mem_util:-0.5}    # share of a node's memory planned for idle connections
model_kernel_kib=${model_kernel_kib:-4}  # kernel memory per socket, outside the RSS

if [ -n "${QUICK:-}" ]; then
	fan_subs=900 fan_rates=20,60 fan_msgs=100 fan_p99=500ms
	rooms=1800 rooms_dur=6s pub_rate=5000 pub_msgs=10000
else
	fan_subs=3000 fan_rates=10,20,40,60,80,100 fan_msgs=150 fan_p99=500ms
	rooms=4000 rooms_dur=15s pub_rate=5000 pub_msgs=50000
fi

cap_pids=()
cap_cleanup() {
	local p
	for p in "${cap_pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${cap_pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
}
trap cap_cleanup EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# free_port BASE [BUS]: the first free port from BASE; with BUS, one whose
# cluster bus port (+10000) is free too.
free_port() {
	local p
	for p in $(seq "$1" $(($1 + 200))); do
		if port_free "$p" && { [ -z "${2:-}" ] || port_free $((p + 10000)); }; then
			echo "$p"
			return
		fi
	done
	echo "capacity: no free port near $1" >&2
	exit 1
}

wait_redis() { # port, log
	for _ in $(seq 50); do
		redis-cli -p "$1" ping >/dev/null 2>&1 && return
		sleep 0.1
	done
	echo "capacity: redis-server on $1 did not start:" >&2
	cat "$2" >&2
	exit 1
}

# start_redis PORT [ARGS...]: a redis-server on loopback, no persistence.
start_redis() {
	local port=$1
	shift
	redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --daemonize no \
		--dir "$out" --logfile "$out/cap-redis-$port.log" "$@" &
	cap_pids+=($!)
	wait_redis "$port" "$out/cap-redis-$port.log"
}

if [ -z "${redis_port:-}" ]; then
	redis_port=$(free_port 16600)
	start_redis "$redis_port"
fi

# The cluster: three masters, no replicas, slots spread evenly.
cluster_ports=()
for i in 0 1 2; do
	p=$(free_port $((16700 + i * 10)) bus)
	start_redis "$p" --cluster-enabled yes --cluster-config-file "$out/cap-nodes-$p.conf" --cluster-node-timeout 5000
	cluster_ports+=("$p")
done
redis-cli --cluster create "${cluster_ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >"$out/cap-cluster-create.log" 2>&1 ||
	{ echo "capacity: redis-cli --cluster create failed:" >&2; cat "$out/cap-cluster-create.log" >&2; exit 1; }
for _ in $(seq 100); do
	ok=0
	for p in "${cluster_ports[@]}"; do
		redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && ok=$((ok + 1))
	done
	[ "$ok" = 3 ] && break
	sleep 0.1
done
[ "$ok" = 3 ] || { echo "capacity: the cluster did not reach cluster_state:ok" >&2; exit 1; }

# start_node NAME REDIS-DIRECTIVE: a Caddy node with one chat route, /ws;
# sets node_url and node_pid.
node_pids=()
start_node() {
	local name=$1 redis=$2 port admin
	port=$(free_port $((18800 + ${#node_pids[@]} * 10)))
	admin=$(free_port $((19800 + ${#node_pids[@]} * 10)))
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
	chat /ws {
		$redis
		rate_limit off
	}
}
CADDY
	XDG_DATA_HOME="$out/$name" XDG_CONFIG_HOME="$out/$name" HOME="$out/$name" \
		"$caddy" run --config "$out/$name/Caddyfile" --adapter caddyfile >"$out/$name/caddy.log" 2>&1 &
	node_pid=$!
	cap_pids+=("$node_pid")
	node_pids+=("$node_pid")
	node_url="ws://127.0.0.1:$port/ws"
	for _ in $(seq 100); do
		port_free "$port" || return 0
		sleep 0.1
	done
	echo "capacity: node $name did not start; log:" >&2
	cat "$out/$name/caddy.log" >&2
	exit 1
}
start_nodes() { # name prefix, redis directive; sets urls and pidlist
	local n
	urls="" pidlist=""
	for n in a b c; do
		start_node "$1-$n" "$2"
		urls+="${urls:+,}$node_url" pidlist+="${pidlist:+,}$node_pid"
	done
}
stop_nodes() {
	local p
	for p in "${node_pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${node_pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
	node_pids=()
}

# Redis figures: main-thread CPU seconds (the thread that limits a shard)
# and the calls and µs of PUBLISH + SPUBLISH.
redis_sample() { # port → "cpu_s calls usec"
	{
		redis-cli -p "$1" info cpu
		redis-cli -p "$1" info commandstats
	} | tr -d '\r' | awk -F'[:,=]' '
		/^used_cpu_(user|sys)_main_thread:/ { cpu += $2 }
		/^cmdstat_s?publish:/ { calls += $3; usec += $5 }
		END { printf "%.6f %d %d\n", cpu, calls, usec }'
}

# run NAME PORTS... -- CHATBENCH FLAGS: one chatbench run, its table in
# $out/cap-runs.md, its JSON in $out/cap-NAME.json and each redis-server's
# figures over the run in $out/cap-NAME.redis ("port cpu_s calls usec").
: >"$out/cap-runs.md"
run() {
	local name=$1 p
	shift
	local ports=()
	while [ "$1" != -- ]; do ports+=("$1"); shift; done
	shift
	declare -A before=()
	for p in "${ports[@]}"; do before[$p]=$(redis_sample "$p"); done
	echo "== capacity $name: chatbench $*" >&2
	{
		echo
		echo "#### $name"
		echo
		echo '```'
		echo "chatbench $*"
		"$chatbench" -quiet -out "$out/cap-$name.json" "$@" 2>"$out/cap-$name.err" || echo "(exit $?: $(tail -3 "$out/cap-$name.err"))"
		echo '```'
	} >>"$out/cap-runs.md"
	: >"$out/cap-$name.redis"
	for p in "${ports[@]}"; do
		read -r c0 n0 u0 <<<"${before[$p]}"
		read -r c1 n1 u1 <<<"$(redis_sample "$p")"
		awk -v p="$p" -v c="$c1" -v c0="$c0" -v n=$((n1 - n0)) -v u=$((u1 - u0)) \
			'BEGIN { printf "%s %.6f %d %d\n", p, c - c0, n, u }' >>"$out/cap-$name.redis"
	done
}

# a. Three nodes on the standalone redis-server.
start_nodes cap-s "redis redis://127.0.0.1:$redis_port/0"
run s-fanout "$redis_port" -- -url "$urls" -pids "$pidlist" -scenario fanout -subs "$fan_subs" \
	-step-rates "$fan_rates" -max-p99 "$fan_p99" -messages "$fan_msgs" -inflight 32
run s-rooms10 "$redis_port" -- -url "$urls" -pids "$pidlist" -scenario rooms -clients "$rooms" -room-size 10 \
	-client-rate 1 -duration "$rooms_dur"
# One publisher at a rate closer to a busy shard's, with one subscriber on
# each of the three nodes (each message to 3 nodes) or one on the
# publisher's node (to 1 node), at the same rate: what one more node a
# message goes to costs Redis and the nodes.
run s-pub3 "$redis_port" -- -url "$urls" -pids "$pidlist" -scenario fanout -subs 3 -rate "$pub_rate" -messages "$pub_msgs" -inflight 64
run s-pub1 "$redis_port" -- -url "$urls" -pids "$pidlist" -scenario fanout -subs 1 -rate "$pub_rate" -messages "$pub_msgs" -inflight 64
stop_nodes

# b. The same three nodes on the 3-shard cluster.
start_nodes cap-c "redis_cluster ${cluster_ports[*]/#/127.0.0.1:}"
run c-rooms10 "${cluster_ports[@]}" -- -url "$urls" -pids "$pidlist" -scenario rooms -clients "$rooms" -room-size 10 \
	-client-rate 1 -duration "$rooms_dur"
run c-rooms1 "${cluster_ports[@]}" -- -url "$urls" -pids "$pidlist" -scenario rooms -clients "$rooms" -room-size 1 \
	-client-rate 1 -duration "$rooms_dur"
stop_nodes
cap_cleanup
cap_pids=()
load1=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------
# The figures.

# phase NAME: the phase the model uses, as JSON: for fanout the last phase
# within -max-p99 (the first when none is), for rooms the only one.
phase() {
	jq -c '.scenarios[0].phases // [] | (map(select((.over_max_p99 // false) | not)) | last) // .[0] // empty' \
		"$out/cap-$1.json" 2>/dev/null || true
}
# Node subscriptions Redis delivers each message to: rooms of 10 and the
# fan-out channel have members on all three nodes, rooms of 1 on one.
declare -A node_subs=([s-fanout]=3 [s-rooms10]=3 [s-pub3]=3 [s-pub1]=1 [c-rooms10]=3 [c-rooms1]=1)
declare -A what=(
	[s-fanout]="fan-out, one channel, $fan_subs subscribers, standalone Redis"
	[s-rooms10]="rooms of 10, $rooms clients × 1 msg/s, standalone Redis"
	[c-rooms10]="rooms of 10, $rooms clients × 1 msg/s, 3-shard cluster"
	[c-rooms1]="rooms of 1, $rooms clients × 1 msg/s, 3-shard cluster"
	[s-pub3]="one publisher, 3 subscribers (one per node), standalone Redis"
	[s-pub1]="one publisher, 1 subscriber, standalone Redis"
)
runs=(s-fanout s-rooms10 s-pub3 s-pub1 c-rooms10 c-rooms1)

# One JSON object of every figure the tables and the model use.
{
	for r in "${runs[@]}"; do
		ph=$(phase "$r")
		all=$(jq -c '.scenarios[0].phases // []' "$out/cap-$r.json" 2>/dev/null || echo '[]')
		# Redis is read over the whole chatbench run: its rates are over
		# every phase's time, its cost per delivery over every phase's.
		jq -n --arg run "$r" --argjson ph "${ph:-null}" --argjson all "${all:-[]}" --argjson k "${node_subs[$r]}" \
			--rawfile redis "$out/cap-$r.redis" '
			($redis | split("\n") | map(select(length > 0) | split(" ") |
				{port: .[0], cpu_s: (.[1] | tonumber), calls: (.[2] | tonumber), cmd_usec: (.[3] | tonumber)})) as $srv |
			($srv | map(.cpu_s) | add // 0) as $rcpu | ($srv | map(.calls) | add // 0) as $msgs |
			($all | map(.cpu.wall_seconds) | add // 0) as $wall | ($all | map(.deliveries) | add // 0) as $dl |
			{run: $run, node_subs: $k, phase: $ph, redis: $srv,
			 redis_cpu_s: $rcpu, redis_msgs: $msgs,
			 redis_msgs_per_sec: (if $wall > 0 then $msgs / $wall else null end),
			 redis_cores: (if $wall > 0 then $rcpu / $wall else null end),
			 redis_us_per_msg: (if $msgs > 0 then $rcpu * 1e6 / $msgs else null end),
			 redis_us_per_node_delivery: (if $msgs > 0 then $rcpu * 1e6 / $msgs / $k else null end),
			 redis_us_per_delivery: (if $dl > 0 then $rcpu * 1e6 / $dl else null end),
			 node_us_per_delivery: ($ph.server_cpu_us_per_delivery // null),
			 node_us_per_msg: (if $ph and $ph.published > 0 then ($ph.cpu.server_cpu_seconds | add) * 1e6 / $ph.published else null end)}'
	done
} | jq -s '.' >"$out/cap-runs.json"
# The fan-out's highest deliveries/s of any phase (saturation).
fan_max=$(jq '[.scenarios[0].phases // [] | .[].deliveries_per_sec] | max // 0' "$out/cap-s-fanout.json" 2>/dev/null || echo 0)

# c. Idle memory per connection: this run's idle parts, else the committed
# results' idle table.
idle_src="" idle_kib="" idle_cps=""
idle_files=$(ls "$out"/idle-[0-9]*.json "$out"/idle3-*.json 2>/dev/null || true)
if [ -n "$idle_files" ]; then
	# shellcheck disable=SC2086 # a list of paths without spaces
	read -r idle_kib idle_cps idle_n <<<"$(jq -s -r '[.[] | .scenarios[0] | select(.idle.total)] |
		"\(map(.idle.total.kib_per_conn_settled) | max) \(map(.connects_per_sec) | max | floor) \(map(.connections) | add)"' $idle_files)"
	idle_src="this run's idle parts ($idle_n connections; the highest KiB/connection settled, the highest connects/s of one node)"
elif [ -f bench/results.md ]; then
	read -r idle_kib idle_cps <<<"$(awk '
		/^### idle-[0-9]+$/ { on = 1; next }
		on && /^###/ { exit }
		on && /KiB\/conn_settled/ { for (i = 1; i <= NF; i++) { if ($i == "KiB/conn_settled") k = i; if ($i == "conns/s") c = i } }
		on && k && $0 ~ / all / { print $k, $c; exit }' bench/results.md)"
	[ -n "$idle_kib" ] && idle_src="the committed bench/results.md (idle part not in this run)"
fi
: "${idle_kib:=0}" "${idle_cps:=0}"

# The model's inputs, with how each is derived. Node CPU per message:
#   c_p  reading it from its sender, publishing it, the reply (rooms of 1
#        publish as a chat client does: each message its own read);
#   c_n  per node it reaches: reading it from Redis, the hub, the first
#        delivery there (pub3 − pub1 = 2 c_n, at the same rate);
#   c_d  per further delivery on a node (the fan-out).
# A room-of-1 message costs c_p + c_n; a room-of-10 message over 3 nodes
# c_p + 3 c_n + 7 c_d (the check against c-rooms10). Redis main thread per
# message: r_m + r_n per node it goes to (pub3 − pub1 = 2 r_n).
jq -n --slurpfile r "$out/cap-runs.json" --argjson idle_kib "$idle_kib" --argjson idle_cps "$idle_cps" \
	--argjson fan_max "$fan_max" '
	($r[0] | map({(.run): .}) | add) as $x |
	($x["s-fanout"].node_us_per_delivery // 0) as $cd |
	($x["c-rooms10"].node_us_per_msg // 0) as $n10 |
	($x["c-rooms1"].node_us_per_msg // 0) as $n1 |
	($x["s-pub3"].node_us_per_msg // 0) as $np3 |
	($x["s-pub1"].node_us_per_msg // 0) as $np1 |
	(($np3 - $np1) / 2) as $cn_m |
	([$cn_m, $cd] | max) as $cn |
	([$n1 - $cn, 0] | max) as $cp |
	($x["s-pub3"].redis_us_per_msg // 0) as $r3 |
	($x["s-pub1"].redis_us_per_msg // 0) as $r1 |
	(($r3 - $r1) / 2) as $rn_m |
	{idle_kib: $idle_kib, connects_per_sec: $idle_cps, fanout_max_deliveries_per_sec: $fan_max,
	 c_d: $cd, c_n: $cn, c_n_measured: $cn_m, c_p: $cp,
	 node_us_per_msg_pub3: $np3, node_us_per_msg_pub1: $np1,
	 node_us_per_msg_rooms1: $n1, node_us_per_msg_rooms10: $n10,
	 node_us_per_msg_rooms10_model: ($cp + 3 * $cn + 7 * $cd),
	 r_3: $r3, r_1: $r1, r_n_measured: $rn_m,
	 r_n: ([$rn_m, 0] | max), r_m: (if $rn_m > 0 then $r1 - $rn_m else ([$r1, $r3] | max) end),
	 redis_msgs_per_sec_3: ($x["s-pub3"].redis_msgs_per_sec // 0), redis_msgs_per_sec_1: ($x["s-pub1"].redis_msgs_per_sec // 0),
	 redis_standalone_rooms_us_per_msg: ($x["s-rooms10"].redis_us_per_msg // null),
	 redis_cluster_rooms_us_per_msg: ($x["c-rooms10"].redis_us_per_msg // null),
	 redis_cluster_rooms_msgs_per_sec: ($x["c-rooms10"].redis_msgs_per_sec // null),
	 redis_cluster_rooms_shard_cores: ($x["c-rooms10"] | if .redis_cores then .redis_cores / 3 else null end)}' >"$out/capacity.json"

# The model, computed with these inputs (the same arithmetic as the README's).
model() {
	jq -r --argjson conns "$model_conns" --argjson msgs "$model_msgs" --argjson room "$model_room" \
		--argjson bcast "$model_bcast" --argjson cores "$model_node_cores" --argjson gib "$model_node_gib" \
		--argjson nmax "$model_node_max" --argjson util "$model_cpu_util" --argjson mutil "$model_mem_util" \
		--argjson kern "$model_kernel_kib" '
	def r(n): . * n | round / n;
	def ceil: -(-. | floor);
	. as $i |
	($msgs * $room + $bcast * $conns) as $D |
	([$nmax, ($gib * 1048576 * $mutil / ($i.idle_kib + $kern) | floor)] | min) as $cpn |
	($conns / $cpn | ceil) as $n_conn |
	# Nodes a room message reaches: k = N (1 - (1 - 1/N)^room), members
	# placed at random; the node count depends on k through the CPU, so
	# iterate from the count the connections need.
	def k(n): if n <= 1 then 1 else n * (1 - pow(1 - 1 / n; $room)) end;
	def node_cpu(n): ($msgs * ($i.c_p + k(n) * $i.c_n + ($room - k(n)) * $i.c_d)
		+ $bcast * ($i.c_p + n * $i.c_n + ($conns - n) * $i.c_d)) / 1e6;
	def nodes(n): [n, $n_conn, (node_cpu(n) / ($cores * $util) | ceil)] | max;
	def fix(n): nodes(n) as $m | if $m == n then n else fix($m) end;
	fix($n_conn) as $N |
	($i.r_m + k($N) * $i.r_n) as $rmsg |
	(($msgs * $rmsg + $bcast * ($i.r_m + $N * $i.r_n)) / 1e6) as $rcpu |
	($rcpu / $util | ceil) as $S |
	"- Deliveries: D = \($msgs) × \($room) + \($bcast) × \($conns) = \($D)/s.",
	"- Connections per node: min(max_connections \($nmax), \($gib) GiB × \($mutil) ÷ (\($i.idle_kib | r(100)) + \($kern)) KiB) = \($cpn); nodes for the connections: ⌈\($conns) ÷ \($cpn)⌉ = \($n_conn).",
	"- Node CPU: rooms \($msgs) × (c_p + k c_n + (\($room) − k) c_d) + broadcast \($bcast) × (c_p + N c_n + (\($conns) − N) c_d) = \($msgs) × (\($i.c_p | r(10)) + k × \($i.c_n | r(10)) + (\($room) − k) × \($i.c_d | r(100))) µs + \($bcast) × (\($i.c_p | r(10)) + N × \($i.c_n | r(10)) + (\($conns) − N) × \($i.c_d | r(100))) µs, with k = N(1 − (1 − 1/N)^\($room)) = \(k($N) | r(10)) nodes a room message reaches at N = \($N): \(node_cpu($N) | r(10)) cores busy; at \($util * 100 | round) % of \($cores) cores per node: ⌈\(node_cpu($N) | r(10)) ÷ \($cores * $util)⌉ = \(node_cpu($N) / ($cores * $util) | ceil) nodes.",
	"- **Nodes: N = \($N)** (the larger of the two): \($conns / $N | floor) connections, \($conns / $N * ($i.idle_kib + $kern) / 1048576 | r(10)) GiB of idle-connection memory and \($D / $N | floor) deliveries/s per node; after a restart of every node, the \($conns) clients reconnect in \(if $i.connects_per_sec > 0 then "\($conns / ($N * $i.connects_per_sec) | r(10)) s at \($i.connects_per_sec) connects/s per node" else "- (no connects/s figure)" end).",
	"- Redis, per room message: r_m + k r_n = \($i.r_m | r(100)) + \(k($N) | r(10)) × \($i.r_n | r(100)) = \($rmsg | r(100)) µs of a shard'"'"'s main thread; \($msgs) msgs/s and the broadcast: \($rcpu | r(100)) cores; at \($util * 100 | round) % per shard: **shards S = \($S)** (one shard carries \(if $rmsg > 0 then 1e6 * $util / $rmsg | floor else "-" end) room msgs/s at that k; a standalone Redis or Sentinel master carries the same, so \(if $S <= 1 then "one Redis is enough" else "one Redis is not enough: a cluster of \($S) shards" end))."
	' "$out/capacity.json"
}

wall=$((SECONDS - started))
{
	echo
	echo "## Capacity"
	echo
	echo "Run by \`${ONLY:+ONLY=\"$ONLY\" }${QUICK:+QUICK=1 }bash bench/run.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), nodes built from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench/results.md' || echo '+changes'), in ${wall} s: **$(nproc) cores shared** by three Caddy nodes, the redis-servers, chatbench and other work on the machine (load average $load0 when the part started, $load1 when it ended), so rates are the machine's, not a node's: the CPU per delivery and per message of each process is what scales to other machines."
	echo "Three nodes (\`rate_limit off\`, other settings default), clients spread round-robin over them; first on the standalone redis-server (\`redis\`), then on a 3-shard Redis Cluster (three \`cluster-enabled\` redis-servers, no replicas, \`redis_cluster\`: sharded pub/sub, SPUBLISH/SSUBSCRIBE). Messages of ~100 bytes of data (chatbench's default \`-payload\`)."
	echo "Fan-out: one channel, $fan_subs subscribers, one publisher stepping $fan_rates msgs/s ($fan_msgs messages each) until p99 passes $fan_p99; rooms: $rooms clients in rooms of 10 (a room's members on all three nodes) or of 1, each publishing 1 msg/s for $rooms_dur; pub3/pub1: one publisher sending $pub_msgs messages at $pub_rate msgs/s (at most 64 unanswered), to 3 subscribers (one per node) or 1."
	echo "Node CPU: the three nodes' CPU (\`-pids\`) over the phase. Redis CPU: each redis-server's main-thread CPU (INFO cpu) from before chatbench started to after it ended (connecting and subscribing included), per PUBLISH/SPUBLISH call (INFO commandstats); a *node delivery* is Redis sending a message to one node's pub/sub connection (3 per message for rooms of 10, the fan-out and pub3, 1 for rooms of 1 and pub1); a *delivery* is a frame a client received."
	echo
	echo "| run | phase used | deliveries/s (per node) | p50 / p99 ms | lost / disconnected | node CPU cores (3 nodes) | node µs/delivery | node µs/message | nodes' RSS MiB | chatbench cores | Redis msgs/s | Redis main-thread cores |"
	echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
	for r in "${runs[@]}"; do
		jq -r --arg what "${what[$r]}" --arg r "$r" '.[] | select(.run == $r) |
			def f(n): if . == null then "-" else (. * n | round / n) end;
			if .phase == null then "| \($r): \($what) | no result | | | | | | | | | | |" else
			.phase as $p |
			"| \($r): \($what) | \(if $p.room_size then "\($p.rate) msg/s each" elif $p.rate == 0 then "unpaced" else "\($p.rate) msgs/s (phase \($p.phase))" end) | \($p.deliveries_per_sec | floor) (\($p.deliveries_per_sec / 3 | floor)) | \($p.latency.p50_ms | f(10)) / \($p.latency.p99_ms | f(10)) | \($p.lost) / \($p.subscribers_disconnected) | \($p.cpu.server_cores | f(100)) | \(.node_us_per_delivery | f(100)) | \(if $p.room_size or $p.subscribers <= 3 then .node_us_per_msg | f(10) else "-" end) | \($p.cpu.server_rss_start_kib / 1024 | floor) → \($p.cpu.server_rss_peak_kib / 1024 | floor) | \($p.cpu.chatbench_cores | f(100)) | \(.redis_msgs_per_sec | floor) | \(.redis_cores | f(100)) |" end' \
			"$out/cap-runs.json"
	done
	echo
	over=$(jq -r '[.[] | select(.phase.latency.p99_ms > 1000) | .run] | join(", ")' "$out/cap-runs.json")
	[ -n "$over" ] && echo "**Over what the machine carried at the time (p99 over 1 s): $over.** An overloaded node or Redis handles bigger batches, so its CPU per message is lower than at a load it keeps up with: take those figures as optimistic."
	echo "The fan-out's highest rate in any phase: $(printf '%.0f' "$fan_max") deliveries/s. Redis msgs/s and cores: over every phase of the run (the fan-out's steps together)."
	echo
	echo "| run | redis-server | messages | main-thread CPU s | µs/message | µs/node delivery | µs/delivery | µs in the command (commandstats) per message |"
	echo "|---|---|---:|---:|---:|---:|---:|---:|"
	for r in "${runs[@]}"; do
		jq -r --arg r "$r" '.[] | select(.run == $r) |
			def f(n): if . == null then "-" else (. * n | round / n) end;
			def per(a; b): if b > 0 then a / b | f(100) else "-" end;
			.node_subs as $k | ((.redis | length) > 1) as $many |
			(if $many then (.redis[] | "| \($r) | :\(.port) | \(.calls) | \(.cpu_s | f(1000)) | \(per(.cpu_s * 1e6; .calls)) | \(per(.cpu_s * 1e6; .calls * $k)) | - | \(per(.cmd_usec; .calls)) |") else empty end),
			"| \($r) | \(if $many then "all three" else ":\(.redis[0].port // "-")" end) | \(.redis_msgs) | \(.redis_cpu_s | f(1000)) | \(.redis_us_per_msg | f(100)) | \(.redis_us_per_node_delivery | f(100)) | \(.redis_us_per_delivery | f(100)) | \(per(.redis | map(.cmd_usec) | add; .redis_msgs)) |"' \
			"$out/cap-runs.json"
	done
	echo
	echo "Idle memory per connection: $(printf '%.2f' "$idle_kib") KiB of node RSS settled, $idle_cps connections/s on one node, from ${idle_src:-nowhere (no idle figures found)}."
	echo
	echo "### The model's inputs from this run"
	echo
	echo "| input | value | from |"
	echo "|---|---:|---|"
	jq -r '
		def f(n): (. * n | round / n);
		"| m: node RSS per idle connection, KiB | \(.idle_kib | f(100)) | idle parts (the kernel adds ~4 KiB per socket) |",
		"| c_d: node CPU per delivery in a fan-out, µs | \(.c_d | f(100)) | s-fanout, phase used |",
		"| node CPU per message to 3 / 1 nodes, one publisher, µs | \(.node_us_per_msg_pub3 | f(10)) / \(.node_us_per_msg_pub1 | f(10)) | s-pub3 / s-pub1 |",
		"| c_n: node CPU per node a message reaches (read from Redis, hub, first delivery there), µs | \(.c_n | f(10)) | (pub3 − pub1) / 2\(if .c_n_measured < .c_d then " = \(.c_n_measured | f(10)), below c_d: taken as c_d" else "" end) |",
		"| node CPU per room-of-1 message, µs | \(.node_us_per_msg_rooms1 | f(10)) | c-rooms1 |",
		"| c_p: node CPU per message published by a chat client (read, publish, reply), µs | \(.c_p | f(10)) | rooms1 − c_n |",
		"| check: node CPU per room-of-10 message, measured / c_p + 3 c_n + 7 c_d, µs | \(.node_us_per_msg_rooms10 | f(10)) / \(.node_us_per_msg_rooms10_model | f(10)) | c-rooms10 |",
		"| Redis main-thread µs per message to 3 / 1 nodes | \(.r_3 | f(100)) / \(.r_1 | f(100)) | s-pub3 / s-pub1, at \(.redis_msgs_per_sec_3 | floor) / \(.redis_msgs_per_sec_1 | floor) msgs/s |",
		"| r_n: Redis main-thread µs per node a message goes to | \(.r_n | f(100)) | (pub3 − pub1) / 2\(if .r_n_measured <= 0 then " = \(.r_n_measured | f(100)): below the noise, taken as 0" else "" end) |",
		"| r_m: Redis main-thread µs per message | \(.r_m | f(100)) | \(if .r_n_measured > 0 then "pub1 − r_n" else "the larger of pub3 and pub1" end) |",
		"| check: Redis µs per room-of-10 message (3 nodes), standalone / cluster | \(.redis_standalone_rooms_us_per_msg | f(100)) / \(.redis_cluster_rooms_us_per_msg | f(100)) | s-rooms10 / c-rooms10, \(.redis_cluster_rooms_msgs_per_sec / 3 | floor) msgs/s and \(.redis_cluster_rooms_shard_cores | f(1000)) cores per shard: r_m + 3 r_n = \(.r_m + 3 * .r_n | f(100)) |"' \
		"$out/capacity.json"
	echo
	echo "### The model with these inputs"
	echo
	echo "$model_conns connections, $model_msgs messages/s in rooms of $model_room whose members are on random nodes, $model_bcast broadcast msgs/s to every connection; nodes of $model_node_cores cores and $model_node_gib GiB, max_connections $model_node_max, planned at $(awk -v u="$model_cpu_util" 'BEGIN { print u * 100 }') % CPU (nodes and shards) and $(awk -v u="$model_mem_util" 'BEGIN { print u * 100 }') % of memory for idle connections (README, Sizing):"
	echo
	model
	echo
	echo "### The runs"
	cat "$out/cap-runs.md"
} >"$out/capacity.md"
echo "capacity: wrote $out/capacity.md (${wall} s)" >&2
