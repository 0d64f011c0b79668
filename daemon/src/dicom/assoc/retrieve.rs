//! C-GET and C-MOVE SCP on an association (PS3.4 C.4.2, C.4.3): the identifier names stored
//! instances ([`crate::dicom::retrieve::resolve`]); each is one C-STORE sub-operation, sent exactly
//! as stored — on this association for C-GET (on a storage context for which the requester took
//! the SCP role, in the stored transfer syntax), on a new association to the Move Destination
//! (`dicom.peers`) for C-MOVE. A pending response with the counts follows each sub-operation; a
//! C-CANCEL-RQ stops before the next one (status FE00 with the counts). Every retrieve, refused or
//! not, appends an audit event naming what was sent and where.

use std::collections::BTreeSet;

use dicom_ul::pdu::{AbortRQServiceProviderReason as AbortReason, Pdu};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use super::Session;
use super::message::Collect;
use crate::config::MoveDestination;
use crate::dicom::dimse::{Command, field, status, tag};
use crate::dicom::negotiate::AcceptedContext;
use crate::dicom::pdu::{self, Incoming, Pdv, ReadPdu};
use crate::dicom::query::QueryError;
use crate::dicom::retrieve::{self, Counts, Outcome, SendError, Target};
use crate::dicom::scu;
use crate::dicom::uids::ServiceKind;

impl Done<'_> {
    fn new(n: usize) -> Self {
        Done {
            counts: Counts::new(n),
            sent: Vec::new(),
            cancelled: false,
            not_held: 0,
            recall_failure: None,
        }
    }
}

/// While a retrieve waits for a recall, a pending response this often.
pub const RECALL_PENDING_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What a retrieve did, for the final response and the audit event.
struct Done<'a> {
    counts: Counts,
    sent: Vec<&'a Target>,
    cancelled: bool,
    /// Sub-operations that failed because the instance was evicted and did not come back.
    not_held: usize,
    /// Why the recall of evicted instances did not bring them all back.
    recall_failure: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A C-GET-RQ / C-MOVE-RQ on a context of its kind: its identifier is collected, then run by
    /// [`Self::run_retrieve`].
    pub(super) async fn on_retrieve(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
    ) -> Result<(), AbortReason> {
        let fits = match pc.kind {
            ServiceKind::Get(_) => cmd.command_field() == field::C_GET_RQ,
            ServiceKind::Move(_) => cmd.command_field() == field::C_MOVE_RQ,
            _ => false,
        };
        self.expect_identifier(pc, cmd, fits, Collect::Retrieve, "not a C-GET/C-MOVE context").await
    }

    pub(super) async fn run_retrieve(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
        buf: bytes::BytesMut,
    ) -> Result<(), AbortReason> {
        let (is_move, model) = match pc.kind {
            ServiceKind::Get(m) => (false, m),
            ServiceKind::Move(m) => (true, m),
            _ => unreachable!("dispatched on the context kind"),
        };
        let rsp_field = if is_move { field::C_MOVE_RSP } else { field::C_GET_RSP };
        let action = if is_move { "dicom-move" } else { "dicom-get" };
        let r = match retrieve::parse_identifier(&buf, &pc.transfer_syntax, model) {
            Ok(r) => r,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "{action} identifier refused");
                self.audit(action, format!("{action}?"), format!("refused: {e}"));
                let st = match e {
                    QueryError::Undecodable(_) => status::CANNOT_UNDERSTAND,
                    QueryError::Invalid(_) => status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                };
                return self.respond(&pc, &cmd, rsp_field, st, &e.to_string()).await;
            }
        };
        let entity = format!("{action}?{}", r.describe());
        let dest = if is_move {
            let ae = cmd.str(tag::MOVE_DESTINATION).unwrap_or("").to_owned();
            match self.ctx.policy().destination(&ae) {
                Some(d) => Some((ae, d)),
                None => {
                    warn!(peer = %self.peer, destination = %ae, "C-MOVE to an unknown destination");
                    self.audit_detail(
                        action,
                        entity,
                        "refused: A801 move destination unknown".into(),
                        serde_json::json!({ "destination": ae }),
                    );
                    let why = format!("Move Destination {ae:?} is not in dicom.peers");
                    return self
                        .respond(&pc, &cmd, rsp_field, status::MOVE_DESTINATION_UNKNOWN, &why)
                        .await;
                }
            }
        } else {
            None
        };
        let limit = self.ctx.settings.max_find_results;
        let r2 = r.clone();
        let targets = match self.ctx.store.read(move |c| retrieve::resolve(c, &r2, limit)).await {
            Ok(Ok(t)) => t,
            Ok(Err(limit)) => {
                let why = format!("more than {limit} instances; retrieve a narrower level");
                self.audit(action, entity, format!("refused: {why}"));
                return self
                    .respond(&pc, &cmd, rsp_field, status::UNABLE_TO_CALCULATE_MATCHES, &why)
                    .await;
            }
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "{action}: index read failed");
                self.audit(action, entity, "failed: index unreadable".into());
                return self
                    .respond(&pc, &cmd, rsp_field, status::UNABLE_TO_CALCULATE_MATCHES, "index")
                    .await;
            }
        };
        metrics::counter!("hms_dicom_retrieve_total", "op" => action).increment(1);
        let mut targets = targets;
        let recall_failure = if targets.iter().any(|t| !t.held) {
            self.recall(&pc, &cmd, rsp_field, &mut targets).await?
        } else {
            None
        };
        let mut done = match &dest {
            None => self.get(&pc, &cmd, &targets).await?,
            Some((ae, d)) => match self.move_to(&pc, &cmd, &targets, ae, *d).await? {
                Ok(done) => done,
                Err(e) => {
                    warn!(peer = %self.peer, destination = %ae, error = %e, "C-MOVE destination unreachable");
                    self.audit_detail(
                        action,
                        entity,
                        format!("failed: destination {ae}: {e}"),
                        serde_json::json!({ "destination": ae, "address": d.addr.to_string() }),
                    );
                    let why = format!("cannot associate with {ae}: {e}");
                    return self
                        .respond(
                            &pc,
                            &cmd,
                            rsp_field,
                            status::UNABLE_TO_PERFORM_SUBOPERATIONS,
                            &why,
                        )
                        .await;
                }
            },
        };
        done.recall_failure = recall_failure;
        let c = &done.counts;
        let outcome = if done.cancelled {
            format!(
                "cancelled: {} sent, {} failed, {} not sent",
                done.sent.len(),
                c.failed,
                c.remaining
            )
        } else if c.failed == 0 {
            format!("success: {} sent", done.sent.len())
        } else {
            format!("partial: {} sent, {} failed", done.sent.len(), c.failed)
        };
        info!(peer = %self.peer, calling_ae = %self.assoc.calling_ae, %outcome, "{action}");
        let studies: BTreeSet<&str> = done.sent.iter().map(|t| t.study_uid.as_str()).collect();
        self.ctx.accessed.touch(studies.iter().copied());
        let series: BTreeSet<&str> = done.sent.iter().map(|t| t.series_uid.as_str()).collect();
        let mut detail = serde_json::json!({
            "studies": studies,
            "series": series,
            "instances": done.sent.iter().map(|t| t.sop_uid.as_str()).collect::<Vec<_>>(),
            "failed": c.failed_uids,
        });
        if let Some((ae, d)) = &dest {
            detail["destination"] = ae.as_str().into();
            detail["address"] = d.addr.to_string().into();
        }
        self.audit_detail(action, entity, outcome, detail);
        self.finish_retrieve(&pc, &cmd, rsp_field, &done).await
    }

    /// C-GET: each instance as a C-STORE on this association.
    async fn get<'a>(
        &mut self,
        pc: &AcceptedContext,
        cmd: &Command,
        targets: &'a [Target],
    ) -> Result<Done<'a>, AbortReason> {
        let message_id = cmd.message_id();
        let mut done = Done::new(targets.len());
        let blobs = self.ctx.store.blobs().clone();
        let mut sub_id: u16 = 0;
        for t in targets {
            if done.cancelled || self.cancel_requested(message_id).await? {
                done.cancelled = true;
                break;
            }
            let context = self
                .assoc
                .contexts
                .values()
                .filter(|c| {
                    c.kind == ServiceKind::Storage
                        && c.abstract_syntax == t.sop_class_uid
                        && c.transfer_syntax == t.transfer_syntax
                        && self.assoc.requester_scp.contains(&c.abstract_syntax)
                })
                .map(|c| c.id)
                .min();
            let outcome = match context {
                _ if !t.held => {
                    done.not_held += 1;
                    Outcome::Failed
                }
                None => {
                    debug!(peer = %self.peer, sop = %t.sop_uid, class = %t.sop_class_uid,
                        ts = %t.transfer_syntax, "C-GET: no storage context with the SCP role in the stored transfer syntax");
                    Outcome::Failed
                }
                Some(id) => {
                    sub_id = sub_id.wrapping_add(1).max(1);
                    let rq = retrieve::store_rq(sub_id, t, None);
                    self.flush().await?;
                    let peer_max = self.assoc.peer_max_pdu;
                    let sent = tokio::time::timeout(
                        self.ctx.settings.idle,
                        retrieve::send_store(&mut self.stream, id, &rq, &blobs, t, peer_max),
                    )
                    .await
                    .map_err(|_| AbortReason::ReasonNotSpecified)?;
                    match sent {
                        Ok(()) => {
                            let st = self
                                .store_response(sub_id, message_id, &mut done.cancelled)
                                .await?;
                            retrieve::classify_store_status(st)
                        }
                        Err(SendError::Unreadable(e)) => {
                            warn!(peer = %self.peer, sop = %t.sop_uid, error = %e, "C-GET: stored instance unreadable");
                            Outcome::Failed
                        }
                        Err(e) => {
                            warn!(peer = %self.peer, sop = %t.sop_uid, error = %e, "C-GET sub-operation broken; aborting");
                            return Err(AbortReason::ReasonNotSpecified);
                        }
                    }
                }
            };
            done.counts.record(&t.sop_uid, outcome);
            if outcome != Outcome::Failed {
                done.sent.push(t);
            }
            if done.counts.remaining > 0 && !done.cancelled {
                self.pending(pc, cmd, field::C_GET_RSP, &done.counts).await?;
            }
        }
        Ok(done)
    }

    /// C-MOVE: each instance as a C-STORE on one association to the destination. The outer error
    /// aborts our association; the inner one is a destination that could not be associated.
    async fn move_to<'a>(
        &mut self,
        pc: &AcceptedContext,
        cmd: &Command,
        targets: &'a [Target],
        dest_ae: &str,
        dest: MoveDestination,
    ) -> Result<Result<Done<'a>, scu::ScuError>, AbortReason> {
        let message_id = cmd.message_id();
        let mut done = Done::new(targets.len());
        if targets.is_empty() {
            return Ok(Ok(done));
        }
        let mut wanted: Vec<(String, String)> = Vec::new();
        for t in targets {
            let k = (t.sop_class_uid.clone(), t.transfer_syntax.clone());
            if !wanted.contains(&k) {
                wanted.push(k);
            }
        }
        let s = &self.ctx.settings;
        let mut assoc =
            match scu::connect(dest, &s.ae_title, dest_ae, &wanted, s.max_pdu, s.artim).await {
                Ok(a) => a,
                Err(e) => return Ok(Err(e)),
            };
        debug!(peer = %self.peer, destination = %dest_ae, "C-MOVE: association to the destination established");
        let blobs = self.ctx.store.blobs().clone();
        let originator = self.assoc.calling_ae.clone();
        let mut broken = false;
        for (i, t) in targets.iter().enumerate() {
            if self.cancel_requested(message_id).await? {
                done.cancelled = true;
                break;
            }
            let outcome = if !t.held {
                done.not_held += 1;
                Outcome::Failed
            } else if !assoc.accepts(&t.sop_class_uid, &t.transfer_syntax) {
                debug!(sop = %t.sop_uid, "C-MOVE: destination refused the SOP class / transfer syntax");
                Outcome::Failed
            } else {
                match assoc.store(&blobs, t, (&originator, message_id)).await {
                    Ok(Some(st)) => retrieve::classify_store_status(st),
                    Ok(None) => {
                        warn!(sop = %t.sop_uid, "C-MOVE: stored instance unreadable");
                        Outcome::Failed
                    }
                    Err(e) => {
                        warn!(destination = %dest_ae, error = %e, "C-MOVE: association to the destination failed");
                        broken = true;
                        Outcome::Failed
                    }
                }
            };
            done.counts.record(&t.sop_uid, outcome);
            if outcome != Outcome::Failed {
                done.sent.push(t);
            }
            if broken {
                for rest in &targets[i + 1..] {
                    done.counts.record(&rest.sop_uid, Outcome::Failed);
                }
                break;
            }
            if done.counts.remaining > 0 {
                self.pending(pc, cmd, field::C_MOVE_RSP, &done.counts).await?;
            }
        }
        if broken {
            assoc.abort().await;
        } else {
            assoc.release().await;
        }
        Ok(Ok(done))
    }

    /// Some targets were evicted: asks the agent to fetch them back from the cloud PACS and waits
    /// (a pending response every [`RECALL_PENDING_EVERY`] keeps the requester's timers quiet)
    /// until they are back, the recall failed, or `storage.recall_timeout_secs` passed. Marks
    /// the targets held again; returns why not all came back, if so.
    async fn recall(
        &mut self,
        pc: &AcceptedContext,
        cmd: &Command,
        rsp_field: u16,
        targets: &mut [Target],
    ) -> Result<Option<String>, AbortReason> {
        use crate::dicom::recall;
        let studies: Vec<String> = targets
            .iter()
            .filter(|t| !t.held)
            .map(|t| t.study_uid.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let missing: Vec<String> =
            targets.iter().filter(|t| !t.held).map(|t| t.blob.as_str().to_owned()).collect();
        info!(peer = %self.peer, instances = missing.len(), studies = studies.len(),
            "retrieve of evicted instances: recalling them from the cloud PACS");
        if let Err(e) = recall::request(&self.ctx.store, studies.clone()).await {
            return Ok(Some(format!("recall not asked: {e}")));
        }
        let store = self.ctx.store.clone();
        let started = std::time::Instant::now();
        let mut last_pending = started;
        let counts = Counts::new(targets.len());
        let why = loop {
            match recall::progress(&store, missing.clone(), studies.clone()).await {
                Ok(p) if p.missing == 0 => break None,
                Ok(p) if p.failure.is_some() => break p.failure,
                Ok(_) => {}
                Err(e) => break Some(e.to_string()),
            }
            if started.elapsed() >= self.ctx.settings.recall_timeout {
                break Some("recall timed out".into());
            }
            if last_pending.elapsed() >= RECALL_PENDING_EVERY {
                self.pending(pc, cmd, rsp_field, &counts).await?;
                last_pending = std::time::Instant::now();
            }
            tokio::time::sleep(crate::dicomweb::RECALL_POLL).await;
        };
        if let Some(w) = &why {
            warn!(peer = %self.peer, why = %w, "recall of evicted instances failed");
        }
        let ids: Vec<String> = targets.iter().map(|t| t.blob.as_str().to_owned()).collect();
        if let Ok(held) = store.read(move |c| crate::dicom::index::held_among(c, &ids)).await {
            for t in targets.iter_mut() {
                t.held = held.contains(t.blob.as_str());
            }
        }
        Ok(why)
    }

    async fn pending(
        &mut self,
        pc: &AcceptedContext,
        cmd: &Command,
        rsp_field: u16,
        counts: &Counts,
    ) -> Result<(), AbortReason> {
        let mut rsp = Command::response_to(cmd, rsp_field, status::PENDING, false);
        counts.apply(&mut rsp, true);
        pdu::encode_pdata(&mut self.out, pc.id, true, &rsp.encode(), self.assoc.peer_max_pdu);
        self.flush().await
    }

    async fn finish_retrieve(
        &mut self,
        pc: &AcceptedContext,
        cmd: &Command,
        rsp_field: u16,
        done: &Done<'_>,
    ) -> Result<(), AbortReason> {
        let c = &done.counts;
        let st = if done.cancelled { status::CANCEL } else { c.final_status() };
        // The Failed SOP Instance UID List goes with Warning (B000) and Cancel only: DCMTK's SCUs
        // do not read a data set after a refusal (A702), and the counts already say it all.
        let identifier =
            if c.failed_uids.is_empty() || st == status::UNABLE_TO_PERFORM_SUBOPERATIONS {
                None
            } else {
                retrieve::failed_list_identifier(&c.failed_uids, &pc.transfer_syntax).ok()
            };
        let mut rsp = Command::response_to(cmd, rsp_field, st, identifier.is_some());
        c.apply(&mut rsp, done.cancelled);
        if done.not_held > 0 {
            // Error Comment is LO: at most 64 characters.
            let why = done.recall_failure.as_deref().unwrap_or("not recalled");
            let mut comment = format!("{} evicted, {why}", done.not_held);
            comment.truncate(64);
            rsp.set_text(tag::ERROR_COMMENT, &comment);
        }
        if rsp.str(tag::AFFECTED_SOP_CLASS_UID).is_none() {
            rsp.set_uid(tag::AFFECTED_SOP_CLASS_UID, &pc.abstract_syntax);
        }
        let peer_max = self.assoc.peer_max_pdu;
        pdu::encode_pdata(&mut self.out, pc.id, true, &rsp.encode(), peer_max);
        if let Some(id) = identifier {
            pdu::encode_pdata(&mut self.out, pc.id, false, &id, peer_max);
        }
        self.flush().await
    }

    /// Waits for the C-STORE-RSP of sub-operation `sub_id` (C-GET); a C-CANCEL-RQ of the C-GET
    /// arriving meanwhile sets `cancelled`. Anything else breaks the protocol.
    async fn store_response(
        &mut self,
        sub_id: u16,
        message_id: u16,
        cancelled: &mut bool,
    ) -> Result<u16, AbortReason> {
        let mut buf = Vec::new();
        let mut pending: std::collections::VecDeque<Pdv> = Default::default();
        loop {
            if pending.is_empty() {
                let incoming = match self.queued.pop_front() {
                    Some(i) => i,
                    None => tokio::time::timeout(
                        self.ctx.settings.idle,
                        self.reader.read(&mut self.stream),
                    )
                    .await
                    .map_err(|_| AbortReason::ReasonNotSpecified)?
                    .map_err(|e| e.abort_reason().unwrap_or(AbortReason::ReasonNotSpecified))?,
                };
                match incoming {
                    Incoming::PData(pdvs) => pending.extend(pdvs),
                    Incoming::Control(p) => {
                        warn!(peer = %self.peer, "{} during a C-GET; aborting", p.short_description());
                        if matches!(p, Pdu::AbortRQ { .. }) {
                            return Err(AbortReason::ReasonNotSpecified);
                        }
                        return Err(AbortReason::UnexpectedPdu);
                    }
                }
                continue;
            }
            let p = pending.pop_front().expect("not empty");
            if !p.is_command || !self.assoc.contexts.contains_key(&p.context_id) {
                return Err(AbortReason::UnexpectedPduParameter);
            }
            buf.extend_from_slice(&p.data);
            if !p.is_last {
                continue;
            }
            let c = Command::decode(&buf).map_err(|_| AbortReason::InvalidPduParameter)?;
            buf.clear();
            match c.command_field() {
                field::C_CANCEL_RQ
                    if c.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO) == Some(message_id) =>
                {
                    *cancelled = true;
                }
                field::C_STORE_RSP if c.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO) == Some(sub_id) => {
                    if !pending.is_empty() {
                        self.queued.push_front(Incoming::PData(pending.into_iter().collect()));
                    }
                    return c.u16(tag::STATUS).ok_or(AbortReason::InvalidPduParameter);
                }
                other => {
                    warn!(peer = %self.peer, field = other, "unexpected command during a C-GET");
                    return Err(AbortReason::UnexpectedPduParameter);
                }
            }
        }
    }
}
