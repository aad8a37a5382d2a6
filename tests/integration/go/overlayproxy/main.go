// Command overlayproxy serves containerd 1.6's own overlay snapshotter over
// the Snapshots gRPC service on a unix socket: the external-snapshotter
// pattern of containerd's docs/PLUGINS.md, as a containerd user would write
// it. The benchmarks measure our daemon against it, and the Go client test
// runs its checks against it too (so they hold for containerd's snapshotter,
// not only for ours).
//
//	overlayproxy -root DIR -address SOCKET [-async-remove]
//
// -async-remove is the option containerd's built-in overlayfs plugin always
// sets (snapshots/overlay/plugin): Remove only drops the record and Cleanup
// deletes the directories, as our daemon does. Without it (PLUGINS.md's
// plain NewSnapshotter(root)) Remove deletes them itself.
//
// grpc-go's server runs with its default settings. SIGTERM or SIGINT stop
// it gracefully (calls in flight finish), then the snapshotter is closed and
// the socket removed; it exits 0.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "", "the snapshotter's root directory")
	address := flag.String("address", "", "the unix socket to serve on")
	async := flag.Bool("async-remove", false,
		"defer the removal of directories to Cleanup (overlay.AsynchronousRemove)")
	flag.Parse()
	if *root == "" || *address == "" {
		fmt.Fprintln(os.Stderr, "overlayproxy: -root and -address are required")
		os.Exit(2)
	}
	var opts []overlay.Opt
	if *async {
		opts = append(opts, overlay.AsynchronousRemove)
	}
	if err := serve(*root, *address, opts); err != nil {
		fmt.Fprintf(os.Stderr, "overlayproxy: %v\n", err)
		os.Exit(1)
	}
}

func serve(root, address string, opts []overlay.Opt) error {
	sn, err := overlay.NewSnapshotter(root, opts...)
	if err != nil {
		return fmt.Errorf("overlay snapshotter on %s: %w", root, err)
	}
	defer sn.Close()

	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))
	listener, err := net.Listen("unix", address)
	if err != nil {
		return err
	}

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		server.GracefulStop()
	}()
	// Serve returns nil after GracefulStop; the listener (and the socket
	// file, Go unlinks it on close) is gone by then.
	return server.Serve(listener)
}
