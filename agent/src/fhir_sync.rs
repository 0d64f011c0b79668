//! FHIR channel: push the edge's changes upstream, then pull upstream's changes.
//!
//! Push: lease changes, squash them per resource (one push of the current version retires every
//! older change of it), order by reference (targets first), send transaction Bundles with
//! `If-Match` on the version upstream is known to hold. A refused transaction is retried entry by
//! entry so one bad resource never blocks the others: it is parked with upstream's
//! OperationOutcome. A 412 is checked against upstream's current content first — equal content is
//! our own earlier push whose answer was lost (idempotence), not a conflict — and otherwise
//! resolved by the site's policy inside hms-edged.
//!
//! Pull: `_history?_since=` (it carries deletes) page by page, each entry applied through the
//! daemon, which refuses other tenants' resources, ignores echoes of our pushes and never
//! regresses a resource to an older version. The cursor moves only after a page is applied.

use std::collections::HashMap;
use std::sync::Arc;

use hms_edge_config::UpstreamConfig;
use hms_edge_wire::api::*;
use hms_edge_wire::client::InternalClient;
use hms_edge_wire::{SITE_SOURCE_PREFIX, TENANT_TAG_SYSTEM, content_of};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::channel::{ChannelStats, RoundError};
use crate::upstream::{FhirUpstream, UpstreamError, error_text, json_body};

/// How long a lease lasts: longer than the slowest push of one batch.
pub const LEASE_SECS: u32 = 300;
/// State key of the pull cursor.
pub const PULL_STATE_KEY: &str = "fhir.pull";
/// Retry delay after a change failed for a reason that may pass (seconds).
pub const RETRY_SECS: u32 = 30;

/// Resource types pushed first, so that references resolve upstream in order.
const REFERENCE_ORDER: &[&str] = &[
    "Organization",
    "Location",
    "Practitioner",
    "PractitionerRole",
    "Patient",
    "RelatedPerson",
    "Device",
    "Medication",
    "Encounter",
    "EpisodeOfCare",
    "Condition",
    "ServiceRequest",
    "Specimen",
    "Observation",
    "Procedure",
    "ImagingStudy",
    "DiagnosticReport",
];

fn rank(rtype: &str) -> usize {
    REFERENCE_ORDER.iter().position(|t| *t == rtype).unwrap_or(REFERENCE_ORDER.len())
}

/// All changes of one resource in a lease, pushed as one.
#[derive(Debug)]
struct Group {
    rtype: String,
    id: String,
    seqs: Vec<i64>,
    attempts: i64,
    current_version: Option<i64>,
    resource: Option<Value>,
    upstream_version: Option<String>,
}

impl Group {
    fn entity(&self) -> String {
        format!("{}/{}", self.rtype, self.id)
    }
}

fn squash(entries: Vec<LeasedChange>) -> Vec<Group> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Group> = HashMap::new();
    for e in entries {
        let Some((rtype, id)) = e.entity.split_once('/') else { continue };
        let g = groups.entry(e.entity.clone()).or_insert_with(|| {
            order.push(e.entity.clone());
            Group {
                rtype: rtype.to_owned(),
                id: id.to_owned(),
                seqs: Vec::new(),
                attempts: 0,
                current_version: e.current_version,
                resource: e.resource.clone(),
                upstream_version: e.upstream_version.clone(),
            }
        });
        g.seqs.push(e.seq);
        g.attempts = g.attempts.max(e.attempts);
    }
    let mut out: Vec<Group> = order.into_iter().filter_map(|k| groups.remove(&k)).collect();
    out.sort_by_key(|g| rank(&g.rtype)); // stable: change order kept within a type
    out
}

/// The version number in an ETag (`W/"3"` → `3`).
pub fn etag_version(etag: &str) -> Option<String> {
    let v = etag.trim().trim_start_matches("W/").trim_matches('"');
    (!v.is_empty()).then(|| v.to_owned())
}

/// The FHIR sync channel.
pub struct FhirSync {
    pub up: Arc<FhirUpstream>,
    pub internal: InternalClient,
    pub cfg: UpstreamConfig,
    pub site_id: String,
    pub stats: Arc<ChannelStats>,
    /// Resources whose last push may have reached upstream although no answer came back (a
    /// timeout, an unreadable answer): looked up before they are pushed again
    /// ([`FhirSync::settle_uncertain`]). In memory: after a restart of the agent a resource
    /// whose push was cut at that instant is pushed blind once more.
    pub uncertain: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Whether a failed push may nevertheless have been applied upstream: yes unless the request
/// provably never left (no connection) or upstream answered with an error of its own.
fn maybe_applied(e: &UpstreamError) -> bool {
    match e {
        UpstreamError::Link(m) => {
            !(m.starts_with("connection failed") || m.starts_with("upstream answered"))
        }
        UpstreamError::Malformed(_) => true,
        UpstreamError::Refused { .. } => false,
    }
}

impl std::fmt::Debug for FhirSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirSync").field("up", &self.up).finish_non_exhaustive()
    }
}

impl FhirSync {
    /// One round: push everything due, then pull. `Ok(true)`: more is waiting.
    pub async fn round(&self) -> Result<bool, RoundError> {
        let pushed = self.push_due().await?;
        let pulled = self.pull().await?;
        if pushed + pulled > 0 {
            crate::events::record(
                &self.internal,
                "sync.progress",
                json!({ "channel": "fhir", "pushed": pushed, "pulled": pulled }),
            )
            .await;
        }
        Ok(false)
    }

    /// Pushes until nothing is due. Returns the number of resources pushed. The next batch is
    /// leased while the current one is in flight (hms-edged never puts one resource in two live
    /// leases), so the upstream server is kept busy; batches still reach it in order.
    async fn push_due(&self) -> Result<u64, RoundError> {
        let mut total = 0;
        let mut next = self.lease().await?;
        while !next.is_empty() {
            let groups = squash(std::mem::take(&mut next));
            let (pushed, following) = tokio::join!(self.push_batch(groups), self.lease());
            match pushed {
                Ok(n) => total += n,
                Err(e) => {
                    // Give the prefetched batch back untouched: it was never attempted.
                    if let Ok(f) = following {
                        let seqs: Vec<i64> = f.iter().map(|c| c.seq).collect();
                        let _ = self
                            .internal
                            .post::<Affected>(
                                "/v1/outbox/unlease",
                                &json!({ "kind": "fhir", "seqs": seqs }),
                            )
                            .await;
                    }
                    return Err(e);
                }
            }
            next = following?;
        }
        Ok(total)
    }

    async fn lease(&self) -> Result<Vec<LeasedChange>, RoundError> {
        let lease: LeaseResponse = self
            .internal
            .post(
                "/v1/outbox/lease",
                &LeaseRequest {
                    kind: "fhir".into(),
                    max: self.cfg.batch_size,
                    lease_secs: LEASE_SECS,
                },
            )
            .await?;
        Ok(lease.entries)
    }

    fn upstream_body(&self, g: &Group) -> Option<Value> {
        let mut r = g.resource.clone()?;
        let obj = r.as_object_mut()?;
        let meta = obj.entry("meta").or_insert_with(|| json!({}));
        if !meta.is_object() {
            *meta = json!({});
        }
        let meta = meta.as_object_mut()?;
        meta.remove("versionId");
        meta.remove("lastUpdated");
        meta.insert("source".into(), json!(format!("{SITE_SOURCE_PREFIX}{}", self.site_id)));
        let tags = meta.entry("tag").or_insert_with(|| json!([]));
        if let Some(tags) = tags.as_array_mut() {
            tags.retain(|t| t.get("system").and_then(Value::as_str) != Some(TENANT_TAG_SYSTEM));
            tags.push(json!({ "system": TENANT_TAG_SYSTEM, "code": self.up.tenant }));
        }
        Some(r)
    }

    fn if_match(g: &Group) -> Option<String> {
        g.upstream_version.as_deref().filter(|v| *v != "gone").map(|v| format!("W/\"{v}\""))
    }

    async fn push_batch(&self, groups: Vec<Group>) -> Result<u64, RoundError> {
        let (groups, settled) = match self.settle_uncertain(groups).await {
            Ok(x) => x,
            Err((groups, e)) => {
                self.fail_groups(&groups, &e.to_string(), false, RETRY_SECS).await?;
                return Err(e);
            }
        };
        if groups.is_empty() {
            return Ok(settled);
        }
        self.push_transaction(groups).await.map(|n| n + settled)
    }

    /// Remembers that the pushes of `groups` may have been applied although they failed.
    fn mark_uncertain(&self, groups: &[Group], e: &UpstreamError) {
        tracing::debug!(resources = groups.len(), error = %e, uncertain = maybe_applied(e), "push failed");
        if maybe_applied(e) {
            let mut set = self.uncertain.lock().unwrap_or_else(|p| p.into_inner());
            set.extend(groups.iter().map(Group::entity));
        }
    }

    /// A resource whose earlier push failed without an answer (see
    /// [`FhirSync::mark_uncertain`]) may be upstream already: the push reached it and only the
    /// answer was lost (a timeout on a black-holed link). Pushing again would write a second
    /// version. So look first: upstream holds our content → acknowledge without writing; it
    /// holds an earlier push of a resource it never confirmed → write with `If-Match` on that
    /// version; otherwise push as usual (a known version keeps its `If-Match`).
    async fn settle_uncertain(
        &self,
        groups: Vec<Group>,
    ) -> Result<(Vec<Group>, u64), (Vec<Group>, RoundError)> {
        let mut out = Vec::with_capacity(groups.len());
        let mut settled = 0;
        let mut rest = groups.into_iter();
        while let Some(mut g) = rest.next() {
            let uncertain =
                self.uncertain.lock().unwrap_or_else(|p| p.into_inner()).contains(&g.entity());
            // Whether or not a version upstream is known: the pull channel may have recorded the
            // version our unanswered push created (an echo), and a write with `If-Match` on it
            // would make a second one.
            let ours = g.resource.clone().filter(|_| uncertain);
            if let Some(ours) = ours {
                let looked = self.fetch_upstream(&g).await;
                if looked.is_ok() {
                    // Known now; a failed look keeps the resource uncertain.
                    self.uncertain.lock().unwrap_or_else(|p| p.into_inner()).remove(&g.entity());
                }
                tracing::debug!(entity = %g.entity(), found = ?looked.as_ref().map(|(r, v)| (r.is_some(), v.clone())).ok(), "looked up a resource whose push got no answer");
                match looked {
                    Ok((Some(theirs), version)) => {
                        if content_of(&ours) == content_of(&theirs) {
                            if let Err(e) = self.ack_group(&g, Some(version)).await {
                                out.push(g);
                                out.extend(rest);
                                return Err((out, e));
                            }
                            ChannelStats::add(&self.stats.sent, 1);
                            settled += 1;
                            continue;
                        }
                        // Never confirmed: what upstream holds is an earlier push of ours.
                        // Known: keep it, so that an upstream edit meanwhile is a 412 (conflict).
                        if g.upstream_version.is_none() {
                            g.upstream_version = Some(version);
                        }
                    }
                    Ok((None, _)) => {}
                    Err(e) => {
                        out.push(g);
                        out.extend(rest);
                        return Err((out, e));
                    }
                }
            }
            out.push(g);
        }
        Ok((out, settled))
    }

    async fn push_transaction(&self, groups: Vec<Group>) -> Result<u64, RoundError> {
        let mut entries = Vec::with_capacity(groups.len());
        for g in &groups {
            let url = g.entity();
            let entry = match self.upstream_body(g) {
                Some(body) => {
                    let mut request = json!({ "method": "PUT", "url": url });
                    if let Some(m) = Self::if_match(g) {
                        request["ifMatch"] = json!(m);
                    }
                    json!({ "fullUrl": self.up.url(&url), "request": request, "resource": body })
                }
                None => json!({ "fullUrl": self.up.url(&url),
                                "request": { "method": "DELETE", "url": url } }),
            };
            entries.push(entry);
        }
        let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries });
        let body = serde_json::to_vec(&bundle).expect("json");
        let bytes = body.len() as u64;
        let result = self
            .up
            .send(|c| {
                c.post(self.up.url(""))
                    .header("content-type", "application/fhir+json")
                    .header("prefer", "return=minimal")
                    .body(body.clone())
            })
            .await;
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                self.mark_uncertain(&groups, &e);
                self.fail_groups(&groups, &e.to_string(), false, RETRY_SECS).await?;
                return Err(e.into());
            }
        };
        let status = resp.status();
        if status.is_success() {
            ChannelStats::add(&self.stats.bytes_sent, bytes);
            match json_body(resp).await {
                Ok(answer) => {
                    let acked = self.ack_transaction(&groups, &answer).await?;
                    ChannelStats::add(&self.stats.sent, acked);
                    return Ok(acked);
                }
                Err(e) => {
                    // The transaction may have been applied: retry soon; the 412 path will
                    // find upstream equal to ours and acknowledge without a second write.
                    tracing::warn!(error = %e, "transaction answer unreadable; will verify");
                    self.mark_uncertain(&groups, &e);
                    self.fail_groups(&groups, &e.to_string(), false, 0).await?;
                    return Err(e.into());
                }
            }
        }
        // Refused as a whole (one bad entry rolls the transaction back): go entry by entry.
        let why = error_text(resp).await;
        tracing::info!(status = %status, resources = groups.len(), reason = %why, "transaction refused; pushing one by one");
        let mut n = 0;
        for g in &groups {
            n += self.push_one(g).await?;
        }
        Ok(n)
    }

    async fn ack_transaction(&self, groups: &[Group], answer: &Value) -> Result<u64, RoundError> {
        let entries = answer.get("entry").and_then(Value::as_array).cloned().unwrap_or_default();
        if entries.len() != groups.len() {
            let e = UpstreamError::Malformed(format!(
                "transaction-response has {} entries for {} requests",
                entries.len(),
                groups.len()
            ));
            self.fail_groups(groups, &e.to_string(), false, 0).await?;
            return Err(e.into());
        }
        let mut items = Vec::new();
        for (g, e) in groups.iter().zip(&entries) {
            let version = e
                .pointer("/response/etag")
                .and_then(Value::as_str)
                .and_then(etag_version)
                .or_else(|| {
                    e.pointer("/resource/meta/versionId").and_then(Value::as_str).map(str::to_owned)
                });
            for seq in &g.seqs {
                items.push(AckItem {
                    seq: *seq,
                    pushed_version: g.current_version,
                    upstream_version: version.clone(),
                });
            }
        }
        let _: Affected = self
            .internal
            .post("/v1/outbox/ack", &AckRequest { kind: "fhir".into(), items })
            .await?;
        Ok(groups.len() as u64)
    }

    async fn ack_group(
        &self,
        g: &Group,
        upstream_version: Option<String>,
    ) -> Result<(), RoundError> {
        let items = g
            .seqs
            .iter()
            .map(|s| AckItem {
                seq: *s,
                pushed_version: g.current_version,
                upstream_version: upstream_version.clone(),
            })
            .collect();
        let _: Affected = self
            .internal
            .post("/v1/outbox/ack", &AckRequest { kind: "fhir".into(), items })
            .await?;
        Ok(())
    }

    async fn fail_groups(
        &self,
        groups: &[Group],
        error: &str,
        park: bool,
        retry_after_secs: u32,
    ) -> Result<(), RoundError> {
        let items: Vec<FailItem> = groups
            .iter()
            .flat_map(|g| g.seqs.iter())
            .map(|seq| FailItem { seq: *seq, error: error.to_owned(), park, retry_after_secs })
            .collect();
        if !items.is_empty() {
            let _: Affected = self
                .internal
                .post("/v1/outbox/fail", &FailRequest { kind: "fhir".into(), items })
                .await?;
        }
        Ok(())
    }

    /// Pushes one resource on its own. Returns 1 when it reached upstream.
    async fn push_one(&self, g: &Group) -> Result<u64, RoundError> {
        let url = self.up.url(&g.entity());
        let body = self.upstream_body(g).map(|b| serde_json::to_vec(&b).expect("json"));
        let if_match = Self::if_match(g);
        let result = self
            .up
            .send(|c| {
                let mut req = match &body {
                    Some(b) => {
                        c.put(&url).header("content-type", "application/fhir+json").body(b.clone())
                    }
                    None => c.delete(&url),
                };
                if let (Some(m), Some(_)) = (&if_match, &body) {
                    req = req.header("if-match", m);
                }
                req
            })
            .await;
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                self.mark_uncertain(std::slice::from_ref(g), &e);
                self.fail_groups(std::slice::from_ref(g), &e.to_string(), false, RETRY_SECS)
                    .await?;
                return Err(e.into());
            }
        };
        let status = resp.status();
        if status.is_success() {
            let version =
                resp.headers().get("etag").and_then(|v| v.to_str().ok()).and_then(etag_version);
            ChannelStats::add(&self.stats.bytes_sent, body.as_ref().map_or(0, |b| b.len() as u64));
            self.ack_group(g, version).await?;
            ChannelStats::add(&self.stats.sent, 1);
            return Ok(1);
        }
        if status == StatusCode::PRECONDITION_FAILED || status == StatusCode::CONFLICT {
            self.on_conflict(g).await?;
            return Ok(0);
        }
        let why = error_text(resp).await;
        let permanent = matches!(status.as_u16(), 400 | 405 | 422);
        let park = permanent || g.attempts + 1 >= i64::from(self.cfg.max_attempts);
        tracing::warn!(entity = %g.entity(), %status, park, reason = %why, "upstream refused a resource");
        self.fail_groups(std::slice::from_ref(g), &why, park, RETRY_SECS).await?;
        if park {
            ChannelStats::add(&self.stats.parked, 1);
            crate::events::record(
                &self.internal,
                "sync.parked",
                json!({ "channel": "fhir", "entity": g.entity(), "status": status.as_u16() }),
            )
            .await;
        }
        Ok(0)
    }

    /// Upstream's current state of a resource: (resource or None when gone, its version).
    async fn fetch_upstream(&self, g: &Group) -> Result<(Option<Value>, String), RoundError> {
        let url = self.up.url(&g.entity());
        let resp = self.up.send(|c| c.get(&url)).await?;
        match resp.status() {
            StatusCode::GONE | StatusCode::NOT_FOUND => Ok((None, "gone".into())),
            s if s.is_success() => {
                let v = json_body(resp).await?;
                let version = v
                    .pointer("/meta/versionId")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        UpstreamError::Malformed("resource without meta.versionId".into())
                    })?;
                Ok((Some(v), version))
            }
            s => Err(UpstreamError::Refused { status: s, message: error_text(resp).await }.into()),
        }
    }

    async fn on_conflict(&self, g: &Group) -> Result<(), RoundError> {
        let (theirs, version) = self.fetch_upstream(g).await?;
        let equal = match (&theirs, &g.resource) {
            (Some(a), Some(b)) => content_of(a) == content_of(b),
            (None, None) => true,
            _ => false,
        };
        if equal {
            // Our own earlier push (its answer was lost): done, nothing written twice.
            self.ack_group(g, Some(version)).await?;
            ChannelStats::add(&self.stats.sent, 1);
            return Ok(());
        }
        let req = ApplyRequest {
            rtype: g.rtype.clone(),
            id: g.id.clone(),
            resource: theirs,
            upstream_version: version,
            policy: self.cfg.conflict_policy,
        };
        let resp: ApplyResponse = match self.internal.post("/v1/fhir/apply", &req).await {
            Ok(r) => r,
            Err(e) if e.status() == Some(hyper::StatusCode::FORBIDDEN) => {
                // Upstream holds another tenant's resource under our id: never overwrite it.
                self.fail_groups(std::slice::from_ref(g), &e.to_string(), true, 0).await?;
                ChannelStats::add(&self.stats.parked, 1);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match resp.outcome {
            ApplyOutcome::ConflictClientWins | ApplyOutcome::Unchanged | ApplyOutcome::Applied => {
                // Retry at once with If-Match on upstream's version.
                self.fail_groups(std::slice::from_ref(g), "conflict: retrying", false, 0).await?;
            }
            ApplyOutcome::ConflictServerWins | ApplyOutcome::ConflictHeld => {}
        }
        if resp.outcome != ApplyOutcome::Unchanged && resp.outcome != ApplyOutcome::Applied {
            ChannelStats::add(&self.stats.conflicts, 1);
            tracing::info!(entity = %g.entity(), outcome = ?resp.outcome, "sync conflict");
            crate::events::record(
                &self.internal,
                "sync.conflict",
                json!({ "entity": g.entity(), "policy": self.cfg.conflict_policy.as_str(),
                        "outcome": resp.outcome, "conflict_id": resp.conflict_id }),
            )
            .await;
        }
        Ok(())
    }

    /// Pulls upstream's history since the cursor. Returns the number of entries applied.
    async fn pull(&self) -> Result<u64, RoundError> {
        let state = self.internal.get_state(PULL_STATE_KEY).await?.unwrap_or(json!({}));
        let since = state.get("since").and_then(Value::as_str).map(str::to_owned);
        let round = state.get("round").cloned().unwrap_or(Value::Null);
        // A round interrupted by a crash resumes at its page (pages already applied are
        // applied again at worst, which changes nothing).
        // `_since` is inclusive: the entries already handled at exactly `since` are remembered
        // and skipped, so a refused entry is not refused (and reported) again every round.
        let keys = |v: Option<&Value>| -> std::collections::HashSet<String> {
            v.and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect())
                .unwrap_or_default()
        };
        let boundary = keys(state.get("boundary"));
        let (mut offset, mut max_seen, mut at_max) = match (&round, &since) {
            (Value::Object(r), _) if r.get("since").and_then(Value::as_str) == since.as_deref() => {
                (
                    r.get("offset").and_then(Value::as_u64).unwrap_or(0),
                    r.get("max").and_then(Value::as_str).map(str::to_owned),
                    keys(r.get("at_max")),
                )
            }
            _ => (0, since.clone(), boundary.clone()),
        };
        let mut applied = 0u64;
        loop {
            let mut url = format!(
                "{}?_count={}&_offset={}",
                self.up.url("_history"),
                self.cfg.pull_page_size,
                offset
            );
            if let Some(s) = &since {
                url.push_str("&_since=");
                url.push_str(&urlencode(s));
            }
            let resp = self.up.send(|c| c.get(&url)).await?;
            let status = resp.status();
            if !status.is_success() {
                return Err(
                    UpstreamError::Refused { status, message: error_text(resp).await }.into()
                );
            }
            let page = json_body(resp).await?;
            if page.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
                return Err(
                    UpstreamError::Malformed("history answer is not a Bundle".into()).into()
                );
            }
            let entries = page.get("entry").and_then(Value::as_array).cloned().unwrap_or_default();
            // Newest first upstream: apply oldest first within the page.
            for e in entries.iter().rev() {
                let lm = last_modified(e);
                let key = entry_key(e);
                if lm.is_some() && lm == since && boundary.contains(&key) {
                    continue;
                }
                applied += self.apply_entry(e).await?;
                if let Some(lm) = lm {
                    match max_seen.as_deref().map(|m| lm.as_str().cmp(m)) {
                        None | Some(std::cmp::Ordering::Greater) => {
                            max_seen = Some(lm);
                            at_max = [key].into_iter().collect();
                        }
                        Some(std::cmp::Ordering::Equal) => {
                            at_max.insert(key);
                        }
                        Some(std::cmp::Ordering::Less) => {}
                    }
                }
            }
            offset += entries.len() as u64;
            let has_next = !entries.is_empty()
                && page.get("link").and_then(Value::as_array).is_some_and(|l| {
                    l.iter().any(|l| l.get("relation").and_then(Value::as_str) == Some("next"))
                });
            let new_state = if has_next {
                json!({ "since": since, "boundary": boundary,
                        "round": { "since": since, "offset": offset, "max": max_seen, "at_max": at_max } })
            } else {
                json!({ "since": max_seen, "boundary": at_max, "round": null })
            };
            self.internal.put_state(PULL_STATE_KEY, &new_state).await?;
            if !has_next {
                return Ok(applied);
            }
        }
    }

    async fn apply_entry(&self, e: &Value) -> Result<u64, RoundError> {
        let method = e.pointer("/request/method").and_then(Value::as_str).unwrap_or("PUT");
        let resource = e.get("resource").cloned();
        let (rtype, id) = match &resource {
            Some(r) => (
                r.get("resourceType").and_then(Value::as_str).unwrap_or("").to_owned(),
                r.get("id").and_then(Value::as_str).unwrap_or("").to_owned(),
            ),
            None => {
                let url = e.pointer("/request/url").and_then(Value::as_str).unwrap_or("");
                let mut parts = url.split('/');
                (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned())
            }
        };
        let version = resource
            .as_ref()
            .and_then(|r| r.pointer("/meta/versionId").and_then(Value::as_str).map(str::to_owned))
            .or_else(|| e.pointer("/response/etag").and_then(Value::as_str).and_then(etag_version))
            .unwrap_or_else(|| "gone".into());
        let resource = if method == "DELETE" { None } else { resource };
        if rtype.is_empty() || id.is_empty() || (method != "DELETE" && resource.is_none()) {
            tracing::warn!(method, "history entry without a resource address; skipped");
            ChannelStats::add(&self.stats.rejected, 1);
            return Ok(0);
        }
        let req = ApplyRequest {
            rtype: rtype.clone(),
            id: id.clone(),
            resource,
            upstream_version: version,
            policy: self.cfg.conflict_policy,
        };
        match self.internal.post::<ApplyResponse>("/v1/fhir/apply", &req).await {
            Ok(r) => {
                match r.outcome {
                    ApplyOutcome::Applied => ChannelStats::add(&self.stats.received, 1),
                    ApplyOutcome::Unchanged => return Ok(0),
                    _ => {
                        ChannelStats::add(&self.stats.received, 1);
                        ChannelStats::add(&self.stats.conflicts, 1);
                        crate::events::record(
                            &self.internal,
                            "sync.conflict",
                            json!({ "entity": format!("{rtype}/{id}"),
                                    "policy": self.cfg.conflict_policy.as_str(),
                                    "outcome": r.outcome, "conflict_id": r.conflict_id }),
                        )
                        .await;
                    }
                }
                Ok(1)
            }
            Err(err) if matches!(err.status().map(|s| s.as_u16()), Some(400 | 403 | 422)) => {
                // Another tenant's resource, or one the edge cannot hold: refused and reported.
                tracing::warn!(entity = %format!("{rtype}/{id}"), error = %err, "upstream resource refused");
                ChannelStats::add(&self.stats.rejected, 1);
                crate::events::record(
                    &self.internal,
                    "sync.rejected",
                    json!({ "entity": format!("{rtype}/{id}"), "status": err.status().map(|s| s.as_u16()) }),
                )
                .await;
                Ok(0)
            }
            Err(err) => Err(err.into()),
        }
    }
}

/// Identity of a history entry: resource address and version.
fn entry_key(e: &Value) -> String {
    let url = e
        .get("resource")
        .and_then(|r| {
            Some(format!("{}/{}", r.get("resourceType")?.as_str()?, r.get("id")?.as_str()?))
        })
        .or_else(|| e.pointer("/request/url").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default();
    let version = e
        .pointer("/resource/meta/versionId")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| e.pointer("/response/etag").and_then(Value::as_str).and_then(etag_version))
        .unwrap_or_default();
    format!("{url}@{version}")
}

fn last_modified(e: &Value) -> Option<String> {
    e.pointer("/response/lastModified")
        .or_else(|| e.pointer("/resource/meta/lastUpdated"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squash_keeps_one_push_per_resource_in_reference_order() {
        let mk = |seq, entity: &str| LeasedChange {
            seq,
            created_at_ms: 0,
            entity: entity.into(),
            op: "update".into(),
            version: Some(seq.to_string()),
            attempts: 0,
            detail: None,
            current_version: Some(9),
            resource: Some(json!({})),
            upstream_version: None,
        };
        let groups = squash(vec![
            mk(1, "Observation/o1"),
            mk(2, "Patient/p1"),
            mk(3, "Observation/o1"),
            mk(4, "Encounter/e1"),
        ]);
        let names: Vec<String> = groups.iter().map(Group::entity).collect();
        assert_eq!(names, ["Patient/p1", "Encounter/e1", "Observation/o1"]);
        assert_eq!(groups[2].seqs, [1, 3]);
    }

    #[test]
    fn etags() {
        assert_eq!(etag_version("W/\"3\"").as_deref(), Some("3"));
        assert_eq!(etag_version("\"12\"").as_deref(), Some("12"));
        assert_eq!(etag_version(""), None);
    }
}
