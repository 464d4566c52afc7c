package caddychat

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/dustin/go-humanize"
)

// The Caddyfile's options are tables: each option's name, how many values
// it takes on its line, whether it opens a block of options of its own, and
// the function that writes its values into the config. One loop reads every
// block (optionTable.parse): it looks the option up by name first, so a typo
// is reported as one, with the closest known name, and only then checks the
// number of values. The syntax comment of UnmarshalCaddyfile and the
// README's table of options are tested against these tables.

// option is one option of a Caddyfile block whose values fill a T.
type option[T any] struct {
	name string
	// Values the option takes on its line: at least min, at most max (-1:
	// no limit).
	min, max int
	// What follows the name in the syntax comment, e.g. "<size>".
	syntax string
	// What the values are and an example line, for the message of a wrong
	// count: "send_queue takes one size, e.g. send_queue 1MiB; got 2 values".
	takes, example string
	// The table of the block the option opens, if it opens one (parse then
	// reads the block); blockOptional: the option works without it.
	block         optionBlock
	blockOptional bool
	// parse writes the option's values into t. Its errors name the option
	// and the value; they are prefixed with "chat: " (and the block's name)
	// and located at the option's line.
	parse func(t *T, d *caddyfile.Dispenser, args []string) error
}

// optionTable is the options of one block: chat's own (block ""), or the
// block an option opens (block "jwt").
type optionTable[T any] struct {
	block   string
	options []option[T]
	// Names that are no option but that an operator may write for one,
	// e.g. the JSON name an option used to have: named in the message.
	meant map[string]string
}

// optionBlock is what the syntax comment and the tests need of a table,
// whatever the type its options fill.
type optionBlock interface {
	docs() []optionDoc
}

// optionDoc describes an option for the syntax comment and the tests.
type optionDoc struct {
	name, syntax  string
	block         []optionDoc // nil: the option opens no block
	blockOptional bool
}

func (tbl *optionTable[T]) docs() []optionDoc {
	docs := make([]optionDoc, 0, len(tbl.options))
	for _, o := range tbl.options {
		doc := optionDoc{name: o.name, syntax: o.syntax, blockOptional: o.blockOptional}
		if o.block != nil {
			doc.block = o.block.docs()
		}
		docs = append(docs, doc)
	}
	return docs
}

// caddyfileError is an error already prefixed and located at its line, that
// an enclosing block passes on as it is.
type caddyfileError struct{ error }

func (e caddyfileError) Unwrap() error { return e.error }

// parse reads the options of the block that starts at the dispenser's
// position into t.
func (tbl *optionTable[T]) parse(d *caddyfile.Dispenser, t *T) error {
	prefix := "chat: "
	if tbl.block != "" {
		prefix += tbl.block + " "
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		o := tbl.lookup(name)
		if o == nil {
			return caddyfileError{d.Errf("chat: %s", tbl.unknown(name))}
		}
		tok := d.Token()
		args := d.RemainingArgs()
		if ot, ok := d.GetContext(optionTokensKey).(optionTokens); ok {
			ot.add(strings.TrimPrefix(tbl.block+" "+name, " "), tok, args)
		}
		if len(args) < o.min || (o.max >= 0 && len(args) > o.max) {
			return caddyfileError{d.Errf("%s%s takes %s, e.g. %s; got %s", prefix, name, o.takes, o.example, valueCount(len(args)))}
		}
		if o.block == nil && d.NextBlock(d.Nesting()) {
			return caddyfileError{d.Errf("%s%s takes no block, e.g. %s", prefix, name, o.example)}
		}
		if err := o.parse(t, d, args); err != nil {
			if errors.As(err, new(caddyfileError)) {
				return err
			}
			return caddyfileError{d.Errf("%s%w", prefix, err)}
		}
	}
	return nil
}

func (tbl *optionTable[T]) lookup(name string) *option[T] {
	for i := range tbl.options {
		if tbl.options[i].name == name {
			return &tbl.options[i]
		}
	}
	return nil
}

// unknown says that name is no option of the block, with the closest known
// name if one is close, else (in a nested block) the names it knows.
func (tbl *optionTable[T]) unknown(name string) string {
	names := make([]string, len(tbl.options))
	for i, o := range tbl.options {
		names[i] = o.name
	}
	what := "unknown option"
	if tbl.block != "" {
		what = "unknown " + tbl.block + " option"
	}
	near := tbl.meant[name]
	if near == "" {
		near = closestName(name, names)
	}
	if near != "" {
		return fmt.Sprintf("%s %q (did you mean %q?)", what, name, near)
	}
	if tbl.block == "" {
		return fmt.Sprintf("%s %q", what, name)
	}
	return fmt.Sprintf("%s %q (want %s or %s)", what, name, strings.Join(names[:len(names)-1], ", "), names[len(names)-1])
}

func valueCount(n int) string {
	switch n {
	case 0:
		return "none"
	case 1:
		return "1 value"
	}
	return strconv.Itoa(n) + " values"
}

// closestName is the name of names nearest to typed, if it is near enough
// to be what was meant: at most a third of typed's letters apart (one for
// short names, three at most), counting a swap of neighbours as one.
func closestName(typed string, names []string) string {
	best, bestDist := "", max(1, min(3, len(typed)/3))+1
	for _, n := range names {
		if d := editDistance(strings.ToLower(typed), n); d < bestDist {
			best, bestDist = n, d
		}
	}
	return best
}

// editDistance is the optimal string alignment distance of a and b: the
// insertions, deletions, substitutions and swaps of adjacent bytes that make
// one the other.
func editDistance(a, b string) int {
	prev2 := make([]int, len(b)+1)
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(b)]
}

// Options of the common kinds.

func stringOption[T any](name, syntax, example string, set func(*T, string)) option[T] {
	return option[T]{name: name, min: 1, max: 1, syntax: syntax,
		takes: "one value", example: name + " " + example,
		parse: func(t *T, _ *caddyfile.Dispenser, args []string) error { set(t, args[0]); return nil }}
}

// patternsOption takes one or more values (patterns), added to a list.
func patternsOption[T any](name, takes, example string, list func(*T) *[]string) option[T] {
	return option[T]{name: name, min: 1, max: -1, syntax: "<pattern...>", takes: takes, example: example,
		parse: func(t *T, _ *caddyfile.Dispenser, args []string) error {
			l := list(t)
			*l = append(*l, args...)
			return nil
		}}
}

func flagOption[T any](name string, set func(*T)) option[T] {
	return option[T]{name: name, takes: "no values", example: name,
		parse: func(t *T, _ *caddyfile.Dispenser, _ []string) error { set(t); return nil }}
}

func sizeOption[T any](name, example string, most uint64, set func(*T, int64)) option[T] {
	return option[T]{name: name, min: 1, max: 1, syntax: "<size>", takes: "one size", example: name + " " + example,
		parse: func(t *T, _ *caddyfile.Dispenser, args []string) error {
			size, err := humanize.ParseBytes(args[0])
			if err != nil || size == 0 || size > most {
				return fmt.Errorf("%s %q: want a size such as %s", name, args[0], example)
			}
			set(t, int64(size))
			return nil
		}}
}

func durationOption[T any](name, example string, set func(*T, caddy.Duration)) option[T] {
	return option[T]{name: name, min: 1, max: 1, syntax: "<duration>", takes: "one duration", example: name + " " + example,
		parse: func(t *T, _ *caddyfile.Dispenser, args []string) error {
			dur, err := caddy.ParseDuration(args[0])
			if err != nil || dur <= 0 {
				return fmt.Errorf("%s %q: want a positive duration such as %s", name, args[0], example)
			}
			set(t, caddy.Duration(dur))
			return nil
		}}
}

// durationOrOffOption is an option taking a duration or off (0), kept in a
// pointer so that unset keeps the default.
func durationOrOffOption[T any](name, example string, field func(*T) **caddy.Duration) option[T] {
	return option[T]{name: name, min: 1, max: 1, syntax: "<duration> | off", takes: "one duration, or off", example: name + " " + example,
		parse: func(t *T, _ *caddyfile.Dispenser, args []string) error {
			var d caddy.Duration
			if args[0] != "off" {
				dur, err := caddy.ParseDuration(args[0])
				if err != nil || dur <= 0 {
					return fmt.Errorf("%s %q: want a positive duration such as %s, or off", name, args[0], example)
				}
				d = caddy.Duration(dur)
			}
			*field(t) = &d
			return nil
		}}
}

func countOption[T any](name, example string, set func(*T, int)) option[T] {
	return option[T]{name: name, min: 1, max: 1, syntax: "<n>", takes: "one number", example: name + " " + example,
		parse: func(t *T, _ *caddyfile.Dispenser, args []string) error {
			n, err := strconv.Atoi(args[0])
			if err != nil || n < 1 {
				return fmt.Errorf("%s %q: want a positive number", name, args[0])
			}
			set(t, n)
			return nil
		}}
}

func onOffOption[T any](name string, set func(*T, bool)) option[T] {
	return option[T]{name: name, min: 1, max: 1, syntax: "on|off", takes: "on or off", example: name + " on",
		parse: func(t *T, _ *caddyfile.Dispenser, args []string) error {
			if args[0] != "on" && args[0] != "off" {
				return fmt.Errorf("%s %q: want on or off", name, args[0])
			}
			set(t, args[0] == "on")
			return nil
		}}
}

// syntaxLines renders options as the syntax comment shows them: one line
// per option, values aligned, a block's options indented within braces.
func syntaxLines(docs []optionDoc, indent string) []string {
	width := 0
	for _, o := range docs {
		width = max(width, len(o.name))
	}
	var lines []string
	for _, o := range docs {
		line := o.name
		if o.syntax != "" {
			line += strings.Repeat(" ", width+1-len(o.name)) + o.syntax
		}
		if o.block == nil {
			lines = append(lines, indent+line)
			continue
		}
		open, end := " {", "}"
		if o.blockOptional {
			open, end = " [{", "}]"
		}
		lines = append(lines, indent+line+open)
		lines = append(lines, syntaxLines(o.block, indent+"\t")...)
		lines = append(lines, indent+end)
	}
	return lines
}
