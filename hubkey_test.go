package caddychat

import (
	"reflect"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// TestHubKeyCoversEveryField: handlers share a hub only when every field of
// their hubConfig is equal. Changing any one field from its zero value must
// change the key; a field of a kind this test does not know fails it, so a
// new field cannot be left out unnoticed.
func TestHubKeyCoversEveryField(t *testing.T) {
	base := hubConfig{}
	typ := reflect.TypeOf(base)
	for i := range typ.NumField() {
		f := typ.Field(i)
		changed := hubConfig{}
		v := reflect.ValueOf(&changed).Elem().Field(i)
		v = reflect.NewAt(v.Type(), v.Addr().UnsafePointer()).Elem() // unexported fields
		switch v.Kind() {
		case reflect.String:
			v.SetString("x")
		case reflect.Int64: // time.Duration
			v.SetInt(int64(time.Second))
		case reflect.Bool:
			v.SetBool(true)
		case reflect.Pointer:
			v.Set(reflect.New(v.Type().Elem()))
		default:
			t.Fatalf("hubConfig.%s: kind %v unknown to this test; teach it, and make key() hold the field", f.Name, v.Kind())
		}
		if base.key() == changed.key() {
			t.Errorf("hubConfig.%s is not in key(): handlers that differ in it would share one hub (key %q)", f.Name, base.key())
		}
	}
	// A prefix cannot pose as another field.
	a := hubConfig{channelPrefix: "a|1s", brokerTimeouts: 2 * time.Second}
	b := hubConfig{channelPrefix: "a", brokerTimeouts: time.Second}
	if a.key() == b.key() {
		t.Errorf("keys collide: %q", a.key())
	}
}

// TestHubPerPublishTimeout: two routes that differ only in publish_timeout
// get a hub each, whose broker timeout is their own.
func TestHubPerPublishTimeout(t *testing.T) {
	prefix := uniquePrefix()
	fast := startNode(t, &Handler{ChannelPrefix: &prefix, PublishTimeout: caddy.Duration(300 * time.Millisecond)})
	slow := startNode(t, &Handler{ChannelPrefix: &prefix, PublishTimeout: caddy.Duration(3 * time.Second)})
	if fast.h.hub == slow.h.hub {
		t.Fatal("routes with different publish_timeout share one hub (the first one's timeout)")
	}
	if got := fast.h.hub.brokerTimeout; got != 300*time.Millisecond {
		t.Errorf("fast route's hub brokerTimeout = %v, want 300ms", got)
	}
	if got := slow.h.hub.brokerTimeout; got != 3*time.Second {
		t.Errorf("slow route's hub brokerTimeout = %v, want 3s", got)
	}
	// Equal settings still share.
	same := startNode(t, &Handler{ChannelPrefix: &prefix, PublishTimeout: caddy.Duration(3 * time.Second)})
	if same.h.hub != slow.h.hub {
		t.Error("routes with equal broker settings do not share their hub")
	}
}
