# `make test` is the one command a newcomer (and CI) needs: it installs what
# is missing, checks formatting and vet, and runs every test.
GO ?= go

.PHONY: test setup check gotest jstest typecheck browsertest xcaddytest run bench

test: setup check gotest jstest typecheck browsertest xcaddytest

setup:
	bash .ci/setup

check:
	@unformatted="$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))"; \
	if [ -n "$$unformatted" ]; then echo "gofmt needed on:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...

# The heap bounds of an idle connection run once more without -race, whose
# own allocations would blur them (they skip themselves under it).
gotest:
	$(GO) test -race -count=1 -timeout 20m ./...
	$(GO) test -count=1 -run 'TestIdleConnectionAllocations' .

# The browser client's unit tests (node's own runner, a fake socket), and
# its npm package: npm pack, installed offline in a fresh project, imported.
jstest:
	node --test client/caddychat.test.mjs client/package.test.mjs

# The hand-written client/caddychat.d.ts: tsc (the npm package typescript,
# pinned in client/typecheck/package-lock.json) on a typed use of the whole
# API, then a test that the declarations name what caddychat.js exports, its
# methods, options, events and error codes.
typecheck:
	npm ci --prefix client/typecheck --no-audit --no-fund --loglevel=error
	client/typecheck/node_modules/.bin/tsc -p client/typecheck
	node --test client/typecheck/

# The chat page in headless Chromium (Debian's, driven by playwright-core)
# against real Caddy nodes built from this tree and a real redis-server.
browsertest:
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix client/browser --no-audit --no-fund --loglevel=error
	$(GO) build -o .build/caddy ./cmd/caddy
	CADDYCHAT_CADDY=$(CURDIR)/.build/caddy node --test client/browser/

# xcaddy.md's checkout build, exactly as written there: installs xcaddy from
# the Go module proxy, builds Caddy with this checkout, checks list-modules and
# serves Caddyfile.example (about 4 min with a cold Go build cache, 20 s warm).
xcaddytest:
	bash .ci/xcaddy-test.sh

run:
	$(GO) run ./cmd/caddy run --config Caddyfile.example

# The benchmark: Caddy nodes, redis-server and chatbench on loopback; writes
# bench/results.md (about 15 minutes on 2 cores; ONLY=sse make bench: the
# SSE and WebSocket section only, about 1 minute; bench/run.sh's header
# lists the parts).
bench:
	bash bench/run.sh
