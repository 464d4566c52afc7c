// Command caddy is Caddy with the standard modules and caddychat built in.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddychat/caddychat"
)

func main() {
	caddycmd.Main()
}
