//! MQTT channel: events from the durable change log, published QoS 1 under
//! `hms/{tenant}/{site}/events/{event}` with a persistent session, acknowledged in the outbox only
//! after the broker's PUBACK. Payloads carry ids and counts only (never PHI). Subscribes to
//! `hms/{tenant}/{site}/commands/sync-now`, which wakes the other channels.
//!
//! QoS 1 is at-least-once: after a lost PUBACK an event can arrive twice; each carries its
//! change-log `seq`, which consumers use to drop repeats.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hms_edge_config::MqttConfig;
use hms_edge_wire::api::*;
use hms_edge_wire::client::InternalClient;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS, Transport};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::channel::{ChannelStats, RoundError};
use crate::upstream::UpstreamError;

/// Events per publish round.
pub const BATCH: u32 = 100;
/// How long the broker gets to acknowledge a round.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(15);

/// What the event-loop task tells the publisher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    connected: bool,
    published: u64,
    unacked: usize,
}

/// The MQTT channel.
pub struct Mqtt {
    client: AsyncClient,
    progress: watch::Receiver<Progress>,
    prefix: String,
    internal: InternalClient,
    pub stats: Arc<ChannelStats>,
}

impl std::fmt::Debug for Mqtt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mqtt").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// Topic prefix of this site.
pub fn topic_prefix(tenant: &str, site: &str) -> String {
    format!("hms/{tenant}/{site}")
}

fn tls_config(cfg: &MqttConfig) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    if cfg.ca_file.as_os_str().is_empty() {
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
    } else {
        for c in CertificateDer::pem_file_iter(&cfg.ca_file)
            .map_err(|e| anyhow::anyhow!("mqtt.ca_file {}: {e}", cfg.ca_file.display()))?
        {
            roots.add(c.map_err(|e| anyhow::anyhow!("mqtt.ca_file: {e}"))?)?;
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    if cfg.client_cert_file.as_os_str().is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    crate::upstream::read_secret(&cfg.client_key_file)?; // refuses a group/world-readable key
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.client_cert_file)
        .map_err(|e| anyhow::anyhow!("mqtt.client_cert_file: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("mqtt.client_cert_file: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.client_key_file)
        .map_err(|e| anyhow::anyhow!("mqtt.client_key_file: {e}"))?;
    Ok(builder.with_client_auth_cert(certs, key)?)
}

impl Mqtt {
    /// Connects in the background. `None` when no broker is configured.
    pub fn start(
        cfg: &MqttConfig,
        tenant: &str,
        site: &str,
        internal: InternalClient,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Option<Self>> {
        if cfg.url.is_empty() {
            return Ok(None);
        }
        let url = url::Url::parse(&cfg.url)?;
        let tls = url.scheme() == "mqtts";
        let host = url.host_str().ok_or_else(|| anyhow::anyhow!("mqtt.url has no host"))?;
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        let client_id = if cfg.client_id.is_empty() {
            format!("hms-edge-{site}")
        } else {
            cfg.client_id.clone()
        };
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs.max(5)));
        opts.set_clean_session(false);
        if tls {
            opts.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                Arc::new(tls_config(cfg)?),
            )));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let prefix = topic_prefix(tenant, site);
        let command_topic = format!("{prefix}/commands/sync-now");
        let (progress_tx, progress) = watch::channel(Progress::default());
        let sub_client = client.clone();
        tokio::spawn(async move {
            let mut unacked: HashSet<u16> = HashSet::new();
            let mut p = Progress::default();
            let mut backoff =
                crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
            loop {
                let polled = tokio::select! {
                    e = eventloop.poll() => e,
                    () = shutdown.cancelled() => return,
                };
                match polled {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        backoff.succeed();
                        p.connected = true;
                        tracing::info!("connected to the MQTT broker");
                        let _ = sub_client.try_subscribe(&command_topic, QoS::AtLeastOnce);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        p.published += 1;
                        unacked.insert(pkid);
                    }
                    Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                        unacked.remove(&ack.pkid);
                    }
                    Ok(Event::Incoming(Incoming::Publish(msg))) if msg.topic == command_topic => {
                        tracing::info!("sync-now command received");
                        wake.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if p.connected {
                            tracing::warn!(error = %e, "MQTT broker connection lost");
                        } else if backoff.failures() == 0 || backoff.failures().is_multiple_of(10) {
                            tracing::warn!(error = %e, "cannot connect to the MQTT broker");
                        }
                        p.connected = false;
                        let _ = progress_tx.send(Progress { unacked: unacked.len(), ..p });
                        let wait = backoff.fail();
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = shutdown.cancelled() => return,
                        }
                    }
                }
                p.unacked = unacked.len();
                let _ = progress_tx.send(p);
            }
        });
        Ok(Some(Self {
            client,
            progress,
            prefix,
            internal,
            stats: Arc::new(ChannelStats::default()),
        }))
    }

    /// Publishes due events. `Ok(true)`: more is waiting.
    pub async fn round(&self) -> Result<bool, RoundError> {
        if !self.progress.borrow().connected {
            return Err(UpstreamError::Link("MQTT broker not connected".into()).into());
        }
        let lease: LeaseResponse = self
            .internal
            .post(
                "/v1/outbox/lease",
                &LeaseRequest { kind: "event".into(), max: BATCH, lease_secs: 60 },
            )
            .await?;
        if lease.entries.is_empty() {
            return Ok(false);
        }
        let before = self.progress.borrow().published;
        let mut bytes = 0u64;
        for e in &lease.entries {
            let payload = json!({
                "event": e.op,
                "seq": e.seq,
                "at_ms": e.created_at_ms,
                "data": e.detail.clone().unwrap_or(Value::Null),
            });
            let body = serde_json::to_vec(&payload).expect("json");
            bytes += body.len() as u64;
            let topic = format!("{}/events/{}", self.prefix, e.op);
            self.client
                .publish(topic, QoS::AtLeastOnce, false, body)
                .await
                .map_err(|err| UpstreamError::Link(format!("MQTT publish: {err}")))?;
        }
        let target = before + lease.entries.len() as u64;
        let mut rx = self.progress.clone();
        let done = tokio::time::timeout(ACK_TIMEOUT, async move {
            rx.wait_for(|p| p.published >= target && p.unacked == 0).await.map(|_| ())
        })
        .await;
        let seqs: Vec<i64> = lease.entries.iter().map(|e| e.seq).collect();
        if !matches!(done, Ok(Ok(_))) {
            let items = seqs
                .iter()
                .map(|s| FailItem {
                    seq: *s,
                    error: "no PUBACK from the broker".into(),
                    park: false,
                    retry_after_secs: 5,
                })
                .collect();
            let _: Affected = self
                .internal
                .post("/v1/outbox/fail", &FailRequest { kind: "event".into(), items })
                .await?;
            return Err(UpstreamError::Link("MQTT broker did not acknowledge".into()).into());
        }
        let items = seqs
            .iter()
            .map(|s| AckItem { seq: *s, pushed_version: None, upstream_version: None })
            .collect();
        let _: Affected = self
            .internal
            .post("/v1/outbox/ack", &AckRequest { kind: "event".into(), items })
            .await?;
        ChannelStats::add(&self.stats.sent, seqs.len() as u64);
        ChannelStats::add(&self.stats.bytes_sent, bytes);
        Ok(seqs.len() as u64 == u64::from(BATCH))
    }
}
