//! `hms-edge verify --rpc`: checks a proof's anchor against an Ethereum node with three
//! read-only JSON-RPC calls (`eth_chainId`, `eth_getTransactionReceipt`, `eth_blockNumber`), so the
//! admin CLI needs no Ethereum library. `https://` (system CAs, or `SSL_CERT_FILE`) or plain
//! `http://` (a local node).

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

use super::anchor::ANCHORED_TOPIC;
use super::proof::Anchor;

/// What the chain said about an anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnChain {
    pub block_number: u64,
    pub confirmations: u64,
    pub gas_used: u64,
}

async fn call(url: &str, method: &str, params: Value) -> Result<Value, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{url}: the RPC URL must start with https:// or http://"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let addr = if host == authority {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    } else {
        authority.to_owned()
    };
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
    let bytes = if tls {
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| format!("{url}: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(client_tls()?);
        let stream =
            connector.connect(name, stream).await.map_err(|e| format!("{url}: TLS: {e}"))?;
        post(stream, url, authority, path, body).await?
    } else {
        post(stream, url, authority, path, body).await?
    };
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{method}: {e}"))?;
    if let Some(err) = v.get("error") {
        return Err(format!("{method}: {err}"));
    }
    Ok(v["result"].clone())
}

/// TLS for `https://` RPC URLs: the system's trusted CAs (`SSL_CERT_FILE` / `SSL_CERT_DIR`
/// override them, e.g. for a consortium chain's own CA), certificate and name verified.
fn client_tls() -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    crate::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for c in found.certs {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(format!(
            "no trusted CA certificates found for https:// ({:?}); set SSL_CERT_FILE",
            found.errors.first().map(|e| e.to_string())
        ));
    }
    Ok(std::sync::Arc::new(
        rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth(),
    ))
}

/// One JSON-RPC POST over an established connection (plain or TLS); the response body.
async fn post<IO>(
    io: IO,
    url: &str,
    authority: &str,
    path: &str,
    body: String,
) -> Result<Bytes, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", authority)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    Ok(resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes())
}

fn quantity(v: &Value) -> Option<u64> {
    u64::from_str_radix(v.as_str()?.strip_prefix("0x")?, 16).ok()
}

fn strip(s: &str) -> String {
    s.trim_start_matches("0x").to_ascii_lowercase()
}

/// Checks that the anchor's transaction is on the chain, succeeded, and emitted
/// `Anchored(logId, size, root)` from the anchor's contract.
pub async fn check_anchor(url: &str, a: &Anchor) -> Result<OnChain, String> {
    let chain_id = quantity(&call(url, "eth_chainId", json!([])).await?).ok_or("bad chain id")?;
    if chain_id != a.chain_id {
        return Err(format!("the node is on chain {chain_id}, the anchor on chain {}", a.chain_id));
    }
    let receipt =
        call(url, "eth_getTransactionReceipt", json!([format!("0x{}", strip(&a.tx_hash))])).await?;
    if receipt.is_null() {
        return Err(format!("transaction {} is not on this chain", a.tx_hash));
    }
    if quantity(&receipt["status"]) != Some(1) {
        return Err(format!("transaction {} failed on chain", a.tx_hash));
    }
    let block = quantity(&receipt["blockNumber"]).ok_or("receipt without block")?;
    if block != a.block_number {
        return Err(format!("transaction is in block {block}, the proof says {}", a.block_number));
    }
    let want_data = format!("{:064x}{}", a.size, strip(&a.root));
    let found = receipt["logs"].as_array().into_iter().flatten().any(|l| {
        let topics: Vec<String> = l["topics"]
            .as_array()
            .map(|t| t.iter().filter_map(|x| x.as_str()).map(strip).collect())
            .unwrap_or_default();
        l["address"].as_str().map(strip) == Some(strip(&a.contract))
            && topics.first().map(String::as_str) == Some(ANCHORED_TOPIC)
            && topics.get(1) == Some(&strip(&a.log_id))
            && l["data"].as_str().map(strip) == Some(want_data.clone())
    });
    if !found {
        return Err(format!(
            "transaction {} emitted no Anchored(log, {}, root) event from {}",
            a.tx_hash, a.size, a.contract
        ));
    }
    let head = quantity(&call(url, "eth_blockNumber", json!([])).await?).ok_or("bad block")?;
    Ok(OnChain {
        block_number: block,
        confirmations: head.saturating_sub(block) + 1,
        gas_used: quantity(&receipt["gasUsed"]).unwrap_or(0),
    })
}
