// cri-pull pulls and unpacks an image into a snapshotter with the labels CRI (and
// nerdctl) put on each layer, containerd.io/snapshot/cri.*, which Debian's ctr cannot
// set: containerd's own client with pkg/snapshotters' handler, as containerd's CRI
// plugin does it. Built by tests/runtime.rs in GOPATH mode.
//
//	cri-pull ADDRESS SNAPSHOTTER REF   (plain HTTP to the registry)
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/remotes/docker"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: cri-pull ADDRESS SNAPSHOTTER REF")
		os.Exit(2)
	}
	address, snapshotter, ref := os.Args[1], os.Args[2], os.Args[3]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ctx = namespaces.WithNamespace(ctx, "default")
	client, err := containerd.New(address)
	if err != nil {
		fmt.Fprintln(os.Stderr, "connect:", err)
		os.Exit(1)
	}
	defer client.Close()
	resolver := docker.NewResolver(docker.ResolverOptions{PlainHTTP: true})
	image, err := client.Pull(ctx, ref,
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(snapshotter),
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pull:", err)
		os.Exit(1)
	}
	fmt.Println(image.Name())
}
