# `make test` is the one command a newcomer (and CI) needs: it installs what
# is missing, checks formatting and vet, and runs every test.
GO ?= go

.PHONY: test setup check gotest jstest run bench

test: setup check gotest jstest

setup:
	bash .ci/setup

check:
	@unformatted="$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))"; \
	if [ -n "$$unformatted" ]; then echo "gofmt needed on:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...

gotest:
	$(GO) test -race -count=1 -timeout 20m ./...

# The browser client's unit tests (node's own runner, a fake socket).
jstest:
	node --test client/caddychat.test.mjs

run:
	$(GO) run ./cmd/caddy run --config Caddyfile.example

# The benchmark: Caddy nodes, redis-server and chatbench on loopback; writes
# bench/results.md (about 5 minutes on 2 cores).
bench:
	bash bench/run.sh
