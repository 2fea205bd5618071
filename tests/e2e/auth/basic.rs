//! Basic auth (htpasswd) over TLS: each credential source, refusals, and the CA.

use super::*;

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
            umask: None,
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
            umask: None,
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
            umask: None,
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
                umask: None,
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
                umask: None,
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

/// Paths under `root` (itself included) that someone other than their owner could
/// read, write or search.
fn open_to_others(root: &Path) -> (usize, Vec<String>) {
    use std::os::unix::fs::PermissionsExt;
    let (mut seen, mut open) = (0, Vec::new());
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        seen += 1;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            open.push(format!("{:o} {}", mode & 0o7777, path.display()));
        }
        if meta.is_dir() {
            let entries =
                fs::read_dir(&path).unwrap_or_else(|e| panic!("list {}: {e}", path.display()));
            todo.extend(entries.map(|e| e.expect("a directory entry").path()));
        }
    }
    (seen, open)
}

#[test]
fn a_private_registrys_content_in_the_disk_cache_is_readable_by_its_owner_only() {
    let setup = BasicTls::start();
    let empty = empty_docker_config();
    let layer = format!("team/app/blobs/{}", setup.image.layer.0);
    for umask in [0o022, 0o000] {
        let tmp = TempDir::new().expect("temp dir for a disk cache");
        let cache = tmp.path().join("cache");
        let mut input = env_credentials(&empty.path().to_string_lossy());
        input.umask = Some(umask);
        let cache_arg = cache.to_string_lossy().into_owned();
        let mount = setup
            .mount(&["--cache-dir", &cache_arg], &input)
            .unwrap_or_else(|log| panic!("mount with umask {umask:03o}: {log}"));
        assert_eq!(
            read(&mount, "team/app/tags/v1/manifest.json"),
            setup.image.manifest
        );
        assert_eq!(read(&mount, &layer), setup.image.layer.1);
        let payload = read(&mount, "team/app/tags/v1/rootfs/data/payload.bin");
        assert_eq!(payload, common::noise(300 << 10, 7));
        // Its queued disk writes are done once it has unmounted.
        assert!(mount.terminate().success());
        let (seen, open) = open_to_others(&cache);
        assert!(
            seen >= 5,
            "umask {umask:03o}: the disk cache holds only {seen} paths"
        );
        assert!(
            open.is_empty(),
            "umask {umask:03o}: the disk cache of a private registry is open to others:\n{}",
            open.join("\n")
        );
    }
}
