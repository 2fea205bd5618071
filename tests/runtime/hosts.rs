//! Registries as containerd's hosts.toml describes them, through a real containerd: a
//! registry on TLS whose CA is the second of two `ca` files (every one is trusted, in
//! one bundle of the snapshotter's own), and a mirror on TLS that no CA vouches for,
//! marked `skip_verify` (its answers used all the same, checked by digest).

use std::path::Path;

use super::common::auth::{Pki, require_auth_tools};
use super::common::{Registry, RegistryOptions};
use super::containerd::{Rig, Setup, prerequisites};
use super::remote::{counter, push_two_layer_image};

/// The mount's counters for the host whose URL names `addr`.
fn host_counters(stats: &serde_json::Value, addr: &str) -> serde_json::Value {
    let hosts = stats["hosts"]
        .as_object()
        .expect("hosts in the mount's stats");
    hosts
        .iter()
        .find(|(url, _)| url.contains(addr))
        .map(|(_, counters)| counters.clone())
        .unwrap_or_else(|| panic!("no host {addr} in {stats}"))
}

#[test]
fn every_ca_and_a_mirrors_skip_verify_are_applied() {
    prerequisites();
    require_auth_tools();
    let (decoy, ours, mirrors) = (Pki::new(), Pki::new(), Pki::new());
    let tls = |pki: &Pki, storage| {
        Registry::start_with(&RegistryOptions {
            tls: Some(pki.server()),
            storage,
            ..RegistryOptions::default()
        })
    };
    let registry = tls(&ours, None);
    let (image, layers) = push_two_layer_image(&registry);
    // The mirror serves the registry's own storage: the same blobs.
    let mirror = tls(&mirrors, Some(registry.storage_dir()));
    let hosts_toml = format!(
        "server = \"https://{}\"\nca = [\"{}\", \"{}\"]\n\
         [host.\"https://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n",
        registry.addr,
        decoy.ca().display(),
        ours.ca().display(),
        mirror.addr
    );
    let setup = Setup {
        hosts_toml,
        timeout: "10s",
    };
    let rig = Rig::start_for(registry, setup);
    let ctr = rig.ctr();
    // containerd reads the same hosts.toml (else it speaks plain HTTP to a loopback
    // registry).
    let hosts_dir = rig.snapshotter.hosts.display().to_string();
    ctr.ctr_ok(&[
        "image",
        "rpull",
        "--hosts-dir",
        &hosts_dir,
        "--snapshotter",
        "regfs",
        &image,
    ]);
    let log = rig.snapshotter.log();
    assert_eq!(counter(&rig, &["remote_snapshots"]), 2, "{log}");
    assert_eq!(counter(&rig, &["fallbacks"]), 0, "{log}");
    let out = ctr.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "regfs",
        &image,
        &rig.id("h1"),
        "cat",
        "/data/two",
    ]);
    assert_eq!(out, "two\n");

    // The layers came from the mirror, whose certificate nothing vouches for.
    let stats = rig.snapshotter.mount_stats(&rig.host());
    let from_mirror = host_counters(&stats, &mirror.addr.to_string());
    assert_eq!(from_mirror["failures"], 0, "{stats}");
    assert!(from_mirror["fetched_bytes"].as_u64() > Some(0), "{stats}");
    let content = ctr.ctr_ok(&["content", "ls", "-q"]);
    assert!(
        layers.iter().all(|l| !content.contains(l.as_str())),
        "{content}"
    );

    // Both CAs, in one bundle under the snapshotter's root.
    let bundle = rig
        .snapshotter
        .root
        .join("certs")
        .join(format!("{}.pem", rig.host()));
    let pem = std::fs::read_to_string(&bundle).expect("the CA bundle");
    for ca in [decoy.ca(), ours.ca()] {
        let one = std::fs::read_to_string(Path::new(&ca)).unwrap();
        assert!(
            pem.contains(one.trim()),
            "{} is not in the bundle",
            ca.display()
        );
    }
    rig.snapshotter.assert_private();
}
