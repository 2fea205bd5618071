//! Token auth: anonymous pulls, the catalog's scope, and tokens renewed when they
//! expire or are refused.

use super::*;

/// A token-auth registry (plain http, realm on loopback) with `team/app:v1` and
/// `other/thing:v1`, pushed by skopeo through the issuer (push scopes).
pub(super) struct TokenSetup {
    _pki: Pki,
    pub(super) issuer: TokenIssuer,
    pub(super) registry: Registry,
    pub(super) image: Image,
}

impl TokenSetup {
    pub(super) fn start() -> TokenSetup {
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

    pub(super) fn secrets(&self) -> Vec<String> {
        let mut secrets = self.issuer.issued();
        secrets.push(PASSWORD.to_string());
        secrets.push(REFRESH_TOKEN.to_string());
        secrets
    }

    /// Token requests made by `account` (None: anonymous) that asked for `scope`.
    pub(super) fn asked(&self, account: Option<&str>, scope: &str) -> usize {
        self.issuer
            .requests()
            .iter()
            .filter(|r| r.account.as_deref() == account && r.scopes.iter().any(|s| s == scope))
            .count()
    }
}

/// The names at the top of the mount, sorted.
fn top_level(mount: &Mount) -> Vec<String> {
    let mut top: Vec<String> = fs::read_dir(&mount.dir)
        .expect("ls the mount")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    top
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
        umask: None,
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
    let top = top_level(&mount);
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
    let top = top_level(&mount);
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
            umask: None,
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
