//! The audit trail: one row per access to patient data (FHIR read, search and write; DICOM store,
//! find and export; admin actions; refused authentication), appended in the same transaction as
//! the change it describes, each with its leaf in the integrity ledger (`crate::ledger`).
//!
//! Auditors read the rows as FHIR `AuditEvent` resources shaped after IHE Basic Audit Log
//! Patterns (BALP): [`to_fhir`] is the one mapping, used by the `/fhir/AuditEvent` routes and by
//! `hms-edge audit export`. The rows are never rewritten; the FHIR view is computed, so the log
//! the ledger commits to is exactly what the auditor sees.
//!
//! Boundaries: [`to_fhir`] and [`AuditQuery::parse`] are pure; [`append`], [`get`] and [`search`]
//! are the only SQL on `audit_events`.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};

use crate::keys::Key;
use crate::store::{StoreError, WriteTx, now_ms};

/// One audit event before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Who: token subject, client certificate, `dicom:<calling AE>`, `os-user:<name>` for the
    /// command-line tools, or `anonymous` (auth off in development).
    pub actor: String,
    /// From where: remote address, or `local` for the command-line tools.
    pub source: String,
    /// What kind of access: `read`, `search`, `create`, …, `dicom-store`, `dicom-find`,
    /// `dicom-export`, `backup`, `restore`, `rotate-key`, `audit-export`, `authenticate`.
    pub action: String,
    /// What: `Patient/123`, `Observation?code=…`, `dicom:<SOP Instance UID>`.
    pub entity: String,
    /// `success`, or the status and reason of a refusal or failure.
    pub outcome: String,
    pub detail: Option<String>,
}

impl AuditRecord {
    /// An event of a command-line tool: the operating-system user, from `local`.
    pub fn local(action: &str, entity: &str, outcome: &str, detail: Option<String>) -> Self {
        AuditRecord {
            actor: local_actor(),
            source: "local".into(),
            action: action.into(),
            entity: entity.into(),
            outcome: outcome.into(),
            detail,
        }
    }
}

/// Appends an event in the caller's transaction, with its ledger leaf; returns its sequence
/// number (the AuditEvent's id).
pub fn append(tx: &WriteTx<'_>, event: &AuditRecord) -> Result<i64, StoreError> {
    let at = now_ms();
    tx.sql()
        .prepare_cached(
            "INSERT INTO audit_events (at, actor, source, action, entity, outcome, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            at,
            event.actor,
            event.source,
            event.action,
            event.entity,
            event.outcome,
            event.detail
        ])?;
    let seq = tx.sql().last_insert_rowid();
    crate::ledger::append(
        tx,
        &crate::ledger::Record::Audit {
            seq,
            at,
            actor: event.actor.clone(),
            source: event.source.clone(),
            action: event.action.clone(),
            entity: event.entity.clone(),
            outcome: event.outcome.clone(),
            detail: event.detail.clone(),
        },
    )?;
    Ok(seq)
}

/// Appends an event from a command-line tool through its own connection (the daemon may be
/// running: SQLite serialises the two writers, and the ledger's next index is read inside the
/// transaction).
pub fn append_with(
    conn: &mut Connection,
    ledger_key: &Key,
    event: &AuditRecord,
) -> Result<i64, StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let seq = append(&WriteTx::new(&tx, ledger_key), event)?;
    tx.commit()?;
    Ok(seq)
}

/// The actor of a command-line tool: the operating-system user who ran it.
pub fn local_actor() -> String {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => format!("os-user:{} (uid {uid})", u.name),
        _ => format!("os-user:uid {uid}"),
    }
}

/// A stored audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub seq: i64,
    pub at: i64,
    pub actor: String,
    pub source: String,
    pub action: String,
    pub entity: String,
    pub outcome: String,
    pub detail: Option<String>,
}

/// Reads a row selected as `seq, at, actor, source, action, entity, outcome, detail`.
pub(crate) fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        seq: r.get(0)?,
        at: r.get(1)?,
        actor: r.get(2)?,
        source: r.get(3)?,
        action: r.get(4)?,
        entity: r.get(5)?,
        outcome: r.get(6)?,
        detail: r.get(7)?,
    })
}

impl From<AuditRow> for crate::ledger::Record {
    fn from(r: AuditRow) -> Self {
        crate::ledger::Record::Audit {
            seq: r.seq,
            at: r.at,
            actor: r.actor,
            source: r.source,
            action: r.action,
            entity: r.entity,
            outcome: r.outcome,
            detail: r.detail,
        }
    }
}

const COLUMNS: &str = "seq, at, actor, source, action, entity, outcome, detail";

/// One event by sequence number.
pub fn get(conn: &Connection, seq: i64) -> Result<Option<AuditRow>, StoreError> {
    Ok(conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM audit_events WHERE seq = ?1"))?
        .query_row([seq], row)
        .optional()?)
}

/// The BALP `action` code (C R U D E) of one of our actions.
pub fn action_code(action: &str) -> &'static str {
    match action {
        "create" | "dicom-store" | "stow" | "restore" => "C",
        "read" | "vread" | "history" | "verify" | "dicom-export" | "wado" | "backup"
        | "audit-export" | "sync-lease" | "dicom-forward" | "dicom-get" | "dicom-move"
        | "dicom-commit" => "R",
        "update" | "rotate-key" | "sync-apply" | "dicom-mpps" => "U",
        "delete" => "D",
        // search, search-page, everything, dicom-find, qido, authenticate, authorize …
        _ => "E",
    }
}

/// The FHIR AuditEvent.outcome code: 0 success, 4 minor failure (refused, not found), 8 serious
/// failure (server error).
pub fn outcome_code(outcome: &str) -> &'static str {
    let o = outcome.trim();
    if o == "success" || o.starts_with("success") || o == "identical" {
        return "0";
    }
    match o.as_bytes().first() {
        Some(b'5') => "8",
        _ => "4",
    }
}

/// The audit event type (`AuditEvent.type`) and, for REST, the interaction subtype.
fn event_type(action: &str) -> (Value, Option<Value>) {
    let dcm = |code: &str, display: &str| json!({"system": "http://dicom.nema.org/resources/ontology/DCM", "code": code, "display": display});
    let rest = json!({
        "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "code": "rest", "display": "Restful Operation"
    });
    let interaction = |code: &str| {
        Some(json!({"system": "http://hl7.org/fhir/restful-interaction", "code": code}))
    };
    match action {
        "dicom-store" | "dicom-export" | "dicom-forward" | "dicom-get" | "dicom-move" | "stow"
        | "wado" => (dcm("110104", "DICOM Instances Transferred"), None),
        "dicom-find" | "dicom-worklist" | "dicom-commit" | "qido" => (dcm("110112", "Query"), None),
        "authenticate" | "authorize" => (dcm("110114", "User Authentication"), None),
        "backup" | "restore" | "rotate-key" | "audit-export" => {
            (dcm("110100", "Application Activity"), None)
        }
        "read" => (rest, interaction("read")),
        "vread" => (rest, interaction("vread")),
        "create" => (rest, interaction("create")),
        "update" => (rest, interaction("update")),
        "delete" => (rest, interaction("delete")),
        "history" => (rest, interaction("history")),
        "search" | "search-page" => (rest, interaction("search")),
        "everything" | "everything-page" | "verify" => (rest, interaction("operation")),
        _ => (rest, None),
    }
}

/// The patient a logged entity belongs to, when the entity names one (`Patient/123`,
/// `Patient/123/$everything`, `Patient/123/_history/2`).
fn patient_of(entity: &str) -> Option<&str> {
    let rest = entity.strip_prefix("Patient/")?;
    let id = rest.split(['/', '?', ' ']).next()?;
    (!id.is_empty() && crate::fhir::valid_id(id)).then_some(id)
}

/// The row as a FHIR R4 `AuditEvent` in the IHE BALP style. `observer` names this box.
pub fn to_fhir(r: &AuditRow, observer: &str) -> Value {
    let (kind, subtype) = event_type(&r.action);
    let recorded = crate::fhir::date::format_instant(r.at);
    let mut requestor = json!({
        "type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "code": "IRCP", "display": "information recipient"
        }]},
        "who": {"display": r.actor},
        "requestor": true,
    });
    if r.source != "local" && r.source != "unknown" {
        requestor["network"] = json!({"address": r.source, "type": "2"});
    }
    let mut entities = Vec::new();
    let entity = &r.entity;
    if let Some(sop) = entity.strip_prefix("dicom:") {
        entities.push(json!({
            "what": {"identifier": {"system": "urn:dicom:uid", "value": format!("urn:oid:{sop}")}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "3", "display": "Report"},
        }));
    } else if entity.contains('?') {
        entities.push(json!({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"},
            "query": base64_encode(entity.as_bytes()),
            "description": entity,
        }));
    } else if entity != "-" && !entity.is_empty() {
        let reference = entity.split(['?', ' ']).next().unwrap_or(entity);
        let reference = reference.split("/$").next().unwrap_or(reference);
        entities.push(json!({
            "what": {"reference": reference},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "description": entity,
        }));
    }
    if let Some(pid) = patient_of(entity) {
        entities.push(json!({
            "what": {"reference": format!("Patient/{pid}")},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"},
        }));
    }
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "id": r.seq.to_string(),
        "meta": {
            "versionId": "1",
            "lastUpdated": recorded,
            "profile": ["https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"],
        },
        "type": kind,
        "action": action_code(&r.action),
        "recorded": recorded,
        "outcome": outcome_code(&r.outcome),
        "outcomeDesc": r.outcome,
        "agent": [requestor, {
            "type": {"coding": [{
                "system": "http://dicom.nema.org/resources/ontology/DCM",
                "code": "110153", "display": "Source Role ID"
            }]},
            "who": {"display": observer},
            "requestor": false,
        }],
        "source": {
            "site": observer,
            "observer": {"display": observer},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}],
        },
        "extension": [{
            "url": "urn:hms-edge:audit-action",
            "valueCode": r.action,
        }],
    });
    if patient_of(entity).is_none() {
        ev["meta"]["profile"] =
            json!(["https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.Read"]);
    }
    if let Some(s) = subtype {
        ev["subtype"] = json!([s]);
    }
    if !entities.is_empty() {
        ev["entity"] = Value::Array(entities);
    }
    if let Some(d) = &r.detail {
        ev["extension"].as_array_mut().expect("array").push(json!({
            "url": "urn:hms-edge:audit-detail",
            "valueString": d,
        }));
    }
    ev
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Search parameters `/fhir/AuditEvent` understands (name, FHIR type): what the
/// CapabilityStatement advertises for AuditEvent, and nothing else.
pub const SEARCH_PARAMS: &[(&str, &str)] = &[
    ("_id", "token"),
    ("_lastUpdated", "date"),
    ("date", "date"),
    ("action", "token"),
    ("subtype", "token"),
    ("outcome", "token"),
    ("agent-name", "string"),
    ("address", "string"),
    ("entity", "reference"),
    ("patient", "reference"),
];

/// Default and largest page size.
pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 1000;

/// A parsed AuditEvent search. Results are ordered by sequence (= time recorded), newest first
/// unless `_sort=date`; paging is by sequence number (`_cursor`), so pages never shift while new
/// events are appended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub ids: Vec<i64>,
    /// Half-open time windows `[lo, hi)` in ms that must all hold.
    pub after: Option<i64>,
    pub before: Option<i64>,
    pub actions: Vec<String>,
    pub action_codes: Vec<String>,
    pub outcomes: Vec<String>,
    pub agent_name: Option<String>,
    pub address: Option<String>,
    pub entity: Option<String>,
    pub patient: Option<String>,
    pub count: usize,
    pub ascending: bool,
    /// Continue after this sequence number (exclusive).
    pub cursor: Option<i64>,
    pub summary_count: bool,
    /// Parameters that were ignored (lenient handling).
    pub ignored: Vec<String>,
}

/// Parameters of the FHIR layer itself that are not search criteria.
const RESULT_PARAMS: &[&str] = &["_format", "_pretty", "_total", "_elements"];

impl AuditQuery {
    /// Parses query parameters. Unknown ones are refused when `strict`, otherwise ignored.
    pub fn parse(q: &[(String, String)], strict: bool) -> Result<AuditQuery, String> {
        let mut out = AuditQuery { count: DEFAULT_COUNT, ..Default::default() };
        for (k, v) in q {
            let (name, modifier) = match k.split_once(':') {
                Some((n, m)) => (n, Some(m)),
                None => (k.as_str(), None),
            };
            if let Some(m) = modifier
                && !((name == "entity" || name == "patient") && m == "Patient"
                    || name == "agent-name" && m == "exact")
            {
                return Err(format!("modifier :{m} is not supported on AuditEvent?{name}"));
            }
            match name {
                "_id" => {
                    // AuditEvent ids are sequence numbers: any other id matches nothing.
                    out.ids.extend(v.split(',').map(|id| id.trim().parse().unwrap_or(-1)));
                }
                "date" | "_lastUpdated" => {
                    for part in v.split(',') {
                        out.add_date(part)?;
                    }
                }
                "action" => out.action_codes.extend(v.split(',').map(|s| token_code(s).to_owned())),
                "subtype" => out.actions.extend(v.split(',').map(|s| token_code(s).to_owned())),
                "outcome" => out.outcomes.extend(v.split(',').map(|s| token_code(s).to_owned())),
                "agent-name" => out.agent_name = Some(v.clone()),
                "address" => out.address = Some(v.clone()),
                "entity" => out.entity = Some(v.clone()),
                "patient" => {
                    let id = v.strip_prefix("Patient/").unwrap_or(v);
                    out.patient = Some(id.to_owned());
                }
                "_count" => {
                    let n: usize =
                        v.parse().map_err(|_| format!("_count={v} is not a whole number"))?;
                    out.count = n.min(MAX_COUNT);
                }
                "_sort" => match v.as_str() {
                    "date" | "_lastUpdated" | "_id" => out.ascending = true,
                    "-date" | "-_lastUpdated" | "-_id" => out.ascending = false,
                    other => return Err(format!("_sort={other} is not supported on AuditEvent")),
                },
                "_cursor" => {
                    out.cursor = Some(v.parse().map_err(|_| format!("_cursor={v} is invalid"))?)
                }
                "_summary" if v == "count" => out.summary_count = true,
                n if RESULT_PARAMS.contains(&n) => {}
                other => {
                    if strict {
                        return Err(format!("unknown search parameter AuditEvent?{other}"));
                    }
                    out.ignored.push(other.to_owned());
                }
            }
        }
        Ok(out)
    }

    fn add_date(&mut self, v: &str) -> Result<(), String> {
        let (prefix, value) = match v.get(..2) {
            Some(p @ ("eq" | "ne" | "gt" | "lt" | "ge" | "le" | "sa" | "eb"))
                if v.len() > 2 && v.as_bytes()[2].is_ascii_digit() =>
            {
                (p, &v[2..])
            }
            _ => ("eq", v),
        };
        let (lo, hi) = crate::fhir::date::parse_range(value)
            .ok_or_else(|| format!("date={v}: not a FHIR date"))?;
        let (after, before) = match prefix {
            "eq" => (Some(lo), Some(hi)),
            "ge" => (Some(lo), None),
            "gt" | "sa" => (Some(hi), None),
            "le" => (None, Some(hi)),
            "lt" | "eb" => (None, Some(lo)),
            _ => return Err(format!("date prefix {prefix} is not supported on AuditEvent")),
        };
        if let Some(a) = after {
            self.after = Some(self.after.map_or(a, |x| x.max(a)));
        }
        if let Some(b) = before {
            self.before = Some(self.before.map_or(b, |x| x.min(b)));
        }
        Ok(())
    }

    /// The parameters (without paging) to repeat in `next` links.
    pub fn link_params(&self, q: &[(String, String)]) -> Vec<(String, String)> {
        q.iter().filter(|(k, _)| k != "_cursor").cloned().collect()
    }
}

fn token_code(s: &str) -> &str {
    s.rsplit_once('|').map_or(s, |(_, c)| c)
}

fn like_prefix(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 1);
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            o.push('\\');
        }
        o.push(c);
    }
    o.push('%');
    o
}

/// Runs a search: at most `count + 1` rows (the extra one says whether there is a next page),
/// and the total when `_summary=count`.
pub fn search(
    conn: &Connection,
    q: &AuditQuery,
) -> Result<(Vec<AuditRow>, Option<u64>), StoreError> {
    let mut wh: Vec<String> = Vec::new();
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    use rusqlite::types::Value as V;
    let mut push = |clause: String, vals: Vec<V>, wh: &mut Vec<String>| {
        wh.push(clause);
        args.extend(vals);
    };
    if !q.ids.is_empty() {
        let marks = vec!["?"; q.ids.len()].join(",");
        push(format!("seq IN ({marks})"), q.ids.iter().map(|i| V::Integer(*i)).collect(), &mut wh);
    }
    if let Some(a) = q.after {
        push("at >= ?".into(), vec![V::Integer(a)], &mut wh);
    }
    if let Some(b) = q.before {
        push("at < ?".into(), vec![V::Integer(b)], &mut wh);
    }
    if !q.actions.is_empty() {
        let marks = vec!["?"; q.actions.len()].join(",");
        push(
            format!("action IN ({marks})"),
            q.actions.iter().map(|a| V::Text(a.clone())).collect(),
            &mut wh,
        );
    }
    // action (C R U D E) and outcome (0 4 8) are derived: filtered after the query below.
    if let Some(n) = &q.agent_name {
        push("actor LIKE ? ESCAPE '\\'".into(), vec![V::Text(like_prefix(n))], &mut wh);
    }
    if let Some(a) = &q.address {
        push("source LIKE ? ESCAPE '\\'".into(), vec![V::Text(like_prefix(a))], &mut wh);
    }
    if let Some(e) = &q.entity {
        push(
            "(entity = ? OR entity LIKE ? ESCAPE '\\')".into(),
            vec![V::Text(e.clone()), V::Text(like_prefix(&format!("{e}/")))],
            &mut wh,
        );
    }
    if let Some(p) = &q.patient {
        let e = format!("Patient/{p}");
        push(
            "(entity = ? OR entity LIKE ? ESCAPE '\\')".into(),
            vec![V::Text(e.clone()), V::Text(like_prefix(&format!("{e}/")))],
            &mut wh,
        );
    }
    let derived = !q.action_codes.is_empty() || !q.outcomes.is_empty();
    let keep = |r: &AuditRow| {
        (q.action_codes.is_empty() || q.action_codes.iter().any(|c| c == action_code(&r.action)))
            && (q.outcomes.is_empty() || q.outcomes.iter().any(|c| c == outcome_code(&r.outcome)))
    };
    let mut page_wh = wh.clone();
    let mut page_args = args.clone();
    if let Some(c) = q.cursor {
        page_wh.push(if q.ascending { "seq > ?" } else { "seq < ?" }.into());
        page_args.push(V::Integer(c));
    }
    let where_sql = |w: &[String]| {
        if w.is_empty() { String::new() } else { format!("WHERE {}", w.join(" AND ")) }
    };
    let order = if q.ascending { "ASC" } else { "DESC" };
    let total =
        if q.summary_count {
            if derived {
                let sql = format!("SELECT {COLUMNS} FROM audit_events {}", where_sql(&wh));
                let mut st = conn.prepare(&sql)?;
                let rows = st.query_map(rusqlite::params_from_iter(args.iter()), row)?;
                let mut n = 0u64;
                for r in rows {
                    if keep(&r?) {
                        n += 1;
                    }
                }
                Some(n)
            } else {
                let sql = format!("SELECT count(*) FROM audit_events {}", where_sql(&wh));
                Some(conn.query_row(&sql, rusqlite::params_from_iter(args.iter()), |r| {
                    r.get::<_, i64>(0)
                })? as u64)
            }
        } else {
            None
        };
    let sql =
        format!("SELECT {COLUMNS} FROM audit_events {} ORDER BY seq {order}", where_sql(&page_wh));
    let mut st = conn.prepare(&sql)?;
    let mut rows = st.query(rusqlite::params_from_iter(page_args.iter()))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let r = row(r)?;
        if keep(&r) {
            out.push(r);
            if out.len() > q.count {
                break;
            }
        }
    }
    Ok((out, total))
}

/// Every event in sequence order from `from_seq` (inclusive) and recorded at or after
/// `since_ms`, for `hms-edge audit export`. Streams through `f`.
pub fn for_each(
    conn: &Connection,
    from_seq: i64,
    since_ms: Option<i64>,
    mut f: impl FnMut(AuditRow) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let mut st = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM audit_events WHERE seq >= ?1 AND at >= ?2 ORDER BY seq"
    ))?;
    let mut rows = st.query(params![from_seq, since_ms.unwrap_or(i64::MIN)])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        f(row(r)?)?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn balp_mapping_of_a_patient_read() {
        let r = AuditRow {
            seq: 7,
            at: 1_764_000_000_000,
            actor: "nurse-1".into(),
            source: "10.0.0.5".into(),
            action: "read".into(),
            entity: "Patient/p1".into(),
            outcome: "success".into(),
            detail: None,
        };
        let ev = to_fhir(&r, "hms-edge site-a");
        assert_eq!(ev["id"], "7");
        assert_eq!(ev["action"], "R");
        assert_eq!(ev["outcome"], "0");
        assert_eq!(ev["subtype"][0]["code"], "read");
        assert_eq!(ev["agent"][0]["who"]["display"], "nurse-1");
        assert_eq!(ev["agent"][0]["network"]["address"], "10.0.0.5");
        assert_eq!(ev["entity"][0]["what"]["reference"], "Patient/p1");
        assert_eq!(ev["entity"][1]["role"]["code"], "1");
    }

    #[test]
    fn dicom_store_and_refusals_map_to_dicom_codes() {
        let mut r = AuditRow {
            seq: 1,
            at: 0,
            actor: "dicom:CT1".into(),
            source: "127.0.0.1".into(),
            action: "dicom-store".into(),
            entity: "dicom:1.2.3".into(),
            outcome: "success".into(),
            detail: None,
        };
        let ev = to_fhir(&r, "x");
        assert_eq!(ev["type"]["code"], "110104");
        assert_eq!(ev["action"], "C");
        assert_eq!(ev["entity"][0]["what"]["identifier"]["value"], "urn:oid:1.2.3");
        r.action = "authenticate".into();
        r.outcome = "401 token expired".into();
        let ev = to_fhir(&r, "x");
        assert_eq!(ev["type"]["code"], "110114");
        assert_eq!(ev["outcome"], "4");
    }

    #[test]
    fn query_parsing() {
        let a = AuditQuery::parse(
            &q(&[("date", "ge2026-01-01"), ("date", "lt2026-02"), ("patient", "Patient/p1")]),
            true,
        )
        .unwrap();
        assert!(a.after.unwrap() < a.before.unwrap());
        assert_eq!(a.patient.as_deref(), Some("p1"));
        assert!(AuditQuery::parse(&q(&[("foo", "1")]), true).is_err());
        assert_eq!(AuditQuery::parse(&q(&[("foo", "1")]), false).unwrap().ignored, ["foo"]);
        assert!(AuditQuery::parse(&q(&[("date", "x2026")]), true).is_err());
        assert_eq!(AuditQuery::parse(&q(&[("_id", "abc")]), true).unwrap().ids, [-1]);
        assert!(AuditQuery::parse(&q(&[("_count", "-1")]), true).is_err());
    }
}
