//! Client side of the internal API (used by hms-edge-agent and the `hms-edge` operations CLI):
//! HTTP/1.1 over the Unix socket, one short connection per call.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Longest wait for the head of an answer (bodies stream on).
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Why a call to hms-edged failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("hms-edged is not reachable on {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("internal API call failed: {0}")]
    Http(String),
    #[error("hms-edged answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("unexpected answer from hms-edged: {0}")]
    Decode(String),
}

impl ClientError {
    /// True when the daemon is down or restarting (retry later), not a refusal.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Http(_) => true,
            ClientError::Status { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE,
            ClientError::Decode(_) => false,
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A handle on the internal API socket.
#[derive(Debug, Clone)]
pub struct InternalClient {
    path: PathBuf,
}

impl InternalClient {
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self { path: path.as_ref().to_owned() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and returns the response with its body still streaming.
    pub async fn send(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| ClientError::Connect { path: self.path.clone(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder().method(method).uri(uri).header("host", "hms-edged");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        // A daemon that accepted but never answers (stopped mid-request) must not hang a channel.
        match tokio::time::timeout(CALL_TIMEOUT, sender.send_request(req)).await {
            Ok(r) => r.map_err(|e| ClientError::Http(e.to_string())),
            Err(_) => Err(ClientError::Http(format!("no answer within {CALL_TIMEOUT:?}"))),
        }
    }

    /// A JSON call: non-2xx answers become [`ClientError::Status`] with the daemon's message.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        uri: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let resp = self.send(method, uri, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Status { status, message });
        }
        let bytes = if bytes.is_empty() { Bytes::from_static(b"null") } else { bytes };
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn get<T: DeserializeOwned>(&self, uri: &str) -> Result<T, ClientError> {
        self.call(Method::GET, uri, None::<&()>).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        uri: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<T, ClientError> {
        self.call(Method::POST, uri, Some(body)).await
    }

    pub async fn put_state(&self, key: &str, value: &serde_json::Value) -> Result<(), ClientError> {
        let _: serde_json::Value =
            self.call(Method::PUT, &format!("/v1/state/{key}"), Some(value)).await?;
        Ok(())
    }

    pub async fn get_state(&self, key: &str) -> Result<Option<serde_json::Value>, ClientError> {
        match self.get(&format!("/v1/state/{key}")).await {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::Status { status: StatusCode::NOT_FOUND, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
