//! Logging in, TLS and time limits, end to end: a real docker-registry with htpasswd or
//! token auth (and TLS with a CA made here), a token issuer signing real JWTs, regfs
//! mounted through the kernel, and what a user sees: files that read, or EACCES/EIO
//! with a log line that says why. No secret may appear in regfs' debug log.

use crate::common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::auth::{
    PASSWORD, Pki, REFRESH_TOKEN, TokenIssuer, USER, assert_no_secrets, credential_helper,
    docker_auth_field, docker_config, htpasswd_config, require_auth_tools,
};
use common::{Layout, Mount, MountInput, Proxy, ProxyRules, Registry, RegistryOptions};
use tempfile::TempDir;

/// An image `team/app:v1` in a layout: its manifest, config and layer bytes.
struct Image {
    layout: Layout,
    manifest: Vec<u8>,
    config: (String, Vec<u8>),
    layer: (String, Vec<u8>),
}

impl Image {
    fn build() -> Image {
        let layout = Layout::new();
        let payload = common::noise(300 << 10, 7);
        layout.new_image("v1", "amd64", &[("/data/payload.bin", &payload)]);
        let manifest = layout.blob(&layout.manifest_digest("v1"));
        let parsed: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
        let digest = |v: &serde_json::Value| v["digest"].as_str().expect("digest").to_string();
        let config = digest(&parsed["config"]);
        let layer = digest(&parsed["layers"][0]);
        Image {
            config: (config.clone(), layout.blob(&config)),
            layer: (layer.clone(), layout.blob(&layer)),
            manifest,
            layout,
        }
    }

    fn push(&self, registry: &Registry, dest: &str, creds: Option<&str>) {
        self.layout.push_as("v1", registry, dest, creds);
    }
}

fn creds() -> String {
    format!("{USER}:{PASSWORD}")
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `REGFS_USERNAME`/`REGFS_PASSWORD` for [`USER`], beside the docker config dir given.
fn env_credentials(docker_config_dir: &str) -> MountInput {
    MountInput {
        stdin: None,
        env: env(&[
            ("DOCKER_CONFIG", docker_config_dir),
            ("REGFS_USERNAME", USER),
            ("REGFS_PASSWORD", PASSWORD),
        ]),
        umask: None,
    }
}

/// A docker config dir with nothing in it, so the machine's own never leaks into a test.
fn empty_docker_config() -> TempDir {
    docker_config(&serde_json::json!({}))
}

fn errno_of(result: std::io::Result<Vec<u8>>) -> i32 {
    match result {
        Ok(bytes) => panic!(
            "read succeeded ({} bytes) where it should fail",
            bytes.len()
        ),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("no errno in {e}")),
    }
}

fn read(mount: &Mount, rel: &str) -> Vec<u8> {
    let path = mount.path(rel);
    fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}\n{}", path.display(), mount.log()))
}

mod basic;
mod faults;
mod pushes;
mod token;
