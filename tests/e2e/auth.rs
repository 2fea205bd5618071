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

/// An htpasswd registry behind TLS with `team/app:v1` pushed to it.
struct BasicTls {
    pki: Pki,
    _auth_dir: TempDir,
    registry: Registry,
    image: Image,
}

impl BasicTls {
    fn start() -> BasicTls {
        require_auth_tools();
        let pki = Pki::new();
        let auth_dir = TempDir::new().expect("temp dir for htpasswd");
        let registry = Registry::start_with(&RegistryOptions {
            extra_config: htpasswd_config(auth_dir.path()),
            tls: Some(pki.server()),
            ..RegistryOptions::default()
        });
        let image = Image::build();
        image.push(&registry, "team/app:v1", Some(&creds()));
        BasicTls {
            pki,
            _auth_dir: auth_dir,
            registry,
            image,
        }
    }

    fn ca_arg(&self) -> String {
        self.pki.ca().display().to_string()
    }

    fn mount(&self, extra: &[&str], input: &MountInput) -> Result<Mount, String> {
        let ca = self.ca_arg();
        let mut args = vec!["-v", "--repo", "team/app", "--ca-file", &ca];
        args.extend_from_slice(extra);
        Mount::start_with(&self.registry.url(), &args, input)
    }
}

/// Mounts with one credential source, reads the manifest, checks the log names the source
/// and holds no secret.
fn reads_with(setup: &BasicTls, extra: &[&str], input: MountInput, source: &str) -> Mount {
    let mount = setup
        .mount(extra, &input)
        .unwrap_or_else(|log| panic!("mount with {source}: {log}"));
    assert_eq!(
        read(&mount, "team/app/tags/v1/manifest.json"),
        setup.image.manifest,
        "manifest through the mount, credentials from {source}"
    );
    let log = mount.log();
    assert!(
        log.contains(&format!("registry credentials: credentials from {source}")),
        "the log should name {source}:\n{log}"
    );
    assert_no_secrets(&log, &[PASSWORD.to_string()]);
    mount
}

#[test]
fn basic_auth_over_tls_with_each_credential_source() {
    let setup = BasicTls::start();
    let host = setup.registry.addr.to_string();
    let empty = empty_docker_config();
    let empty_dir = empty.path().display().to_string();

    // 1. --username with --password-stdin.
    reads_with(
        &setup,
        &["--username", USER, "--password-stdin"],
        MountInput {
            stdin: Some(format!("{PASSWORD}\n")),
            env: env(&[("DOCKER_CONFIG", &empty_dir)]),
        },
        "--username/--password-stdin",
    )
    .terminate();

    // 2. REGFS_USERNAME / REGFS_PASSWORD.
    reads_with(
        &setup,
        &[],
        env_credentials(&empty_dir),
        "REGFS_USERNAME/REGFS_PASSWORD",
    )
    .terminate();

    // 3. docker config.json `auths`, as `docker login` writes it.
    let auths = docker_config(&serde_json::json!({
        "auths": { host.clone(): { "auth": docker_auth_field(USER, PASSWORD) } }
    }));
    let auths_dir = auths.path().display().to_string();
    reads_with(
        &setup,
        &[],
        MountInput {
            stdin: None,
            env: env(&[("DOCKER_CONFIG", &auths_dir)]),
        },
        &format!("{auths_dir}/config.json auths"),
    )
    .terminate();

    // 4. A credential helper named in `credHelpers`, found on PATH.
    let helper = credential_helper();
    let helpers = docker_config(&serde_json::json!({ "credHelpers": { host.clone(): "test" } }));
    let path = format!(
        "{}:{}",
        helper.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let helpers_dir = helpers.path().display().to_string();
    reads_with(
        &setup,
        &[],
        MountInput {
            stdin: None,
            env: env(&[("DOCKER_CONFIG", &helpers_dir), ("PATH", &path)]),
        },
        "docker-credential-test",
    )
    .terminate();
    let asked = fs::read_to_string(helper.path().join("asked")).expect("the helper was asked");
    assert_eq!(asked.trim(), host, "the helper is asked for host:port");
}

#[test]
fn refused_credentials_are_eacces_and_the_log_names_the_source() {
    let setup = BasicTls::start();
    let empty = empty_docker_config();
    let empty_dir = empty.path().display().to_string();
    let wrong = "not-the-password-42";
    let mount = setup
        .mount(
            &[],
            &MountInput {
                stdin: None,
                env: env(&[
                    ("DOCKER_CONFIG", &empty_dir),
                    ("REGFS_USERNAME", USER),
                    ("REGFS_PASSWORD", wrong),
                ]),
            },
        )
        .expect("a registry that refuses the credentials still mounts");
    let errno = errno_of(fs::read(mount.path("team/app/tags/v1/manifest.json")));
    assert_eq!(errno, libc::EACCES, "{}", mount.log());
    let log = mount.log();
    assert!(
        log.contains("access denied") && log.contains("credentials from REGFS_USERNAME"),
        "the log should say the credentials from REGFS_USERNAME were refused:\n{log}"
    );
    assert_no_secrets(&log, &[wrong.to_string(), PASSWORD.to_string()]);
    mount.terminate();

    // Without any credentials: EACCES too, and the log says none were found.
    let mount = setup
        .mount(
            &[],
            &MountInput {
                stdin: None,
                env: env(&[("DOCKER_CONFIG", &empty_dir)]),
            },
        )
        .expect("mount without credentials");
    let errno = errno_of(fs::read(mount.path("team/app/tags/v1/manifest.json")));
    assert_eq!(errno, libc::EACCES, "{}", mount.log());
    assert!(
        mount
            .log()
            .contains("no credentials (no --username, no REGFS_USERNAME"),
        "{}",
        mount.log()
    );
}

#[test]
fn tls_needs_the_ca_unless_insecure() {
    let setup = BasicTls::start();
    let empty = empty_docker_config();
    let empty_dir = empty.path().display().to_string();
    let input = env_credentials(&empty_dir);
    // Without --ca-file the mount fails and says it is the certificate.
    let failure = match Mount::start_with(&setup.registry.url(), &["--repo", "team/app"], &input) {
        Ok(mount) => panic!("mounted without trusting the CA:\n{}", mount.log()),
        Err(failure) => failure,
    };
    assert!(
        failure.contains("certificate") && failure.contains("--ca-file"),
        "the failure should name the certificate problem and --ca-file:\n{failure}"
    );
    assert_no_secrets(&failure, &[PASSWORD.to_string()]);

    // --insecure: works, with a warning.
    let mount = Mount::start_with(
        &setup.registry.url(),
        &["--repo", "team/app", "--insecure"],
        &input,
    )
    .unwrap_or_else(|log| panic!("--insecure mount: {log}"));
    assert_eq!(
        read(&mount, "team/app/tags/v1/manifest.json"),
        setup.image.manifest
    );
    assert!(
        mount.log().contains("--insecure"),
        "a warning: {}",
        mount.log()
    );
}

/// A token-auth registry (plain http, realm on loopback) with `team/app:v1` and
/// `other/thing:v1`, pushed by skopeo through the issuer (push scopes).
struct TokenSetup {
    _pki: Pki,
    issuer: TokenIssuer,
    registry: Registry,
    image: Image,
}

impl TokenSetup {
    fn start() -> TokenSetup {
        require_auth_tools();
        let pki = Pki::new();
        let issuer = TokenIssuer::start(&pki);
        let registry = Registry::start_with(&RegistryOptions {
            extra_config: issuer.registry_config(&pki),
            ..RegistryOptions::default()
        });
        let image = Image::build();
        image.push(&registry, "team/app:v1", Some(&creds()));
        image.push(&registry, "other/thing:v1", Some(&creds()));
        TokenSetup {
            _pki: pki,
            issuer,
            registry,
            image,
        }
    }

    fn secrets(&self) -> Vec<String> {
        let mut secrets = self.issuer.issued();
        secrets.push(PASSWORD.to_string());
        secrets.push(REFRESH_TOKEN.to_string());
        secrets
    }

    /// Token requests made by `account` (None: anonymous) that asked for `scope`.
    fn asked(&self, account: Option<&str>, scope: &str) -> usize {
        self.issuer
            .requests()
            .iter()
            .filter(|r| r.account.as_deref() == account && r.scopes.iter().any(|s| s == scope))
            .count()
    }
}

#[test]
fn token_auth_anonymous_pull_and_catalog_scope() {
    let setup = TokenSetup::start();
    let empty = empty_docker_config();
    let empty_dir = empty.path().display().to_string();
    let (config_digest, config) = &setup.image.config;

    // Anonymous: pull works; the catalog is refused, so only --repo shows.
    let anonymous = MountInput {
        stdin: None,
        env: env(&[("DOCKER_CONFIG", &empty_dir)]),
    };
    let mount = Mount::start_with(
        &setup.registry.url(),
        &["-v", "--repo", "team/app"],
        &anonymous,
    )
    .unwrap_or_else(|log| panic!("anonymous mount: {log}"));
    assert_eq!(
        read(&mount, "team/app/tags/v1/manifest.json"),
        setup.image.manifest
    );
    assert_eq!(
        &read(&mount, &format!("team/app/blobs/{config_digest}")),
        config
    );
    assert!(setup.asked(None, "repository:team/app:pull") >= 1);
    let top: Vec<String> = fs::read_dir(&mount.dir)
        .expect("ls the mount")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        top,
        ["team"],
        "anonymous: the catalog is refused, only --repo shows"
    );
    assert!(setup.asked(None, "registry:catalog:*") >= 1);
    assert_no_secrets(&mount.log(), &setup.secrets());
    mount.terminate();

    // With credentials: the catalog scope is granted and lists both repositories.
    let mount = Mount::start_with(&setup.registry.url(), &["-v"], &env_credentials(&empty_dir))
        .unwrap_or_else(|log| panic!("mount with credentials: {log}"));
    let mut top: Vec<String> = fs::read_dir(&mount.dir)
        .expect("ls the mount")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["other", "team"], "{}", mount.log());
    assert!(setup.asked(Some(USER), "registry:catalog:*") >= 1);
    assert_eq!(
        read(&mount, "other/thing/tags/v1/manifest.json"),
        setup.image.manifest
    );
    assert_no_secrets(&mount.log(), &setup.secrets());
    mount.terminate();

    // A docker `identitytoken` is exchanged with the OAuth2 refresh grant (POST).
    let host = setup.registry.addr.to_string();
    let identity = docker_config(&serde_json::json!({
        "auths": { host: { "identitytoken": REFRESH_TOKEN } }
    }));
    let identity_dir = identity.path().display().to_string();
    let posts_before = setup
        .issuer
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    let mount = Mount::start_with(
        &setup.registry.url(),
        &["-v"],
        &MountInput {
            stdin: None,
            env: env(&[("DOCKER_CONFIG", &identity_dir)]),
        },
    )
    .unwrap_or_else(|log| panic!("mount with an identity token: {log}"));
    assert!(mount.path("other/thing").is_dir(), "{}", mount.log());
    let posts = setup
        .issuer
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert!(posts > posts_before, "no OAuth2 POST to the token endpoint");
    assert_no_secrets(&mount.log(), &setup.secrets());
}

#[test]
fn tokens_are_renewed_when_they_expire_and_when_refused() {
    let setup = TokenSetup::start();
    let empty = empty_docker_config();
    let empty_dir = empty.path().display().to_string();
    let input = env_credentials(&empty_dir);
    let scope = "repository:team/app:pull";
    let (config_digest, config) = &setup.image.config;
    let (layer_digest, layer) = &setup.image.layer;

    // Tokens said to live 1 s: the next read after that gets a fresh one.
    setup.issuer.set_lifetimes(1, 0);
    let mount = Mount::start_with(&setup.registry.url(), &["-v", "--repo", "team/app"], &input)
        .unwrap_or_else(|log| panic!("mount: {log}"));
    assert_eq!(
        read(&mount, "team/app/tags/v1/manifest.json"),
        setup.image.manifest
    );
    let first = setup.asked(Some(USER), scope);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        &read(&mount, &format!("team/app/blobs/{config_digest}")),
        config
    );
    assert!(
        setup.asked(Some(USER), scope) > first,
        "no new token after expires_in"
    );

    // Tokens said to live 5 min that the registry refuses after 3 s: the 401 gets a
    // new token and the read still succeeds.
    setup.issuer.set_lifetimes(300, 3);
    let mount2 = Mount::start_with(&setup.registry.url(), &["-v", "--repo", "team/app"], &input)
        .unwrap_or_else(|log| panic!("mount: {log}"));
    assert_eq!(
        read(&mount2, "team/app/tags/v1/manifest.json"),
        setup.image.manifest
    );
    let before = setup.asked(Some(USER), scope);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        &read(&mount2, &format!("team/app/blobs/{layer_digest}")),
        layer
    );
    assert!(
        setup.asked(Some(USER), scope) > before,
        "the refused token was not renewed"
    );
    assert!(
        mount2.log().contains("had_credentials=true"),
        "the registry should have refused the old token once:\n{}",
        mount2.log()
    );
    let mut secrets = setup.secrets();
    secrets.retain(|s| !s.is_empty());
    assert_no_secrets(&mount.log(), &secrets);
    assert_no_secrets(&mount2.log(), &secrets);
}

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

    // Anonymous first: the issuer grants only pull, so the upload is refused.
    let refused = common::noise(40 << 10, 23);
    let refused_digest = common::sha256_digest(&refused);
    let refused_file = local.path().join("refused.bin");
    fs::write(&refused_file, &refused).expect("write refused.bin");
    let mount = Mount::start_with(
        &setup.registry.url(),
        &["-v", "--repo", "team/app"],
        &MountInput {
            stdin: None,
            env: env(&[("DOCKER_CONFIG", &empty_dir)]),
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

    // With credentials: push scopes are granted.
    let mount = Mount::start_with(&setup.registry.url(), &["-v"], &env_credentials(&empty_dir))
        .unwrap_or_else(|log| panic!("mount with credentials: {log}"));

    // 1. A blob through uploads/: committed at close, then a symlink to the blob.
    let layer = common::noise(200 << 10, 31);
    let layer_digest = common::sha256_digest(&layer);
    let layer_file = local.path().join("layer.tar");
    fs::write(&layer_file, &layer).expect("write layer.tar");
    cp(&mount, &layer_file, "team/app/uploads/layer.tar");
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
        read(&mount, &format!("team/app/blobs/{layer_digest}")) == layer,
        "the blob reads back through the mount"
    );

    // 2. A manifest by tag, referencing that layer and a config uploaded the same way.
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .expect("config JSON");
    let config_digest = common::sha256_digest(&config);
    let config_file = local.path().join("config.json");
    fs::write(&config_file, &config).expect("write config.json");
    cp(&mount, &config_file, "team/app/uploads/config.json");
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
    let manifest_file = local.path().join("manifest.json");
    fs::write(&manifest_file, &manifest).expect("write manifest.json");
    let tag_dir = mount.path("team/app/tags/pushed");
    fs::create_dir(&tag_dir)
        .unwrap_or_else(|e| panic!("mkdir {}: {e}\n{}", tag_dir.display(), mount.log()));
    cp(&mount, &manifest_file, "team/app/tags/pushed/manifest.json");
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
    assert_eq!(read(&mount, "team/app/tags/pushed/manifest.json"), manifest);

    // 3. ln across repositories: a blob mount, which needs pull on the source and push on
    // the target in one token (docker-registry answers 401 to a token without the source's
    // pull). It must be mounted, not declined and copied.
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

    assert_no_secrets(&mount.log(), &setup.secrets());
}

#[test]
fn blob_redirects_carry_no_credentials() {
    require_auth_tools();
    let auth_dir = TempDir::new().expect("temp dir for htpasswd");
    let registry = Registry::start_with(&RegistryOptions {
        extra_config: htpasswd_config(auth_dir.path()),
        ..RegistryOptions::default()
    });
    let image = Image::build();
    image.push(&registry, "team/app:v1", Some(&creds()));
    // "Object storage": another host serving the same blobs without registry auth.
    let open_registry = Registry::start_with(&RegistryOptions {
        storage: Some(registry.storage_dir()),
        ..RegistryOptions::default()
    });
    let storage = Proxy::start_on("127.0.0.2", open_registry.addr, ProxyRules::default());
    let front = Proxy::start(
        registry.addr,
        ProxyRules {
            redirect_blob_gets_to: Some(storage.url()),
            ..ProxyRules::default()
        },
    );
    let empty = empty_docker_config();
    let mount = Mount::start_with(
        &front.url(),
        &["-v", "--repo", "team/app"],
        &MountInput {
            stdin: None,
            env: env(&[
                ("DOCKER_CONFIG", &empty.path().display().to_string()),
                ("REGFS_USERNAME", USER),
                ("REGFS_PASSWORD", PASSWORD),
            ]),
        },
    )
    .unwrap_or_else(|log| panic!("mount: {log}"));
    let (layer_digest, layer) = &image.layer;
    assert_eq!(
        &read(&mount, &format!("team/app/blobs/{layer_digest}")),
        layer
    );
    assert!(
        storage.requests_matching("GET /v2/team/app/blobs/") > 0,
        "the read did not go to the redirect target"
    );
    assert!(
        front.requests_with_authorization() > 0,
        "the registry itself got credentials"
    );
    assert_eq!(
        storage.requests_with_authorization(),
        0,
        "credentials went to the redirect target"
    );
    assert_no_secrets(&mount.log(), &[PASSWORD.to_string()]);
}

#[test]
fn retries_survive_503_and_429_with_retry_after() {
    common::require_tools();
    let registry = Registry::start();
    let image = Image::build();
    image.push(&registry, "team/app:v1", None);
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            fail_blob_gets: 2,
            throttle_blob_gets: 1,
            ..ProxyRules::default()
        },
    );
    let mount = Mount::start(&proxy.url(), &["--repo", "team/app"]);
    let (layer_digest, layer) = &image.layer;
    assert_eq!(
        &read(&mount, &format!("team/app/blobs/{layer_digest}")),
        layer
    );
    assert_eq!(proxy.faults_left(), 0, "every fault was served");
    let retries = mount.stats()["retries"].as_u64().unwrap_or_default();
    assert!(retries >= 3, "retries counted: {}", mount.stats());
}

fn timed_read(path: &Path) -> (std::io::Result<Vec<u8>>, Duration) {
    let start = Instant::now();
    let result = fs::read(path);
    (result, start.elapsed())
}

#[test]
fn a_registry_that_stays_down_fails_reads_with_eio_within_timeout() {
    common::require_tools();
    let registry = Registry::start();
    let image = Image::build();
    image.push(&registry, "team/app:v1", None);
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            stall_blob_gets: true,
            ..ProxyRules::default()
        },
    );
    let mount = Mount::start(&proxy.url(), &["--repo", "team/app", "--timeout", "2s"]);
    // Metadata first (manifest, sizes), while the registry still answers those.
    let (layer_digest, _) = &image.layer;
    let (config_digest, _) = &image.config;
    let layer_path = mount.path(&format!("team/app/blobs/{layer_digest}"));
    let config_path = mount.path(&format!("team/app/blobs/{config_digest}"));
    assert!(layer_path.is_file() && config_path.is_file());

    // A registry that never answers: the proxy holds blob GETs for 60 s.
    let (result, took) = timed_read(&layer_path);
    assert_eq!(errno_of(result), libc::EIO, "{}", mount.log());
    assert!(
        took < Duration::from_secs(30),
        "the read took {took:?}, not bounded by --timeout 2s"
    );
    assert!(mount.log().contains("--timeout"), "{}", mount.log());

    // A registry that is gone: every request fails; EIO within the time limit too.
    proxy.set_stall_blob_gets(false);
    drop(registry);
    let (result, took) = timed_read(&config_path);
    assert_eq!(errno_of(result), libc::EIO, "{}", mount.log());
    assert!(took < Duration::from_secs(30), "the read took {took:?}");
}
