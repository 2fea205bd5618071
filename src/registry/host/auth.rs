//! Authentication for every request to the registry: `WWW-Authenticate` challenges,
//! bearer tokens per scope (cached until they expire), and Basic.
//!
//! All requests pass through [`Auth::send`]. A request to the registry's own origin gets
//! a cached token for its scope (or Basic credentials) up front; a 401 with a challenge
//! gets a token for the scope the challenge names (joined with the scope derived from the
//! method and path) and the request is sent once more. Requests to any other origin (a
//! blob redirected to object storage) are sent bare. Tokens and passwords go only to the
//! registry's origin and to the realm its challenge named, and never into a log line.

use std::collections::HashMap;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use serde::Deserialize;
use tracing::debug;
use url::{Origin, Url};

use super::challenge::{Challenge, challenge};
use super::credentials::{Credentials, Secret};
use super::http::transport;
use super::scopes::Scopes;
use super::ssrf::Guard;
use crate::registry::error::{Error, Result};

/// Token lifetime when the token endpoint does not say (the token spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Token endpoint answers larger than this are refused.
const MAX_TOKEN_ANSWER: usize = 1 << 20;

struct CachedToken {
    value: String,
    valid_until: Instant,
    /// What it was asked for (the issuer may have granted less; a 401 then fetches one
    /// for the exact scope).
    asked: Scopes,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The authenticator of one registry client.
pub struct Auth {
    registry: Origin,
    registry_is_https: bool,
    credentials: Credentials,
    /// For token requests: follows no redirects, so credentials go to the realm only.
    token_http: reqwest::Client,
    tokens: Mutex<HashMap<String, CachedToken>>,
    /// The registry asked for Basic once: send it with every request from then on.
    basic: AtomicBool,
    /// One token fetch at a time: 16 parallel block reads hitting a 401 together
    /// should cost one token request, not 16.
    fetching: tokio::sync::Mutex<()>,
    /// Where a challenge's realm may be (ssrf.rs).
    guard: Arc<Guard>,
}

impl Auth {
    pub fn new(
        registry: &Url,
        credentials: Credentials,
        token_http: reqwest::Client,
        guard: Arc<Guard>,
    ) -> Auth {
        Auth {
            guard,
            registry: registry.origin(),
            registry_is_https: registry.scheme() == "https",
            credentials,
            token_http,
            tokens: Mutex::new(HashMap::new()),
            basic: AtomicBool::new(false),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// What was tried, for the message of a refusal.
    pub fn tried(&self) -> String {
        self.credentials.describe()
    }

    /// Sends `req`, authenticating it if it goes to the registry. The answer may still be
    /// 401/403 (the caller turns that into EACCES, naming [`Auth::tried`]).
    pub async fn send(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let (client, request) = req.build_split();
        let mut request = request
            .map_err(|e| Error::BadAnswer(format!("{what}: cannot build the request: {e}")))?;
        if request.url().origin() != self.registry {
            return execute(what, &client, request).await;
        }
        let scopes = Scopes::for_request(request.method(), request.url());
        let sent_token = self.authorize(&mut request, &scopes);
        // In-memory bodies can be sent again; a streamed one cannot.
        let replay = request.try_clone();
        let resp = execute(what, &client, request).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = challenge(resp.headers()) else {
            return Ok(resp);
        };
        debug!(
            request = what,
            had_credentials = sent_token.is_some(),
            "registry answered 401; authenticating"
        );
        let authorization = match challenge {
            Challenge::Basic => {
                let Some(Secret::Password { username, password }) = self.credentials.secret()
                else {
                    return Ok(resp);
                };
                if self.basic.swap(true, Ordering::Relaxed) && sent_token.is_some() {
                    // The credentials were sent and refused: no point sending them again.
                    return Ok(resp);
                }
                basic_header(username, password)?
            }
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let wanted = scopes.join(&Scopes::parse(scope.as_deref().unwrap_or("")));
                let token = self
                    .token(
                        what,
                        &realm,
                        service.as_deref(),
                        &scopes,
                        &wanted,
                        sent_token,
                    )
                    .await?;
                bearer_header(&token)?
            }
        };
        let Some(mut replay) = replay else {
            return Err(Error::BadAnswer(format!(
                "{what}: the registry asks for authentication, and this request's body \
                 cannot be sent a second time"
            )));
        };
        replay
            .headers_mut()
            .insert(header::AUTHORIZATION, authorization);
        execute(what, &client, replay).await
    }

    /// Adds the credentials known to work for this request's scope, if it goes to the
    /// registry, without sending it (a request sent by other means than reqwest: a
    /// refusal then goes through [`Auth::send`], which asks for a token).
    pub fn attach(&self, request: &mut reqwest::Request) {
        if request.url().origin() == self.registry {
            let scopes = Scopes::for_request(request.method(), request.url());
            self.authorize(request, &scopes);
        }
    }

    /// Adds what is known to work for this scope. Returns the credential sent, if any, so
    /// that a 401 can tell a stale token from a missing one.
    fn authorize(&self, request: &mut reqwest::Request, scopes: &Scopes) -> Option<String> {
        if self.basic.load(Ordering::Relaxed)
            && let Some(Secret::Password { username, password }) = self.credentials.secret()
            && let Ok(value) = basic_header(username, password)
        {
            request.headers_mut().insert(header::AUTHORIZATION, value);
            return Some(String::new());
        }
        let token = {
            let tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            tokens
                .get(&scopes.key())
                .filter(|t| t.valid_until > now)
                .or_else(|| {
                    tokens
                        .values()
                        .find(|t| t.valid_until > now && t.asked.covers(scopes))
                })
                .map(|t| t.value.clone())?
        };
        let value = bearer_header(&token).ok()?;
        request.headers_mut().insert(header::AUTHORIZATION, value);
        Some(token)
    }

    /// A token for `wanted`, cached under `key`'s scopes. `stale` is the token the
    /// registry just refused: it is not handed out again.
    async fn token(
        &self,
        what: &str,
        realm: &str,
        service: Option<&str>,
        key: &Scopes,
        wanted: &Scopes,
        stale: Option<String>,
    ) -> Result<String> {
        let key = key.key();
        let _one_at_a_time = self.fetching.lock().await;
        // Another request may have fetched it while this one waited.
        {
            let tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(t) = tokens.get(&key)
                && t.valid_until > Instant::now()
                && Some(&t.value) != stale.as_ref()
            {
                return Ok(t.value.clone());
            }
        }
        let realm_url = Url::parse(realm)
            .map_err(|e| Error::BadAnswer(format!("{what}: invalid token realm {realm:?}: {e}")))?;
        match realm_url.scheme() {
            "https" => {}
            // Credentials over plain http only when the registry itself is plain http.
            "http" if !self.registry_is_https => {}
            _ => {
                return Err(Error::BadAnswer(format!(
                    "{what}: refusing token realm {realm:?} (not https)"
                )));
            }
        }
        self.guard.check(what, "token realm", &realm_url)?;
        let scope_list = wanted.to_strings();
        let fetched = self
            .fetch_token(&realm_url, service, &scope_list)
            .await
            .map_err(|e| match e {
                Error::Denied(msg) => Error::Denied(format!("{msg}; {}", self.tried())),
                other => other,
            })?;
        debug!(
            request = what,
            scope = %scope_list.join(" "),
            valid_for_s = fetched.1.as_secs(),
            "got a registry token"
        );
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens.retain(|_, t| t.valid_until > Instant::now());
        tokens.insert(
            key,
            CachedToken {
                value: fetched.0.clone(),
                // Renew a little early so a token does not expire on its way.
                valid_until: Instant::now() + fetched.1.mul_f64(0.9),
                asked: wanted.clone(),
            },
        );
        Ok(fetched.0)
    }

    /// Asks the realm for a token: POST with the refresh token for an identity token
    /// (OAuth2), GET with Basic for a password (falling back to the OAuth2 password grant
    /// where GET is not offered), anonymous GET otherwise.
    async fn fetch_token(
        &self,
        realm: &Url,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<(String, Duration)> {
        let what = format!("token request to {}", realm.origin().ascii_serialization());
        let joined = scopes.join(" ");
        let oauth_form = |grant: &[(&str, &str)]| {
            let mut form = grant.to_vec();
            form.push(("client_id", "regfs"));
            if let Some(service) = service {
                form.push(("service", service));
            }
            if !joined.is_empty() {
                form.push(("scope", &joined));
            }
            let body = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form)
                .finish();
            self.token_http
                .post(realm.clone())
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(body)
        };
        let get = || {
            let mut url = realm.clone();
            {
                let mut query = url.query_pairs_mut();
                if let Some(service) = service {
                    query.append_pair("service", service);
                }
                for scope in scopes {
                    query.append_pair("scope", scope);
                }
            }
            self.token_http.get(url)
        };
        let resp = match self.credentials.secret() {
            Some(Secret::IdentityToken(refresh)) => {
                let req =
                    oauth_form(&[("grant_type", "refresh_token"), ("refresh_token", refresh)]);
                execute(&what, &self.token_http, sensitive(&what, req)?).await?
            }
            Some(Secret::Password { username, password }) => {
                let req = get().header(header::AUTHORIZATION, basic_header(username, password)?);
                let resp = execute(&what, &self.token_http, sensitive(&what, req)?).await?;
                if matches!(
                    resp.status(),
                    StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
                ) {
                    let req = oauth_form(&[
                        ("grant_type", "password"),
                        ("username", username),
                        ("password", password),
                    ]);
                    execute(&what, &self.token_http, sensitive(&what, req)?).await?
                } else {
                    resp
                }
            }
            None => execute(&what, &self.token_http, sensitive(&what, get())?).await?,
        };
        read_token(&what, resp).await
    }
}

/// The token in a token endpoint's answer, and how long it lives.
async fn read_token(what: &str, resp: reqwest::Response) -> Result<(String, Duration)> {
    let status = resp.status();
    let body = read_limited(what, resp).await?;
    if !status.is_success() {
        return Err(Error::from_status(what, status.as_u16(), &body));
    }
    let answer: TokenAnswer = serde_json::from_slice(&body)
        .map_err(|e| Error::BadAnswer(format!("{what}: invalid JSON: {e}")))?;
    let token = answer
        .token
        .filter(|t| !t.is_empty())
        .or(answer.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::BadAnswer(format!("{what}: answer has no token")))?;
    let lifetime = answer
        .expires_in
        .filter(|s| *s > 0)
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
    Ok((token, lifetime))
}

fn sensitive(what: &str, req: reqwest::RequestBuilder) -> Result<reqwest::Request> {
    req.build()
        .map_err(|e| Error::BadAnswer(format!("{what}: cannot build the request: {e}")))
}

async fn execute(
    what: &str,
    client: &reqwest::Client,
    request: reqwest::Request,
) -> Result<reqwest::Response> {
    client
        .execute(request)
        .await
        .map_err(|e| transport(what, &e))
}

async fn read_limited(what: &str, mut resp: reqwest::Response) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport(what, &e))? {
        if body.len() + chunk.len() > MAX_TOKEN_ANSWER {
            return Err(Error::BadAnswer(format!("{what}: answer too large")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Header values marked sensitive, so that no debug output of a request shows them.
fn basic_header(username: &str, password: &str) -> Result<HeaderValue> {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    secret_header(&format!("Basic {encoded}"))
}

fn bearer_header(token: &str) -> Result<HeaderValue> {
    secret_header(&format!("Bearer {token}"))
}

fn secret_header(value: &str) -> Result<HeaderValue> {
    let mut value = HeaderValue::from_str(value).map_err(|_| {
        Error::BadAnswer("credential or token has characters a header cannot carry".into())
    })?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_never_printed() {
        let h = bearer_header("secret-token").expect("header");
        assert!(h.is_sensitive());
        assert!(!format!("{h:?}").contains("secret-token"));
    }
}
