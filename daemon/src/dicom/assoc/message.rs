//! The DIMSE level of an established association: PDVs are gathered into the message in
//! progress ([`Message`]), and a complete command set goes to its service's file.

use bytes::BytesMut;
use dicom_ul::pdu::AbortRQServiceProviderReason as AbortReason;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::Session;
use crate::dicom::dimse::{self, Command, field, status};
use crate::dicom::ingest::Receiving;
use crate::dicom::mpps;
use crate::dicom::negotiate::AcceptedContext;
use crate::dicom::pdu::Pdv;

/// Largest C-FIND identifier we accept.
const MAX_IDENTIFIER_BYTES: usize = 1024 * 1024;
/// Largest DIMSE-N data set we accept (a commitment request for a few thousand instances).
const MAX_N_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// The DIMSE message in progress on an established association.
pub(super) enum Message {
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
    /// A data set collected whole (up to [`Collect::limit`]), then handled by its service.
    Collect {
        service: Collect,
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

/// The services whose request data set is collected whole before they run.
#[derive(Clone, Copy)]
pub(super) enum Collect {
    /// A C-FIND identifier (Study Root or Modality Worklist).
    Find,
    /// A C-GET or C-MOVE identifier.
    Retrieve,
    /// The action information of a Storage Commitment N-ACTION.
    Commitment,
    /// The data set of an MPPS N-CREATE / N-SET.
    Mpps,
}

impl Collect {
    fn limit(self) -> usize {
        match self {
            Collect::Find | Collect::Retrieve => MAX_IDENTIFIER_BYTES,
            Collect::Commitment | Collect::Mpps => MAX_N_REQUEST_BYTES,
        }
    }
}

impl Message {
    pub(super) fn collect(service: Collect, pc: AcceptedContext, cmd: Command) -> Message {
        Message::Collect { service, pc, cmd, buf: BytesMut::new() }
    }

    /// Drop the coming data set, then answer `cmd` with `status`.
    pub(super) fn discard(
        pc: AcceptedContext,
        cmd: Command,
        status: u16,
        comment: &str,
    ) -> Message {
        let rsp_field = cmd.command_field() | 0x8000;
        Message::Discard { pc, cmd, rsp_field, status, comment: comment.into() }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The start of a request whose identifier follows (C-FIND, C-GET, C-MOVE): none announced
    /// → C000 "no identifier"; a context of another service (`fits` false) → the data set is
    /// dropped and the request answered 0122 with `wrong_context`; else it is collected for
    /// `service`.
    pub(super) async fn expect_identifier(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
        fits: bool,
        service: Collect,
        wrong_context: &str,
    ) -> Result<(), AbortReason> {
        if !cmd.has_data_set() {
            let rsp_field = cmd.command_field() | 0x8000;
            return self
                .respond(&pc, &cmd, rsp_field, status::CANNOT_UNDERSTAND, "no identifier")
                .await;
        }
        self.state = if fits {
            Message::collect(service, pc, cmd)
        } else {
            Message::discard(pc, cmd, status::SOP_CLASS_NOT_SUPPORTED, wrong_context)
        };
        Ok(())
    }

    pub(super) async fn on_pdv(&mut self, pdv: Pdv) -> Result<(), AbortReason> {
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
            Message::Collect { service, pc: c_pc, buf, .. } => {
                if pdv.is_command || c_pc.id != pc.id {
                    return Err(AbortReason::UnexpectedPduParameter);
                }
                if buf.len() + pdv.data.len() > service.limit() {
                    return Err(AbortReason::InvalidPduParameter);
                }
                buf.extend_from_slice(&pdv.data);
                if pdv.is_last {
                    let Message::Collect { service, pc, cmd, buf } =
                        std::mem::replace(&mut self.state, Message::Idle)
                    else {
                        unreachable!()
                    };
                    match service {
                        Collect::Find => self.run_find(pc, cmd, buf).await?,
                        Collect::Retrieve => self.run_retrieve(pc, cmd, buf).await?,
                        Collect::Commitment => self.run_commitment(pc, cmd, buf).await?,
                        Collect::Mpps => self.run_mpps(pc, cmd, buf).await?,
                    }
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

    /// A complete command set: each service checks its request (in its own file) and either
    /// answers at once or sets the message state for the data set that follows.
    async fn on_command(&mut self, pc: AcceptedContext, cmd: Command) -> Result<(), AbortReason> {
        match cmd.command_field() {
            field::C_ECHO_RQ => self.on_echo(pc, cmd).await,
            field::C_STORE_RQ => self.on_store(pc, cmd).await,
            field::C_FIND_RQ => self.on_find(pc, cmd).await,
            field::C_GET_RQ | field::C_MOVE_RQ => self.on_retrieve(pc, cmd).await,
            field::C_CANCEL_RQ => Ok(()), // nothing in progress to cancel
            field::N_ACTION_RQ => self.on_commitment(pc, cmd).await,
            field::N_EVENT_REPORT_RSP => {
                self.on_event_report_rsp(&cmd);
                Ok(())
            }
            mpps::field::N_CREATE_RQ | mpps::field::N_SET_RQ => self.on_mpps(pc, cmd).await,
            other => {
                debug!(peer = %self.peer, field = other, "unsupported DIMSE command");
                if cmd.has_data_set() {
                    self.state = Message::discard(
                        pc,
                        cmd,
                        status::UNRECOGNIZED_OPERATION,
                        "operation not supported",
                    );
                    Ok(())
                } else {
                    let rsp_field = cmd.command_field() | 0x8000;
                    self.respond(&pc, &cmd, rsp_field, status::UNRECOGNIZED_OPERATION, "").await
                }
            }
        }
    }
}
