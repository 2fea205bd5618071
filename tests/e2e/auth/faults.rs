//! Credentials never follow a blob redirect; retries survive 503 and 429; a registry
//! that stays down fails reads within `--timeout`.

use super::*;

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
            umask: None,
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
