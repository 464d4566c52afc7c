// replaced by main.go at merge: the hooks branch writes examples/backend/main.go.
package main

func main() {}
