//! Storage Commitment Push Model SCP (N-ACTION): the durability check is
//! [`crate::dicom::commitment`]'s; the N-EVENT-REPORT goes on this association, or on a new one
//! when the requester's `dicom.peers` entry asks for it.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dicom_ul::pdu::AbortRQServiceProviderReason as AbortReason;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::Session;
use super::message::{Collect, Message};
use crate::dicom::DicomContext;
use crate::dicom::commitment;
use crate::dicom::dimse::{Command, field, status, tag};
use crate::dicom::negotiate::AcceptedContext;
use crate::dicom::pdu;
use crate::dicom::uids::{self, ServiceKind};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// An N-ACTION-RQ: checked (Storage Commitment context, well-known instance, action type 1),
    /// then its action information is collected and run by [`Self::run_commitment`].
    pub(super) async fn on_commitment(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
    ) -> Result<(), AbortReason> {
        let rsp_field = cmd.command_field() | 0x8000;
        let class = cmd.str(tag::REQUESTED_SOP_CLASS_UID).unwrap_or("");
        let instance = cmd.str(tag::REQUESTED_SOP_INSTANCE_UID).unwrap_or("");
        let refused = if pc.kind != ServiceKind::StorageCommitment
            || class != uids::STORAGE_COMMITMENT_PUSH_MODEL
        {
            Some((status::NO_SUCH_SOP_CLASS, "not a Storage Commitment context"))
        } else if instance != uids::STORAGE_COMMITMENT_INSTANCE {
            Some((status::NO_SUCH_SOP_INSTANCE, "not the well-known commitment instance"))
        } else if cmd.u16(tag::ACTION_TYPE_ID) != Some(commitment::ACTION_REQUEST_COMMITMENT) {
            Some((status::NO_SUCH_ACTION_TYPE, "action type is not 1"))
        } else if !cmd.has_data_set() {
            Some((status::MISSING_ATTRIBUTE, "no action information"))
        } else {
            None
        };
        match refused {
            None => {
                self.state = Message::collect(Collect::Commitment, pc, cmd);
                Ok(())
            }
            Some((st, why)) if cmd.has_data_set() => {
                self.state = Message::discard(pc, cmd, st, why);
                Ok(())
            }
            Some((st, why)) => self.respond(&pc, &cmd, rsp_field, st, why).await,
        }
    }

    /// The requester's answer to our commitment report (N-EVENT-REPORT-RSP): nothing more to do.
    pub(super) fn on_event_report_rsp(&self, cmd: &Command) {
        let st = cmd.u16(tag::STATUS).unwrap_or(0xFFFF);
        if st != status::SUCCESS {
            warn!(peer = %self.peer, status = format!("{st:04X}"),
                "the requester refused our storage commitment report");
        }
    }

    /// Storage Commitment: answers the N-ACTION, then reports the result at once with an
    /// N-EVENT-REPORT on this association (every acknowledged instance is already durable).
    pub(super) async fn run_commitment(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
        buf: BytesMut,
    ) -> Result<(), AbortReason> {
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
    outcomes: Vec<commitment::Outcome>,
) {
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
        let connected = crate::dicom::scu::connect_with_roles(
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
