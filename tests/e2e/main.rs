//! The end-to-end tests, one test binary: each module below is one area of regfs, run
//! against a real `docker-registry` and (most of them) through the kernel. The harness
//! they share is `tests/common/`, one file per kind of fixture. The three tests that must
//! have the machine to themselves (soak, scale, pull-through) are `tests/alone/`.
//!
//! One binary, not one per area: each binary links the whole crate and its dependencies,
//! which took most of `scripts/test.sh`'s build when there were 22 of them. Tests run on
//! the test harness's threads (one per core unless `--test-threads` says otherwise);
//! every fixture is a process or a port of its own (registries, proxies, mounts on temp
//! directories), so tests of different areas share nothing but the machine. The runtime
//! tests (`runtime`, `layerstore`) too: each runs a containerd, snapshotter or podman on
//! roots, sockets and container IDs of its own.

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod blocks;
mod crash;
mod delete;
mod disk;
mod fstab;
mod harness;
mod hostile;
mod image;
mod layerstore;
mod mirrors;
mod model;
mod mount;
mod oci_layout;
mod referrers;
mod runtime;
mod shaper;
mod small_reads;
mod soci;
mod stalls;
mod status;
mod toc_lazy;
mod upload;
mod wan;
mod warm;
mod writes;
