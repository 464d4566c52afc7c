package main

import (
	"errors"
	"strconv"
)

// The readers decode every server frame, tens of thousands per second per
// core, so they do not use reflection: a small scanner walks the top-level
// object, keeps the few fields the bench needs and skips the others. Field
// order does not matter and unknown fields are ignored, as the protocol
// requires. The test checks it against encoding/json.

// frame holds the fields of a server frame the bench looks at. Byte slices
// point into the frame's buffer.
type frame struct {
	typ   []byte // welcome, ok, error, message, gap
	id    int64  // our correlation id, when it is a number (hasID)
	hasID bool
	code  []byte // error code
	// missed: a gap frame's count of the channel's messages the connection
	// was not sent (issue 21's bounded latency).
	missed int64
	data   []byte // raw JSON of a delivery's data
	conn   []byte // welcome: connection id
	node   []byte // welcome: node id
}

// payload is what the bench puts in the data of its publishes.
type payload struct {
	seq int64 // message number of its sender
	t   int64 // send time, unix nanoseconds
	c   int64 // sender (rooms), 0 when absent
}

var errSyntax = errors.New("malformed JSON frame")

// parseFrame fills f from one JSON object.
func parseFrame(b []byte, f *frame) error {
	*f = frame{}
	return eachField(b, func(key, val []byte) error {
		switch string(key) {
		case "type":
			f.typ = plainString(val)
		case "id":
			if n, err := strconv.ParseInt(string(val), 10, 64); err == nil {
				f.id, f.hasID = n, true
			}
		case "code":
			f.code = plainString(val)
		case "missed":
			if n, err := strconv.ParseInt(string(val), 10, 64); err == nil && n > 0 {
				f.missed = n
			}
		case "data":
			f.data = val
		case "conn":
			f.conn = plainString(val)
		case "node":
			f.node = plainString(val)
		}
		return nil
	})
}

// parsePayload reads seq, t and c from a delivery's data.
func parsePayload(b []byte, p *payload) error {
	*p = payload{}
	var haveSeq, haveT bool
	err := eachField(b, func(key, val []byte) error {
		var err error
		switch string(key) {
		case "seq":
			p.seq, err = strconv.ParseInt(string(val), 10, 64)
			haveSeq = err == nil
		case "t":
			p.t, err = strconv.ParseInt(string(val), 10, 64)
			haveT = err == nil
		case "c":
			p.c, err = strconv.ParseInt(string(val), 10, 64)
		}
		return err
	})
	if err != nil {
		return err
	}
	if !haveSeq || !haveT || p.seq < 0 {
		return errors.New("data is not a bench payload")
	}
	return nil
}

// plainString returns the content of a JSON string without escapes; a string
// with escapes or another value gives the raw text (only compared, never
// shown, so that is good enough).
func plainString(v []byte) []byte {
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		s := v[1 : len(v)-1]
		for _, c := range s {
			if c == '\\' {
				return v
			}
		}
		return s
	}
	return v
}

// eachField calls fn with the raw key (without quotes) and the raw value of
// every member of the JSON object b.
func eachField(b []byte, fn func(key, val []byte) error) error {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return errSyntax
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return nil
	}
	for {
		if i >= len(b) || b[i] != '"' {
			return errSyntax
		}
		end, err := skipString(b, i)
		if err != nil {
			return err
		}
		key := b[i+1 : end-1]
		i = skipSpace(b, end)
		if i >= len(b) || b[i] != ':' {
			return errSyntax
		}
		i = skipSpace(b, i+1)
		end, err = skipValue(b, i)
		if err != nil {
			return err
		}
		if err := fn(key, b[i:end]); err != nil {
			return err
		}
		i = skipSpace(b, end)
		if i >= len(b) {
			return errSyntax
		}
		switch b[i] {
		case ',':
			i = skipSpace(b, i+1)
		case '}':
			return nil
		default:
			return errSyntax
		}
	}
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index just past the string starting at b[i] == '"'.
func skipString(b []byte, i int) (int, error) {
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			j++
		case '"':
			return j + 1, nil
		}
	}
	return 0, errSyntax
}

// skipValue returns the index just past the JSON value starting at b[i].
// Nested objects and arrays are skipped by counting brackets outside strings;
// scalars end at the next delimiter.
func skipValue(b []byte, i int) (int, error) {
	if i >= len(b) {
		return 0, errSyntax
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(b); j++ {
			switch b[j] {
			case '"':
				end, err := skipString(b, j)
				if err != nil {
					return 0, err
				}
				j = end - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1, nil
				}
			}
		}
		return 0, errSyntax
	default:
		j := i
		for j < len(b) {
			switch b[j] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				if j == i {
					return 0, errSyntax
				}
				return j, nil
			}
			j++
		}
		if j == i {
			return 0, errSyntax
		}
		return j, nil
	}
}
