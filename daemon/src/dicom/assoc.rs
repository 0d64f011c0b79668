//! One association, from the A-ASSOCIATE-RQ to release or abort (the acceptor side of the PS3.8
//! state machine), over any byte stream (plain TCP or TLS).
//!
//! Messages are processed as their PDVs arrive: a C-STORE data set goes fragment by fragment to
//! a [`SinkHandle`]; the response is sent only after the instance is durable. Anything that breaks
//! the protocol (bad PDU, PDV on an unknown context, a data set where a command belongs, a PDU over
//! our limit) gets an A-ABORT, and the message in progress is abandoned: its temp file is removed
//! and nothing of it is indexed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dicom_ul::pdu::{AbortRQServiceProviderReason as AbortReason, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::DicomContext;
use super::dimse::{self, Command, field, status, tag};
use super::index;
use super::ingest::{self, Declared, IngestError, Receiving, Stored, Written};
use super::negotiate::{self, AcceptedContext, Association};
use super::pdu::{self, FramingError, Incoming, PduReader, Pdv, ReadPdu};
use super::query;
use super::uids::{self, ServiceKind};
use super::{mpps, worklist};

mod retrieve;

/// Largest C-FIND identifier we accept.
const MAX_IDENTIFIER_BYTES: usize = 1024 * 1024;
/// Largest DIMSE-N data set we accept (a commitment request for a few thousand instances).
const MAX_N_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Responses are written in batches of about this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// Why the association ends.
enum End {
    /// We abort with this reason.
    Abort(AbortReason),
    /// The peer aborted, closed the connection, or released: nothing more to send.
    Quiet,
}

enum Message {
    Idle,
    Command {
        context_id: u8,
        buf: BytesMut,
    },
    Store {
        pc: AcceptedContext,
        cmd: Command,
        sink: Receiving,
    },
    Find {
        pc: AcceptedContext,
        cmd: Command,
        buf: BytesMut,
    },
    /// The data set of a DIMSE-N request (Storage Commitment N-ACTION, MPPS N-CREATE / N-SET),
    /// collected whole, then handled by its command field.
    NRequest {
        pc: AcceptedContext,
        cmd: Command,
        buf: BytesMut,
    },
    /// A C-GET or C-MOVE identifier arriving (run by `retrieve` once complete).
    Retrieve {
        pc: AcceptedContext,
        cmd: Command,
        buf: BytesMut,
    },
    /// Consume and drop the data set, then answer with this status.
    Discard {
        pc: AcceptedContext,
        cmd: Command,
        rsp_field: u16,
        status: u16,
        comment: String,
    },
}

/// Serves one connection: negotiation, then DIMSE messages until release or abort. `pending` is
/// the connection's place among the not-yet-accepted ones; an association slot is taken only
/// once the caller's request is accepted (when all are taken, the request is rejected as
/// transient), and the pending place is given back then.
pub async fn serve_connection<S>(
    mut stream: S,
    peer: SocketAddr,
    ctx: Arc<DicomContext>,
    shutdown: watch::Receiver<bool>,
    pending: crate::conn_gate::GatePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let s = &ctx.settings;
    let mut reader = PduReader::new(s.max_pdu);
    let first = tokio::time::timeout(s.artim, reader.read(&mut stream)).await;
    let rq = match first {
        Err(_) => {
            debug!(%peer, "no association request before the ARTIM timeout; closing");
            return;
        }
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "bad first PDU");
            if let Some(reason) = e.abort_reason() {
                let _ = pdu::send(&mut stream, &pdu::abort_pdu(reason)).await;
            }
            return;
        }
        Ok(Ok(Incoming::Control(Pdu::AssociationRQ(rq)))) => rq,
        Ok(Ok(other)) => {
            warn!(%peer, "expected an A-ASSOCIATE-RQ, got {}", describe(&other));
            let _ = pdu::send(&mut stream, &pdu::abort_pdu(AbortReason::UnexpectedPdu)).await;
            return;
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
            return;
        }
    };
    let Some(_slot) = ctx.try_slot() else {
        warn!(%peer, calling_ae = %rq.calling_ae_title, "association limit reached; rejecting");
        metrics::counter!("hms_dicom_associations_rejected_total", "reason" => "busy").increment(1);
        let _ = tokio::time::timeout(s.artim, async {
            let _ =
                pdu::send(&mut stream, &pdu::encode(&Pdu::AssociationRJ(negotiate::busy()))).await;
            let _ = stream.shutdown().await;
        })
        .await;
        return;
    };
    drop(pending);
    if pdu::send(&mut stream, &pdu::encode(&Pdu::AssociationAC(ac))).await.is_err() {
        return;
    }
    info!(%peer, calling_ae = %assoc.calling_ae, contexts = assoc.contexts.len(), "association accepted");
    metrics::counter!("hms_dicom_associations_total").increment(1);
    metrics::gauge!("hms_dicom_associations_active").increment(1.0);
    let mut session = Session {
        stream,
        reader,
        ctx: ctx.clone(),
        assoc,
        peer,
        state: Message::Idle,
        queued: VecDeque::new(),
        out: Vec::with_capacity(WRITE_BATCH),
        next_message_id: 1,
    };
    let end = session.run(shutdown).await;
    session.abandon();
    if let End::Abort(reason) = end {
        let _ = tokio::time::timeout(
            ctx.settings.artim,
            pdu::send(&mut session.stream, &pdu::abort_pdu(reason)),
        )
        .await;
    }
    let _ = tokio::time::timeout(ctx.settings.artim, session.stream.shutdown()).await;
    metrics::gauge!("hms_dicom_associations_active").decrement(1.0);
    debug!(%peer, "association closed");
}

fn describe(i: &Incoming) -> String {
    match i {
        Incoming::PData(_) => "P-DATA-TF".into(),
        Incoming::Control(p) => p.short_description().to_string(),
    }
}

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
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> End {
        let idle = self.ctx.settings.idle;
        loop {
            let idle_now = matches!(self.state, Message::Idle);
            if idle_now && *shutdown.borrow() {
                info!(peer = %self.peer, "shutting down: aborting idle association");
                return End::Abort(AbortReason::ReasonNotSpecified);
            }
            let incoming = if let Some(q) = self.queued.pop_front() {
                Ok(q)
            } else {
                tokio::select! {
                    r = tokio::time::timeout(idle, self.reader.read(&mut self.stream)) => match r {
                        Ok(r) => r,
                        Err(_) => {
                            warn!(peer = %self.peer, "association idle too long; aborting");
                            return End::Abort(AbortReason::ReasonNotSpecified);
                        }
                    },
                    r = shutdown.changed(), if idle_now => {
                        if r.is_err() {
                            return End::Abort(AbortReason::ReasonNotSpecified);
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
                            End::Abort(reason)
                        }
                        None => {
                            if !matches!(e, FramingError::Closed) || !idle_now {
                                warn!(peer = %self.peer, error = %e, "connection lost");
                            }
                            End::Quiet
                        }
                    };
                }
            };
            match incoming {
                Incoming::PData(pdvs) => {
                    for pdv in pdvs {
                        if let Err(reason) = self.on_pdv(pdv).await {
                            metrics::counter!("hms_dicom_aborts_total").increment(1);
                            return End::Abort(reason);
                        }
                    }
                }
                Incoming::Control(Pdu::ReleaseRQ) => {
                    if !matches!(self.state, Message::Idle) {
                        warn!(peer = %self.peer, "release requested in the middle of a message");
                    }
                    self.abandon();
                    let _ = pdu::send(&mut self.stream, &pdu::encode(&Pdu::ReleaseRP)).await;
                    debug!(peer = %self.peer, "association released");
                    return End::Quiet;
                }
                Incoming::Control(Pdu::AbortRQ { .. }) => {
                    debug!(peer = %self.peer, "association aborted by the peer");
                    return End::Quiet;
                }
                Incoming::Control(other) => {
                    warn!(peer = %self.peer, "unexpected {}; aborting", other.short_description());
                    return End::Abort(AbortReason::UnexpectedPdu);
                }
            }
        }
    }

    /// Drops the message in progress; a partial instance leaves nothing behind.
    fn abandon(&mut self) {
        if let Message::Store { sink, .. } = std::mem::replace(&mut self.state, Message::Idle) {
            sink.abandon();
            metrics::counter!("hms_dicom_store_abandoned_total").increment(1);
        }
    }

    async fn on_pdv(&mut self, pdv: Pdv) -> Result<(), AbortReason> {
        let Some(pc) = self.assoc.contexts.get(&pdv.context_id).cloned() else {
            warn!(peer = %self.peer, id = pdv.context_id, "PDV on a context that was not accepted");
            return Err(AbortReason::InvalidPduParameter);
        };
        if matches!(self.state, Message::Idle) {
            if !pdv.is_command {
                warn!(peer = %self.peer, "data set fragment without a command");
                return Err(AbortReason::UnexpectedPduParameter);
            }
            self.state = Message::Command { context_id: pc.id, buf: BytesMut::new() };
        }
        match &mut self.state {
            Message::Idle => unreachable!("handled above"),
            Message::Command { context_id, buf } => {
                if !pdv.is_command || *context_id != pc.id {
                    return Err(AbortReason::UnexpectedPduParameter);
                }
                if buf.len() + pdv.data.len() > dimse::MAX_COMMAND_BYTES {
                    return Err(AbortReason::InvalidPduParameter);
                }
                buf.extend_from_slice(&pdv.data);
                if !pdv.is_last {
                    return Ok(());
                }
                let cmd = match Command::decode(buf) {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(peer = %self.peer, error = %e, "undecodable command set");
                        return Err(AbortReason::InvalidPduParameter);
                    }
                };
                self.state = Message::Idle;
                self.on_command(pc, cmd).await
            }
            Message::Store { pc: store_pc, sink, .. } => {
                if pdv.is_command || store_pc.id != pc.id {
                    return Err(AbortReason::UnexpectedPduParameter);
                }
                metrics::counter!("hms_dicom_bytes_received_total")
                    .increment(pdv.data.len() as u64);
                let last = pdv.is_last;
                sink.push(pdv.data).await;
                if last {
                    let Message::Store { pc, cmd, sink } =
                        std::mem::replace(&mut self.state, Message::Idle)
                    else {
                        unreachable!()
                    };
                    self.finish_store(pc, cmd, sink).await?;
                }
                Ok(())
            }
            Message::Find { pc: find_pc, buf, .. } => {
                if pdv.is_command || find_pc.id != pc.id {
                    return Err(AbortReason::UnexpectedPduParameter);
                }
                if buf.len() + pdv.data.len() > MAX_IDENTIFIER_BYTES {
                    return Err(AbortReason::InvalidPduParameter);
                }
                buf.extend_from_slice(&pdv.data);
                if pdv.is_last {
                    let Message::Find { pc, cmd, buf } =
                        std::mem::replace(&mut self.state, Message::Idle)
                    else {
                        unreachable!()
                    };
                    self.run_find(pc, cmd, buf).await?;
                }
                Ok(())
            }
            Message::NRequest { pc: n_pc, buf, .. } => {
                if pdv.is_command || n_pc.id != pc.id {
                    return Err(AbortReason::UnexpectedPduParameter);
                }
                if buf.len() + pdv.data.len() > MAX_N_REQUEST_BYTES {
                    return Err(AbortReason::InvalidPduParameter);
                }
                buf.extend_from_slice(&pdv.data);
                if pdv.is_last {
                    let Message::NRequest { pc, cmd, buf } =
                        std::mem::replace(&mut self.state, Message::Idle)
                    else {
                        unreachable!()
                    };
                    if cmd.command_field() == field::N_ACTION_RQ {
                        self.run_commitment(pc, cmd, buf).await?;
                    } else {
                        self.run_mpps(pc, cmd, buf).await?;
                    }
                }
                Ok(())
            }
            Message::Retrieve { pc: r_pc, buf, .. } => {
                if pdv.is_command || r_pc.id != pc.id {
                    return Err(AbortReason::UnexpectedPduParameter);
                }
                if buf.len() + pdv.data.len() > MAX_IDENTIFIER_BYTES {
                    return Err(AbortReason::InvalidPduParameter);
                }
                buf.extend_from_slice(&pdv.data);
                if pdv.is_last {
                    let Message::Retrieve { pc, cmd, buf } =
                        std::mem::replace(&mut self.state, Message::Idle)
                    else {
                        unreachable!()
                    };
                    self.run_retrieve(pc, cmd, buf).await?;
                }
                Ok(())
            }
            Message::Discard { pc: d_pc, .. } => {
                if pdv.is_command || d_pc.id != pc.id {
                    return Err(AbortReason::UnexpectedPduParameter);
                }
                if pdv.is_last {
                    let Message::Discard { pc, cmd, rsp_field, status, comment } =
                        std::mem::replace(&mut self.state, Message::Idle)
                    else {
                        unreachable!()
                    };
                    self.respond(&pc, &cmd, rsp_field, status, &comment).await?;
                }
                Ok(())
            }
        }
    }

    async fn on_command(&mut self, pc: AcceptedContext, cmd: Command) -> Result<(), AbortReason> {
        let rsp_field = cmd.command_field() | 0x8000;
        let discard = |pc: AcceptedContext, cmd: Command, status: u16, comment: &str| {
            Message::Discard { pc, cmd, rsp_field, status, comment: comment.into() }
        };
        match cmd.command_field() {
            field::C_ECHO_RQ => {
                let st = if pc.kind == ServiceKind::Verification {
                    status::SUCCESS
                } else {
                    status::SOP_CLASS_NOT_SUPPORTED
                };
                if cmd.has_data_set() {
                    self.state =
                        discard(pc, cmd, status::CANNOT_UNDERSTAND, "C-ECHO with a data set");
                    return Ok(());
                }
                metrics::counter!("hms_dicom_echo_total").increment(1);
                self.respond(&pc, &cmd, field::C_ECHO_RSP, st, "").await
            }
            field::C_STORE_RQ => {
                let class = cmd.str(tag::AFFECTED_SOP_CLASS_UID).unwrap_or("").to_owned();
                let instance = cmd.str(tag::AFFECTED_SOP_INSTANCE_UID).unwrap_or("").to_owned();
                if !cmd.has_data_set() {
                    return self
                        .respond(&pc, &cmd, rsp_field, status::CANNOT_UNDERSTAND, "no data set")
                        .await;
                }
                if pc.kind != ServiceKind::Storage || class != pc.abstract_syntax {
                    self.state = discard(
                        pc,
                        cmd,
                        status::SOP_CLASS_NOT_SUPPORTED,
                        "SOP class differs from the presentation context",
                    );
                    return Ok(());
                }
                if instance.is_empty() {
                    self.state =
                        discard(pc, cmd, status::CANNOT_UNDERSTAND, "no Affected SOP Instance UID");
                    return Ok(());
                }
                let declared = Declared {
                    sop_class_uid: class,
                    sop_instance_uid: instance,
                    transfer_syntax: pc.transfer_syntax.clone(),
                    source_ae_title: self.assoc.calling_ae.clone(),
                    study_instance_uid: None,
                };
                match Receiving::start(self.ctx.store.blobs(), declared) {
                    Ok(sink) => self.state = Message::Store { pc, cmd, sink },
                    Err(_) => {
                        self.state = discard(pc, cmd, status::CANNOT_UNDERSTAND, "transfer syntax");
                    }
                }
                Ok(())
            }
            field::C_FIND_RQ => {
                if !cmd.has_data_set() {
                    return self
                        .respond(&pc, &cmd, rsp_field, status::CANNOT_UNDERSTAND, "no identifier")
                        .await;
                }
                if !matches!(pc.kind, ServiceKind::StudyRootFind | ServiceKind::WorklistFind) {
                    self.state =
                        discard(pc, cmd, status::SOP_CLASS_NOT_SUPPORTED, "not a C-FIND context");
                    return Ok(());
                }
                self.state = Message::Find { pc, cmd, buf: BytesMut::new() };
                Ok(())
            }
            field::N_ACTION_RQ => {
                let class = cmd.str(tag::REQUESTED_SOP_CLASS_UID).unwrap_or("");
                let instance = cmd.str(tag::REQUESTED_SOP_INSTANCE_UID).unwrap_or("");
                let refused = if pc.kind != ServiceKind::StorageCommitment
                    || class != uids::STORAGE_COMMITMENT_PUSH_MODEL
                {
                    Some((status::NO_SUCH_SOP_CLASS, "not a Storage Commitment context"))
                } else if instance != uids::STORAGE_COMMITMENT_INSTANCE {
                    Some((status::NO_SUCH_SOP_INSTANCE, "not the well-known commitment instance"))
                } else if cmd.u16(tag::ACTION_TYPE_ID)
                    != Some(super::commitment::ACTION_REQUEST_COMMITMENT)
                {
                    Some((status::NO_SUCH_ACTION_TYPE, "action type is not 1"))
                } else if !cmd.has_data_set() {
                    Some((status::MISSING_ATTRIBUTE, "no action information"))
                } else {
                    None
                };
                match refused {
                    None => {
                        self.state = Message::NRequest { pc, cmd, buf: BytesMut::new() };
                        Ok(())
                    }
                    Some((st, why)) if cmd.has_data_set() => {
                        self.state = discard(pc, cmd, st, why);
                        Ok(())
                    }
                    Some((st, why)) => self.respond(&pc, &cmd, rsp_field, st, why).await,
                }
            }
            field::N_EVENT_REPORT_RSP => {
                // The requester's answer to our commitment report: nothing more to do.
                let st = cmd.u16(tag::STATUS).unwrap_or(0xFFFF);
                if st != status::SUCCESS {
                    warn!(peer = %self.peer, status = format!("{st:04X}"),
                        "the requester refused our storage commitment report");
                }
                Ok(())
            }
            field::C_GET_RQ | field::C_MOVE_RQ => {
                if !cmd.has_data_set() {
                    return self
                        .respond(&pc, &cmd, rsp_field, status::CANNOT_UNDERSTAND, "no identifier")
                        .await;
                }
                let fits = match pc.kind {
                    ServiceKind::Get(_) => cmd.command_field() == field::C_GET_RQ,
                    ServiceKind::Move(_) => cmd.command_field() == field::C_MOVE_RQ,
                    _ => false,
                };
                if !fits {
                    self.state = discard(
                        pc,
                        cmd,
                        status::SOP_CLASS_NOT_SUPPORTED,
                        "not a C-GET/C-MOVE context",
                    );
                    return Ok(());
                }
                self.state = Message::Retrieve { pc, cmd, buf: BytesMut::new() };
                Ok(())
            }
            field::C_CANCEL_RQ => Ok(()), // nothing in progress to cancel
            mpps::field::N_CREATE_RQ | mpps::field::N_SET_RQ => {
                if !cmd.has_data_set() {
                    return self
                        .respond_mpps(&pc, &cmd, mpps::status::MISSING_ATTRIBUTE, "no data set")
                        .await;
                }
                if pc.kind != ServiceKind::Mpps {
                    self.state =
                        discard(pc, cmd, status::SOP_CLASS_NOT_SUPPORTED, "not an MPPS context");
                    return Ok(());
                }
                self.state = Message::NRequest { pc, cmd, buf: BytesMut::new() };
                Ok(())
            }
            other => {
                debug!(peer = %self.peer, field = other, "unsupported DIMSE command");
                if cmd.has_data_set() {
                    self.state =
                        discard(pc, cmd, status::UNRECOGNIZED_OPERATION, "operation not supported");
                    Ok(())
                } else {
                    self.respond(&pc, &cmd, rsp_field, status::UNRECOGNIZED_OPERATION, "").await
                }
            }
        }
    }

    async fn finish_store(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
        sink: Receiving,
    ) -> Result<(), AbortReason> {
        let ctx = self.ctx.clone();
        let sender = index::Sender::association(&self.assoc.calling_ae, self.peer);
        let policy = ctx.settings.duplicate_policy;
        let (st, comment) = match ingest::commit(&ctx.store, policy, sink, sender).await {
            Ok(Stored { sop_instance_uid: sop, written, .. }) => {
                match written {
                    Written::New { version, outbox_seq } => {
                        debug!(peer = %self.peer, %sop, version, outbox_seq, "instance stored");
                    }
                    Written::Identical => {
                        debug!(peer = %self.peer, %sop, "identical instance already stored");
                    }
                }
                (status::SUCCESS, String::new())
            }
            Err(e) => self.store_failure(e, cmd.str(tag::AFFECTED_SOP_INSTANCE_UID).unwrap_or("")),
        };
        metrics::counter!("hms_dicom_store_total", "status" => format!("{st:04X}")).increment(1);
        self.respond(&pc, &cmd, field::C_STORE_RSP, st, &comment).await
    }

    /// The C-STORE-RSP status and Error Comment of an instance that was not stored.
    fn store_failure(&self, e: IngestError, sop: &str) -> (u16, String) {
        match e {
            IngestError::Malformed(m) => {
                warn!(peer = %self.peer, error = %m, "malformed data set refused");
                (status::CANNOT_UNDERSTAND, m)
            }
            IngestError::UnsupportedTransferSyntax(_) | IngestError::Write(_) => {
                warn!(peer = %self.peer, error = %e, "instance could not be written");
                (status::OUT_OF_RESOURCES, "cannot write the instance".to_owned())
            }
            IngestError::Mismatch(m) => {
                let why = m.describe("the command");
                warn!(peer = %self.peer, why, "instance refused");
                (status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS, why)
            }
            IngestError::Conflict => {
                warn!(peer = %self.peer, %sop,
                    "instance with this SOP Instance UID already stored with other content; kept the first");
                (status::DUPLICATE_SOP_INSTANCE, e.to_string())
            }
            IngestError::Store(e) => {
                warn!(peer = %self.peer, error = %e, disk_full = e.is_disk_full(), "index write failed");
                (status::OUT_OF_RESOURCES, "storage failure".to_owned())
            }
        }
    }

    async fn run_find(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
        buf: BytesMut,
    ) -> Result<(), AbortReason> {
        if pc.kind == ServiceKind::WorklistFind {
            return self.run_worklist(pc, cmd, buf).await;
        }
        let q = match query::parse_identifier(&buf, &pc.transfer_syntax) {
            Ok(q) => q,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "C-FIND identifier refused");
                self.audit("dicom-find", "dicom-find?".into(), format!("refused: {e}"));
                let st = match e {
                    query::QueryError::Undecodable(_) => status::CANNOT_UNDERSTAND,
                    query::QueryError::Invalid(_) => status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                };
                return self.respond(&pc, &cmd, field::C_FIND_RSP, st, &e.to_string()).await;
            }
        };
        let limit = self.ctx.settings.max_find_results;
        let q2 = q.clone();
        let found = self.ctx.store.read(move |conn| super::index::find(conn, &q2, limit)).await;
        let records = match found {
            Ok(Ok(r)) => r,
            Ok(Err(limit)) => {
                let why = format!("more than {limit} matches; narrow the query");
                return self
                    .respond(&pc, &cmd, field::C_FIND_RSP, status::OUT_OF_RESOURCES, &why)
                    .await;
            }
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "C-FIND failed");
                return self
                    .respond(
                        &pc,
                        &cmd,
                        field::C_FIND_RSP,
                        status::UNABLE_TO_PROCESS,
                        "query failed",
                    )
                    .await;
            }
        };
        metrics::counter!("hms_dicom_find_total").increment(1);
        self.audit(
            "dicom-find",
            format!("dicom-find?{}", q.describe()),
            format!("success: {} match(es)", records.len()),
        );
        let ae = self.ctx.settings.ae_title.clone();
        let ts = pc.transfer_syntax.clone();
        self.send_matches(&pc, &cmd, &records, "C-FIND", |rec| {
            query::response_identifier(&q, rec, &ts, &ae)
        })
        .await
    }

    /// Sends one Pending C-FIND-RSP with its identifier per match (batched writes), watching for
    /// a C-CANCEL between matches, then the final status. Shared by C-FIND and the worklist.
    async fn send_matches<T>(
        &mut self,
        pc: &AcceptedContext,
        cmd: &Command,
        matches: &[T],
        what: &str,
        encode: impl Fn(&T) -> Result<Vec<u8>, String>,
    ) -> Result<(), AbortReason> {
        let message_id = cmd.message_id();
        for m in matches {
            if self.cancel_requested(message_id).await? {
                self.flush().await?;
                debug!(peer = %self.peer, what, "query cancelled");
                return self.respond(pc, cmd, field::C_FIND_RSP, status::CANCEL, "").await;
            }
            let identifier = match encode(m) {
                Ok(b) => b,
                Err(e) => {
                    warn!(peer = %self.peer, what, error = %e, "cannot encode a query response");
                    self.flush().await?;
                    return self
                        .respond(
                            pc,
                            cmd,
                            field::C_FIND_RSP,
                            status::UNABLE_TO_PROCESS,
                            "encoding failed",
                        )
                        .await;
                }
            };
            let rsp = Command::response_to(cmd, field::C_FIND_RSP, status::PENDING, true);
            let peer_max = self.assoc.peer_max_pdu;
            pdu::encode_pdata(&mut self.out, pc.id, true, &rsp.encode(), peer_max);
            pdu::encode_pdata(&mut self.out, pc.id, false, &identifier, peer_max);
            if self.out.len() >= WRITE_BATCH {
                self.flush().await?;
            }
        }
        self.flush().await?;
        self.respond(pc, cmd, field::C_FIND_RSP, status::SUCCESS, "").await
    }

    /// Storage Commitment: answers the N-ACTION, then reports the result at once with an
    /// N-EVENT-REPORT on this association (every acknowledged instance is already durable).
    async fn run_commitment(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
        buf: BytesMut,
    ) -> Result<(), AbortReason> {
        use super::commitment;
        let set_affected = |rsp: &mut Command| {
            rsp.set_uid(tag::AFFECTED_SOP_CLASS_UID, uids::STORAGE_COMMITMENT_PUSH_MODEL)
                .set_uid(tag::AFFECTED_SOP_INSTANCE_UID, uids::STORAGE_COMMITMENT_INSTANCE);
        };
        let request = match commitment::parse_request(&buf, &pc.transfer_syntax) {
            Ok(r) => r,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "storage commitment request refused");
                let st = match e {
                    commitment::RequestError::Missing(_) => status::MISSING_ATTRIBUTE,
                    _ => status::PROCESSING_FAILURE,
                };
                let mut rsp = Command::response_to(&cmd, field::N_ACTION_RSP, st, false);
                set_affected(&mut rsp);
                rsp.set_text(tag::ERROR_COMMENT, &e.to_string());
                return self.send_command(&pc, &rsp).await;
            }
        };
        let refs = request.references.clone();
        let blobs = self.ctx.store.blobs().clone();
        let checked = self.ctx.store.read(move |conn| commitment::check(conn, &blobs, &refs)).await;
        let outcomes = match checked {
            Ok(o) => o,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "storage commitment lookup failed");
                let mut rsp = Command::response_to(
                    &cmd,
                    field::N_ACTION_RSP,
                    status::PROCESSING_FAILURE,
                    false,
                );
                set_affected(&mut rsp);
                return self.send_command(&pc, &rsp).await;
            }
        };
        let failed = outcomes.iter().filter(|o| o.failure.is_some()).count();
        metrics::counter!("hms_dicom_commitment_total").increment(1);
        self.audit(
            "dicom-commit",
            format!("dicom-commit?transaction={}", request.transaction_uid),
            format!("{} committed, {failed} failed", outcomes.len() - failed),
        );
        let mut rsp = Command::response_to(&cmd, field::N_ACTION_RSP, status::SUCCESS, false);
        set_affected(&mut rsp);
        rsp.set_u16(tag::ACTION_TYPE_ID, commitment::ACTION_REQUEST_COMMITMENT);
        self.send_command(&pc, &rsp).await?;

        let ae = self.ctx.settings.ae_title.clone();
        if let Some(dest) = self.ctx.policy().commitment_destination(&self.assoc.calling_ae) {
            // The requester asked (in its `dicom.peers` entry) for the report on a new association.
            tokio::spawn(report_on_new_association(
                self.ctx.clone(),
                dest,
                self.assoc.calling_ae.clone(),
                request.transaction_uid.clone(),
                outcomes,
            ));
            return Ok(());
        }
        let (event, data) = match commitment::event_report(
            &request.transaction_uid,
            &outcomes,
            &pc.transfer_syntax,
            &ae,
        ) {
            Ok(x) => x,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "cannot encode the commitment report");
                return Ok(());
            }
        };
        let mut report = Command::new();
        report
            .set_u16(tag::COMMAND_FIELD, field::N_EVENT_REPORT_RQ)
            .set_u16(tag::MESSAGE_ID, self.take_message_id())
            .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0000)
            .set_uid(tag::AFFECTED_SOP_CLASS_UID, uids::STORAGE_COMMITMENT_PUSH_MODEL)
            .set_uid(tag::AFFECTED_SOP_INSTANCE_UID, uids::STORAGE_COMMITMENT_INSTANCE)
            .set_u16(tag::EVENT_TYPE_ID, event);
        let peer_max = self.assoc.peer_max_pdu;
        pdu::encode_pdata(&mut self.out, pc.id, true, &report.encode(), peer_max);
        pdu::encode_pdata(&mut self.out, pc.id, false, &data, peer_max);
        info!(peer = %self.peer, transaction = %request.transaction_uid,
            committed = outcomes.len() - failed, failed, "storage commitment reported");
        self.flush().await
    }

    fn take_message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        id
    }

    /// Sends one command without a data set.
    async fn send_command(&mut self, pc: &AcceptedContext, c: &Command) -> Result<(), AbortReason> {
        pdu::encode_pdata(&mut self.out, pc.id, true, &c.encode(), self.assoc.peer_max_pdu);
        self.flush().await
    }

    /// Queues an audit event for a query (like FHIR reads, a query does not wait for its audit
    /// event to be durable; stores write theirs in the instance's own transaction).
    fn audit(&self, action: &str, entity: String, outcome: String) {
        self.audit_record(action, entity, outcome, None);
    }

    /// As [`Self::audit`], with a JSON detail (what a retrieve sent, and where).
    fn audit_detail(&self, action: &str, entity: String, outcome: String, d: serde_json::Value) {
        self.audit_record(action, entity, outcome, Some(d.to_string()));
    }

    fn audit_record(&self, action: &str, entity: String, outcome: String, detail: Option<String>) {
        let rec = crate::audit::AuditRecord {
            actor: format!("dicom:{}", self.assoc.calling_ae),
            source: self.peer.ip().to_string(),
            action: action.into(),
            entity,
            outcome,
            detail,
        };
        let store = self.ctx.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.write(move |tx| crate::audit::append(tx, &rec).map(|_| ())).await
            {
                tracing::error!(error = %e, "audit record could not be written");
            }
        });
    }

    /// Looks, without waiting, for a C-CANCEL-RQ of `message_id`. Other PDUs read meanwhile are
    /// queued for the main loop.
    async fn cancel_requested(&mut self, message_id: u16) -> Result<bool, AbortReason> {
        loop {
            // A zero timeout polls the (cancel-safe) read exactly once.
            let got =
                tokio::time::timeout(Duration::ZERO, self.reader.read(&mut self.stream)).await;
            let incoming = match got {
                Err(_) => return Ok(false),
                Ok(Ok(i)) => i,
                Ok(Err(e)) => {
                    return Err(e.abort_reason().unwrap_or(AbortReason::ReasonNotSpecified));
                }
            };
            if let Incoming::PData(pdvs) = &incoming
                && let [p] = pdvs.as_slice()
                && p.is_command
                && p.is_last
                && let Ok(c) = Command::decode(&p.data)
                && c.command_field() == field::C_CANCEL_RQ
                && c.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO) == Some(message_id)
            {
                return Ok(true);
            }
            self.queued.push_back(incoming);
            if matches!(self.queued.back(), Some(Incoming::Control(_))) {
                return Ok(false);
            }
        }
    }

    async fn flush(&mut self) -> Result<(), AbortReason> {
        if self.out.is_empty() {
            return Ok(());
        }
        let res =
            tokio::time::timeout(self.ctx.settings.idle, pdu::send(&mut self.stream, &self.out))
                .await;
        self.out.clear();
        match res {
            Ok(Ok(())) => Ok(()),
            _ => Err(AbortReason::ReasonNotSpecified),
        }
    }

    async fn respond(
        &mut self,
        pc: &AcceptedContext,
        rq: &Command,
        rsp_field: u16,
        st: u16,
        comment: &str,
    ) -> Result<(), AbortReason> {
        let mut rsp = Command::response_to(rq, rsp_field, st, false);
        if !comment.is_empty() && st != status::SUCCESS && st != status::CANCEL {
            rsp.set_text(tag::ERROR_COMMENT, comment);
        }
        if rq.str(tag::AFFECTED_SOP_CLASS_UID).is_none() {
            rsp.set_uid(tag::AFFECTED_SOP_CLASS_UID, &pc.abstract_syntax);
        }
        pdu::encode_pdata(&mut self.out, pc.id, true, &rsp.encode(), self.assoc.peer_max_pdu);
        self.flush().await
    }
}

// Modality Worklist (`dicom::worklist`) and MPPS (`dicom::mpps`): the mapping and the store
// work are in those modules; here only the DIMSE exchange.
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Modality Worklist C-FIND: one pending response per item, C-CANCEL honoured, capped by
    /// `dicom.max_find_results`; audited like a Study Root C-FIND (patient data access).
    async fn run_worklist(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
        buf: BytesMut,
    ) -> Result<(), AbortReason> {
        let q = match worklist::parse_identifier(&buf, &pc.transfer_syntax) {
            Ok(q) => q,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "worklist identifier refused");
                self.audit("dicom-worklist", "dicom-worklist?".into(), format!("refused: {e}"));
                return self
                    .respond(
                        &pc,
                        &cmd,
                        field::C_FIND_RSP,
                        status::CANNOT_UNDERSTAND,
                        &e.to_string(),
                    )
                    .await;
            }
        };
        let limit = self.ctx.settings.max_find_results;
        let system = self.ctx.settings.patient_id_system.clone();
        let q2 = q.clone();
        let found = self.ctx.store.read(move |conn| worklist::run(conn, &q2, &system, limit)).await;
        let items = match found {
            Ok(Ok(items)) => items,
            Ok(Err(limit)) => {
                let why = format!("more than {limit} matches; narrow the query");
                return self
                    .respond(&pc, &cmd, field::C_FIND_RSP, status::OUT_OF_RESOURCES, &why)
                    .await;
            }
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "worklist query failed");
                return self
                    .respond(
                        &pc,
                        &cmd,
                        field::C_FIND_RSP,
                        status::UNABLE_TO_PROCESS,
                        "query failed",
                    )
                    .await;
            }
        };
        metrics::counter!("hms_dicom_worklist_find_total").increment(1);
        self.audit(
            "dicom-worklist",
            format!("dicom-worklist?{}", q.describe()),
            format!("success: {} match(es)", items.len()),
        );
        let ts = pc.transfer_syntax.clone();
        self.send_matches(&pc, &cmd, &items, "worklist", |item| {
            worklist::response_identifier(&q, item, &ts)
        })
        .await
    }

    /// MPPS N-CREATE / N-SET: one durable write (Procedure, order, outbox, audit), then the
    /// response.
    async fn run_mpps(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
        buf: BytesMut,
    ) -> Result<(), AbortReason> {
        let attrs = match mpps::parse(&buf, &pc.transfer_syntax) {
            Ok(a) => a,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "MPPS data set refused");
                return self.respond_mpps(&pc, &cmd, status::CANNOT_UNDERSTAND, &e).await;
            }
        };
        let create = cmd.command_field() == mpps::field::N_CREATE_RQ;
        let uid = if create {
            match cmd.str(tag::AFFECTED_SOP_INSTANCE_UID) {
                Some(u) if !u.is_empty() => u.to_owned(),
                // The SCP creates the instance UID when the SCU did not (PS3.4 F.7.2.1.1).
                _ => format!("2.25.{}", u128::from_be_bytes(rand::random())),
            }
        } else {
            cmd.str(mpps::tag::REQUESTED_SOP_INSTANCE_UID).unwrap_or("").to_owned()
        };
        let who = mpps::Caller {
            calling_ae: self.assoc.calling_ae.clone(),
            source: self.peer.ip().to_string(),
        };
        let system = self.ctx.settings.patient_id_system.clone();
        let u = uid.clone();
        let result = self
            .ctx
            .store
            .write(move |tx| {
                if create {
                    mpps::create(tx, &u, &attrs, &system, &who)
                } else {
                    mpps::set(tx, &u, &attrs, &who)
                }
            })
            .await;
        let (st, comment) = match result {
            Ok(Ok(what)) => {
                info!(peer = %self.peer, %uid, what, "MPPS recorded");
                (status::SUCCESS, String::new())
            }
            Ok(Err((st, why))) => {
                warn!(peer = %self.peer, %uid, status = format!("{st:04X}"), why, "MPPS refused");
                (st, why)
            }
            Err(e) => {
                warn!(peer = %self.peer, %uid, error = %e, "MPPS write failed");
                (mpps::status::PROCESSING_FAILURE, "storage failure".to_owned())
            }
        };
        metrics::counter!("hms_dicom_mpps_total", "status" => format!("{st:04X}")).increment(1);
        let mut rsp_cmd = cmd;
        rsp_cmd.set_uid(tag::AFFECTED_SOP_INSTANCE_UID, &uid);
        self.respond_mpps(&pc, &rsp_cmd, st, &comment).await
    }

    /// An N-CREATE-RSP / N-SET-RSP: Affected SOP Class and Instance UID (from the Requested ones
    /// of an N-SET), no data set.
    async fn respond_mpps(
        &mut self,
        pc: &AcceptedContext,
        rq: &Command,
        st: u16,
        comment: &str,
    ) -> Result<(), AbortReason> {
        let rsp_field = rq.command_field() | 0x8000;
        let mut rsp = Command::response_to(rq, rsp_field, st, false);
        rsp.set_uid(tag::AFFECTED_SOP_CLASS_UID, &pc.abstract_syntax);
        if let Some(i) = rq
            .str(tag::AFFECTED_SOP_INSTANCE_UID)
            .or_else(|| rq.str(mpps::tag::REQUESTED_SOP_INSTANCE_UID))
        {
            rsp.set_uid(tag::AFFECTED_SOP_INSTANCE_UID, i);
        }
        if !comment.is_empty() && st != status::SUCCESS {
            rsp.set_text(tag::ERROR_COMMENT, comment);
        }
        pdu::encode_pdata(&mut self.out, pc.id, true, &rsp.encode(), self.assoc.peer_max_pdu);
        self.flush().await
    }
}

/// Attempts, and the pause before each retry, to deliver a Storage Commitment report on a new
/// association (the requester may be busy or restarting).
const COMMITMENT_REPORT_RETRIES: [Duration; 3] =
    [Duration::ZERO, Duration::from_secs(5), Duration::from_secs(30)];

/// Opens an association to the requester (we propose the SCP role of Storage Commitment) and
/// sends the N-EVENT-REPORT there; retried, then logged as an error if it cannot be delivered.
async fn report_on_new_association(
    ctx: Arc<DicomContext>,
    dest: crate::config::MoveDestination,
    requester_ae: String,
    transaction_uid: String,
    outcomes: Vec<super::commitment::Outcome>,
) {
    use super::commitment;
    let ts = dicom_dictionary_std::uids::IMPLICIT_VR_LITTLE_ENDIAN;
    let s = &ctx.settings;
    let (event, data) = match commitment::event_report(&transaction_uid, &outcomes, ts, &s.ae_title)
    {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "cannot encode the commitment report");
            return;
        }
    };
    let wanted = [(uids::STORAGE_COMMITMENT_PUSH_MODEL.to_owned(), ts.to_owned())];
    let mut last_error = String::new();
    for pause in COMMITMENT_REPORT_RETRIES {
        tokio::time::sleep(pause).await;
        let connected = super::scu::connect_with_roles(
            dest,
            &s.ae_title,
            &requester_ae,
            &wanted,
            &[uids::STORAGE_COMMITMENT_PUSH_MODEL],
            s.max_pdu,
            s.artim,
        )
        .await;
        let mut assoc = match connected {
            Ok(a) => a,
            Err(e) => {
                last_error = e.to_string();
                continue;
            }
        };
        let sent = assoc
            .event_report(
                uids::STORAGE_COMMITMENT_PUSH_MODEL,
                uids::STORAGE_COMMITMENT_INSTANCE,
                event,
                ts,
                &data,
            )
            .await;
        assoc.release().await;
        match sent {
            Ok(st) => {
                info!(requester = %requester_ae, transaction = %transaction_uid,
                    status = format!("{st:04X}"), "storage commitment reported on a new association");
                return;
            }
            Err(e) => last_error = e.to_string(),
        }
    }
    tracing::error!(requester = %requester_ae, transaction = %transaction_uid, error = %last_error,
        "storage commitment report could not be delivered; the requester must ask again");
}
