// containerd's snapshotter conformance suite (snapshots/testsuite), run through
// containerd's own proxy client (snapshots/proxy) against `regfs snapshotter`.
// Built and run by tests/runtime.rs in GOPATH mode on Debian's
// golang-github-containerd-containerd-dev; REGFS_BIN names the regfs binary.
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestRegfsSnapshotter(t *testing.T) {
	bin := os.Getenv("REGFS_BIN")
	if bin == "" {
		t.Fatal("REGFS_BIN must name the regfs binary")
	}
	// Each subtest gets a snapshotter of its own, on its own root (the subtests run
	// in parallel and reuse key names).
	testsuite.SnapshotterSuite(t, "regfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return start(bin, root)
	})
}

func start(bin, root string) (snapshots.Snapshotter, func() error, error) {
	sock := filepath.Join(root, "snapshotter.sock")
	cmd := exec.Command(bin, "snapshotter", "--root", root, "--address", sock,
		"--hosts-dir", filepath.Join(root, "no-hosts"))
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				return fmt.Errorf("regfs snapshotter did not stop cleanly: %w", err)
			}
			return nil
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			return fmt.Errorf("regfs snapshotter did not stop within 20s of SIGTERM")
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			_ = stop()
			return nil, nil, fmt.Errorf("regfs snapshotter made no socket at %s within 30s", sock)
		}
		select {
		case err := <-done:
			return nil, nil, fmt.Errorf("regfs snapshotter exited at start: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	dial := func(ctx context.Context, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure(), grpc.WithContextDialer(dial))
	if err != nil {
		_ = stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "regfs")
	cleanup := func() error {
		_ = conn.Close()
		return stop()
	}
	return sn, cleanup, nil
}
