//! C-STORE SCP: the command is checked against its presentation context, the data set streams
//! into a blob as it arrives, and [`ingest::commit`] checks and records the instance; the
//! C-STORE-RSP is sent only once that is durable. Here only the mapping of the outcome to a DIMSE
//! status and Error Comment.

use dicom_ul::pdu::AbortRQServiceProviderReason as AbortReason;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::Session;
use super::message::Message;
use crate::dicom::dimse::{Command, field, status, tag};
use crate::dicom::index;
use crate::dicom::ingest::{self, Declared, IngestError, Receiving, Stored, Written};
use crate::dicom::negotiate::AcceptedContext;
use crate::dicom::uids::ServiceKind;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A C-STORE-RQ: checked against its context, then its data set streams into a blob.
    pub(super) async fn on_store(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
    ) -> Result<(), AbortReason> {
        let rsp_field = cmd.command_field() | 0x8000;
        let class = cmd.str(tag::AFFECTED_SOP_CLASS_UID).unwrap_or("").to_owned();
        let instance = cmd.str(tag::AFFECTED_SOP_INSTANCE_UID).unwrap_or("").to_owned();
        if !cmd.has_data_set() {
            return self
                .respond(&pc, &cmd, rsp_field, status::CANNOT_UNDERSTAND, "no data set")
                .await;
        }
        if pc.kind != ServiceKind::Storage || class != pc.abstract_syntax {
            self.state = Message::discard(
                pc,
                cmd,
                status::SOP_CLASS_NOT_SUPPORTED,
                "SOP class differs from the presentation context",
            );
            return Ok(());
        }
        if instance.is_empty() {
            self.state = Message::discard(
                pc,
                cmd,
                status::CANNOT_UNDERSTAND,
                "no Affected SOP Instance UID",
            );
            return Ok(());
        }
        // Below the critical floor of free space: nothing of the data set is written (it is
        // drained and dropped), and the modality gets Out of Resources with the amounts.
        if let Err(full) = self.ctx.store.space().admit(crate::store::space::WriteClass::Images) {
            warn!(peer = %self.peer, sop = %instance, error = %full, "C-STORE refused: disk full");
            metrics::counter!("hms_dicom_refused_no_space_total").increment(1);
            self.state = Message::discard(pc, cmd, status::OUT_OF_RESOURCES, &dimse_comment(&full));
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
                self.state =
                    Message::discard(pc, cmd, status::CANNOT_UNDERSTAND, "transfer syntax");
            }
        }
        Ok(())
    }

    pub(super) async fn finish_store(
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
}

/// An Error Comment (LO: at most 64 characters) for a refusal for lack of space.
fn dimse_comment(full: &crate::store::space::NoSpace) -> String {
    use crate::config::space::human_bytes;
    let mut c =
        format!("disk full: {} free, {} reserved", human_bytes(full.free), human_bytes(full.floor));
    c.truncate(64);
    c
}
