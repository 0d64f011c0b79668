//! One association, from the A-ASSOCIATE-RQ to release or abort (the acceptor side of the PS3.8
//! state machine), over any byte stream (plain TCP or TLS).
//!
//! [`serve_connection`] walks the association's [`State`]s; while it is established, a [`Session`]
//! reads PDUs and [`message`] gathers their PDVs into the DIMSE message in progress. Each DIMSE service is a file
//! of its own, holding its request checks and its exchange: [`echo`], [`store`] (C-STORE, through
//! [`crate::dicom::ingest`]), [`find`] (C-FIND and Modality Worklist), [`mpps`], [`commitment`]
//! and [`retrieve`] (C-GET/C-MOVE); [`session`] has the send helpers they share.
//!
//! Messages are processed as their PDVs arrive: a C-STORE data set goes fragment by fragment to
//! a blob ([`crate::dicom::ingest::Receiving`]); the response is sent only after the instance is durable. Anything that
//! breaks the protocol (bad PDU, PDV on an unknown context, a data set where a command belongs, a
//! PDU over our limit) gets an A-ABORT, and the message in progress is abandoned: its temp file is
//! removed and nothing of it is indexed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use dicom_ul::pdu::{AbortRQServiceProviderReason as AbortReason, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tracing::{debug, info, warn};

use super::DicomContext;
use super::negotiate::{self, Association};
use super::pdu::{self, FramingError, Incoming, PduReader, ReadPdu};
use message::Message;

mod commitment;
mod echo;
mod find;
mod message;
mod mpps;
mod retrieve;
mod session;
mod store;

/// Responses are written in batches of about this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// Where an association is: the acceptor's states of PS3.8 9.2 that are ours to keep (the
/// transport and ARTIM states around them are the acceptor's, in `dicom::serve`).
enum State<S> {
    /// Sta2: connection open, ARTIM running, waiting for the A-ASSOCIATE-RQ.
    AwaitingAssociateRq(S),
    /// Sta6: accepted; DIMSE messages until the peer releases or either side aborts.
    Established(Session<S>),
    /// Sta8: the peer sent an A-RELEASE-RQ; our A-RELEASE-RP goes out next.
    AwaitingRelease(Session<S>),
    /// Sta13: closing the connection, after the A-ABORT to send, if any.
    Ended(Session<S>, End),
}

/// Why the established association stops.
enum Stop {
    /// The peer asked for release.
    Release,
    /// It ends now (aborted by either side, or the connection is gone).
    End(End),
}

/// How the association ends.
enum End {
    /// We abort with this reason.
    Abort(AbortReason),
    /// The peer aborted, closed the connection, or released: nothing more to send.
    Quiet,
}

/// Serves one connection: negotiation, then DIMSE messages until release or abort. `pending` is
/// the connection's place among the not-yet-accepted ones; an association slot is taken only
/// once the caller's request is accepted (when all are taken, the request is rejected as
/// transient), and the pending place is given back then.
pub async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    ctx: Arc<DicomContext>,
    mut shutdown: watch::Receiver<bool>,
    pending: crate::conn_gate::GatePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut pending = Some(pending);
    let mut state = State::AwaitingAssociateRq(stream);
    loop {
        state = match state {
            State::AwaitingAssociateRq(stream) => {
                match accept(stream, peer, &ctx, pending.take()).await {
                    Some(session) => State::Established(session),
                    None => return,
                }
            }
            State::Established(mut session) => match session.run(&mut shutdown).await {
                Stop::Release => State::AwaitingRelease(session),
                Stop::End(end) => State::Ended(session, end),
            },
            State::AwaitingRelease(mut session) => {
                session.release().await;
                State::Ended(session, End::Quiet)
            }
            State::Ended(session, end) => {
                session.close(end).await;
                return;
            }
        };
    }
}

/// Reads and answers the A-ASSOCIATE-RQ; `None` when the association was not established (the
/// A-ASSOCIATE-RJ or A-ABORT, if any, is sent).
async fn accept<S>(
    mut stream: S,
    peer: SocketAddr,
    ctx: &Arc<DicomContext>,
    pending: Option<crate::conn_gate::GatePermit>,
) -> Option<Session<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let s = &ctx.settings;
    let mut reader = PduReader::new(s.max_pdu);
    let first = tokio::time::timeout(s.artim, reader.read(&mut stream)).await;
    let rq = match first {
        Err(_) => {
            debug!(%peer, "no association request before the ARTIM timeout; closing");
            return None;
        }
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "bad first PDU");
            if let Some(reason) = e.abort_reason() {
                let _ = pdu::send(&mut stream, &pdu::abort_pdu(reason)).await;
            }
            return None;
        }
        Ok(Ok(Incoming::Control(Pdu::AssociationRQ(rq)))) => rq,
        Ok(Ok(other)) => {
            warn!(%peer, "expected an A-ASSOCIATE-RQ, got {}", describe(&other));
            let _ = pdu::send(&mut stream, &pdu::abort_pdu(AbortReason::UnexpectedPdu)).await;
            return None;
        }
    };
    let policy = ctx.policy();
    let (assoc, ac) = match negotiate::negotiate(&rq, peer.ip(), &policy, s.max_pdu) {
        Ok(x) => x,
        Err(rj) => {
            warn!(%peer, calling_ae = %rq.calling_ae_title, called_ae = %rq.called_ae_title,
                reason = %rj.source, "association rejected");
            metrics::counter!("hms_dicom_associations_rejected_total", "reason" => "policy")
                .increment(1);
            let _ = tokio::time::timeout(s.artim, async {
                let _ = pdu::send(&mut stream, &pdu::encode(&Pdu::AssociationRJ(rj))).await;
                let _ = stream.shutdown().await;
            })
            .await;
            return None;
        }
    };
    let Some(slot) = ctx.try_slot() else {
        warn!(%peer, calling_ae = %rq.calling_ae_title, "association limit reached; rejecting");
        metrics::counter!("hms_dicom_associations_rejected_total", "reason" => "busy").increment(1);
        let _ = tokio::time::timeout(s.artim, async {
            let _ =
                pdu::send(&mut stream, &pdu::encode(&Pdu::AssociationRJ(negotiate::busy()))).await;
            let _ = stream.shutdown().await;
        })
        .await;
        return None;
    };
    drop(pending);
    if pdu::send(&mut stream, &pdu::encode(&Pdu::AssociationAC(ac))).await.is_err() {
        return None;
    }
    info!(%peer, calling_ae = %assoc.calling_ae, contexts = assoc.contexts.len(), "association accepted");
    metrics::counter!("hms_dicom_associations_total").increment(1);
    metrics::gauge!("hms_dicom_associations_active").increment(1.0);
    Some(Session {
        stream,
        reader,
        ctx: ctx.clone(),
        assoc,
        peer,
        state: Message::Idle,
        queued: VecDeque::new(),
        out: Vec::with_capacity(WRITE_BATCH),
        next_message_id: 1,
        _slot: slot,
    })
}

fn describe(i: &Incoming) -> String {
    match i {
        Incoming::PData(_) => "P-DATA-TF".into(),
        Incoming::Control(p) => p.short_description().to_string(),
    }
}

/// An established association.
struct Session<S> {
    stream: S,
    reader: PduReader,
    ctx: Arc<DicomContext>,
    assoc: Association,
    peer: SocketAddr,
    state: Message,
    /// PDUs read ahead while answering a C-FIND (watching for C-CANCEL).
    queued: VecDeque<Incoming>,
    out: Vec<u8>,
    /// Message ID of the next request we send (N-EVENT-REPORT) on this association.
    next_message_id: u16,
    /// The association slot, held until the connection is closed.
    _slot: OwnedSemaphorePermit,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> Stop {
        let idle = self.ctx.settings.idle;
        loop {
            let idle_now = matches!(self.state, Message::Idle);
            if idle_now && *shutdown.borrow() {
                info!(peer = %self.peer, "shutting down: aborting idle association");
                return Stop::End(End::Abort(AbortReason::ReasonNotSpecified));
            }
            let incoming = if let Some(q) = self.queued.pop_front() {
                Ok(q)
            } else {
                tokio::select! {
                    r = tokio::time::timeout(idle, self.reader.read(&mut self.stream)) => match r {
                        Ok(r) => r,
                        Err(_) => {
                            warn!(peer = %self.peer, "association idle too long; aborting");
                            return Stop::End(End::Abort(AbortReason::ReasonNotSpecified));
                        }
                    },
                    r = shutdown.changed(), if idle_now => {
                        if r.is_err() {
                            return Stop::End(End::Abort(AbortReason::ReasonNotSpecified));
                        }
                        continue;
                    }
                }
            };
            let incoming = match incoming {
                Ok(i) => i,
                Err(e) => {
                    return match e.abort_reason() {
                        Some(reason) => {
                            warn!(peer = %self.peer, error = %e, "protocol error; aborting");
                            metrics::counter!("hms_dicom_aborts_total").increment(1);
                            Stop::End(End::Abort(reason))
                        }
                        None => {
                            if !matches!(e, FramingError::Closed) || !idle_now {
                                warn!(peer = %self.peer, error = %e, "connection lost");
                            }
                            Stop::End(End::Quiet)
                        }
                    };
                }
            };
            match incoming {
                Incoming::PData(pdvs) => {
                    for pdv in pdvs {
                        if let Err(reason) = self.on_pdv(pdv).await {
                            metrics::counter!("hms_dicom_aborts_total").increment(1);
                            return Stop::End(End::Abort(reason));
                        }
                    }
                }
                Incoming::Control(Pdu::ReleaseRQ) => return Stop::Release,
                Incoming::Control(Pdu::AbortRQ { .. }) => {
                    debug!(peer = %self.peer, "association aborted by the peer");
                    return Stop::End(End::Quiet);
                }
                Incoming::Control(other) => {
                    warn!(peer = %self.peer, "unexpected {}; aborting", other.short_description());
                    return Stop::End(End::Abort(AbortReason::UnexpectedPdu));
                }
            }
        }
    }

    /// Answers the peer's A-RELEASE-RQ (a message in progress is abandoned).
    async fn release(&mut self) {
        if !matches!(self.state, Message::Idle) {
            warn!(peer = %self.peer, "release requested in the middle of a message");
        }
        self.abandon();
        let _ = pdu::send(&mut self.stream, &pdu::encode(&Pdu::ReleaseRP)).await;
        debug!(peer = %self.peer, "association released");
    }

    /// Sends the A-ABORT, if any, and closes the connection.
    async fn close(mut self, end: End) {
        self.abandon();
        let artim = self.ctx.settings.artim;
        if let End::Abort(reason) = end {
            let _ =
                tokio::time::timeout(artim, pdu::send(&mut self.stream, &pdu::abort_pdu(reason)))
                    .await;
        }
        let _ = tokio::time::timeout(artim, self.stream.shutdown()).await;
        metrics::gauge!("hms_dicom_associations_active").decrement(1.0);
        debug!(peer = %self.peer, "association closed");
    }

    /// Drops the message in progress; a partial instance leaves nothing behind.
    fn abandon(&mut self) {
        if let Message::Store { sink, .. } = std::mem::replace(&mut self.state, Message::Idle) {
            sink.abandon();
            metrics::counter!("hms_dicom_store_abandoned_total").increment(1);
        }
    }
}
