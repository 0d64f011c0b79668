//! Who may do what on the FHIR API: bearer JWTs (RS256/ES256) checked offline against a JWKS file
//! cached on disk, the site's tenant in a claim, and SMART v2 scopes per interaction and type.
//!
//! The JWKS is read from disk (the agent keeps it fresh from the cloud issuer); validation never
//! needs the WAN. With `fhir.auth = "none"` (development only, loopback only — config validation
//! refuses it elsewhere) every caller is `anonymous` with every permission.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

/// A FHIR interaction, as SMART v2 permission letters name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Interaction {
    fn letter(self) -> char {
        match self {
            Interaction::Create => 'c',
            Interaction::Read => 'r',
            Interaction::Update => 'u',
            Interaction::Delete => 'd',
            Interaction::Search => 's',
        }
    }
}

/// One granted scope: resource type (or `*`) and permission letters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    rtype: String,
    letters: HashSet<char>,
}

/// Parses SMART scopes (`user/Patient.rs`, `system/*.cruds`, v1 `user/*.read` / `.write` / `.*`).
/// `patient/` scopes need a patient context this server does not establish, so they grant nothing.
fn parse_scopes(scope: &str) -> Vec<Grant> {
    let mut out = Vec::new();
    for s in scope.split_whitespace() {
        let Some((ctx, rest)) = s.split_once('/') else { continue };
        if !matches!(ctx, "user" | "system") {
            continue;
        }
        let Some((rtype, perms)) = rest.split_once('.') else { continue };
        // A SMART v2 granular scope (`user/Observation.rs?category=laboratory`) grants part of a
        // type. We do not enforce such constraints, so it grants nothing rather than the whole
        // type (never widen a scope).
        if perms.contains('?') {
            tracing::debug!(scope = s, "granular scope not supported; ignored");
            continue;
        }
        let letters: HashSet<char> = match perms {
            "*" => "cruds".chars().collect(),
            "read" => "rs".chars().collect(),
            "write" => "cud".chars().collect(),
            p if !p.is_empty() && p.chars().all(|c| "cruds".contains(c)) => p.chars().collect(),
            _ => continue,
        };
        out.push(Grant { rtype: rtype.to_owned(), letters });
    }
    out
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Token subject (or `anonymous`).
    pub subject: String,
    grants: Option<Vec<Grant>>,
}

impl Principal {
    /// The development caller when authentication is off: may do everything.
    pub fn anonymous() -> Self {
        Principal { subject: "anonymous".into(), grants: None }
    }

    /// A fixed workstation identified by its client certificate (mTLS), with the scopes the
    /// site's configuration grants that certificate's CN.
    pub fn workstation(cn: &str, scopes: &str) -> Self {
        Principal { subject: format!("cert:{cn}"), grants: Some(parse_scopes(scopes)) }
    }

    /// Whether this caller may perform `what` on `rtype`.
    pub fn allows(&self, rtype: &str, what: Interaction) -> bool {
        match &self.grants {
            None => true,
            Some(g) => g.iter().any(|g| {
                (g.rtype == "*" || g.rtype == rtype) && g.letters.contains(&what.letter())
            }),
        }
    }

    /// `allows`, or a 403 OperationOutcome naming what is missing.
    pub fn require(&self, rtype: &str, what: Interaction) -> Result<(), AuthError> {
        if self.allows(rtype, what) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "the token's scopes do not allow {what:?} on {rtype} (needs user/{rtype}.{} or similar)",
                what.letter()
            )))
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    scope: String,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// How often the JWKS file is looked at again (its modification time) while tokens arrive, so
/// a key the issuer retired stops being accepted without a restart.
pub const JWKS_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);
/// A token signed by a key we do not know makes us look at the file at most this often (the
/// agent may just have fetched the issuer's new key).
pub const JWKS_RECHECK_UNKNOWN_KID: std::time::Duration = std::time::Duration::from_secs(1);

/// The JWKS as last read from disk.
#[derive(Debug)]
struct KeyState {
    set: Arc<JwkSet>,
    modified: Option<std::time::SystemTime>,
    checked: std::time::Instant,
}

/// The token verifier: keys, issuer, audience, tenant. The keys follow the JWKS file, which the
/// agent keeps fresh from the cloud issuer: re-read when its modification time changes (looked at
/// every [`JWKS_RECHECK`], or at once for an unknown `kid`), and on SIGHUP. A file that no longer
/// parses or holds no keys is refused and the previous keys stay in use. Clones share the keys.
#[derive(Clone)]
pub struct Verifier {
    path: std::path::PathBuf,
    keys: Arc<std::sync::RwLock<KeyState>>,
    issuer: String,
    audience: String,
    leeway_secs: u64,
    tenant_claim: String,
    tenant: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

/// Reads and checks a JWKS file: (keys, modification time).
fn read_jwks(path: &Path) -> Result<(JwkSet, Option<std::time::SystemTime>), JwksError> {
    let err = |reason: String| JwksError { path: path.display().to_string(), reason };
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let keys: JwkSet = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    if keys.keys.is_empty() {
        return Err(err("it holds no keys".into()));
    }
    Ok((keys, modified))
}

/// Why a request was refused: no valid token (401) or a token that does not allow it (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
}

/// Why the verifier could not be built (at start or on reload).
#[derive(Debug, thiserror::Error)]
#[error("cannot load the JWKS {path}: {reason}")]
pub struct JwksError {
    pub path: String,
    pub reason: String,
}

impl Verifier {
    pub fn load(
        jwks_file: &Path,
        issuer: &str,
        audience: &str,
        leeway_secs: u64,
        tenant_claim: &str,
        tenant: &str,
    ) -> Result<Self, JwksError> {
        let (set, modified) = read_jwks(jwks_file)?;
        Ok(Verifier {
            path: jwks_file.to_owned(),
            keys: Arc::new(std::sync::RwLock::new(KeyState {
                set: Arc::new(set),
                modified,
                checked: std::time::Instant::now(),
            })),
            issuer: issuer.into(),
            audience: audience.into(),
            leeway_secs,
            tenant_claim: tenant_claim.into(),
            tenant: tenant.into(),
        })
    }

    /// Re-reads the JWKS file now (SIGHUP). On error the keys in use stay.
    pub fn reload(&self) -> Result<usize, JwksError> {
        let (set, modified) = read_jwks(&self.path)?;
        let n = set.keys.len();
        let mut st = self.keys.write().expect("jwks lock");
        *st = KeyState { set: Arc::new(set), modified, checked: std::time::Instant::now() };
        Ok(n)
    }

    /// The keys to verify with, re-read first when the file changed and it is time to look.
    fn current_keys(&self, min_age: std::time::Duration) -> Arc<JwkSet> {
        {
            let st = self.keys.read().expect("jwks lock");
            if st.checked.elapsed() < min_age {
                return st.set.clone();
            }
        }
        let mut st = self.keys.write().expect("jwks lock");
        if st.checked.elapsed() < min_age {
            return st.set.clone();
        }
        st.checked = std::time::Instant::now();
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if modified != st.modified {
            match read_jwks(&self.path) {
                Ok((set, m)) => {
                    tracing::info!(path = %self.path.display(), keys = set.keys.len(),
                        "JWKS changed on disk; now verifying tokens with the new keys");
                    st.set = Arc::new(set);
                    st.modified = m;
                }
                Err(e) => {
                    // Not retried until the file changes again; the previous keys stay.
                    st.modified = modified;
                    tracing::error!(error = %e, "JWKS changed on disk but cannot be used; keeping the previous keys");
                }
            }
        }
        st.set.clone()
    }

    /// Checks `Authorization: Bearer …`. 401 for a missing, malformed, expired or foreign-signed
    /// token; 403 for a valid token of another tenant.
    pub fn verify(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let unauthorized = |m: &str| AuthError::Unauthorized(m.to_owned());
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .ok_or_else(|| unauthorized("a bearer token is required"))?
            .trim();
        let header = decode_header(token).map_err(|_| unauthorized("malformed token"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(unauthorized("only RS256 and ES256 tokens are accepted"));
        }
        let find = |keys: &JwkSet| -> Option<jsonwebtoken::jwk::Jwk> {
            match &header.kid {
                Some(kid) => keys.find(kid).cloned(),
                None if keys.keys.len() == 1 => keys.keys.first().cloned(),
                None => None,
            }
        };
        let jwk = find(&self.current_keys(JWKS_RECHECK))
            .or_else(|| find(&self.current_keys(JWKS_RECHECK_UNKNOWN_KID)))
            .ok_or_else(|| unauthorized("token signed by an unknown key"))?;
        let jwk = &jwk;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| unauthorized("unusable signing key"))?;
        let mut v = Validation::new(header.alg);
        v.leeway = self.leeway_secs;
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        // A token that says it is not valid yet (`nbf`) is refused like an expired one.
        v.validate_nbf = true;
        let data = decode::<Claims>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => unauthorized("token expired"),
                ErrorKind::InvalidIssuer => unauthorized("token from another issuer"),
                ErrorKind::InvalidAudience => unauthorized("token for another audience"),
                ErrorKind::ImmatureSignature => unauthorized("token not yet valid"),
                _ => unauthorized("invalid token"),
            }
        })?;
        let tenant = data.claims.rest.get(&self.tenant_claim).and_then(|v| v.as_str());
        if tenant != Some(self.tenant.as_str()) {
            return Err(AuthError::Forbidden(format!(
                "token is for tenant {:?}, this site serves {:?}",
                tenant.unwrap_or("<none>"),
                self.tenant
            )));
        }
        Ok(Principal {
            subject: data.claims.sub.unwrap_or_else(|| "unknown".into()),
            grants: Some(parse_scopes(&data.claims.scope)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_map_to_permissions() {
        let p = Principal {
            subject: "s".into(),
            grants: Some(parse_scopes(
                "user/Patient.rs system/Observation.cu user/*.read patient/*.*",
            )),
        };
        assert!(p.allows("Patient", Interaction::Read));
        assert!(p.allows("Patient", Interaction::Search));
        assert!(!p.allows("Patient", Interaction::Create));
        assert!(p.allows("Observation", Interaction::Create));
        assert!(p.allows("Encounter", Interaction::Read), "user/*.read");
        assert!(!p.allows("Encounter", Interaction::Delete), "patient/ grants nothing");
        let all = Principal { subject: "s".into(), grants: Some(parse_scopes("user/*.cruds")) };
        assert!(all.allows("Condition", Interaction::Delete));
        let none = Principal {
            subject: "s".into(),
            grants: Some(parse_scopes("openid fhirUser user/Patient.x")),
        };
        assert!(!none.allows("Patient", Interaction::Read));
    }
}
