//! Pushes through a token-auth mount: anonymous ones refused, and with credentials a
//! blob, a manifest by tag and a cross-repository `ln`, each with the scope it needs.

use super::token::TokenSetup;
use super::*;

/// Runs `program args…`; (success, stderr).
fn run_tool(program: &str, args: &[&Path]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `cp src dst`, panicking with the mount log when it fails.
fn cp(mount: &Mount, src: &Path, rel: &str) {
    let dst = mount.path(rel);
    let (ok, stderr) = run_tool("cp", &[src, &dst]);
    assert!(
        ok,
        "cp {} {}: {stderr}\n{}",
        src.display(),
        dst.display(),
        mount.log()
    );
}

impl TokenSetup {
    /// A GET straight to the registry with an anonymous (pull) token for `repo`: what
    /// the registry itself holds, whatever regfs may have cached.
    fn registry_get(&self, repo: &str, path: &str, accept: &str) -> common::Response {
        let token_path = format!(
            "/token?service={}&scope=repository:{repo}:pull",
            common::auth::SERVICE
        );
        let answer = common::http(self.issuer.addr, "GET", &token_path, &[], &[]);
        assert_eq!(answer.status, 200, "token for {repo}: {}", answer.text());
        let token: serde_json::Value = serde_json::from_slice(&answer.body).expect("token JSON");
        let bearer = format!("Bearer {}", token["token"].as_str().expect("a token"));
        common::http(
            self.registry.addr,
            "GET",
            &format!("/v2/{repo}/{path}"),
            &[("Authorization", &bearer), ("Accept", accept)],
            &[],
        )
    }
}

#[test]
fn pushes_through_the_mount_get_push_scope() {
    let setup = TokenSetup::start();
    let empty = empty_docker_config();
    let empty_dir = empty.path().display().to_string();
    let local = TempDir::new().expect("temp dir for files to copy");
    anonymous_pushes_are_refused(&setup, local.path(), &empty_dir);

    // With credentials: push scopes are granted.
    let mount = Mount::start_with(&setup.registry.url(), &["-v"], &env_credentials(&empty_dir))
        .unwrap_or_else(|log| panic!("mount with credentials: {log}"));
    let (layer, layer_digest) = a_blob_through_uploads(&setup, &mount, local.path());
    a_manifest_by_tag(&setup, &mount, local.path(), &layer, &layer_digest);
    ln_across_repositories(&setup, &mount, &layer, &layer_digest);

    assert_no_secrets(&mount.log(), &setup.secrets());
}

/// Anonymous first: the issuer grants only pull, so the upload is refused.
fn anonymous_pushes_are_refused(setup: &TokenSetup, local: &Path, empty_dir: &str) {
    let refused = common::noise(40 << 10, 23);
    let refused_digest = common::sha256_digest(&refused);
    let refused_file = local.join("refused.bin");
    fs::write(&refused_file, &refused).expect("write refused.bin");
    let mount = Mount::start_with(
        &setup.registry.url(),
        &["-v", "--repo", "team/app"],
        &MountInput {
            stdin: None,
            env: env(&[("DOCKER_CONFIG", empty_dir)]),
            umask: None,
        },
    )
    .unwrap_or_else(|log| panic!("anonymous mount: {log}"));
    let (ok, stderr) = run_tool(
        "cp",
        &[&refused_file, &mount.path("team/app/uploads/refused.bin")],
    );
    assert!(
        !ok,
        "an anonymous cp into uploads/ succeeded:\n{}",
        mount.log()
    );
    assert!(
        stderr.contains("Permission denied") || stderr.contains("Input/output error"),
        "cp should fail with EACCES or EIO: {stderr}\n{}",
        mount.log()
    );
    // One line names the refused upload and the credential source (the catalog's
    // refusal says the same about itself, so both are looked for on one line).
    let log = mount.log();
    assert!(
        log.lines().any(|line| line.contains("access denied")
            && line.contains("POST /v2/team/app/blobs/uploads/")
            && line.contains("no credentials (no --username")),
        "the log should say the upload was refused and that no credentials were found:\n{log}"
    );
    assert_no_secrets(&log, &setup.secrets());
    assert!(
        setup.asked(None, "repository:team/app:pull,push") >= 1,
        "regfs did not ask for the push scope: {:?}",
        setup.issuer.requests()
    );
    mount.terminate();
    assert_eq!(
        setup
            .registry_get("team/app", &format!("blobs/{refused_digest}"), "*/*")
            .status,
        404,
        "a refused upload committed nothing"
    );
}

/// A blob through uploads/: committed at close, then a symlink to the blob. The
/// blob's bytes and digest.
fn a_blob_through_uploads(setup: &TokenSetup, mount: &Mount, local: &Path) -> (Vec<u8>, String) {
    let layer = common::noise(200 << 10, 31);
    let layer_digest = common::sha256_digest(&layer);
    let layer_file = local.join("layer.tar");
    fs::write(&layer_file, &layer).expect("write layer.tar");
    cp(mount, &layer_file, "team/app/uploads/layer.tar");
    let link = mount.path("team/app/uploads/layer.tar");
    assert_eq!(
        fs::read_link(&link).unwrap_or_else(|e| panic!(
            "readlink {}: {e}\n{}",
            link.display(),
            mount.log()
        )),
        Path::new(&format!("../blobs/{layer_digest}")),
    );
    assert!(
        setup.asked(Some(USER), "repository:team/app:pull,push") >= 1,
        "no push-scope token for the account: {:?}",
        setup.issuer.requests()
    );
    let served = setup.registry_get("team/app", &format!("blobs/{layer_digest}"), "*/*");
    assert_eq!(served.status, 200, "the registry serves the uploaded blob");
    assert!(
        served.body == layer,
        "the registry's blob is the bytes copied"
    );
    assert!(
        read(mount, &format!("team/app/blobs/{layer_digest}")) == layer,
        "the blob reads back through the mount"
    );
    (layer, layer_digest)
}

/// A manifest by tag, referencing that layer and a config uploaded the same way.
fn a_manifest_by_tag(
    setup: &TokenSetup,
    mount: &Mount,
    local: &Path,
    layer: &[u8],
    layer_digest: &str,
) {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .expect("config JSON");
    let config_digest = common::sha256_digest(&config);
    let config_file = local.join("config.json");
    fs::write(&config_file, &config).expect("write config.json");
    cp(mount, &config_file, "team/app/uploads/config.json");
    let media_type = "application/vnd.oci.image.manifest.v1+json";
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .expect("manifest JSON");
    let manifest_file = local.join("manifest.json");
    fs::write(&manifest_file, &manifest).expect("write manifest.json");
    let tag_dir = mount.path("team/app/tags/pushed");
    fs::create_dir(&tag_dir)
        .unwrap_or_else(|e| panic!("mkdir {}: {e}\n{}", tag_dir.display(), mount.log()));
    cp(mount, &manifest_file, "team/app/tags/pushed/manifest.json");
    let served = setup.registry_get("team/app", "manifests/pushed", media_type);
    assert_eq!(served.status, 200, "the registry serves the pushed tag");
    assert_eq!(
        served.body, manifest,
        "the registry's manifest is the bytes copied"
    );
    let tags: Vec<String> = fs::read_dir(mount.path("team/app/tags"))
        .expect("ls tags")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        tags.iter().any(|t| t == "pushed") && tags.iter().any(|t| t == "v1"),
        "the new tag shows beside v1: {tags:?}"
    );
    assert_eq!(read(mount, "team/app/tags/pushed/manifest.json"), manifest);
}

/// ln across repositories: a blob mount, which needs pull on the source and push on
/// the target in one token (docker-registry answers 401 to a token without the source's
/// pull). It must be mounted, not declined and copied.
fn ln_across_repositories(setup: &TokenSetup, mount: &Mount, layer: &[u8], layer_digest: &str) {
    assert_eq!(
        setup
            .registry_get("other/thing", &format!("blobs/{layer_digest}"), "*/*")
            .status,
        404,
        "the target repository does not have the blob yet"
    );
    let (src, dst) = (
        mount.path(&format!("team/app/blobs/{layer_digest}")),
        mount.path(&format!("other/thing/blobs/{layer_digest}")),
    );
    let (ok, stderr) = run_tool("ln", &[&src, &dst]);
    assert!(
        ok,
        "ln {} {}: {stderr}\n{}",
        src.display(),
        dst.display(),
        mount.log()
    );
    let both = setup.issuer.requests().iter().any(|r| {
        r.account.as_deref() == Some(USER)
            && r.scopes
                .iter()
                .any(|s| s == "repository:other/thing:pull,push")
            && r.scopes.iter().any(|s| s == "repository:team/app:pull")
    });
    assert!(
        both,
        "no token asked for push on other/thing and pull on team/app together: {:?}",
        setup.issuer.requests()
    );
    let log = mount.log();
    assert!(
        !log.contains("declined the mount")
            && log
                .lines()
                .any(|line| line.contains("blob mounted") && line.contains("from=team/app")),
        "the registry should have mounted the blob, not declined it:\n{log}"
    );
    let served = setup.registry_get("other/thing", &format!("blobs/{layer_digest}"), "*/*");
    assert_eq!(served.status, 200, "the target repository serves the blob");
    assert!(served.body == layer, "the mounted blob is the same bytes");
}
