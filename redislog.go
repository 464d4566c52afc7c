package caddychat

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
)

// go-redis writes its own notes (a discarded pub/sub connection, a
// sentinel's answer, a recovered panic) with the standard library's logger,
// as plain-text lines on stderr: in a Caddy whose logs are JSON they would
// be the only lines a log pipeline cannot read. redisLogger sends them
// through Caddy's logging instead, under the module's name.
//
// go-redis has one logger per process, so it is set once, the first time a
// hub is built; it asks Caddy for its current default logger on every line,
// so a config reload's log settings apply. The notes are go-redis's view of
// events the module reports itself, with their consequences for clients
// (connection lost and restored, publishes refused), so they are debug
// level; a recovered panic in go-redis is an error.
type redisLogger struct{}

var setRedisLogger sync.Once

func useRedisLogger() {
	setRedisLogger.Do(func() { redis.SetLogger(redisLogger{}) })
}

func (redisLogger) Printf(_ context.Context, format string, v ...any) {
	log := caddy.Log().Named("http.handlers.chat.redis")
	msg := strings.TrimSpace(fmt.Sprintf(format, v...))
	if strings.Contains(msg, "panic") {
		log.Error(msg)
		return
	}
	log.Debug(msg)
}
