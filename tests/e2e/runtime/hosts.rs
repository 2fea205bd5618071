//! Registries as containerd's hosts.toml describes them, through a real containerd: a
//! registry on TLS whose CA is the second of two `ca` files (every one is trusted, in
//! one bundle of the snapshotter's own), and a mirror on TLS that no CA vouches for,
//! marked `skip_verify` (its answers used all the same, checked by digest). And the
//! other side: a CA that did not sign the registry is not trusted (every layer falls
//! back, counted, with the certificate named in the log), while `skip_verify` with no
//! CA serves them.

use std::path::Path;

use super::containerd::{Rig, Setup, prerequisites};
use super::remote::{counter, push_two_layer_image};
use crate::common::auth::{Pki, require_auth_tools};
use crate::common::{Registry, RegistryOptions};

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
        flags: &[],
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
    let out = rig.cat(&image, "h1", "/data/two");
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

/// A hosts dir of containerd's own for `host`, trusting `ca` (the snapshotter's may
/// say otherwise: the test is the snapshotter's).
fn containerd_hosts(dir: &Path, host: &str, ca: &Path) -> String {
    let host_dir = dir.join(host);
    std::fs::create_dir_all(&host_dir).unwrap();
    // containerd 1.6 reads no hosts.toml without a [host] table.
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"https://{host}\"\nca = \"{ca}\"\n[host.\"https://{host}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n  ca = \"{ca}\"\n",
            ca = ca.display()
        ),
    )
    .unwrap();
    dir.display().to_string()
}

/// rpull of `image` by a containerd that trusts `ca`.
fn rpull_trusting(rig: &Rig, image: &str, ca: &Path) {
    let hosts = containerd_hosts(&rig.dir.path().join("ctr-hosts"), &rig.host(), ca);
    rig.ctr().ctr_ok(&[
        "image",
        "rpull",
        "--hosts-dir",
        &hosts,
        "--snapshotter",
        "regfs",
        image,
    ]);
}

#[test]
fn only_the_named_cas_are_trusted_and_skip_verify_trusts_any() {
    prerequisites();
    require_auth_tools();
    let (decoy, ours) = (Pki::new(), Pki::new());
    let tls = |storage| {
        Registry::start_with(&RegistryOptions {
            tls: Some(ours.server()),
            storage,
            ..RegistryOptions::default()
        })
    };
    // The registry's storage outlives it: a second one serves it later.
    let storage = tempfile::tempdir().unwrap();
    let registry = tls(Some(storage.path().to_owned()));
    let (_, layers) = push_two_layer_image(&registry);

    // A CA that did not sign the registry's certificate: no mount, so every layer falls
    // back, counted, and the container runs from containerd's download.
    let hosts_toml = format!(
        "server = \"https://{}\"\nca = \"{}\"\n",
        registry.addr,
        decoy.ca().display()
    );
    let rig = rig_with_hosts_toml(registry, hosts_toml);
    an_untrusted_registry_falls_back(&rig, &layers, &ours);
    drop(rig);

    // skip_verify and no CA: served by regfs.
    let registry = tls(Some(storage.path().to_owned()));
    let hosts_toml = format!(
        "server = \"https://{}\"\nskip_verify = true\n",
        registry.addr
    );
    let rig = rig_with_hosts_toml(registry, hosts_toml);
    skip_verify_is_served_by_regfs(&rig, &layers, &ours);
}

/// A rig whose snapshotter reads `hosts_toml` for the registry's host.
fn rig_with_hosts_toml(registry: Registry, hosts_toml: String) -> Rig {
    Rig::start_for(
        registry,
        Setup {
            hosts_toml,
            timeout: "10s",
            flags: &[],
        },
    )
}

/// The snapshotter does not trust the registry: every layer falls back, counted, the log
/// says why, containerd downloads the layers and the container runs.
fn an_untrusted_registry_falls_back(rig: &Rig, layers: &[String], ours: &Pki) {
    let image = format!("{}/t/app:v1", rig.host());
    rpull_trusting(rig, &image, &ours.ca());
    assert_eq!(counter(rig, &["remote_snapshots"]), 0);
    assert_eq!(
        counter(rig, &["fallback_reasons", "mount_failed"]),
        2,
        "{}",
        rig.snapshotter.log()
    );
    // The log says why: the mount's own verdict, passed on.
    let log = rig.snapshotter.log();
    assert!(log.to_lowercase().contains("certificate"), "{log}");
    let content = rig.ctr().ctr_ok(&["content", "ls", "-q"]);
    assert!(
        layers.iter().all(|l| content.contains(l.as_str())),
        "{content}"
    );
    assert_eq!(rig.cat(&image, "u1", "/data/two"), "two\n");
}

/// skip_verify: every layer served by regfs, none downloaded, and the container runs.
fn skip_verify_is_served_by_regfs(rig: &Rig, layers: &[String], ours: &Pki) {
    let image = format!("{}/t/app:v1", rig.host());
    rpull_trusting(rig, &image, &ours.ca());
    assert_eq!(
        counter(rig, &["remote_snapshots"]),
        2,
        "{}",
        rig.snapshotter.log()
    );
    assert_eq!(counter(rig, &["fallbacks"]), 0);
    let content = rig.ctr().ctr_ok(&["content", "ls", "-q"]);
    assert!(
        layers.iter().all(|l| !content.contains(l.as_str())),
        "{content}"
    );
    assert_eq!(rig.cat(&image, "u2", "/data/two"), "two\n");
}
