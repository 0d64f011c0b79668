//! The tenant's cloud endpoints as seen from the agent: one HTTP client (rustls; system roots plus
//! the site's CA file), the tenant on every request (path or `X-Tenant-ID`), and an OAuth2
//! client-credentials token cached until shortly before it expires. A 401 refreshes the token
//! once; the secret is read from a 0600 file or a systemd credential, never from argv or config.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hms_edge_config::{Config, TenantMode};
use reqwest::{RequestBuilder, Response, StatusCode};
use tokio::sync::Mutex;
use zeroize::Zeroizing;

/// The systemd credential holding the OAuth2 client secret.
pub const CLIENT_SECRET_CREDENTIAL: &str = "upstream-client-secret";
/// A token is renewed this long before the server says it expires.
pub const TOKEN_RENEW_MARGIN: Duration = Duration::from_secs(30);

/// How an upstream call failed, by what the agent must do about it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Link down, timeout, 5xx, token endpoint refusing: retry the whole channel later.
    #[error("upstream unreachable or failing: {0}")]
    Link(String),
    /// Upstream refused this request (4xx other than 401/412): retrying will not help by itself.
    #[error("upstream refused ({status}): {message}")]
    Refused { status: StatusCode, message: String },
    /// A 2xx answer we cannot read (truncated, not JSON…): its effect upstream is unknown.
    #[error("malformed upstream answer: {0}")]
    Malformed(String),
}

/// Builds the HTTP client shared by every channel.
pub fn http_client(ca_file: &Path, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if !ca_file.as_os_str().is_empty() {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| anyhow::anyhow!("cannot read CA file {}: {e}", ca_file.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("bad CA file {}: {e}", ca_file.display()))?;
        for c in certs {
            roots.add(c)?;
        }
    }
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("hms-edge-agent/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// Reads a secret file after checking that only its owner can read it.
pub fn read_secret(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("cannot read secret file {}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        anyhow::bail!(
            "secret file {} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.mode() & 0o777
        );
    }
    let raw = Zeroizing::new(std::fs::read_to_string(path)?);
    Ok(Zeroizing::new(raw.trim().to_owned()))
}

struct TokenSource {
    url: String,
    client_id: String,
    secret: Zeroizing<String>,
    scope: String,
    cached: Mutex<Option<(Zeroizing<String>, Instant)>>,
}

/// The tenant's FHIR server.
pub struct FhirUpstream {
    pub http: reqwest::Client,
    /// FHIR base URL with the tenant resolved, without a trailing slash.
    pub base: String,
    pub tenant: String,
    header_mode: bool,
    token: Option<TokenSource>,
}

impl std::fmt::Debug for FhirUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirUpstream").field("base", &self.base).finish_non_exhaustive()
    }
}

impl FhirUpstream {
    /// `None` when no upstream is configured (the box runs offline).
    pub fn from_config(cfg: &Config, http: reqwest::Client) -> anyhow::Result<Option<Arc<Self>>> {
        let u = &cfg.upstream;
        if u.fhir_base_url.is_empty() {
            return Ok(None);
        }
        let tenant = cfg.site.tenant_id.clone();
        let base = u.fhir_base_url.replace("{tenant}", &tenant).trim_end_matches('/').to_owned();
        let token = if u.token_url.is_empty() {
            None
        } else {
            let path = if u.client_secret_file.as_os_str().is_empty() {
                match std::env::var_os("CREDENTIALS_DIRECTORY") {
                    Some(d) => Path::new(&d).join(CLIENT_SECRET_CREDENTIAL),
                    None => anyhow::bail!(
                        "upstream.token_url is set but there is no client secret: set \
                         upstream.client_secret_file or pass the systemd credential {}",
                        CLIENT_SECRET_CREDENTIAL
                    ),
                }
            } else {
                u.client_secret_file.clone()
            };
            Some(TokenSource {
                url: u.token_url.clone(),
                client_id: u.client_id.clone(),
                secret: read_secret(&path)?,
                scope: u.scope.clone(),
                cached: Mutex::new(None),
            })
        };
        Ok(Some(Arc::new(Self {
            http,
            base,
            tenant,
            header_mode: u.tenant_mode == TenantMode::Header,
            token,
        })))
    }

    async fn bearer(&self, renew: bool) -> Result<Option<Zeroizing<String>>, UpstreamError> {
        let Some(src) = &self.token else { return Ok(None) };
        let mut cached = src.cached.lock().await;
        if !renew
            && let Some((tok, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(Some(tok.clone()));
        }
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", src.client_id.as_str()),
            ("client_secret", src.secret.as_str()),
        ];
        if !src.scope.is_empty() {
            form.push(("scope", src.scope.as_str()));
        }
        let body = Zeroizing::new(
            url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&form).finish(),
        );
        let resp = self
            .http
            .post(&src.url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.as_str().to_owned())
            .send()
            .await
            .map_err(|e| UpstreamError::Link(format!("token endpoint: {}", without_url(&e))))?;
        let status = resp.status();
        if !status.is_success() {
            *cached = None;
            return Err(UpstreamError::Link(format!("token endpoint refused: {status}")));
        }
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| UpstreamError::Link(format!("token endpoint answer: {e}")))?;
        let Some(tok) = body.get("access_token").and_then(|v| v.as_str()) else {
            return Err(UpstreamError::Link("token endpoint answer has no access_token".into()));
        };
        let ttl =
            Duration::from_secs(body.get("expires_in").and_then(|v| v.as_u64()).unwrap_or(300));
        let until = Instant::now() + ttl.saturating_sub(TOKEN_RENEW_MARGIN).max(ttl / 2);
        let tok = Zeroizing::new(tok.to_owned());
        *cached = Some((tok.clone(), until));
        Ok(Some(tok))
    }

    /// URL of a path below the FHIR base ("" for the base itself).
    pub fn url(&self, path: &str) -> String {
        if path.is_empty() { self.base.clone() } else { format!("{}/{}", self.base, path) }
    }

    /// Sends a request built by `build` with tenant and token; a 401 renews the token and
    /// resends once. Transport errors and 5xx are [`UpstreamError::Link`].
    pub async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, UpstreamError> {
        let mut renew = false;
        loop {
            let mut req = build(&self.http).header("accept", "application/fhir+json");
            if self.header_mode {
                req = req.header("x-tenant-id", &self.tenant);
            }
            if let Some(tok) = self.bearer(renew).await? {
                req = req.bearer_auth(tok.as_str());
            }
            let resp = req.send().await.map_err(|e| UpstreamError::Link(without_url(&e)))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !renew && self.token.is_some() {
                renew = true;
                continue;
            }
            if status.is_server_error() || status == StatusCode::UNAUTHORIZED {
                return Err(UpstreamError::Link(format!("upstream answered {status}")));
            }
            if status == StatusCode::FORBIDDEN {
                // A token for the wrong tenant: a configuration problem, not this resource's.
                return Err(UpstreamError::Link("upstream refused our tenant (403)".into()));
            }
            return Ok(resp);
        }
    }
}

/// A reqwest error without its URL's query string (no ids in logs beyond what is needed).
pub fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "bad body"
    } else {
        "request failed"
    };
    let mut msg = e.to_string();
    if let Some(url) = e.url() {
        msg = msg.replace(url.as_str(), url.path());
    }
    format!("{kind}: {msg}")
}

/// Reads a response body as JSON; an unreadable 2xx body is [`UpstreamError::Malformed`].
pub async fn json_body(resp: Response) -> Result<serde_json::Value, UpstreamError> {
    let bytes = resp.bytes().await.map_err(|e| UpstreamError::Malformed(without_url(&e)))?;
    serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Malformed(e.to_string()))
}

/// The text of an error answer (OperationOutcome diagnostics when there is one).
pub async fn error_text(resp: Response) -> String {
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap_or_default();
    let v: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    let diag = v.as_ref().and_then(|v| {
        v.pointer("/issue/0/diagnostics").or_else(|| v.pointer("/issue/0/details/text"))
    });
    match diag.and_then(|d| d.as_str()) {
        Some(d) => format!("{status}: {d}"),
        None => format!(
            "{status}: {}",
            String::from_utf8_lossy(&bytes).chars().take(300).collect::<String>()
        ),
    }
}
