//! Our side of an association we open (the requester of PS3.8): the C-MOVE destination
//! association, and the Storage Commitment report to a requester that asked for a new one. Built from the same pieces as the acceptor: [`super::pdu`] framing (`dicom-ul`'s
//! codec for the association PDUs), [`super::dimse`] commands, and
//! [`super::retrieve::send_store`] streaming stored data sets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::pdu::{
    AbortRQSource, AssociationRQ, Pdu, PresentationContextProposed,
    PresentationContextResultReason, RequestorRoles, UserVariableItem,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::dimse::{Command, field, tag};
use super::pdu::{self, Incoming, PduReader, ReadPdu};
use super::retrieve::{self, SendError, Target};
use super::uids::{APPLICATION_CONTEXT, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};
use crate::config::MoveDestination;
use crate::store::BlobStore;

/// A byte stream an association runs over (TCP or TLS).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Most presentation contexts one association can carry (odd ids 1-255).
pub const MAX_CONTEXTS: usize = 128;

/// Why the association to a destination failed.
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    #[error("cannot connect to {0}: {1}")]
    Connect(std::net::SocketAddr, String),
    #[error("association rejected by the destination ({0})")]
    Rejected(String),
    #[error("destination did not answer in time")]
    Timeout,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// An established association with a storage SCP.
pub struct Association {
    stream: Box<dyn Stream>,
    reader: PduReader,
    peer_max: u32,
    /// (SOP class, transfer syntax) → accepted presentation context id.
    contexts: HashMap<(String, String), u8>,
    timeout: Duration,
    next_message_id: u16,
}

impl std::fmt::Debug for Association {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("scu::Association").field("contexts", &self.contexts).finish_non_exhaustive()
    }
}

/// The rustls client configuration for TLS destinations: the system's trusted CAs (the
/// destination's certificate must be valid for its IP address).
fn tls_client() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth(),
    ))
}

/// Opens an association to `dest` proposing one context per (SOP class, transfer syntax) pair
/// of `wanted` (at most [`MAX_CONTEXTS`]; each proposes exactly the stored transfer syntax, so
/// what is sent is the stored bytes). `timeout` bounds the connect, the handshake and every
/// response later.
pub async fn connect(
    dest: MoveDestination,
    calling_ae: &str,
    called_ae: &str,
    wanted: &[(String, String)],
    our_max_pdu: u32,
    timeout: Duration,
) -> Result<Association, ScuError> {
    connect_with_roles(dest, calling_ae, called_ae, wanted, &[], our_max_pdu, timeout).await
}

/// [`connect`], also proposing, by SCP/SCU role selection, that we play the SCP role (only) for
/// the SOP classes of `scp_role_for` — as the Storage Commitment SCP must when it opens the
/// association that carries its N-EVENT-REPORT (PS3.4 J.3.3).
pub async fn connect_with_roles(
    dest: MoveDestination,
    calling_ae: &str,
    called_ae: &str,
    wanted: &[(String, String)],
    scp_role_for: &[&str],
    our_max_pdu: u32,
    timeout: Duration,
) -> Result<Association, ScuError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(dest.addr))
        .await
        .map_err(|_| ScuError::Timeout)?
        .map_err(|e| ScuError::Connect(dest.addr, e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Stream> = if dest.tls {
        let cfg = tls_client().map_err(|e| ScuError::Connect(dest.addr, e))?;
        let name = rustls::pki_types::ServerName::IpAddress(dest.addr.ip().into());
        let tls =
            tokio::time::timeout(timeout, tokio_rustls::TlsConnector::from(cfg).connect(name, tcp))
                .await
                .map_err(|_| ScuError::Timeout)?
                .map_err(|e| ScuError::Connect(dest.addr, format!("TLS: {e}")))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let mut proposed = Vec::new();
    let mut ids = HashMap::new();
    for (i, (class, ts)) in wanted.iter().take(MAX_CONTEXTS).enumerate() {
        let id = (2 * i + 1) as u8;
        ids.insert(id, (class.clone(), ts.clone()));
        proposed.push(PresentationContextProposed {
            id,
            abstract_syntax: class.clone(),
            transfer_syntaxes: vec![ts.clone()],
        });
    }
    let rq = AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling_ae.to_owned(),
        called_ae_title: called_ae.to_owned(),
        application_context_name: APPLICATION_CONTEXT.to_owned(),
        presentation_contexts: proposed,
        user_variables: [
            UserVariableItem::MaxLength(our_max_pdu),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_owned()),
            UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_owned()),
        ]
        .into_iter()
        .chain(scp_role_for.iter().map(|uid| {
            UserVariableItem::ScuScpRoleSelectionSubItem(
                (*uid).to_owned(),
                RequestorRoles { scu: false, scp: true },
            )
        }))
        .collect(),
    };
    let mut a = Association {
        stream,
        reader: PduReader::new(our_max_pdu),
        peer_max: 0,
        contexts: HashMap::new(),
        timeout,
        next_message_id: 1,
    };
    pdu::send(&mut a.stream, &pdu::encode(&Pdu::AssociationRQ(rq))).await?;
    match a.read().await? {
        Incoming::Control(Pdu::AssociationAC(ac)) => {
            a.peer_max = ac
                .user_variables
                .iter()
                .find_map(|v| match v {
                    UserVariableItem::MaxLength(n) => Some(*n),
                    _ => None,
                })
                .unwrap_or(0);
            for r in ac.presentation_contexts {
                if r.reason == PresentationContextResultReason::Acceptance
                    && let Some((class, ts)) = ids.get(&r.id)
                {
                    a.contexts.insert((class.clone(), ts.clone()), r.id);
                }
            }
            Ok(a)
        }
        Incoming::Control(Pdu::AssociationRJ(rj)) => {
            Err(ScuError::Rejected(format!("{:?}", rj.source)))
        }
        Incoming::Control(Pdu::AbortRQ { .. }) => Err(ScuError::Rejected("aborted".into())),
        other => Err(ScuError::Protocol(format!("unexpected answer {other:?}"))),
    }
}

impl Association {
    async fn read(&mut self) -> Result<Incoming, ScuError> {
        tokio::time::timeout(self.timeout, self.reader.read(&mut self.stream))
            .await
            .map_err(|_| ScuError::Timeout)?
            .map_err(|e| ScuError::Protocol(e.to_string()))
    }

    /// Whether the destination accepted a context for this SOP class in this transfer syntax.
    pub fn accepts(&self, class: &str, ts: &str) -> bool {
        self.contexts.contains_key(&(class.to_owned(), ts.to_owned()))
    }

    /// One C-STORE sub-operation: the stored data set as is; returns the destination's status.
    /// `Ok(None)`: the instance could not be read (nothing was sent; the association goes on).
    pub async fn store(
        &mut self,
        blobs: &BlobStore,
        t: &Target,
        originator: (&str, u16),
    ) -> Result<Option<u16>, ScuError> {
        let Some(&pc) = self.contexts.get(&(t.sop_class_uid.clone(), t.transfer_syntax.clone()))
        else {
            return Err(ScuError::Protocol("no accepted context".into()));
        };
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        let rq = retrieve::store_rq(id, t, Some(originator));
        let sent = tokio::time::timeout(
            self.timeout,
            retrieve::send_store(&mut self.stream, pc, &rq, blobs, t, self.peer_max),
        )
        .await
        .map_err(|_| ScuError::Timeout)?;
        match sent {
            Ok(()) => {}
            Err(SendError::Unreadable(_)) => return Ok(None),
            Err(SendError::Broken(e)) => return Err(ScuError::Protocol(e.to_string())),
            Err(SendError::Io(e)) => return Err(ScuError::Io(e)),
        }
        self.response(field::C_STORE_RSP, id).await.map(Some)
    }

    /// Sends an N-EVENT-REPORT (our request, `data` already encoded in `ts`) on the context of
    /// `class` and returns the receiver's status.
    pub async fn event_report(
        &mut self,
        class: &str,
        instance: &str,
        event_type: u16,
        ts: &str,
        data: &[u8],
    ) -> Result<u16, ScuError> {
        let Some(&pc) = self.contexts.get(&(class.to_owned(), ts.to_owned())) else {
            return Err(ScuError::Protocol("no accepted context".into()));
        };
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        let mut rq = Command::new();
        rq.set_u16(tag::COMMAND_FIELD, field::N_EVENT_REPORT_RQ)
            .set_u16(tag::MESSAGE_ID, id)
            .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0000)
            .set_uid(tag::AFFECTED_SOP_CLASS_UID, class)
            .set_uid(tag::AFFECTED_SOP_INSTANCE_UID, instance)
            .set_u16(tag::EVENT_TYPE_ID, event_type);
        let mut out = Vec::with_capacity(data.len() + 512);
        pdu::encode_pdata(&mut out, pc, true, &rq.encode(), self.peer_max);
        pdu::encode_pdata(&mut out, pc, false, data, self.peer_max);
        tokio::time::timeout(self.timeout, pdu::send(&mut self.stream, &out))
            .await
            .map_err(|_| ScuError::Timeout)??;
        self.response(field::N_EVENT_REPORT_RSP, id).await
    }

    /// Reads the response `rsp_field` to our request `id` and returns its status.
    async fn response(&mut self, rsp_field: u16, id: u16) -> Result<u16, ScuError> {
        let mut buf = Vec::new();
        loop {
            match self.read().await? {
                Incoming::PData(pdvs) => {
                    for p in pdvs {
                        if !p.is_command {
                            return Err(ScuError::Protocol("data set in a response".into()));
                        }
                        buf.extend_from_slice(&p.data);
                        if p.is_last {
                            let rsp = Command::decode(&buf).map_err(ScuError::Protocol)?;
                            if rsp.command_field() != rsp_field
                                || rsp.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO) != Some(id)
                            {
                                return Err(ScuError::Protocol("unexpected response".into()));
                            }
                            return rsp.u16(tag::STATUS).ok_or_else(|| {
                                ScuError::Protocol("response without status".into())
                            });
                        }
                    }
                }
                Incoming::Control(p) => {
                    return Err(ScuError::Protocol(format!(
                        "destination sent {}",
                        p.short_description()
                    )));
                }
            }
        }
    }

    /// Releases the association (A-RELEASE-RQ, waits for the RP), then closes.
    pub async fn release(mut self) {
        if pdu::send(&mut self.stream, &pdu::encode(&Pdu::ReleaseRQ)).await.is_ok() {
            let _ = self.read().await;
        }
        let _ = self.stream.shutdown().await;
    }

    /// Aborts the association (cancel, or an error in the middle of a message).
    pub async fn abort(mut self) {
        let _ = tokio::time::timeout(
            self.timeout,
            pdu::send(
                &mut self.stream,
                &pdu::encode(&Pdu::AbortRQ { source: AbortRQSource::ServiceUser }),
            ),
        )
        .await;
        let _ = self.stream.shutdown().await;
    }
}
