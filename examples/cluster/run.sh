#!/usr/bin/env bash
# A local caddychat cluster on loopback: one redis-server, three chat nodes
# (node.Caddyfile) and a load balancer (balancer.Caddyfile), all with a Caddy
# built from this checkout. Needs Go and redis-server; Ctrl-C stops it all.
#
#   examples/cluster/run.sh
#
# then open the printed URL in several tabs. Ctrl-C (or SIGTERM to this
# script) stops the balancer, then the nodes, then Redis. Settings (environment):
#
#   LB_PORT=8080  NODE_PORTS="8081 8082 8083"  REDIS_PORT=6380
#                         the ports, all on 127.0.0.1 (each must be free)
#   CHAT_DRAIN_PERIOD=10s how long a stopped node takes to close its WebSockets
#   CADDY_BIN=<path>      use this Caddy (built with the module) instead of
#                         building .build/caddy with `go build ./cmd/caddy`
#   CLUSTER_DIR=<dir>     where the logs, pid files and data go
#                         (default .build/cluster, emptied at each start)
#
# Each process's pid is in $CLUSTER_DIR/<name>.pid and its log in
# $CLUSTER_DIR/<name>.log (names: redis, node1..node3, balancer). To see a
# node go away while clients stay: kill -TERM "$(cat .build/cluster/node2.pid)".
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

LB_PORT="${LB_PORT:-8080}"
NODE_PORTS="${NODE_PORTS:-8081 8082 8083}"
REDIS_PORT="${REDIS_PORT:-6380}"
CLUSTER_DIR="${CLUSTER_DIR:-$repo/.build/cluster}"
export CHAT_DRAIN_PERIOD="${CHAT_DRAIN_PERIOD:-10s}"

say() { printf 'cluster: %s\n' "$*"; }
die() { printf 'cluster: %s\n' "$*" >&2; exit 1; }

redis_bin="$(command -v redis-server || true)"
[ -n "$redis_bin" ] || [ ! -x /usr/bin/redis-server ] || redis_bin=/usr/bin/redis-server
[ -n "$redis_bin" ] ||
	die "redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)"

# listening PORT: something accepts connections on 127.0.0.1:PORT.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for port in "$REDIS_PORT" $NODE_PORTS "$LB_PORT"; do
	if listening "$port"; then
		die "127.0.0.1:$port is in use: set LB_PORT, NODE_PORTS or REDIS_PORT to free ports"
	fi
done

case "$CLUSTER_DIR" in "" | / | "$HOME") die "refusing CLUSTER_DIR=$CLUSTER_DIR" ;; esac
rm -rf "$CLUSTER_DIR"
mkdir -p "$CLUSTER_DIR"

if [ -z "${CADDY_BIN:-}" ]; then
	command -v go >/dev/null 2>&1 || die "go not found: install Go (https://go.dev/dl/) or set CADDY_BIN"
	CADDY_BIN="$repo/.build/caddy"
	say "building $CADDY_BIN from this checkout (the first build compiles all of Caddy: a few minutes)"
	(cd "$repo" && go build -o "$CADDY_BIN" ./cmd/caddy)
fi

pids=()
names=()

# stop PID...: SIGTERM to each, then wait until all have exited (SIGKILL
# after a minute).
stop() {
	local pid waited=0
	for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
	for pid in "$@"; do
		while kill -0 "$pid" 2>/dev/null; do
			if [ "$waited" -ge 600 ]; then
				say "pid $pid did not stop within 60s: killing it"
				kill -KILL "$pid" 2>/dev/null || true
				break
			fi
			sleep 0.1
			waited=$((waited + 1))
		done
		wait "$pid" 2>/dev/null || true
	done
}

# stop_all: the balancer first (no new connections), then the nodes together
# (each closes its WebSockets with 1001 within CHAT_DRAIN_PERIOD), Redis last.
stopping=""
stop_all() {
	[ -z "$stopping" ] || return 0
	stopping=1
	trap '' INT TERM
	[ "${#pids[@]}" -gt 0 ] || return 0
	say "stopping"
	local i
	local -a nodes=() rest=()
	for ((i = 0; i < ${#pids[@]}; i++)); do
		case "${names[$i]}" in
		node*) nodes+=("${pids[$i]}") ;;
		balancer) stop "${pids[$i]}" ;;
		*) rest+=("${pids[$i]}") ;;
		esac
	done
	[ "${#nodes[@]}" -eq 0 ] || stop "${nodes[@]}"
	[ "${#rest[@]}" -eq 0 ] || stop "${rest[@]}"
	say "stopped; logs in $CLUSTER_DIR"
}
trap 'stop_all; exit 0' INT TERM
trap 'stop_all' EXIT

# start NAME PORT CMD...: runs CMD in the background, logging to NAME.log,
# and waits until it accepts connections on PORT.
start() {
	local name="$1" port="$2"
	shift 2
	# set -m: the process gets a process group of its own, so a Ctrl-C in
	# the terminal reaches this script only, which stops them in order.
	set -m
	"$@" </dev/null >"$CLUSTER_DIR/$name.log" 2>&1 &
	local pid=$!
	set +m
	pids+=("$pid")
	names+=("$name")
	echo "$pid" >"$CLUSTER_DIR/$name.pid"
	local tries=0
	until listening "$port"; do
		if ! kill -0 "$pid" 2>/dev/null; then
			tail -n 30 "$CLUSTER_DIR/$name.log" >&2 || true
			die "$name exited during start-up; log: $CLUSTER_DIR/$name.log"
		fi
		tries=$((tries + 1))
		[ "$tries" -le 600 ] || die "$name does not listen on 127.0.0.1:$port after 60s; log: $CLUSTER_DIR/$name.log"
		sleep 0.1
	done
	say "$name listening on 127.0.0.1:$port (pid $pid)"
}

mkdir -p "$CLUSTER_DIR/redis"
start redis "$REDIS_PORT" "$redis_bin" --port "$REDIS_PORT" --bind 127.0.0.1 \
	--save "" --appendonly no --dir "$CLUSTER_DIR/redis"

# Caddy writes a little state even with auto_https off: each process keeps
# its own under CLUSTER_DIR (XDG_DATA_HOME, XDG_CONFIG_HOME).
upstreams=""
i=0
for port in $NODE_PORTS; do
	i=$((i + 1))
	start "node$i" "$port" env \
		XDG_DATA_HOME="$CLUSTER_DIR/node$i/data" XDG_CONFIG_HOME="$CLUSTER_DIR/node$i/config" \
		CHAT_BIND=127.0.0.1 CHAT_PORT="$port" \
		CHAT_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" \
		"$CADDY_BIN" run --config "$here/node.Caddyfile" --adapter caddyfile
	upstreams="$upstreams 127.0.0.1:$port"
done

start balancer "$LB_PORT" env \
	XDG_DATA_HOME="$CLUSTER_DIR/balancer/data" XDG_CONFIG_HOME="$CLUSTER_DIR/balancer/config" \
	LB_BIND=127.0.0.1 LB_PORT="$LB_PORT" LB_UPSTREAMS="${upstreams# }" \
	"$CADDY_BIN" run --config "$here/balancer.Caddyfile" --adapter caddyfile

say "open http://127.0.0.1:$LB_PORT/ (WebSocket: ws://127.0.0.1:$LB_PORT/ws); Ctrl-C stops everything"

# Wait until Ctrl-C (the trap stops everything) or until every process has
# exited. A node stopped on its own (kill -TERM) leaves the others running.
while :; do
	alive=0
	for pid in "${pids[@]}"; do
		if kill -0 "$pid" 2>/dev/null; then alive=1; fi
	done
	[ "$alive" = 1 ] || break
	sleep 1 &
	wait $! || true
done
say "every process has exited"
