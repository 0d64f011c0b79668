//! C-FIND SCP: Study Root queries against the DICOM index ([`crate::dicom::index::find`]) and
//! Modality Worklist queries against the FHIR orders ([`crate::dicom::worklist::run`]); one
//! pending response per match, C-CANCEL honoured, capped by `dicom.max_find_results`, audited as
//! patient data access.

use bytes::BytesMut;
use dicom_ul::pdu::AbortRQServiceProviderReason as AbortReason;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::message::Collect;
use super::{Session, WRITE_BATCH};
use crate::dicom::dimse::{Command, field, status};
use crate::dicom::negotiate::AcceptedContext;
use crate::dicom::pdu;
use crate::dicom::query;
use crate::dicom::uids::ServiceKind;
use crate::dicom::worklist;
use crate::store::StoreError;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A C-FIND-RQ: its identifier is collected, then run by [`Self::run_find`].
    pub(super) async fn on_find(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
    ) -> Result<(), AbortReason> {
        let fits = matches!(pc.kind, ServiceKind::StudyRootFind | ServiceKind::WorklistFind);
        self.expect_identifier(pc, cmd, fits, Collect::Find, "not a C-FIND context").await
    }

    pub(super) async fn run_find(
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
        let found =
            self.ctx.store.read(move |conn| crate::dicom::index::find(conn, &q2, limit)).await;
        let Some(records) = self.matches_or_refuse(&pc, &cmd, found, "C-FIND failed").await? else {
            return Ok(());
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

    /// The matches a query's read found; or `None` once the refusal is sent (more matches than
    /// `dicom.max_find_results`, or the read failed, logged as `failed`).
    async fn matches_or_refuse<T>(
        &mut self,
        pc: &AcceptedContext,
        cmd: &Command,
        found: Result<Result<Vec<T>, usize>, StoreError>,
        failed: &str,
    ) -> Result<Option<Vec<T>>, AbortReason> {
        let (st, why) = match found {
            Ok(Ok(matches)) => return Ok(Some(matches)),
            Ok(Err(limit)) => {
                (status::OUT_OF_RESOURCES, format!("more than {limit} matches; narrow the query"))
            }
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "{failed}");
                (status::UNABLE_TO_PROCESS, "query failed".to_owned())
            }
        };
        self.respond(pc, cmd, field::C_FIND_RSP, st, &why).await?;
        Ok(None)
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
        let Some(items) = self.matches_or_refuse(&pc, &cmd, found, "worklist query failed").await?
        else {
            return Ok(());
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
}
