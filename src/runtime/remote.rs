//! Remote snapshots: a layer named by a Prepare's labels (labels.rs) is served from the
//! regfs mount of its registry host (host_mounts.rs) and bound, read-only, at the
//! snapshot's own short path. Whatever cannot be served this way becomes an ordinary
//! snapshot that containerd fills, counted and logged (stats.rs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use tracing::{info, warn};

use super::host_mounts::HostMounts;
use super::labels::{LABEL_TARGET, LayerRef, layer_ref, names_a_layer};
use super::overlay::Layout;
use super::stats::{Fallback, RuntimeStats};
use super::store::{Record, RemoteLayer};
use crate::mount::mountinfo::is_mount_point;
use crate::mount::unmount::is_dead;
use crate::registry::{Digest, RepoName, Tag};

/// A layer regfs serves: its directory in the host's mount.
pub struct Served {
    pub dir: PathBuf,
    pub layer: RemoteLayer,
}

pub struct Remote {
    mounts: HostMounts,
    stats: RuntimeStats,
    /// Held while a bind is looked at and made again: two Mounts calls at once would
    /// both find it gone and stack two binds.
    rebinding: std::sync::Mutex<()>,
}

/// The directory of a layer in its host's mount, as an overlayfs lower dir (whiteouts
/// as 0:0 character devices, opaque directories marked; docs/SEMANTICS.md, "Image
/// contents"). The one place that knows the path. With the image's manifest, the
/// layer is described by that manifest (media type, TOC annotations:
/// `.images/<manifest>/layers/<layer>`); without it, by whichever tagged image of the
/// repository lists it (`.layers/<layer>`).
pub fn layer_dir(mountpoint: &Path, repo: &str, manifest: Option<&str>, layer: &str) -> PathBuf {
    let repo_dir = mountpoint.join(repo);
    match manifest {
        Some(m) => repo_dir.join(".images").join(m).join("layers").join(layer),
        None => repo_dir.join(".layers").join(layer),
    }
}

/// The digest of the manifest `tag` names now, read through the mount: the bytes of
/// `tags/<tag>/manifest.json` are the manifest as served, so their SHA-256 is its digest.
fn tag_manifest(mountpoint: &Path, repo: &RepoName, tag: &Tag) -> std::io::Result<Digest> {
    let path = mountpoint
        .join(repo.as_str())
        .join("tags")
        .join(tag.as_str())
        .join("manifest.json");
    Ok(Digest::sha256_of(&std::fs::read(path)?))
}

impl Remote {
    pub fn new(mounts: HostMounts, stats: RuntimeStats) -> Remote {
        Remote {
            mounts,
            stats,
            rebinding: std::sync::Mutex::default(),
        }
    }

    /// The layer the labels of unpack `key` name, if regfs can serve it; None means an
    /// ordinary snapshot, and the reason was counted and logged.
    pub fn serve(&self, key: &str, labels: &BTreeMap<String, String>) -> Option<Served> {
        if !names_a_layer(labels) {
            let target = labels.get(LABEL_TARGET).map_or(key, String::as_str);
            self.stats.fallback(
                target,
                Fallback::NoLabels,
                "the unpack names no image layer (no containerd.io/snapshot/remote/stargz.* \
                 or containerd.io/snapshot/cri.* labels)",
            );
            return None;
        }
        let layer = match layer_ref(labels) {
            Ok(layer) => layer,
            Err(why) => {
                self.stats
                    .fallback(&format!("the unpack {key:?}"), Fallback::BadLabels, &why);
                return None;
            }
        };
        let digest = &format!("layer {}", layer.layer);
        let mountpoint = match self.mounts.ensure(&layer.host) {
            Ok(m) => m,
            Err(why) => {
                self.stats.fallback(digest, Fallback::MountFailed, &why);
                return None;
            }
        };
        let mut layer = layer;
        if layer.manifest.is_none() {
            layer.manifest = self.resolve_tag(&mountpoint, &layer);
        }
        let dir = self.dir_of(&mountpoint, &layer);
        if let Err(e) = std::fs::read_dir(&dir).and_then(|mut d| d.next().transpose()) {
            let why = match e.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => Fallback::AccessDenied,
                Some(libc::ENOENT) => Fallback::NotFound,
                _ => Fallback::Unreadable,
            };
            let detail = format!(
                "{}: {e} (the mount's log under logs/{}.log says more)",
                dir.display(),
                layer.host
            );
            self.stats.fallback(digest, why, &detail);
            return None;
        }
        Some(Served {
            dir,
            layer: RemoteLayer {
                host: layer.host,
                repo: layer.repo.as_str().to_owned(),
                layer: layer.layer.as_str().to_owned(),
                manifest: layer.manifest.map(|m| m.as_str().to_owned()),
            },
        })
    }

    /// The manifest a stargz reference's tag names (ctr-remote's labels carry the
    /// reference, not the manifest), so the layer is described by its own image.
    fn resolve_tag(&self, mountpoint: &Path, layer: &LayerRef) -> Option<Digest> {
        let tag = layer.tag.as_ref()?;
        match tag_manifest(mountpoint, &layer.repo, tag) {
            Ok(digest) => Some(digest),
            Err(e) => {
                warn!(
                    "layer {} of {}/{}:{}: cannot read the tag's manifest ({e}); the layer is \
                     described by whichever tagged image lists it",
                    layer.layer,
                    layer.host,
                    layer.repo,
                    tag.as_str()
                );
                None
            }
        }
    }

    fn dir_of(&self, mountpoint: &Path, layer: &LayerRef) -> PathBuf {
        layer_dir(
            mountpoint,
            layer.repo.as_str(),
            layer.manifest.as_ref().map(|m| m.as_str()),
            layer.layer.as_str(),
        )
    }

    /// Counts the unpack of layer `chain` whose labels name no image layer.
    pub fn unlabelled(&self, chain: &str) {
        self.stats.fallback(
            &format!("layer (chain ID) {chain}"),
            Fallback::NoLabels,
            "the unpack names no image layer (no containerd.io/snapshot/remote/stargz.* \
             or containerd.io/snapshot/cri.* labels)",
        );
    }

    /// Counts a layer committed as a remote snapshot.
    pub fn committed(&self, layer: &RemoteLayer) {
        self.stats.served();
        info!(
            "layer {} of {}/{}: served by regfs",
            layer.layer, layer.host, layer.repo
        );
    }

    /// Counts a layer whose target name is taken by a snapshot over another parent.
    pub fn name_taken(&self, target: &str, parent: &str) {
        self.stats.fallback(
            &format!("layer (chain ID) {target}"),
            Fallback::NameTaken,
            &format!("a snapshot of that name exists over another parent than {parent:?}"),
        );
    }

    /// Counts a layer that was to be served but could not be bound into its snapshot.
    pub fn bind_failed(&self, layer: &str, detail: &str) {
        self.stats
            .fallback(&format!("layer {layer}"), Fallback::BindFailed, detail);
    }

    /// Binds a remote snapshot's layer again where the bind is gone (after a reboot,
    /// the host's mount too) or dead (its host's mount process ended), one at a time.
    /// Failures are logged; the mount then fails visibly.
    pub fn ensure_bound(&self, layout: &Layout, record: &Record) {
        let Some(layer) = &record.remote else {
            return;
        };
        let fs = layout.fs(record.id);
        if is_mount_point(&fs) && !is_dead(&fs) {
            return; // the common case, without the lock
        }
        let _one_at_a_time = self
            .rebinding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if is_mount_point(&fs) {
            if !is_dead(&fs) {
                return;
            }
            // Its host's mount process died: bind the new mount's directory instead.
            unbind(&fs);
        }
        let bound = self.mounts.ensure(&layer.host).and_then(|mountpoint| {
            let dir = layer_dir(
                &mountpoint,
                &layer.repo,
                layer.manifest.as_deref(),
                &layer.layer,
            );
            bind(&dir, &fs).map_err(|e| e.to_string())
        });
        match bound {
            Ok(()) => info!("layer {}: bound again at {}", layer.layer, fs.display()),
            Err(e) => warn!(
                "layer {}: cannot bind it at {}: {e}",
                layer.layer,
                fs.display()
            ),
        }
    }
}

/// Binds `dir` read-only at `target`.
pub fn bind(dir: &Path, target: &Path) -> std::io::Result<()> {
    let none: Option<&str> = None;
    mount(Some(dir), target, none, MsFlags::MS_BIND, none)?;
    let readonly = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Err(e) = mount(none, target, none, readonly, none) {
        let _ = umount2(target, MntFlags::MNT_DETACH);
        return Err(e.into());
    }
    Ok(())
}

/// Takes a remote snapshot's bind away (lazily: a container may still hold it).
pub fn unbind(target: &Path) {
    if is_mount_point(target) {
        if let Err(e) = umount2(target, MntFlags::MNT_DETACH) {
            warn!("cannot unmount {}: {e}", target.display());
        }
    }
}
