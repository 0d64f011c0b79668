//! MPPS SCP (N-CREATE / N-SET): the state machine and the Procedure/order writes are
//! [`crate::dicom::mpps`]'s; here only the DIMSE exchange.

use bytes::BytesMut;
use dicom_ul::pdu::AbortRQServiceProviderReason as AbortReason;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::Session;
use super::message::{Collect, Message};
use crate::dicom::dimse::{Command, status, tag};
use crate::dicom::mpps;
use crate::dicom::negotiate::AcceptedContext;
use crate::dicom::pdu;
use crate::dicom::uids::ServiceKind;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// An N-CREATE-RQ / N-SET-RQ: its data set is collected, then run by [`Self::run_mpps`].
    pub(super) async fn on_mpps(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
    ) -> Result<(), AbortReason> {
        if !cmd.has_data_set() {
            return self
                .respond_mpps(&pc, &cmd, mpps::status::MISSING_ATTRIBUTE, "no data set")
                .await;
        }
        if pc.kind != ServiceKind::Mpps {
            self.state =
                Message::discard(pc, cmd, status::SOP_CLASS_NOT_SUPPORTED, "not an MPPS context");
            return Ok(());
        }
        self.state = Message::collect(Collect::Mpps, pc, cmd);
        Ok(())
    }

    /// MPPS N-CREATE / N-SET: one durable write (Procedure, order, outbox, audit), then the
    /// response.
    pub(super) async fn run_mpps(
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
            .write_as(move |tx| {
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
    pub(super) async fn respond_mpps(
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
