#!/usr/bin/env bash
# xcaddy.md's checkout build, run exactly as the doc writes it.
#
# Finds the fenced block that follows the `<!-- xcaddy-test: ... -->` comment
# in xcaddy.md and runs its lines, one step each, in one bash shell (so an
# `export` carries to the next line), from the root of a temporary copy of
# this checkout (the doc says "from the root of a checkout"). xcaddy itself is
# installed by the block's own `go install` line, from the Go module proxy.
# The `./caddy run ...` line, which would serve until stopped, is started in
# the background with CHAT_ADDR and CADDY_ADMIN on free loopback ports; the
# test then GETs the chat page and /ws/caddychat.js and stops Caddy through
# its admin API. Before that it checks on its own that the binary is there,
# that `caddy list-modules` lists http.handlers.chat and that `caddy version`
# is the Caddy of go.mod (so the doc's pinned version cannot drift from it).
#
# Any failure names the step and exits non-zero. Time: the block's build
# compiles all of Caddy with xcaddy's flags (-trimpath): about 4 minutes on 2
# cores with a cold Go build cache, about 20 seconds warm.
#
# Side effect, as the doc's first line has it: xcaddy v0.4.5 is installed in
# $(go env GOPATH)/bin.
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
doc="$repo/xcaddy.md"
marker='<!-- xcaddy-test:'
t_start=$SECONDS

say() { printf '\n== xcaddy-test: %s\n' "$*"; }
fail() {
	printf '\nxcaddy-test FAILED at step: %s\n' "$1" >&2
	shift
	[ $# -gt 0 ] && printf '  %s\n' "$@" >&2
	exit 1
}

# --- the block ---------------------------------------------------------------
[ -f "$doc" ] || fail "read xcaddy.md" "$doc is missing"
# The lines of the first fenced block after the marker comment.
block="$(awk -v m="$marker" '
	index($0, m) == 1 { armed = 1; next }
	armed && !infence && /^```/ { infence = 1; next }
	infence && /^```/ { found = 1; exit }
	infence { print }
	END { if (!found) exit 1 }
' "$doc")" || fail "find the tested block in xcaddy.md" \
	"no fenced block (closed) after a line starting with '$marker'"
steps=()
while IFS= read -r line; do
	trimmed="${line#"${line%%[![:space:]]*}"}"
	[ -z "$trimmed" ] && continue
	[ "${trimmed:0:1}" = "#" ] && continue
	steps+=("$line")
done <<<"$block"
[ ${#steps[@]} -gt 0 ] || fail "find the tested block in xcaddy.md" "the block after '$marker' has no command"

# The Caddy version of go.mod must be the one the block builds.
caddy_ver="$(awk '$1 == "github.com/caddyserver/caddy/v2" { print $2; exit }' "$repo/go.mod")"
[ -n "$caddy_ver" ] || fail "read Caddy's version from go.mod" "no github.com/caddyserver/caddy/v2 line in go.mod"
build_line="$(printf '%s\n' "${steps[@]}" | grep -E '(^|[[:space:]])xcaddy build' | head -1)"
[ -n "$build_line" ] || fail "check the block's xcaddy build line" "the block has no 'xcaddy build' command"
case " $build_line " in
*" xcaddy build $caddy_ver "* | *"CADDY_VERSION=$caddy_ver "*) ;;
*) fail "check the block's xcaddy build line" \
	"it does not pin Caddy $caddy_ver (go.mod's): $build_line" \
	"write 'xcaddy build $caddy_ver --with ...' (or CADDY_VERSION=$caddy_ver) in xcaddy.md" ;;
esac
printf '%s\n' "${steps[@]}" | grep -qE '^\./caddy run( |$)' ||
	fail "check the block's ./caddy run line" "the block has no './caddy run ...' line, so there is nothing to serve Caddyfile.example with"

say "xcaddy.md's tested block (${#steps[@]} commands), Caddy $caddy_ver from go.mod:"
printf '   %s\n' "${steps[@]}"

# --- a copy of the checkout --------------------------------------------------
tmp="$(mktemp -d "${TMPDIR:-/tmp}/xcaddy-test.XXXXXX")"
caddy_pid=""
cleanup() {
	if [ -n "$caddy_pid" ] && kill -0 "$caddy_pid" 2>/dev/null; then
		kill -TERM "$caddy_pid" 2>/dev/null
		wait "$caddy_pid" 2>/dev/null
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
src="$tmp/caddychat"
mkdir -p "$src" "$tmp/xdg-data" "$tmp/xdg-config"
command -v git >/dev/null || fail "copy the checkout" "git is not installed"
# The working tree's files (committed or not, git-ignored ones left out).
(cd "$repo" && git ls-files -z --cached --others --exclude-standard) |
	(cd "$repo" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) |
	(cd "$repo" && tar --null -T - -cf -) | tar -xf - -C "$src" ||
	fail "copy the checkout" "could not copy $repo's files to $src"
say "checkout copied to $src"

# Free loopback ports: not listening now, outside the ephemeral range.
free_port() {
	local p i
	for i in $(seq 1 200); do
		p=$((20000 + RANDOM % 12000))
		case " $* " in *" $p "*) continue ;; esac
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			echo "$p"
			return 0
		fi
	done
	return 1
}

http_get() { # url outfile headerfile -> prints the status code
	curl -sS -L --max-time 10 -o "$2" -D "$3" -w '%{http_code}' "$1"
}

# The serve step: ./caddy run ... in the background, then the checks.
serve_step() {
	local n="$1" line="$2" chat_port admin_port log="$tmp/caddy-run.log" i code
	local name="$n ($line)"
	command -v curl >/dev/null || fail "$name" "curl is not installed"

	say "before step $n: the binary the block built"
	[ -x ./caddy ] || fail "$name" "./caddy is not there: the build steps made no binary"
	./caddy list-modules >"$tmp/modules.txt" 2>&1 ||
		fail "./caddy list-modules" "exit status $?" "$(tail -20 "$tmp/modules.txt")"
	grep -qx 'http.handlers.chat' "$tmp/modules.txt" ||
		fail "./caddy list-modules" "http.handlers.chat is not listed" "$(grep -i chat "$tmp/modules.txt")"
	echo "   list-modules lists http.handlers.chat"
	local v
	v="$(./caddy version 2>&1)" || fail "./caddy version" "exit status $?: $v"
	case "$v" in
	"$caddy_ver "* | "$caddy_ver") echo "   caddy version: $v" ;;
	*) fail "./caddy version" "built Caddy is '$v', go.mod requires $caddy_ver" ;;
	esac

	chat_port="$(free_port)" || fail "$name" "found no free loopback port"
	admin_port="$(free_port "$chat_port")" || fail "$name" "found no free loopback port"
	say "step $n/${#steps[@]}: $line   (in the background, CHAT_ADDR=127.0.0.1:$chat_port CADDY_ADMIN=127.0.0.1:$admin_port)"
	# exec: $caddy_pid is Caddy's own PID. The XDG dirs keep Caddy's files
	# (autosave.json, storage) in the temporary directory.
	(
		export CHAT_ADDR="127.0.0.1:$chat_port" CADDY_ADMIN="127.0.0.1:$admin_port" \
			XDG_DATA_HOME="$tmp/xdg-data" XDG_CONFIG_HOME="$tmp/xdg-config"
		eval "exec $line"
	) >"$log" 2>&1 </dev/null &
	caddy_pid=$!
	local base="http://127.0.0.1:$chat_port"
	for i in $(seq 1 150); do
		kill -0 "$caddy_pid" 2>/dev/null ||
			fail "$name" "Caddy exited before serving; its log:" "$(tail -30 "$log")"
		# Any HTTP answer means Caddy is up; the checks below judge it.
		code="$(curl -s -o /dev/null --max-time 2 -w '%{http_code}' "$base/ws/caddychat.js" 2>/dev/null)"
		[ -n "$code" ] && [ "$code" != "000" ] && break
		sleep 0.2
	done
	[ -n "$code" ] && [ "$code" != "000" ] || fail "$name" "no answer from $base within 30 s; Caddy's log:" "$(tail -30 "$log")"

	code="$(http_get "$base/" "$tmp/page.html" "$tmp/page.hdr")" || fail "GET $base/" "curl failed"
	[ "$code" = "200" ] || fail "GET $base/ (redirected to the chat page /ws)" "status $code" "$(cat "$tmp/page.hdr")"
	grep -qi '^content-type: text/html' "$tmp/page.hdr" ||
		fail "GET $base/ (the chat page)" "not text/html:" "$(cat "$tmp/page.hdr")"
	grep -q '<meta name="caddychat-base" content="/ws">' "$tmp/page.html" ||
		fail "GET $base/ (the chat page)" "the page is not caddychat's chat page for /ws:" "$(head -c 600 "$tmp/page.html")"
	echo "   GET / -> /ws: the chat page ($(wc -c <"$tmp/page.html") bytes)"

	code="$(http_get "$base/ws/caddychat.js" "$tmp/client.js" "$tmp/client.hdr")" || fail "GET $base/ws/caddychat.js" "curl failed"
	[ "$code" = "200" ] || fail "GET $base/ws/caddychat.js" "status $code" "$(cat "$tmp/client.hdr")"
	grep -qi '^content-type: text/javascript' "$tmp/client.hdr" ||
		fail "GET $base/ws/caddychat.js" "not text/javascript:" "$(cat "$tmp/client.hdr")"
	cmp -s "$tmp/client.js" client/caddychat.js ||
		fail "GET $base/ws/caddychat.js" "the body is not this checkout's client/caddychat.js"
	echo "   GET /ws/caddychat.js: client/caddychat.js ($(wc -c <"$tmp/client.js") bytes)"

	curl -sS --max-time 10 -X POST "http://127.0.0.1:$admin_port/stop" >/dev/null ||
		fail "stop Caddy (POST /stop on CADDY_ADMIN)" "the admin API did not answer"
	for i in $(seq 1 100); do
		kill -0 "$caddy_pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -0 "$caddy_pid" 2>/dev/null && fail "stop Caddy (POST /stop on CADDY_ADMIN)" "Caddy still runs 10 s after /stop"
	wait "$caddy_pid" 2>/dev/null
	caddy_pid=""
	echo "   stopped through the admin API"
}

# --- run the block -------------------------------------------------------------
cd "$src" || fail "cd to the copy" "$src"
unset GOBIN # the block installs xcaddy where its next line looks: $(go env GOPATH)/bin
n=0
for line in "${steps[@]}"; do
	n=$((n + 1))
	case "$line" in
	./caddy\ run | ./caddy\ run\ *)
		serve_step "$n" "$line"
		continue
		;;
	esac
	say "step $n/${#steps[@]}: $line"
	t0=$SECONDS
	eval "$line"
	rc=$?
	[ $rc -eq 0 ] || fail "$n ($line)" "exit status $rc (its output is above)"
	echo "   step $n done in $((SECONDS - t0)) s"
done

echo
echo "xcaddy-test: xcaddy.md's checkout build passed in $((SECONDS - t_start)) s"
