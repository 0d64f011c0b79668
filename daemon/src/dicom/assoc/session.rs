//! What the services of an association share: buffered sending of responses and requests,
//! audit events of queries and retrieves, and the look-ahead for a C-CANCEL.

use std::time::Duration;

use dicom_ul::pdu::AbortRQServiceProviderReason as AbortReason;
use tokio::io::{AsyncRead, AsyncWrite};

use super::Session;
use crate::dicom::dimse::{Command, field, status, tag};
use crate::dicom::negotiate::AcceptedContext;
use crate::dicom::pdu::{self, Incoming, ReadPdu};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) fn take_message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        id
    }

    /// Sends one command without a data set.
    pub(super) async fn send_command(
        &mut self,
        pc: &AcceptedContext,
        c: &Command,
    ) -> Result<(), AbortReason> {
        pdu::encode_pdata(&mut self.out, pc.id, true, &c.encode(), self.assoc.peer_max_pdu);
        self.flush().await
    }

    /// Queues an audit event for a query (like FHIR reads, a query does not wait for its audit
    /// event to be durable; stores write theirs in the instance's own transaction).
    pub(super) fn audit(&self, action: &str, entity: String, outcome: String) {
        self.audit_record(action, entity, outcome, None);
    }

    /// As [`Self::audit`], with a JSON detail (what a retrieve sent, and where).
    pub(super) fn audit_detail(
        &self,
        action: &str,
        entity: String,
        outcome: String,
        d: serde_json::Value,
    ) {
        self.audit_record(action, entity, outcome, Some(d.to_string()));
    }

    pub(super) fn audit_record(
        &self,
        action: &str,
        entity: String,
        outcome: String,
        detail: Option<String>,
    ) {
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
    pub(super) async fn cancel_requested(&mut self, message_id: u16) -> Result<bool, AbortReason> {
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

    pub(super) async fn flush(&mut self) -> Result<(), AbortReason> {
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

    pub(super) async fn respond(
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
