//! Container runtimes (docs/SEMANTICS.md, "Container runtimes"): `regfs snapshotter`
//! under containerd's own conformance suite, and a private containerd 1.6 with runc
//! that pulls and runs images through it from a real registry, all through the kernel.

mod common;
#[path = "runtime/conformance.rs"]
mod conformance;
#[path = "runtime/containerd.rs"]
mod containerd;
#[path = "runtime/contents.rs"]
mod contents;
#[path = "runtime/faults.rs"]
mod faults;
#[path = "runtime/harness.rs"]
mod harness;
#[path = "runtime/hosts.rs"]
mod hosts;
#[path = "runtime/layer_store.rs"]
mod layer_store;
#[path = "runtime/podman.rs"]
mod podman;
#[path = "runtime/remote.rs"]
mod remote;
#[path = "runtime/rich_image.rs"]
mod rich_image;
