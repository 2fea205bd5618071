//! Container runtimes (docs/SEMANTICS.md, "Container runtimes"): `regfs snapshotter`
//! under containerd's own conformance suite, and a private containerd 1.6 with runc
//! that pulls and runs images through it from a real registry, all through the kernel.

mod conformance;
mod containerd;
mod contents;
mod faults;
mod go;
mod hosts;
mod layer_store;
mod podman;
mod remote;
mod rich_image;
