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
