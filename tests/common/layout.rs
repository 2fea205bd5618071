//! Images built the way users build them: an OCI image layout where `umoci` makes images
//! by tag and `skopeo` pushes them (digests unchanged), plus hand-made indexes for the
//! cases these tools cannot make; and [`Layer`]s, images of one layer of noise.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use super::registry::Registry;
use super::registry::api::{get_blob, get_manifest, split_reference};
use super::{Mount, OCI_INDEX, noise, run, run_bytes, sha256_digest};

/// An OCI image layout in a temp dir, where tests build images by tag.
pub struct Layout {
    dir: TempDir,
}

impl Layout {
    pub fn new() -> Layout {
        let dir = tempfile::Builder::new()
            .prefix("regfs-layout-")
            .tempdir()
            .expect("create temp dir for an OCI layout");
        let layout = Layout { dir };
        run(Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(layout.oci_dir()));
        layout
    }

    /// The layout directory (index.json, blobs/).
    pub fn oci_dir(&self) -> PathBuf {
        self.dir.path().join("oci")
    }

    /// A path inside the layout's temp dir (not created), for bundles and such.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.oci_dir().display())
    }

    /// Builds a linux/`arch` image with one layer holding `files` (path in the rootfs, content),
    /// tagged `tag` in the layout.
    pub fn new_image(&self, tag: &str, arch: &str, files: &[(&str, &[u8])]) {
        let image = self.image(tag);
        let bundle = self.dir.path().join(format!("bundle-{tag}"));
        run(Command::new("umoci").args(["new", "--image", &image]));
        run(Command::new("umoci")
            .args(["unpack", "--rootless", "--image", &image])
            .arg(&bundle));
        let rootfs = bundle.join("rootfs");
        for (path, content) in files {
            let target = rootfs.join(path.trim_start_matches('/'));
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)
                    .unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
            }
            fs::write(&target, content)
                .unwrap_or_else(|e| panic!("write {}: {e}", target.display()));
        }
        run(Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle));
        self.set_platform(tag, arch);
        fs::remove_dir_all(&bundle).unwrap_or_else(|e| panic!("remove {}: {e}", bundle.display()));
    }

    /// Makes `tag` a linux/`arch` image. Without --tag, umoci config writes a new
    /// manifest and moves `tag` onto it.
    pub fn set_platform(&self, tag: &str, arch: &str) {
        let image = self.image(tag);
        run(Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--os",
            "linux",
            "--architecture",
            arch,
        ]));
    }

    /// The descriptor (JSON) of the manifest that `tag` names in index.json.
    pub fn descriptor(&self, tag: &str) -> serde_json::Value {
        let index = self.index_json();
        index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "tag {tag} not in {}",
                    self.oci_dir().join("index.json").display()
                )
            })
    }

    /// Digest of the manifest (or index) that `tag` names.
    pub fn manifest_digest(&self, tag: &str) -> String {
        self.descriptor(tag)["digest"]
            .as_str()
            .expect("descriptor digest is a string")
            .to_string()
    }

    /// Bytes of a blob in the layout.
    pub fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let path = self.oci_dir().join("blobs/sha256").join(hex);
        fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn index_json(&self) -> serde_json::Value {
        let path = self.oci_dir().join("index.json");
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
    }

    /// Pushes `tag` of the layout to `registry` as `dest` ("team/app:v1"), digests unchanged.
    pub fn push(&self, tag: &str, registry: &Registry, dest: &str) {
        self.push_as(tag, registry, dest, None);
    }

    /// [`Layout::push`] with `user:password` credentials (`--dest-creds`).
    pub fn push_as(&self, tag: &str, registry: &Registry, dest: &str, creds: Option<&str>) {
        let mut options = vec!["--preserve-digests", "--dest-tls-verify=false"];
        if let Some(creds) = creds {
            options.extend(["--dest-creds", creds]);
        }
        skopeo_copy(
            &options,
            &format!("oci:{}", self.image(tag)),
            &format!("docker://{}/{dest}", registry.addr),
        );
    }

    /// Writes an OCI image index over the images tagged `tags` (platforms read from their
    /// configs) into the layout as `index_tag`; returns its digest.
    pub fn add_index(&self, index_tag: &str, tags: &[&str]) -> String {
        self.add_index_with(index_tag, tags, &serde_json::Value::Null)
    }

    /// [`Layout::add_index`] with `annotations` (a JSON object; null for none) on the index,
    /// e.g. to give it another digest.
    pub fn add_index_with(
        &self,
        index_tag: &str,
        tags: &[&str],
        annotations: &serde_json::Value,
    ) -> String {
        let manifests: Vec<serde_json::Value> = tags
            .iter()
            .map(|tag| {
                let desc = self.descriptor(tag);
                let digest = desc["digest"].as_str().expect("descriptor digest");
                let manifest: serde_json::Value =
                    serde_json::from_slice(&self.blob(digest)).expect("manifest blob is JSON");
                let config_digest = manifest["config"]["digest"]
                    .as_str()
                    .expect("config digest");
                let config: serde_json::Value =
                    serde_json::from_slice(&self.blob(config_digest)).expect("config blob is JSON");
                serde_json::json!({
                    "mediaType": desc["mediaType"],
                    "digest": desc["digest"],
                    "size": desc["size"],
                    "platform": { "architecture": config["architecture"], "os": config["os"] },
                })
            })
            .collect();
        let mut index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        if !annotations.is_null() {
            index["annotations"] = annotations.clone();
        }
        let bytes = serde_json::to_vec(&index).expect("serialize index");
        let digest = self.write_blob(&bytes);
        self.set_ref(index_tag, OCI_INDEX, &digest, bytes.len());
        digest
    }

    /// Stores bytes as a blob of the layout; returns the digest.
    pub fn write_blob(&self, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let path = self
            .oci_dir()
            .join("blobs/sha256")
            .join(&digest["sha256:".len()..]);
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        digest
    }

    /// Points ref name `tag` of index.json at a descriptor (replacing an older one).
    pub fn set_ref(&self, tag: &str, media_type: &str, digest: &str, size: usize) {
        let mut index = self.index_json();
        let manifests = index["manifests"]
            .as_array_mut()
            .expect("index.json has manifests");
        manifests.retain(|d| d["annotations"]["org.opencontainers.image.ref.name"] != tag);
        manifests.push(serde_json::json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }));
        let path = self.oci_dir().join("index.json");
        let bytes = serde_json::to_vec(&index).expect("serialize index.json");
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Pushes a multi-arch index over the images tagged `tags` as `dest` ("team/app:multi").
    /// The children are pushed by digest only (untagged). Returns the index digest.
    pub fn push_index(&self, tags: &[&str], registry: &Registry, dest: &str) -> String {
        self.push_index_with(tags, registry, dest, &serde_json::Value::Null)
    }

    /// [`Layout::push_index`] with `annotations` on the index (see [`Layout::add_index_with`]).
    pub fn push_index_with(
        &self,
        tags: &[&str],
        registry: &Registry,
        dest: &str,
        annotations: &serde_json::Value,
    ) -> String {
        let index_tag = format!(
            "index-{}",
            dest.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "-")
        );
        let digest = self.add_index_with(&index_tag, tags, annotations);
        self.push(&index_tag, registry, dest);
        // skopeo must not have converted it: the registry serves our exact bytes as an index.
        let (repo, reference) = split_reference(dest);
        let (served, media_type, _) = get_manifest(registry, repo, reference);
        assert_eq!(media_type, OCI_INDEX, "{dest} did not land as an OCI index");
        assert_eq!(served, digest, "{dest} was pushed with another digest");
        digest
    }
}

impl Default for Layout {
    fn default() -> Self {
        Layout::new()
    }
}

/// `skopeo inspect --raw docker://<addr>/<reference>`: the manifest bytes as skopeo gets them.
pub fn skopeo_raw_manifest(addr: SocketAddr, reference: &str) -> Vec<u8> {
    run_bytes(Command::new("skopeo").args([
        "--command-timeout",
        "60s",
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{addr}/{reference}"),
    ]))
}

/// `skopeo copy --all [options] src dest`; panics if skopeo fails.
pub fn skopeo_copy(options: &[&str], src: &str, dest: &str) {
    run(Command::new("skopeo")
        .args([
            // The policy is irrelevant here; this also works without /etc/containers/policy.json.
            "--insecure-policy",
            "--command-timeout",
            "120s",
            "copy",
            "--quiet",
            "--all",
        ])
        .args(options)
        .args([src, dest]));
}

/// `skopeo copy --all docker://<addr>/<reference> oci:<dir>:<tag>` (panics if skopeo fails).
pub fn skopeo_copy_to_oci(addr: SocketAddr, reference: &str, dir: &Path, tag: &str) {
    skopeo_copy(
        &["--src-tls-verify=false"],
        &format!("docker://{addr}/{reference}"),
        &format!("oci:{}:{tag}", dir.display()),
    );
}

/// A layer blob in the registry, with its bytes as the registry serves them.
pub struct Layer {
    pub repo: String,
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Layer {
    pub fn path(&self, mnt: &Mount) -> PathBuf {
        mnt.path(&format!("{}/blobs/{}", self.repo, self.digest))
    }

    /// Reads the whole blob through the mount and checks the bytes.
    pub fn read_through(&self, mnt: &Mount) {
        let got = fs::read(self.path(mnt)).expect("read blob through the mount");
        assert!(
            got == self.bytes,
            "{}: wrong bytes through the mount",
            self.digest
        );
    }
}

/// Pushes one image per `(repo, size, seed)` whose only layer holds that much noise.
pub fn layers(registry: &Registry, specs: &[(&str, usize, u32)]) -> Vec<Layer> {
    let layout = Layout::new();
    specs
        .iter()
        .map(|&(repo, size, seed)| {
            let tag = format!("img{seed}");
            layout.new_image(&tag, "amd64", &[("noise.bin", &noise(size, seed))]);
            layout.push(&tag, registry, &format!("{repo}:v1"));
            let (_, _, manifest) = get_manifest(registry, repo, "v1");
            let json: serde_json::Value = serde_json::from_slice(&manifest).expect("JSON");
            let digest = json["layers"][0]["digest"]
                .as_str()
                .expect("digest")
                .to_owned();
            let bytes = get_blob(registry, repo, &digest);
            Layer {
                repo: repo.to_owned(),
                digest,
                bytes,
            }
        })
        .collect()
}
