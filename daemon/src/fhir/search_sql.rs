//! The search planner and executor: a parsed [`SearchRequest`] (`hms_edge_fhir::search`, pure:
//! parameters, modifiers, prefixes, bounds) turned into SQL over the FHIR index tables —
//! [`execute`] (the driving-clause `plan` or the `patient_token_plan`), [`include_targets`] and
//! [`revinclude_sources`].
//!
//! **Boundary:** besides `fhir::storage`, this is the only door to the FHIR tables, and a
//! read-only one: it reads the index rows `storage` writes (`fhir_idx_*`, `fhir_current`) and
//! never writes. Everything else reaches those tables through `storage` or through here.

use rusqlite::Connection;
use rusqlite::types::Value as Sql;

use hms_edge_fhir::search::*;

use super::FhirError;
use super::date;
use super::index::{normalize, split_reference};
use super::params::{self, ParamKind};

/// SQL condition builder with positional parameters.
struct Sql_ {
    args: Vec<Sql>,
}

impl Sql_ {
    fn arg(&mut self, v: impl Into<Sql>) -> String {
        self.args.push(v.into());
        format!("?{}", self.args.len())
    }
}

/// Condition on a date range `[lo, hi)` in columns `lo_col`, `hi_col`.
fn date_condition(
    q: &mut Sql_,
    prefix: Prefix,
    plo: i64,
    phi: i64,
    lo_col: &str,
    hi_col: &str,
) -> String {
    match prefix {
        Prefix::Eq => format!("({lo_col} >= {} AND {hi_col} <= {})", q.arg(plo), q.arg(phi)),
        Prefix::Ne => format!("NOT ({lo_col} >= {} AND {hi_col} <= {})", q.arg(plo), q.arg(phi)),
        Prefix::Gt => format!("{hi_col} > {}", q.arg(phi)),
        Prefix::Lt => format!("{lo_col} < {}", q.arg(plo)),
        Prefix::Ge => format!("{hi_col} > {}", q.arg(plo)),
        Prefix::Le => format!("{lo_col} < {}", q.arg(phi)),
        Prefix::Sa => format!("{lo_col} >= {}", q.arg(phi)),
        Prefix::Eb => format!("{hi_col} <= {}", q.arg(plo)),
        Prefix::Ap => format!("({lo_col} < {} AND {hi_col} > {})", q.arg(phi), q.arg(plo)),
    }
}

fn number_condition(q: &mut Sql_, prefix: Prefix, text: &str, col: &str) -> String {
    let n: f64 = text.parse().unwrap_or(0.0);
    // Precision from the written digits: 6.3 means [6.25, 6.35).
    let decimals = text.split_once('.').map_or(0, |(_, f)| f.len()) as i32;
    let half = 0.5 * 10f64.powi(-decimals);
    match prefix {
        Prefix::Eq | Prefix::Ap => {
            format!("({col} >= {} AND {col} < {})", q.arg(n - half), q.arg(n + half))
        }
        Prefix::Ne => format!("NOT ({col} >= {} AND {col} < {})", q.arg(n - half), q.arg(n + half)),
        Prefix::Gt | Prefix::Sa => format!("{col} > {}", q.arg(n)),
        Prefix::Lt | Prefix::Eb => format!("{col} < {}", q.arg(n)),
        Prefix::Ge => format!("{col} >= {}", q.arg(n)),
        Prefix::Le => format!("{col} <= {}", q.arg(n)),
    }
}

/// `(rtype, id)` selector for one parameter value of `kind` on `table`-rows of `rtype`/`param`.
fn value_condition(q: &mut Sql_, kind: ParamKind, modifier: Option<&str>, value: &str) -> String {
    match kind {
        ParamKind::Token | ParamKind::Uri => {
            if modifier == Some("text") {
                let n = normalize(value);
                return format!(
                    "(text >= {} AND text < {})",
                    q.arg(n.clone()),
                    q.arg(format!("{n}\u{10FFFF}"))
                );
            }
            match split_pipe(value) {
                Some((s, c)) if s.is_empty() => format!("(system IS NULL AND code = {})", q.arg(c)),
                Some((s, c)) if c.is_empty() => format!("system = {}", q.arg(s)),
                Some((s, c)) => format!("(system = {} AND code = {})", q.arg(s), q.arg(c)),
                None => format!("code = {}", q.arg(unescape(value))),
            }
        }
        ParamKind::String => {
            let v = unescape(value);
            match modifier {
                Some("exact") => format!("exact = {}", q.arg(v)),
                Some("contains") => format!("instr(norm, {}) > 0", q.arg(normalize(&v))),
                _ => {
                    let n = normalize(&v);
                    format!(
                        "(norm >= {} AND norm < {})",
                        q.arg(n.clone()),
                        q.arg(format!("{n}\u{10FFFF}"))
                    )
                }
            }
        }
        ParamKind::Date => {
            let (p, d) = split_prefix(value);
            let (lo, hi) = date::parse_range(d).unwrap_or((0, 0));
            date_condition(q, p, lo, hi, "lo", "hi")
        }
        ParamKind::Quantity | ParamKind::Number => {
            let (p, rest) = split_prefix(value);
            let mut parts = rest.splitn(3, '|');
            let num = parts.next().unwrap_or("0");
            let mut cond = number_condition(q, p, num, "value");
            if let Some(system) = parts.next().filter(|s| !s.is_empty()) {
                cond = format!("{cond} AND system = {}", q.arg(system.to_owned()));
            }
            if let Some(code) = parts.next().filter(|s| !s.is_empty()) {
                cond = format!("{cond} AND code = {}", q.arg(code.to_owned()));
            }
            format!("({cond})")
        }
        ParamKind::Reference => {
            let target_type = modifier.filter(|m| *m != "missing");
            let (t, id) = match split_reference(value) {
                Some((t, id)) => (Some(t.to_owned()), id.to_owned()),
                None => (target_type.map(str::to_owned), value.to_owned()),
            };
            match t {
                Some(t) => format!("(target_id = {} AND target_type = {})", q.arg(id), q.arg(t)),
                None => format!("target_id = {}", q.arg(id)),
            }
        }
    }
}

fn table_of(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Token | ParamKind::Uri => "fhir_idx_token",
        ParamKind::String => "fhir_idx_string",
        ParamKind::Date => "fhir_idx_date",
        ParamKind::Reference => "fhir_idx_ref",
        ParamKind::Quantity | ParamKind::Number => "fhir_idx_number",
    }
}

/// How well a clause can drive the search (lower is more selective, tried first); `None`: it
/// cannot (negations, `:missing`, `:contains`, `:text`, `_lastUpdated`), it is only checked.
fn drive_rank(rtype: &str, c: &Clause) -> Option<u8> {
    if matches!(c.modifier.as_deref(), Some("not" | "missing" | "contains" | "text")) {
        return None;
    }
    match c.code.as_str() {
        "_id" => Some(0),
        "_lastUpdated" => None,
        _ if c.chain.is_some() => Some(4),
        code => Some(match params::find(rtype, code)?.kind {
            ParamKind::Reference => 1,
            ParamKind::Token | ParamKind::Uri => 2,
            ParamKind::String => 3,
            ParamKind::Date => 5,
            ParamKind::Quantity | ParamKind::Number => 6,
        }),
    }
}

/// How one clause is written.
enum Role<'a> {
    /// The driving clause: `c.id IN (SELECT d.id FROM <value index> d … AND <inner>)`. SQLite
    /// reads the matching ids from the covering value index; `inner` are the other clauses'
    /// probes, checked there on the index row so that only full matches are looked up in
    /// `fhir_current`.
    Drive(&'a [String]),
    /// A check on the row called `alias` (`c`: the current row; `d`: the driver's index row).
    Check(&'a str),
}

/// Condition for one clause. Every clause but the driving one is a correlated `EXISTS` on the
/// owner index `(rtype, id, param, values…)`: one index probe per candidate.
fn clause_sql(q: &mut Sql_, rtype: &str, c: &Clause, role: Role<'_>) -> String {
    let (drive, alias, inner) = match role {
        Role::Drive(inner) => (true, "c", inner),
        Role::Check(alias) => (false, alias, &[][..]),
    };
    let inner: String = inner.iter().map(|i| format!(" AND {i}")).collect();
    let modifier = c.modifier.as_deref();
    match c.code.as_str() {
        "_id" => {
            let list: Vec<String> = c.values.iter().map(|v| q.arg(v.clone())).collect();
            let op = if modifier == Some("not") { "NOT IN" } else { "IN" };
            return format!("c.id {op} ({})", list.join(","));
        }
        "_lastUpdated" => {
            let conds: Vec<String> = c
                .values
                .iter()
                .map(|v| {
                    let (p, d) = split_prefix(v);
                    let (lo, hi) = date::parse_range(d).unwrap_or((0, 0));
                    date_condition(q, p, lo, hi, "c.last_updated", "(c.last_updated + 1)")
                })
                .collect();
            return format!("({})", conds.join(" OR "));
        }
        _ => {}
    }
    let def = params::find(rtype, &c.code).expect("validated");
    let owned = |q: &mut Sql_, table: &str, param: &str, cond: &str| {
        format!(
            "EXISTS (SELECT 1 FROM {table} s WHERE s.rtype = {alias}.rtype AND s.id = {alias}.id AND s.param = {}{cond})",
            q.arg(param.to_owned())
        )
    };
    if modifier == Some("missing") {
        let present = owned(q, table_of(def.kind), def.code, "");
        let want_missing = c.values.first().map(String::as_str) == Some("true");
        return if want_missing { format!("NOT {present}") } else { present };
    }
    if let Some((t, p)) = &c.chain {
        // target ids whose chained parameter matches
        let mut alts = Vec::new();
        for tt in chain_targets(def, t.as_deref()) {
            let Some(cdef) = params::find(&tt, p) else { continue };
            let conds: Vec<String> =
                c.values.iter().map(|v| value_condition(q, cdef.kind, None, v)).collect();
            alts.push(format!(
                "(target_type = {} AND target_id IN (SELECT id FROM {} WHERE rtype = {} AND param = {} AND ({})))",
                q.arg(tt.clone()),
                table_of(cdef.kind),
                q.arg(tt.clone()),
                q.arg(cdef.code.to_owned()),
                conds.join(" OR ")
            ));
        }
        if alts.is_empty() {
            return "0".into();
        }
        let alts = alts.join(" OR ");
        return if drive {
            format!(
                "c.id IN (SELECT d.id FROM fhir_idx_ref d WHERE d.rtype = {} AND d.param = {} AND ({alts}){inner})",
                q.arg(rtype.to_owned()),
                q.arg(def.code.to_owned()),
            )
        } else {
            owned(q, "fhir_idx_ref", def.code, &format!(" AND ({alts})"))
        };
    }
    let negate = modifier == Some("not");
    let value_mod = if negate { None } else { modifier };
    let conds: Vec<String> =
        c.values.iter().map(|v| value_condition(q, def.kind, value_mod, v)).collect();
    let conds = conds.join(" OR ");
    if drive && !negate {
        return format!(
            "c.id IN (SELECT d.id FROM {} d WHERE d.rtype = {} AND d.param = {} AND ({conds}){inner})",
            table_of(def.kind),
            q.arg(rtype.to_owned()),
            q.arg(def.code.to_owned()),
        );
    }
    let exists = owned(q, table_of(def.kind), def.code, &format!(" AND ({conds})"));
    if negate { format!("NOT {exists}") } else { exists }
}

/// Sort key for one `_sort` entry: `(join, order-by terms)`. Index parameters are joined once
/// (`LEFT JOIN` on the owner index, aggregated per resource) instead of a subquery per row.
fn sort_sql(
    q: &mut Sql_,
    rtype_arg: &str,
    rtype: &str,
    n: usize,
    name: &str,
    desc: bool,
) -> (String, String) {
    let dir = if desc { "DESC" } else { "ASC" };
    match name {
        "_id" => (String::new(), format!("c.id {dir}")),
        "_lastUpdated" => (String::new(), format!("c.last_updated {dir}")),
        code => {
            let def = params::find(rtype, code).expect("validated");
            let (agg, col) = match (def.kind, desc) {
                (ParamKind::Date, false) => ("MIN", "lo"),
                (ParamKind::Date, true) => ("MAX", "hi"),
                (ParamKind::String, _) => (if desc { "MAX" } else { "MIN" }, "norm"),
                (ParamKind::Token | ParamKind::Uri, _) => {
                    (if desc { "MAX" } else { "MIN" }, "code")
                }
                (ParamKind::Reference, _) => (if desc { "MAX" } else { "MIN" }, "target_id"),
                (ParamKind::Quantity | ParamKind::Number, _) => {
                    (if desc { "MAX" } else { "MIN" }, "value")
                }
            };
            let join = format!(
                " LEFT JOIN {} s{n} ON s{n}.rtype = {rtype_arg} AND s{n}.id = c.id AND s{n}.param = {}",
                table_of(def.kind),
                q.arg(def.code.to_owned())
            );
            // Resources without the value sort last either way.
            let key = format!("{agg}(s{n}.{col})");
            (join, format!("{key} IS NULL, {key} {dir}"))
        }
    }
}

/// The clauses that can drive the search, most selective kind first.
fn drive_candidates(req: &SearchRequest) -> Vec<usize> {
    let mut ranked: Vec<(u8, usize)> = req
        .clauses
        .iter()
        .enumerate()
        .filter_map(|(i, c)| drive_rank(&req.rtype, c).map(|r| (r, i)))
        .collect();
    ranked.sort();
    ranked.into_iter().map(|(_, i)| i).collect()
}

/// Index rows under which the first candidate drives without looking at the others: a few
/// milliseconds of probes at most, less than counting another clause's rows would cost when
/// their pages are not cached (every page read from SQLCipher is decrypted and authenticated).
const DRIVER_GOOD_ENOUGH: usize = 2_048;
/// Growth of the cap up to which [`choose_driver`] then counts the candidates' rows.
const DRIVER_CAP_GROWTH: usize = 4;

/// The driving clause, chosen by the data when more than one clause can drive.
///
/// Why: the static order (a reference before a token) is right for the usual ward search — a
/// patient's few hundred Observations, one LOINC code shared by thousands of patients — but a
/// patient with decades of records has tens of thousands of Observations, and a rare code then
/// selects far fewer rows (40 ms against 1 ms in the benchmark). The first candidate's index
/// rows are counted up to [`DRIVER_GOOD_ENOUGH`] (pages its drive reads next anyway); only when
/// it has more are the others counted up to a cap that grows by steps, each only up to the best
/// count so far, the first last (a count reads the covering value index in order; driving
/// probes another index per row, several times the cost).
fn choose_driver(conn: &Connection, req: &SearchRequest) -> Result<Option<usize>, FhirError> {
    let candidates = drive_candidates(req);
    let first = candidates.first().copied();
    if candidates.len() < 2 || req.clauses[candidates[0]].code == "_id" {
        return Ok(first);
    }
    match count_driven_rows(conn, &req.rtype, &req.clauses[candidates[0]], DRIVER_GOOD_ENOUGH)? {
        Some(n) if n >= DRIVER_GOOD_ENOUGH => {}
        _ => return Ok(first),
    }
    // The others first, so that the first (known to be large) is only counted up to the
    // best of them.
    let mut order = candidates[1..].to_vec();
    order.push(candidates[0]);
    let mut cap = DRIVER_GOOD_ENOUGH * DRIVER_CAP_GROWTH;
    loop {
        let mut best: Option<(usize, usize)> = None;
        for &i in &order {
            let limit = best.map_or(cap, |(n, _)| n);
            let Some(n) = count_driven_rows(conn, &req.rtype, &req.clauses[i], limit)? else {
                continue;
            };
            if n < limit {
                best = Some((n, i));
            }
        }
        if let Some((_, i)) = best {
            return Ok(Some(i));
        }
        if cap > MAX_RESULTS {
            return Ok(first);
        }
        cap *= DRIVER_CAP_GROWTH;
    }
}

/// Index rows that `c` would drive, counted up to `limit` (`None`: not an index-driven clause).
fn count_driven_rows(
    conn: &Connection,
    rtype: &str,
    c: &Clause,
    limit: usize,
) -> Result<Option<usize>, FhirError> {
    let mut q = Sql_ { args: Vec::new() };
    let cond = clause_sql(&mut q, rtype, c, Role::Drive(&[]));
    let Some(sub) = cond.strip_prefix("c.id IN (SELECT ").and_then(|s| s.strip_suffix(')')) else {
        return Ok(None);
    };
    // The limit is bound, not written: one cached statement per clause shape.
    let limit_arg = q.arg(limit as i64);
    let sql = format!("SELECT count(*) FROM (SELECT {sub} LIMIT {limit_arg})");
    let n: i64 = conn
        .prepare_cached(&sql)?
        .query_row(rusqlite::params_from_iter(q.args.iter()), |r| r.get(0))?;
    Ok(Some(n as usize))
}

/// The SQL (and its arguments) selecting the ids of every match, in result order, driven by
/// clause `driver` (see [`choose_driver`]).
fn plan(req: &SearchRequest, driver: Option<usize>) -> (String, Vec<Sql>) {
    let mut q = Sql_ { args: Vec::new() };
    let rtype_arg = q.arg(req.rtype.clone());
    // Clauses on index values are checked inside the driving subquery (on its index row) when
    // it has one; `_id` and `_lastUpdated` read `fhir_current` and stay outside.
    let on_current = |c: &Clause| matches!(c.code.as_str(), "_id" | "_lastUpdated");
    let nested = driver.is_some_and(|d| !on_current(&req.clauses[d]));
    let mut inner = Vec::new();
    let mut conds = vec![String::new(); req.clauses.len()];
    for (i, c) in req.clauses.iter().enumerate() {
        if Some(i) == driver {
            continue;
        }
        if nested && !on_current(c) {
            inner.push(clause_sql(&mut q, &req.rtype, c, Role::Check("d")));
        } else {
            conds[i] = clause_sql(&mut q, &req.rtype, c, Role::Check("c"));
        }
    }
    if let Some(d) = driver {
        conds[d] = clause_sql(&mut q, &req.rtype, &req.clauses[d], Role::Drive(&inner));
    }
    let mut matches = format!("FROM fhir_current c WHERE c.rtype = {rtype_arg}");
    // The driving clause first: SQLite plans the primary-key lookup from it.
    if let Some(d) = driver {
        matches.push_str(" AND ");
        matches.push_str(&conds[d]);
    }
    matches.push_str(" AND c.deleted = 0");
    for (i, cond) in conds.iter().enumerate() {
        if Some(i) != driver && !cond.is_empty() {
            matches.push_str(" AND ");
            matches.push_str(cond);
        }
    }
    let mut joins = String::new();
    let mut order = Vec::new();
    for (n, (name, desc)) in req.sort.iter().enumerate() {
        let (j, o) = sort_sql(&mut q, &rtype_arg, &req.rtype, n, name, *desc);
        joins.push_str(&j);
        order.push(o);
    }
    order.push("c.id".into());
    let sql = if joins.is_empty() {
        format!("SELECT c.id {matches} ORDER BY {}", order.join(", "))
    } else {
        // The matches are found first (materialised: otherwise SQLite may satisfy the GROUP BY
        // by walking every resource of the type in key order), then joined to their sort keys.
        format!(
            "WITH m AS MATERIALIZED (SELECT c.id, c.last_updated {matches}) \
             SELECT c.id FROM m c{joins} GROUP BY c.id ORDER BY {}",
            order.join(", ")
        )
    };
    (sql, q.args)
}

/// The plan of a search within one patient's chart on a token kept per patient (see
/// `storage::MIGRATION_PATIENT_TOKEN`), such as `Observation?patient=…&code=…&_sort=-date`:
/// one range of `fhir_idx_patient_token_search` holds the matches of both clauses and their
/// sort key. `None` when the search is not of that shape (then [`plan`] runs it).
///
/// Shape: a plain `patient` clause (reference, no modifier or chain), a plain clause on one of
/// `storage::PATIENT_TOKEN_PARAMS`, any other clauses but `_id` and `_lastUpdated` (checked on
/// the index row as in [`plan`]), and no sort, or a sort on the type's `date` parameter. The
/// results are the same as [`plan`]'s, in the same order: the row's `date_lo` / `date_hi` are
/// the `MIN(lo)` / `MAX(hi)` that [`sort_sql`] aggregates, and deleted resources have no index
/// rows. `INDEXED BY`: without it, a search with no sort may walk the whole owner index,
/// whose order is the `GROUP BY`'s.
fn patient_token_plan(req: &SearchRequest) -> Option<(String, Vec<Sql>)> {
    use super::storage::PATIENT_TOKEN_PARAMS;
    let rtype = req.rtype.as_str();
    let plain = |c: &Clause| c.modifier.is_none() && c.chain.is_none() && !c.values.is_empty();
    let kind = |code: &str| params::find(rtype, code).map(|d| d.kind);
    let patient = req.clauses.iter().position(|c| {
        c.code == "patient" && plain(c) && kind("patient") == Some(ParamKind::Reference)
    })?;
    let token = req.clauses.iter().position(|c| {
        PATIENT_TOKEN_PARAMS.contains(&c.code.as_str())
            && plain(c)
            && kind(&c.code) == Some(ParamKind::Token)
    })?;
    if req.clauses.iter().any(|c| matches!(c.code.as_str(), "_id" | "_lastUpdated")) {
        return None;
    }
    let order = match req.sort.as_slice() {
        [] => "d.id",
        [(name, desc)] if name == "date" && kind("date") == Some(ParamKind::Date) => {
            if *desc {
                "MAX(d.date_hi) IS NULL, MAX(d.date_hi) DESC, d.id"
            } else {
                "MIN(d.date_lo) IS NULL, MIN(d.date_lo) ASC, d.id"
            }
        }
        _ => return None,
    };
    let mut q = Sql_ { args: Vec::new() };
    let rtype_arg = q.arg(rtype.to_owned());
    let any_of = |q: &mut Sql_, c: &Clause, k: ParamKind| {
        let conds: Vec<String> = c.values.iter().map(|v| value_condition(q, k, None, v)).collect();
        conds.join(" OR ")
    };
    let patients = any_of(&mut q, &req.clauses[patient], ParamKind::Reference);
    let param_arg = q.arg(req.clauses[token].code.clone());
    let tokens = any_of(&mut q, &req.clauses[token], ParamKind::Token);
    let mut sql = format!(
        "SELECT d.id FROM fhir_idx_patient_token d INDEXED BY fhir_idx_patient_token_search WHERE d.rtype = {rtype_arg} \
         AND ({patients}) AND d.param = {param_arg} AND ({tokens})"
    );
    for (i, c) in req.clauses.iter().enumerate() {
        if i != patient && i != token {
            sql.push_str(" AND ");
            sql.push_str(&clause_sql(&mut q, rtype, c, Role::Check("d")));
        }
    }
    sql.push_str(&format!(" GROUP BY d.id ORDER BY {order}"));
    Some((sql, q.args))
}

/// Runs the search; returns the ids of every match in result order.
pub fn execute(conn: &Connection, req: &SearchRequest) -> Result<Vec<String>, FhirError> {
    let (mut sql, args) = match patient_token_plan(req) {
        Some(planned) => planned,
        None => plan(req, choose_driver(conn, req)?),
    };
    sql.push_str(&format!(" LIMIT {}", MAX_RESULTS + 1));
    let mut stmt = conn.prepare_cached(&sql)?;
    let ids: Vec<String> = stmt
        .query_map(rusqlite::params_from_iter(args.iter()), |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if ids.len() > MAX_RESULTS {
        return Err(FhirError::Unprocessable(format!(
            "more than {MAX_RESULTS} matches: narrow the search"
        )));
    }
    Ok(ids)
}

/// References from `ids` (of `rtype`) through `inc.param` (all reference params for `*`).
pub fn include_targets(
    conn: &Connection,
    rtype: &str,
    ids: &[String],
    inc: &Include,
) -> Result<Vec<(String, String)>, FhirError> {
    let mut stmt = conn.prepare_cached(
        "SELECT target_type, target_id FROM fhir_idx_ref
         WHERE rtype = ?1 AND id = ?2 AND (?3 = '*' OR param = ?3) AND target_type IS NOT NULL
           AND (?4 IS NULL OR target_type = ?4)",
    )?;
    collect_pairs(
        &mut stmt,
        ids.iter().map(|id| (rtype, id.as_str(), inc.param.as_str(), inc.target.as_deref())),
    )
}

/// Resources of `inc.source` referring to any of `ids` (of `rtype`) through `inc.param`.
pub fn revinclude_sources(
    conn: &Connection,
    rtype: &str,
    ids: &[String],
    inc: &Include,
) -> Result<Vec<(String, String)>, FhirError> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT r.rtype, r.id FROM fhir_idx_ref r JOIN fhir_current c
           ON c.rtype = r.rtype AND c.id = r.id AND c.deleted = 0
         WHERE r.target_id = ?1 AND r.target_type = ?2 AND r.rtype = ?3 AND (?4 = '*' OR r.param = ?4)",
    )?;
    collect_pairs(
        &mut stmt,
        ids.iter().map(|id| (id.as_str(), rtype, inc.source.as_str(), inc.param.as_str())),
    )
}

/// Runs `stmt` once per parameter set and returns the distinct (type, id) pairs it yields.
fn collect_pairs<P: rusqlite::Params>(
    stmt: &mut rusqlite::CachedStatement<'_>,
    runs: impl Iterator<Item = P>,
) -> Result<Vec<(String, String)>, FhirError> {
    let mut out = Vec::new();
    for params in runs {
        let rows =
            stmt.query_map(params, |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for r in rows {
            out.push(r?);
            if out.len() >= MAX_INCLUDED {
                break;
            }
        }
        if out.len() >= MAX_INCLUDED {
            break;
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    #[test]
    fn multiplying_clauses_are_bounded() {
        let keys = vec!["name"; 500].join(",");
        let r = parse("Patient", &p(&[("_sort", &keys)]), true).unwrap();
        assert_eq!(r.sort, vec![("name".to_owned(), false)]);
        let five = "name,birthdate,gender,_id,_lastUpdated";
        assert!(parse("Patient", &p(&[("_sort", five)]), true).is_err());
        let many: Vec<(&str, &str)> = vec![("name", "x"); MAX_CLAUSES + 1];
        assert!(parse("Patient", &p(&many), true).is_err());
        let values = vec!["x"; MAX_VALUES_PER_CLAUSE + 1].join(",");
        assert!(parse("Patient", &p(&[("name", &values)]), true).is_err());
        let incs: Vec<(&str, &str)> =
            vec![("_revinclude", "Observation:subject"); MAX_INCLUDES + 1];
        assert!(parse("Patient", &p(&incs), true).is_err());
    }

    #[test]
    fn parses_modifiers_chains_and_result_params() {
        let r = parse(
            "Observation",
            &p(&[
                ("code", "http://loinc.org|1,2"),
                ("subject:Patient.identifier", "x|1"),
                ("_sort", "-date"),
                ("_count", "5"),
                ("_include", "Observation:subject"),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(r.clauses[0].values, vec!["http://loinc.org|1", "2"]);
        assert_eq!(r.clauses[1].chain, Some((Some("Patient".into()), "identifier".into())));
        assert_eq!(r.sort, vec![("date".into(), true)]);
        assert_eq!(r.count, 5);
        assert_eq!(r.includes.len(), 1);
    }

    #[test]
    fn unknown_parameters_strict_vs_lenient() {
        assert!(parse("Patient", &p(&[("shoe-size", "9")]), true).is_err());
        let r = parse("Patient", &p(&[("shoe-size", "9")]), false).unwrap();
        assert_eq!(r.ignored, vec!["shoe-size"]);
        assert!(parse("Binary", &p(&[("x", "1")]), false).is_err());
    }

    /// A fresh store holding Observations `o0, o1, …` of (patient, LOINC code, effective date
    /// or "").
    fn store_with_observations(
        rows: &[(String, &str, &str)],
    ) -> (tempfile::TempDir, std::sync::Arc<crate::store::Store>) {
        use crate::keys::Key;
        use crate::store::StoreOptions;
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::open(dir.path(), &Key::random(), &StoreOptions::default()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let rows: Vec<(String, String, String)> =
            rows.iter().map(|(p, c, d)| (p.clone(), (*c).to_owned(), (*d).to_owned())).collect();
        rt.block_on(store.write_as(move |tx| -> Result<(), crate::fhir::FhirError> {
            for (i, (pat, code, day)) in rows.iter().enumerate() {
                let mut obs = serde_json::json!({"resourceType": "Observation",
                    "id": format!("o{i}"), "status": "final",
                    "subject": {"reference": format!("Patient/{pat}")},
                    "code": {"coding": [{"system": "http://loinc.org", "code": code}]}});
                if !day.is_empty() {
                    obs["effectiveDateTime"] = day.clone().into();
                }
                crate::fhir::storage::put(tx, "Observation", &format!("o{i}"), obs, None, "local")?;
            }
            Ok(())
        }))
        .unwrap();
        (dir, store)
    }

    /// The clause that selects fewer rows drives: a patient's rare code rather than the
    /// patient's many Observations, and the patient when the code is common.
    #[test]
    fn the_more_selective_clause_drives() {
        // p1: 2,100 heart rates (over DRIVER_GOOD_ENOUGH) and a rare code; p2..p60: one each.
        let mut rows: Vec<(String, &str, &str)> =
            (0..2_100).map(|_| ("p1".into(), "8867-4", "")).collect();
        rows.push(("p1".into(), "1742-6", ""));
        rows.extend((2..61).map(|n| (format!("p{n}"), "8867-4", "")));
        let (_dir, store) = store_with_observations(&rows);
        let search = |pat: &str, code: &str| {
            let req = parse(
                "Observation",
                &p(&[("patient", pat), ("code", &format!("http://loinc.org|{code}"))]),
                true,
            )
            .unwrap();
            store
                .read_blocking(|c| {
                    let d = choose_driver(c, &req)
                        .map_err(|e| crate::store::StoreError::Rejected(e.to_string()))?;
                    let ids = execute(c, &req)
                        .map_err(|e| crate::store::StoreError::Rejected(e.to_string()))?;
                    Ok((d.map(|i| req.clauses[i].code.clone()), ids.len()))
                })
                .unwrap()
        };
        assert_eq!(search("p1", "1742-6"), (Some("code".into()), 1));
        assert_eq!(search("p7", "8867-4"), (Some("patient".into()), 1));
        assert_eq!(search("p1", "8867-4"), (Some("patient".into()), 2_100));
    }

    /// The planned search reads the index tables through their covering indexes: the driving
    /// clause from the value index, the other clause and the sort key from the owner index —
    /// no table scan — and returns the right rows in order.
    #[test]
    fn plan_uses_covering_indexes_and_sorts_by_join() {
        let (_dir, store) = store_with_observations(&[
            ("p1".into(), "8867-4", "2026-01-03"),
            ("p1".into(), "8867-4", "2026-01-05"),
            ("p1".into(), "8302-2", "2026-01-09"),
            ("p2".into(), "8867-4", "2026-01-07"),
            ("p1".into(), "8867-4", "2026-01-04"),
        ]);
        let req = parse(
            "Observation",
            &p(&[("patient", "p1"), ("code", "http://loinc.org|8867-4"), ("_sort", "-date")]),
            true,
        )
        .unwrap();
        let (sql, args) = plan(&req, drive_candidates(&req).first().copied());
        let (ids, steps) = store
            .read_blocking(|c| {
                let ids = execute(c, &req)
                    .map_err(|e| crate::store::StoreError::Rejected(e.to_string()))?;
                let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let steps: Vec<String> = stmt
                    .query_map(rusqlite::params_from_iter(args.iter()), |r| r.get(3))?
                    .collect::<Result<_, _>>()?;
                Ok((ids, steps))
            })
            .unwrap();
        assert_eq!(ids, vec!["o1", "o4", "o0"]);
        let plan = steps.join("\n");
        // The code probe runs inside the driving subquery, on the patient index row: only full
        // matches are looked up in fhir_current.
        assert!(sql.contains("s.rtype = d.rtype AND s.id = d.id"), "{sql}");
        // The only scan is of the materialised matches (aliased `c` for the sort join).
        assert!(steps.iter().filter(|s| s.starts_with("SCAN")).count() <= 1, "{plan}");
        assert!(plan.contains("COVERING INDEX fhir_idx_ref_search"), "{plan}");
        assert!(plan.contains("COVERING INDEX fhir_idx_token_owner"), "{plan}");
        assert!(plan.contains("COVERING INDEX fhir_idx_date_owner"), "{plan}");
    }

    /// A store of varied Observations for the patient-token plan: several codings, categories,
    /// date times and periods or no date, a subject that is not a Patient, updates that move a
    /// resource to another patient and code, and deletions.
    fn store_for_patient_tokens() -> (tempfile::TempDir, std::sync::Arc<crate::store::Store>) {
        use crate::keys::Key;
        use crate::store::StoreOptions;
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::open(dir.path(), &Key::random(), &StoreOptions::default()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(store.write_as(|tx| -> Result<(), crate::fhir::FhirError> {
            use crate::fhir::storage::{delete, put};
            for i in 0..240u32 {
                let pat = format!("p{}", i % 4);
                let subject = if i % 37 == 5 {
                    format!("Group/{pat}")
                } else {
                    format!("Patient/{pat}")
                };
                let code = ["8867-4", "8302-2", "29463-7"][(i % 3) as usize];
                let mut coding = vec![serde_json::json!({"system": "http://loinc.org", "code": code})];
                if i % 5 == 0 {
                    coding.push(serde_json::json!({"system": "http://snomed.info/sct", "code": "364075005"}));
                }
                if i % 11 == 0 {
                    coding.push(serde_json::json!({"code": code}));
                }
                let cat = ["vital-signs", "laboratory"][(i % 2) as usize];
                let mut obs = serde_json::json!({"resourceType": "Observation", "id": format!("o{i}"),
                    "status": if i % 7 == 0 { "amended" } else { "final" },
                    "subject": {"reference": subject},
                    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": cat}]}],
                    "code": {"coding": coding}});
                match i % 6 {
                    0 => {}
                    1 => {
                        obs["effectivePeriod"] = serde_json::json!({
                            "start": format!("2025-0{}-10", 1 + i % 9), "end": format!("2026-0{}-02", 1 + i % 7)});
                    }
                    _ => obs["effectiveDateTime"] = format!("2026-{:02}-{:02}T10:{:02}:00Z", 1 + i % 12, 1 + i % 28, i % 60).into(),
                }
                put(tx, "Observation", &format!("o{i}"), obs.clone(), None, "local")?;
                if i % 13 == 0 {
                    obs["subject"] = serde_json::json!({"reference": "Patient/p9"});
                    obs["code"] = serde_json::json!({"coding": [{"system": "http://loinc.org", "code": "1742-6"}]});
                    put(tx, "Observation", &format!("o{i}"), obs, None, "local")?;
                }
                if i % 17 == 0 {
                    delete(tx, "Observation", &format!("o{i}"), "local")?;
                }
            }
            Ok(())
        }))
        .unwrap();
        (dir, store)
    }

    /// The patient-token plan returns what the general plan returns, in the same order, for
    /// every combination of patient, code or category value forms, an extra clause and sort;
    /// and it reads one covering index.
    #[test]
    fn patient_token_plan_matches_the_general_plan() {
        let (_dir, store) = store_for_patient_tokens();
        let patients = ["p0", "Patient/p1", "p2,p3", "p9", "Group/p0", "nobody"];
        let tokens = [
            ("code", "http://loinc.org|8867-4"),
            ("code", "8302-2"),
            ("code", "|8867-4"),
            ("code", "http://snomed.info/sct|"),
            ("code", "http://loinc.org|1742-6,29463-7"),
            ("category", "vital-signs"),
            ("category", "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"),
        ];
        let extras: [&[(&str, &str)]; 3] =
            [&[], &[("status", "amended")], &[("date", "ge2026-03-01")]];
        let sorts = [None, Some("-date"), Some("date")];
        let mut planned = 0;
        for pat in patients {
            for (param, value) in tokens {
                for extra in extras {
                    for sort in sorts {
                        let mut pairs = vec![("patient", pat), (param, value)];
                        pairs.extend_from_slice(extra);
                        if let Some(sort) = sort {
                            pairs.push(("_sort", sort));
                        }
                        let req = parse("Observation", &p(&pairs), true).unwrap();
                        let (sql, args) = patient_token_plan(&req).expect("of the shape");
                        let (fast, general, steps) = store
                            .read_blocking(|c| {
                                let run =
                                    |sql: &str, args: &[Sql]| -> rusqlite::Result<Vec<String>> {
                                        c.prepare(sql)?
                                            .query_map(rusqlite::params_from_iter(args), |r| {
                                                r.get(0)
                                            })?
                                            .collect()
                                    };
                                let (gsql, gargs) =
                                    plan(&req, drive_candidates(&req).first().copied());
                                let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                                let steps: Vec<String> = stmt
                                    .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                                        r.get(3)
                                    })?
                                    .collect::<Result<_, _>>()?;
                                Ok((run(&sql, &args)?, run(&gsql, &gargs)?, steps))
                            })
                            .unwrap();
                        assert_eq!(fast, general, "{pairs:?}");
                        let steps = steps.join("\n");
                        assert!(
                            steps.contains("COVERING INDEX fhir_idx_patient_token_search"),
                            "{steps}"
                        );
                        assert!(!steps.contains("SCAN"), "{pairs:?}: {steps}");
                        planned += usize::from(!fast.is_empty());
                    }
                }
            }
        }
        // Most combinations match something: the comparison is not of empty lists.
        assert!(planned > 150, "{planned}");
    }

    /// Other shapes keep the general plan: a modifier, a chain, `_id`, another sort.
    #[test]
    fn patient_token_plan_only_for_its_shape() {
        for pairs in [
            &[("patient", "p1"), ("code:not", "x")][..],
            &[("patient:Patient", "p1"), ("code", "x")],
            &[("patient.name", "x"), ("code", "x")],
            &[("patient", "p1"), ("code", "x"), ("_id", "o1")],
            &[("patient", "p1"), ("code", "x"), ("_sort", "_lastUpdated")],
            &[("patient", "p1"), ("status", "final")],
            &[("subject", "Patient/p1"), ("code", "x")],
        ] {
            let req = parse("Observation", &p(pairs), true).unwrap();
            assert!(patient_token_plan(&req).is_none(), "{pairs:?}");
        }
        let req = parse("Condition", &p(&[("patient", "p1"), ("code", "x")]), true).unwrap();
        assert!(patient_token_plan(&req).is_some());
    }

    /// The migration's backfill writes the rows that writing the resources writes.
    #[test]
    fn patient_token_backfill_equals_the_written_rows() {
        let (_dir, store) = store_for_patient_tokens();
        let rows = |c: &rusqlite::Connection| -> rusqlite::Result<Vec<String>> {
            c.prepare(
                "SELECT json_array(rtype, id, target_type, target_id, param, system, code, date_lo, date_hi)
                 FROM fhir_idx_patient_token ORDER BY 1",
            )?
            .query_map([], |r| r.get(0))?
            .collect()
        };
        let written = store.read_blocking(|c| Ok(rows(c)?)).unwrap();
        assert!(written.len() > 300, "{}", written.len());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(store.write(|tx| {
            tx.sql().execute_batch("DELETE FROM fhir_idx_patient_token")?;
            tx.sql().execute_batch(crate::fhir::storage::PATIENT_TOKEN_BACKFILL)?;
            Ok(())
        }))
        .unwrap();
        let backfilled = store.read_blocking(|c| Ok(rows(c)?)).unwrap();
        assert_eq!(backfilled, written);
    }

    #[test]
    fn bad_values_are_400_not_500() {
        for (k, v) in [
            ("birthdate", "yesterday"),
            ("_count", "-1"),
            ("name:sounds", "x"),
            ("_sort", "nope"),
            ("birthdate", ""),
            ("_lastUpdated", "gt2020-13"),
        ] {
            let e = parse("Patient", &p(&[(k, v)]), true).unwrap_err();
            assert_eq!(e.status(), 400, "{k}={v}: {e}");
        }
        let e = parse("Observation", &p(&[("value-quantity", "gtabc")]), true).unwrap_err();
        assert_eq!(e.status(), 400);
    }
}
