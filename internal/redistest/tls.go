package redistest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// PKI is a throwaway certificate authority for Redis over TLS, written as
// PEM files into a t.TempDir():
//   - CA: the CA certificate the servers trust for client certificates
//     (tls-ca-cert-file) and clients trust for the servers;
//   - ServerCert/ServerKey: signed by CA, for the names in ServerNames
//     (localhost, redis.test and the IP 127.0.0.1), usable as a server and
//     as a client certificate (Redis presents tls-cert-file on the
//     replication and cluster bus connections it opens itself);
//   - ClientCert/ClientKey: signed by CA, a client certificate (CN chat);
//   - OtherCA, with OtherClientCert/OtherClientKey: an unrelated CA and a
//     client certificate it signed, which the servers must refuse.
type PKI struct {
	Dir                             string
	CA                              string
	ServerCert, ServerKey           string
	ClientCert, ClientKey           string
	OtherCA                         string
	OtherClientCert, OtherClientKey string

	pool   *x509.CertPool
	client tls.Certificate
}

// ServerNames are the names the server certificate of NewPKI holds.
var ServerNames = []string{"localhost", "redis.test", "127.0.0.1"}

// NewPKI generates the PKI's keys and certificates (ECDSA P-256).
func NewPKI(t testing.TB) *PKI {
	t.Helper()
	p := &PKI{Dir: t.TempDir()}
	file := func(name string) string { return filepath.Join(p.Dir, name) }
	ca, caKey := newCA(t, "redistest CA")
	other, otherKey := newCA(t, "redistest other CA")
	p.CA, p.OtherCA = file("ca.crt"), file("other-ca.crt")
	writePEM(t, p.CA, "CERTIFICATE", ca.Raw)
	writePEM(t, p.OtherCA, "CERTIFICATE", other.Raw)

	p.ServerCert, p.ServerKey = file("server.crt"), file("server.key")
	issue(t, ca, caKey, p.ServerCert, p.ServerKey, "redis.test", ServerNames,
		[]x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth})
	p.ClientCert, p.ClientKey = file("client.crt"), file("client.key")
	issue(t, ca, caKey, p.ClientCert, p.ClientKey, "chat", nil, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})
	p.OtherClientCert, p.OtherClientKey = file("other-client.crt"), file("other-client.key")
	issue(t, other, otherKey, p.OtherClientCert, p.OtherClientKey, "intruder", nil, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})

	p.pool = x509.NewCertPool()
	p.pool.AddCert(ca)
	pair, err := tls.LoadX509KeyPair(p.ClientCert, p.ClientKey)
	if err != nil {
		t.Fatalf("redistest: client key pair: %v", err)
	}
	p.client = pair
	return p
}

// ClientTLS is a client configuration that trusts CA and presents the
// client certificate.
func (p *PKI) ClientTLS() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: p.pool, Certificates: []tls.Certificate{p.client}}
}

func newCA(t testing.TB, name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatalf("redistest: CA certificate: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// issue writes a certificate for names signed by ca, and its key.
func issue(t testing.TB, ca *x509.Certificate, caKey *ecdsa.PrivateKey, certPath, keyPath, cn string, names []string, usage []x509.ExtKeyUsage) {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: serial(t),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  usage,
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatalf("redistest: certificate %s: %v", cn, err)
	}
	writePEM(t, certPath, "CERTIFICATE", der)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, keyPath, "PRIVATE KEY", keyDER)
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func serial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	// Redis reads the key as the user running the test; 0600 as a key should be.
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
