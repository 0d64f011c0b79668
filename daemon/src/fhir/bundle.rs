//! Bundle `transaction` (all-or-nothing in one store transaction, `urn:uuid:` and conditional
//! references resolved) and `batch` (each entry on its own).

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::Connection;
use serde_json::{Value, json};

use super::auth::Interaction;
use super::storage::{self, Written};
use super::{FhirError, date, new_id, search, search_sql, validate_resource};
use crate::http_caller::Identity;
use crate::store::{Store, WriteTx};

#[derive(Debug, Clone)]
enum Op {
    Create { rtype: String, if_none_exist: Option<String> },
    Update { rtype: String, id: String, if_match: Option<i64> },
    ConditionalUpdate { rtype: String, query: String },
    Delete { rtype: String, id: String },
    Read { rtype: String, id: String },
    Search { rtype: String, query: String },
}

#[derive(Debug, Clone)]
struct Entry {
    full_url: Option<String>,
    op: Op,
    resource: Option<Value>,
}

fn entry_error(i: usize, msg: impl std::fmt::Display) -> FhirError {
    FhirError::BadRequest(format!("Bundle.entry[{i}]: {msg}"))
}

/// Takes the bundle: its resources are moved into the entries, not copied (a Synthea patient's
/// transaction parses to a few hundred MB of values; a copy doubled the daemon's peak RSS).
fn parse_entries(mut bundle: Value) -> Result<Vec<Entry>, FhirError> {
    let Some(items) = bundle.get_mut("entry").map(|e| match e.take() {
        Value::Array(items) => items,
        _ => Vec::new(),
    }) else {
        return Ok(Vec::new());
    };
    drop(bundle);
    let mut out = Vec::with_capacity(items.len());
    for (i, mut e) in items.into_iter().enumerate() {
        let req = e.get("request").ok_or_else(|| entry_error(i, "request is missing"))?;
        let method = req
            .get("method")
            .and_then(Value::as_str)
            .ok_or_else(|| entry_error(i, "request.method is missing"))?
            .to_owned();
        let url = req
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| entry_error(i, "request.url is missing"))?;
        let url = url.trim_start_matches('/').to_owned();
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (url.as_str(), None),
        };
        let segs: Vec<&str> = path.split('/').collect();
        let rtype = segs[0].to_owned();
        if !super::is_resource_type(&rtype) {
            return Err(entry_error(i, format!("unknown resource type in {url:?}")));
        }
        let id = segs.get(1).map(|s| (*s).to_owned());
        if let Some(id) = &id
            && !super::valid_id(id)
        {
            return Err(entry_error(i, format!("invalid id in {url:?}")));
        }
        let op = match (method.as_str(), id, query) {
            ("POST", None, None) => Op::Create {
                rtype: rtype.clone(),
                if_none_exist: req
                    .get("ifNoneExist")
                    .and_then(Value::as_str)
                    .map(|s| s.trim_start_matches('?').to_owned()),
            },
            ("PUT", Some(id), None) => {
                let if_match = match req.get("ifMatch").and_then(Value::as_str) {
                    Some(s) => Some(
                        s.trim_start_matches("W/")
                            .trim_matches('"')
                            .parse()
                            .map_err(|_| entry_error(i, "bad ifMatch"))?,
                    ),
                    None => None,
                };
                Op::Update { rtype: rtype.clone(), id, if_match }
            }
            ("PUT", None, Some(q)) => Op::ConditionalUpdate { rtype: rtype.clone(), query: q },
            ("DELETE", Some(id), None) => Op::Delete { rtype: rtype.clone(), id },
            ("GET", Some(id), None) => Op::Read { rtype: rtype.clone(), id },
            ("GET", None, q) => Op::Search { rtype: rtype.clone(), query: q.unwrap_or_default() },
            (m, _, _) => {
                return Err(entry_error(i, format!("{m} {url} is not supported in a bundle")));
            }
        };
        if super::READ_ONLY_TYPES.contains(&rtype.as_str())
            && !matches!(op, Op::Read { .. } | Op::Search { .. })
        {
            return Err(FhirError::MethodNotAllowed(format!(
                "Bundle.entry[{i}]: {rtype} is written by the server only"
            )));
        }
        let resource = e.get_mut("resource").map(Value::take);
        if matches!(op, Op::Create { .. } | Op::Update { .. } | Op::ConditionalUpdate { .. }) {
            let r = resource.as_ref().ok_or_else(|| entry_error(i, "resource is missing"))?;
            validate_resource(r, &rtype).map_err(|e| entry_error(i, e))?;
            if let (Op::Update { id, .. }, Some(rid)) = (&op, r.get("id").and_then(Value::as_str))
                && rid != id
            {
                return Err(entry_error(i, format!("resource id {rid} does not match {url}")));
            }
        }
        out.push(Entry {
            full_url: e.get("fullUrl").and_then(Value::as_str).map(str::to_owned),
            op,
            resource,
        });
    }
    Ok(out)
}

fn search_in_tx(conn: &Connection, rtype: &str, query: &str) -> Result<Vec<String>, FhirError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| FhirError::BadRequest(format!("bad query {query:?}: {e}")))?;
    let req = search::parse(rtype, &pairs, true)?;
    search_sql::execute(conn, &req)
}

/// Replaces `reference` values: bundle-local full URLs by their assigned `Type/id`, and
/// conditional references (`Type?search`) by the one resource they match (remembered in `map`:
/// a Synthea bundle names the same practitioner or organization hundreds of times).
fn rewrite_references(
    conn: &Connection,
    v: &mut Value,
    map: &mut HashMap<String, String>,
) -> Result<(), FhirError> {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                if k == "reference"
                    && let Value::String(r) = val
                {
                    if let Some(to) = map.get(r.as_str()) {
                        *r = to.clone();
                    } else if let Some((t, q)) = r.split_once('?')
                        && super::is_resource_type(t)
                    {
                        let found = search_in_tx(conn, t, q)?;
                        match found.len() {
                            1 => {
                                let to = format!("{t}/{}", found[0]);
                                map.insert(r.clone(), to.clone());
                                *r = to;
                            }
                            0 => {
                                return Err(FhirError::PreconditionFailed(format!(
                                    "conditional reference {r} matches nothing"
                                )));
                            }
                            n => {
                                return Err(FhirError::PreconditionFailed(format!(
                                    "conditional reference {r} matches {n} resources"
                                )));
                            }
                        }
                    } else if r.starts_with("urn:uuid:") {
                        return Err(FhirError::BadRequest(format!(
                            "reference {r} names no entry of this bundle"
                        )));
                    }
                } else {
                    rewrite_references(conn, val, map)?;
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                rewrite_references(conn, x, map)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn response_of(w: &Written, status: &str) -> Value {
    json!({
        "status": status,
        "location": format!("{}/{}/_history/{}", w.rtype, w.id, w.version),
        "etag": format!("W/\"{}\"", w.version),
        "lastModified": date::format_instant(w.last_updated),
    })
}

fn read_entry(conn: &Connection, rtype: &str, id: &str) -> Result<Value, FhirError> {
    match storage::read_current(conn, rtype, id)? {
        Some(c) if !c.deleted => Ok(json!({
            "resource": serde_json::from_str::<Value>(c.json.as_deref().unwrap_or("{}")).unwrap_or(Value::Null),
            "response": {"status": "200", "etag": format!("W/\"{}\"", c.version)}
        })),
        Some(_) => Err(FhirError::Gone(format!("{rtype}/{id} was deleted"))),
        None => Err(FhirError::NotFound(format!("{rtype}/{id} is not known"))),
    }
}

/// Runs one entry (ids already assigned, references already rewritten).
fn run_entry(
    tx: &WriteTx<'_>,
    e: &Entry,
    assigned: Option<&str>,
    who: &Identity,
) -> Result<Value, FhirError> {
    let conn = tx.sql();
    match &e.op {
        Op::Create { rtype, if_none_exist } => {
            if let Some(q) = if_none_exist {
                let found = search_in_tx(conn, rtype, q)?;
                match found.len() {
                    0 => {}
                    1 => {
                        let c = storage::read_current(conn, rtype, &found[0])?.expect("found");
                        return Ok(
                            json!({"response": {"status": "200", "location": format!("{rtype}/{}/_history/{}", found[0], c.version), "etag": format!("W/\"{}\"", c.version)}}),
                        );
                    }
                    n => {
                        return Err(FhirError::PreconditionFailed(format!(
                            "ifNoneExist {q} matched {n} resources"
                        )));
                    }
                }
            }
            let id = assigned.map(str::to_owned).unwrap_or_else(new_id);
            let mut r = e.resource.clone().expect("validated");
            r["id"] = Value::String(id.clone());
            let w = storage::put(tx, rtype, &id, r, None, "local")?;
            storage::audit(tx, &who.write_audit("create", format!("{rtype}/{id}")))?;
            Ok(json!({"response": response_of(&w, "201 Created")}))
        }
        Op::Update { rtype, id, if_match } => {
            let w = storage::put(
                tx,
                rtype,
                id,
                e.resource.clone().expect("validated"),
                *if_match,
                "local",
            )?;
            storage::audit(tx, &who.write_audit("update", format!("{rtype}/{id}")))?;
            Ok(
                json!({"response": response_of(&w, if w.created { "201 Created" } else { "200 OK" })}),
            )
        }
        Op::ConditionalUpdate { rtype, query } => {
            let found = search_in_tx(conn, rtype, query)?;
            let id = match found.len() {
                0 => assigned.map(str::to_owned).unwrap_or_else(new_id),
                1 => found[0].clone(),
                n => {
                    return Err(FhirError::PreconditionFailed(format!(
                        "conditional update {query} matched {n} resources"
                    )));
                }
            };
            let mut r = e.resource.clone().expect("validated");
            r["id"] = Value::String(id.clone());
            let w = storage::put(tx, rtype, &id, r, None, "local")?;
            storage::audit(tx, &who.write_audit("update", format!("{rtype}/{id}")))?;
            Ok(
                json!({"response": response_of(&w, if w.created { "201 Created" } else { "200 OK" })}),
            )
        }
        Op::Delete { rtype, id } => {
            storage::delete(tx, rtype, id, "local")?;
            storage::audit(tx, &who.write_audit("delete", format!("{rtype}/{id}")))?;
            Ok(json!({"response": {"status": "204 No Content"}}))
        }
        Op::Read { rtype, id } => {
            storage::audit(tx, &who.write_audit("read", format!("{rtype}/{id}")))?;
            read_entry(conn, rtype, id)
        }
        Op::Search { rtype, query } => {
            let ids = search_in_tx(conn, rtype, query)?;
            storage::audit(tx, &who.write_audit("search", format!("{rtype}?{query}")))?;
            let mut entries = Vec::new();
            for id in ids.iter().take(search::DEFAULT_COUNT) {
                if let Ok(v) = read_entry(conn, rtype, id) {
                    entries.push(json!({"resource": v["resource"]}));
                }
            }
            Ok(
                json!({"resource": {"resourceType": "Bundle", "type": "searchset", "total": ids.len(), "entry": entries}, "response": {"status": "200"}}),
            )
        }
    }
}

/// The scope an entry needs.
fn required(op: &Op) -> (&str, Interaction) {
    match op {
        Op::Create { rtype, .. } => (rtype, Interaction::Create),
        Op::Update { rtype, .. } | Op::ConditionalUpdate { rtype, .. } => {
            (rtype, Interaction::Update)
        }
        Op::Delete { rtype, .. } => (rtype, Interaction::Delete),
        Op::Read { rtype, .. } => (rtype, Interaction::Read),
        Op::Search { rtype, .. } => (rtype, Interaction::Search),
    }
}

fn order_rank(op: &Op) -> u8 {
    match op {
        Op::Delete { .. } => 0,
        Op::Create { .. } => 1,
        Op::Update { .. } | Op::ConditionalUpdate { .. } => 2,
        Op::Read { .. } | Op::Search { .. } => 3,
    }
}

/// A transaction: every entry succeeds, or nothing is stored and the first failure is returned.
pub async fn transaction(
    store: &Arc<Store>,
    bundle: Value,
    who: Identity,
) -> Result<Value, FhirError> {
    let mut entries = parse_entries(bundle)?;
    for (i, e) in entries.iter().enumerate() {
        let (t, what) = required(&e.op);
        who.principal
            .require(t, what)
            .map_err(|err| FhirError::Forbidden(format!("Bundle.entry[{i}]: {err}")))?;
    }
    // Ids for created resources are minted now, so bundle-local references can be rewritten.
    let mut map = HashMap::new();
    let mut assigned: Vec<Option<String>> = Vec::with_capacity(entries.len());
    for e in &entries {
        let (rtype, id) = match &e.op {
            Op::Create { rtype, .. } | Op::ConditionalUpdate { rtype, .. } => {
                (rtype.clone(), Some(new_id()))
            }
            Op::Update { rtype, id, .. } => (rtype.clone(), Some(id.clone())),
            _ => (String::new(), None),
        };
        if let (Some(full), Some(id)) = (&e.full_url, &id) {
            map.insert(full.clone(), format!("{rtype}/{id}"));
        }
        assigned.push(id);
    }
    let n = entries.len();
    let responses = store
        .write_as(move |tx| -> Result<_, FhirError> {
            // Conditional creates that find an existing resource point the bundle's references at it.
            for (i, e) in entries.iter().enumerate() {
                if let (Op::Create { rtype, if_none_exist: Some(q) }, Some(full)) =
                    (&e.op, &e.full_url)
                {
                    let found =
                        search_in_tx(tx.sql(), rtype, q).map_err(|err| entry_err(i, err))?;
                    if found.len() == 1 {
                        map.insert(full.clone(), format!("{rtype}/{}", found[0]));
                    }
                }
            }
            for (i, e) in entries.iter_mut().enumerate() {
                if let Some(r) = e.resource.as_mut() {
                    rewrite_references(tx.sql(), r, &mut map).map_err(|err| entry_err(i, err))?;
                }
            }
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| order_rank(&entries[i].op));
            let mut responses = vec![Value::Null; n];
            for i in order {
                let mut r = run_entry(tx, &entries[i], assigned[i].as_deref(), &who)
                    .map_err(|err| entry_err(i, err))?;
                if let Some(full) = &entries[i].full_url {
                    r["fullUrl"] = Value::String(full.clone());
                }
                responses[i] = r;
            }
            Ok(responses)
        })
        .await?;
    Ok(json!({"resourceType": "Bundle", "type": "transaction-response", "entry": responses}))
}

/// Keeps the status of an entry's error but says which entry failed.
fn entry_err(i: usize, e: FhirError) -> FhirError {
    let msg = format!("Bundle.entry[{i}]: {e}");
    match e {
        FhirError::NotFound(_) => FhirError::NotFound(msg),
        FhirError::Gone(_) => FhirError::Gone(msg),
        FhirError::PreconditionFailed(_) => FhirError::PreconditionFailed(msg),
        FhirError::Conflict(_) => FhirError::Conflict(msg),
        FhirError::Internal(_) => FhirError::Internal(msg),
        FhirError::Unprocessable(_) => FhirError::Unprocessable(msg),
        _ => FhirError::BadRequest(msg),
    }
}

/// A batch: each entry is its own transaction; failures are reported per entry.
pub async fn batch(
    store: &Arc<Store>,
    bundle: Value,
    who: Identity,
    _base: &str,
) -> Result<Value, FhirError> {
    let entries = parse_entries(bundle)?;
    let mut responses = Vec::with_capacity(entries.len());
    for mut e in entries {
        let (t, what) = required(&e.op);
        if let Err(err) = who.principal.require(t, what) {
            responses.push(
                json!({"response": {"status": "403", "outcome": FhirError::from(err).outcome()}}),
            );
            continue;
        }
        let who = who.clone();
        let result = store
            .write_as(move |tx| -> Result<_, FhirError> {
                if let Some(r) = e.resource.as_mut() {
                    rewrite_references(tx.sql(), r, &mut HashMap::new())?;
                }
                run_entry(tx, &e, None, &who)
            })
            .await;
        responses.push(match result {
            Ok(v) => v,
            Err(f) => {
                json!({"response": {"status": f.status().to_string(), "outcome": f.outcome()}})
            }
        });
    }
    Ok(json!({"resourceType": "Bundle", "type": "batch-response", "entry": responses}))
}
