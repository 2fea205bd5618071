//! Authentication parts for the end-to-end tests, all real and on loopback:
//! - [`Pki`]: a CA, a server certificate for 127.0.0.1, and a token-signing certificate,
//!   made with the `openssl` CLI;
//! - [`htpasswd_config`]: a bcrypt htpasswd file (`htpasswd -B`) and its registry config;
//! - [`TokenIssuer`]: a token server (the Docker token spec, GET and OAuth2 POST) that
//!   signs RS256 JWTs the registry verifies through `rootcertbundle`;
//! - docker config.json files and a `docker-credential-test` helper script.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use tempfile::TempDir;

use super::http::{Request, Response, header, json_response, read_request, write_response};
use super::run;

pub const USER: &str = "alice";
pub const PASSWORD: &str = "s3cret-P4ssw0rd";
/// An OAuth2 refresh token the issuer accepts, as docker keeps it (`identitytoken`).
pub const REFRESH_TOKEN: &str = "refresh-9b1f2c7d";
pub const SERVICE: &str = "regfs-test-registry";
const ISSUER: &str = "regfs-test-issuer";
/// distribution accepts a token this long after its `exp` (clock skew allowance).
const REGISTRY_LEEWAY_S: i64 = 60;

/// Panics with a pointer to scripts/setup.sh unless openssl and htpasswd are present.
pub fn require_auth_tools() {
    super::require_tools();
    for tool in ["openssl", "htpasswd"] {
        assert!(
            super::find_in_path(tool).is_some(),
            "missing tool {tool}: run scripts/setup.sh (installs it with apt-get)"
        );
    }
}

/// Certificates made for one test, in a temp dir.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("regfs-pki-")
            .tempdir()
            .expect("create temp dir for certificates");
        let pki = Pki { dir };
        let p = |name: &str| pki.path(name).display().to_string();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args(["-keyout", &p("ca.key"), "-out", &p("ca.pem"), "-days", "2"])
            .args(["-subj", "/CN=regfs test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]));
        run(Command::new("openssl")
            .arg("req")
            .args(ec)
            .args(["-keyout", &p("server.key"), "-out", &p("server.csr")])
            .args(["-subj", "/CN=localhost"]));
        std::fs::write(
            pki.path("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        run(Command::new("openssl")
            .args(["x509", "-req", "-in", &p("server.csr")])
            .args([
                "-CA",
                &p("ca.pem"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
            ])
            .args(["-out", &p("server.pem"), "-days", "2"])
            .args(["-extfile", &p("server.ext")]));
        // The token signer: self-signed, named in the registry's rootcertbundle, and sent
        // in each token's x5c header.
        run(Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
            .args([
                "-keyout",
                &p("signer.key"),
                "-out",
                &p("signer.pem"),
                "-days",
                "2",
            ])
            .args(["-subj", "/CN=regfs test token signer"]));
        run(Command::new("openssl")
            .args(["x509", "-in", &p("signer.pem"), "-outform", "DER"])
            .args(["-out", &p("signer.der")]));
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// (certificate, key) for `RegistryOptions::tls`.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.path("server.pem"), self.path("server.key"))
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// An htpasswd file with [`USER`]/[`PASSWORD`] in `dir`, and the registry config using it.
pub fn htpasswd_config(dir: &Path) -> String {
    let file = dir.join("htpasswd");
    let line = run(Command::new("htpasswd").args(["-nbB", USER, PASSWORD]));
    std::fs::write(&file, line.trim()).expect("write htpasswd");
    format!(
        "auth:\n  htpasswd:\n    realm: regfs-test\n    path: {}\n",
        file.display()
    )
}

/// A docker config dir (for `DOCKER_CONFIG`) holding `config` as config.json.
pub fn docker_config(config: &serde_json::Value) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("regfs-docker-config-")
        .tempdir()
        .expect("create temp dir for a docker config");
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec(config).expect("serialize config.json"),
    )
    .expect("write config.json");
    dir
}

/// `base64(user:password)`, as `docker login` writes `auths.<host>.auth`.
pub fn docker_auth_field(user: &str, password: &str) -> String {
    STANDARD.encode(format!("{user}:{password}"))
}

/// A directory with an executable `docker-credential-test` that answers `get` with
/// [`USER`]/[`PASSWORD`] and appends each server it was asked about to `asked`.
pub fn credential_helper() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("regfs-cred-helper-")
        .tempdir()
        .expect("create temp dir for a credential helper");
    let script = dir.path().join("docker-credential-test");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             [ \"$1\" = get ] || exit 1\n\
             read -r server\n\
             echo \"$server\" >> \"$(dirname \"$0\")/asked\"\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$server\"\n"
        ),
    )
    .expect("write credential helper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .expect("chmod credential helper");
    dir
}

/// Panics if `log` contains any of `secrets`.
pub fn assert_no_secrets(log: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !log.contains(secret.as_str()),
            "the regfs log contains a secret ({}…):\n{log}",
            &secret[..secret.len().min(6)]
        );
    }
}

/// A token request the issuer saw.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// "GET" or "POST"
    pub method: String,
    /// The account it authenticated, if any.
    pub account: Option<String>,
    pub scopes: Vec<String>,
}

struct IssuerShared {
    signer_key: PathBuf,
    x5c: String,
    /// `expires_in` announced to clients.
    expires_in: AtomicU64,
    /// How long the registry will accept a token (0: an hour).
    registry_accepts_for: AtomicU64,
    issued: Mutex<Vec<String>>,
    requests: Mutex<Vec<TokenRequest>>,
    stopping: AtomicBool,
}

/// A Docker token server on loopback. [`USER`]/[`PASSWORD`] (GET with Basic, or the
/// OAuth2 password grant) and [`REFRESH_TOKEN`] (OAuth2 refresh grant) get every action
/// asked for; anonymous requests get `pull` on repositories only; other credentials 401.
pub struct TokenIssuer {
    pub addr: SocketAddr,
    shared: Arc<IssuerShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl TokenIssuer {
    pub fn start(pki: &Pki) -> TokenIssuer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the token issuer");
        let addr = listener.local_addr().expect("issuer local addr");
        let der = std::fs::read(pki.path("signer.der")).expect("read signer.der");
        let shared = Arc::new(IssuerShared {
            signer_key: pki.path("signer.key"),
            x5c: STANDARD.encode(der),
            expires_in: AtomicU64::new(300),
            registry_accepts_for: AtomicU64::new(0),
            issued: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("test-token-issuer".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if shared.stopping.load(Ordering::SeqCst) {
                            return;
                        }
                        if let Ok(stream) = stream {
                            let shared = Arc::clone(&shared);
                            thread::spawn(move || serve_token_client(&shared, stream));
                        }
                    }
                })
                .expect("spawn issuer thread")
        };
        TokenIssuer {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The registry config section for this issuer.
    pub fn registry_config(&self, pki: &Pki) -> String {
        format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    \
             issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.addr,
            pki.path("signer.pem").display()
        )
    }

    /// Tells clients tokens live `expires_in` seconds, while the registry accepts them
    /// for `registry_accepts_for` seconds (0: an hour).
    pub fn set_lifetimes(&self, expires_in: u64, registry_accepts_for: u64) {
        self.shared.expires_in.store(expires_in, Ordering::SeqCst);
        self.shared
            .registry_accepts_for
            .store(registry_accepts_for, Ordering::SeqCst);
    }

    /// Every token handed out so far.
    pub fn issued(&self) -> Vec<String> {
        self.shared.issued.lock().expect("issuer lock").clone()
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.requests.lock().expect("issuer lock").clone()
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn serve_token_client(shared: &IssuerShared, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    while let Ok(Some(request)) = read_request(&mut reader) {
        let response = token_answer(shared, &request);
        if write_response(&mut writer, &response, false, false).is_err() {
            return;
        }
    }
}

fn query_pairs(s: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(s.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn token_answer(shared: &IssuerShared, request: &Request) -> Response {
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((&request.target, ""));
    if path != "/token" {
        return json_response(404, "Not Found", b"{}");
    }
    let unauthorized = || json_response(401, "Unauthorized", br#"{"error":"bad credentials"}"#);
    let (account, scopes) = match request.method.as_str() {
        "GET" => {
            let scopes: Vec<String> = query_pairs(query)
                .into_iter()
                .filter(|(k, _)| k == "scope")
                .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
                .collect();
            let account = match header(&request.headers, "authorization") {
                None => None,
                Some(value) => {
                    let decoded = value
                        .strip_prefix("Basic ")
                        .and_then(|b| STANDARD.decode(b).ok())
                        .map(|b| String::from_utf8_lossy(&b).into_owned());
                    if decoded.as_deref() != Some(&format!("{USER}:{PASSWORD}")) {
                        return unauthorized();
                    }
                    Some(USER.to_owned())
                }
            };
            (account, scopes)
        }
        "POST" => {
            let form = query_pairs(&String::from_utf8_lossy(&request.body));
            let field = |name: &str| {
                form.iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            let ok = match field("grant_type") {
                Some("refresh_token") => field("refresh_token") == Some(REFRESH_TOKEN),
                Some("password") => {
                    field("username") == Some(USER) && field("password") == Some(PASSWORD)
                }
                _ => false,
            };
            if !ok {
                return unauthorized();
            }
            let scopes = field("scope")
                .unwrap_or("")
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            (Some(USER.to_owned()), scopes)
        }
        _ => return json_response(405, "Method Not Allowed", b"{}"),
    };
    shared
        .requests
        .lock()
        .expect("issuer lock")
        .push(TokenRequest {
            method: request.method.clone(),
            account: account.clone(),
            scopes: scopes.clone(),
        });
    let token = sign_token(shared, account.as_deref(), &scopes);
    shared
        .issued
        .lock()
        .expect("issuer lock")
        .push(token.clone());
    let expires_in = shared.expires_in.load(Ordering::SeqCst);
    let body =
        serde_json::json!({ "token": token, "access_token": token, "expires_in": expires_in });
    json_response(
        200,
        "OK",
        &serde_json::to_vec(&body).expect("serialize token answer"),
    )
}

/// The access a scope gets: everything for an account, `pull` on repositories for anyone.
fn grant(account: Option<&str>, scope: &str) -> Option<serde_json::Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions: Vec<&str> = actions
        .split(',')
        .filter(|a| account.is_some() || (kind == "repository" && *a == "pull"))
        .collect();
    Some(serde_json::json!({ "type": kind, "name": name, "actions": actions }))
}

fn sign_token(shared: &IssuerShared, account: Option<&str>, scopes: &[String]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let accepts_for = shared.registry_accepts_for.load(Ordering::SeqCst) as i64;
    let exp = if accepts_for == 0 {
        now + 3600
    } else {
        now + accepts_for - REGISTRY_LEEWAY_S
    };
    let jti = shared.issued.lock().expect("issuer lock").len();
    let header = serde_json::json!({ "typ": "JWT", "alg": "RS256", "x5c": [shared.x5c] });
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": account.unwrap_or(""),
        "aud": SERVICE,
        "exp": exp,
        "nbf": now - 1,
        "iat": now,
        "jti": format!("regfs-test-{jti}-{now}"),
        "access": scopes.iter().filter_map(|s| grant(account, s)).collect::<Vec<_>>(),
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut openssl = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&shared.signer_key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl dgst (run scripts/setup.sh?)");
    openssl
        .stdin
        .take()
        .expect("openssl stdin")
        .write_all(signing_input.as_bytes())
        .expect("write to openssl");
    let out = openssl.wait_with_output().expect("wait for openssl");
    assert!(
        out.status.success(),
        "openssl dgst failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(out.stdout))
}
