//! Container runtimes (docs/SEMANTICS.md, "Container runtimes"): `regfs snapshotter`
//! under containerd's own conformance suite, and a private containerd 1.6 with runc
//! that pulls and runs images through it from a real registry, all through the kernel.

mod common;
#[path = "runtime/conformance.rs"]
mod conformance;
#[path = "runtime/containerd.rs"]
mod containerd;
#[path = "runtime/harness.rs"]
mod harness;
#[path = "runtime/remote.rs"]
mod remote;
