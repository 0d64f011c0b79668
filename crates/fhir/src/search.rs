//! Search parsing: the FHIR query string as a typed, validated request ([`SearchRequest`]),
//! bounded by the limits below. No SQL: the daemon's `fhir::search` plans and runs it.

use crate::Invalid;
use crate::date;
use crate::params::{self, ParamKind, SearchParamDef};

/// Default and maximum page size.
pub const DEFAULT_COUNT: usize = 20;
pub const MAX_COUNT: usize = 1000;
/// Most matches one search materialises (for stable paging). Larger result sets are refused
/// with a request to narrow the search.
pub const MAX_RESULTS: usize = 200_000;
/// Most `_sort` keys in one search. Each key is a join on the index; a repeated key adds
/// nothing, so repeats are dropped and more distinct keys than this are refused (400).
pub const MAX_SORT_KEYS: usize = 4;
/// Most search clauses (parameters other than `_count`, `_sort`, …) in one search: each is a
/// probe or join of the plan. Real ward clients send a handful.
pub const MAX_CLAUSES: usize = 16;
/// Most comma-separated (ORed) values of one clause.
pub const MAX_VALUES_PER_CLAUSE: usize = 64;
/// Most `_include` plus `_revinclude` parameters of one search.
pub const MAX_INCLUDES: usize = 8;
/// Most resources `_include` and `_revinclude` add to one page, all of them together; the
/// rest are left out (a patient with 30,000 Observations must not make one page of Patients
/// load them all).
pub const MAX_INCLUDED: usize = 1000;

/// `_total` handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Total {
    None,
    Estimate,
    Accurate,
}

/// A comparison prefix (`eq`, `lt`, …) of date, number and quantity searches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Sa,
    Eb,
    Ap,
}

/// One search parameter occurrence: values are ORed; several clauses are ANDed.
#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    pub code: String,
    pub modifier: Option<String>,
    /// Chained parameter: (target type, parameter on that type).
    pub chain: Option<(Option<String>, String)>,
    pub values: Vec<String>,
}

/// `_include` / `_revinclude`: `SourceType:param[:TargetType]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Include {
    pub source: String,
    pub param: String,
    pub target: Option<String>,
}

/// A parsed search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchRequest {
    pub rtype: String,
    pub clauses: Vec<Clause>,
    /// (parameter, descending)
    pub sort: Vec<(String, bool)>,
    pub count: usize,
    pub includes: Vec<Include>,
    pub revincludes: Vec<Include>,
    pub total: Total,
    pub summary_count: bool,
    pub elements: Option<Vec<String>>,
    /// Parameters ignored under lenient handling (reported in the Bundle).
    pub ignored: Vec<String>,
}

/// Parameters about the result, not the match.
const RESULT_PARAMS: &[&str] = &[
    "_count",
    "_sort",
    "_include",
    "_revinclude",
    "_total",
    "_summary",
    "_elements",
    "_format",
    "_pretty",
    "_getpages",
    "_offset",
];

pub fn split_values(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(',' | '|' | '$' | '\\')) => {
                cur.push('\\');
                cur.push(chars.next().expect("peeked"));
            }
            ',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

pub fn unescape(s: &str) -> String {
    s.replace("\\,", ",").replace("\\$", "$").replace("\\|", "|").replace("\\\\", "\\")
}

/// Splits `a|b` at the first unescaped `|`.
pub fn split_pipe(s: &str) -> Option<(String, String)> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == b'|' {
            return Some((unescape(&s[..i]), unescape(&s[i + 1..])));
        }
        i += 1;
    }
    None
}

/// Parses the query of `GET [base]/{rtype}?…` (or a `_search` form body).
/// `strict`: unknown or unsupported parameters are an error instead of being ignored.
pub fn parse(
    rtype: &str,
    pairs: &[(String, String)],
    strict: bool,
) -> Result<SearchRequest, Invalid> {
    let indexed = params::params_for(rtype).is_some();
    if !indexed {
        return Err(Invalid::BadRequest(format!(
            "searching {rtype} is not supported (stored and read by id only)"
        )));
    }
    let mut req = SearchRequest {
        rtype: rtype.to_owned(),
        clauses: Vec::new(),
        sort: Vec::new(),
        count: DEFAULT_COUNT,
        includes: Vec::new(),
        revincludes: Vec::new(),
        total: Total::Accurate,
        summary_count: false,
        elements: None,
        ignored: Vec::new(),
    };
    let bad = |m: String| Err(Invalid::BadRequest(m));
    for (key, value) in pairs {
        match key.as_str() {
            "_count" => {
                req.count = match value.parse::<usize>() {
                    Ok(n) => n.min(MAX_COUNT),
                    Err(_) => {
                        return bad(format!(
                            "_count must be a non-negative integer, got {value:?}"
                        ));
                    }
                }
            }
            "_sort" => {
                for s in value.split(',').filter(|s| !s.is_empty()) {
                    let (name, desc) = match s.strip_prefix('-') {
                        Some(n) => (n, true),
                        None => (s, false),
                    };
                    if !matches!(name, "_id" | "_lastUpdated")
                        && params::find(rtype, name).is_none()
                    {
                        return bad(format!("cannot sort {rtype} by unknown parameter {name:?}"));
                    }
                    // A later key equal to an earlier one cannot change the order.
                    if req.sort.iter().any(|(n, _)| n == name) {
                        continue;
                    }
                    if req.sort.len() == MAX_SORT_KEYS {
                        return bad(format!("at most {MAX_SORT_KEYS} _sort keys"));
                    }
                    req.sort.push((name.to_owned(), desc));
                }
            }
            "_include" | "_revinclude" => {
                let parts: Vec<&str> = value.split(':').collect();
                let inc = match parts.as_slice() {
                    [src, p] => Include { source: (*src).into(), param: (*p).into(), target: None },
                    [src, p, t] => Include {
                        source: (*src).into(),
                        param: (*p).into(),
                        target: Some((*t).into()),
                    },
                    _ => return bad(format!("{key} must be Type:param[:Target], got {value:?}")),
                };
                let def = params::find(&inc.source, &inc.param);
                if inc.param != "*" && def.is_none_or(|d| d.kind != ParamKind::Reference) {
                    return bad(format!(
                        "{key}: {}:{} is not a reference search parameter",
                        inc.source, inc.param
                    ));
                }
                if req.includes.len() + req.revincludes.len() == MAX_INCLUDES {
                    return bad(format!("at most {MAX_INCLUDES} _include and _revinclude"));
                }
                if key == "_include" {
                    if inc.source != rtype {
                        return bad(format!("_include source type must be {rtype}"));
                    }
                    req.includes.push(inc);
                } else {
                    req.revincludes.push(inc);
                }
            }
            "_total" => {
                req.total = match value.as_str() {
                    "none" => Total::None,
                    "estimate" => Total::Estimate,
                    "accurate" => Total::Accurate,
                    _ => {
                        return bad(format!(
                            "_total must be none, estimate or accurate, got {value:?}"
                        ));
                    }
                }
            }
            "_summary" => match value.as_str() {
                "count" => req.summary_count = true,
                "false" => {}
                _ => {
                    return bad(format!(
                        "_summary={value} is not supported (only count and false)"
                    ));
                }
            },
            "_elements" => {
                req.elements = Some(
                    value
                        .split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            }
            k if RESULT_PARAMS.contains(&k) => {}
            _ => {
                // `subject:Patient.identifier` = param `subject`, type `Patient`, chained `identifier`.
                let (head, chained) = match key.split_once('.') {
                    Some((h, c)) => (h, Some(c.to_owned())),
                    None => (key.as_str(), None),
                };
                let (name, modifier) = match head.split_once(':') {
                    Some((n, m)) => (n, Some(m.to_owned())),
                    None => (head, None),
                };
                let chain = chained.map(|c| (modifier.clone(), c));
                let known = matches!(name, "_id" | "_lastUpdated")
                    || (indexed
                        && params::find(rtype, name).is_some()
                        && super::index::is_supported(rtype, name));
                if !known {
                    let why = if indexed {
                        format!("unknown or unsupported search parameter {key:?} for {rtype}")
                    } else {
                        format!("searching {rtype} is not supported (stored and read by id only)")
                    };
                    if strict || !indexed {
                        return bad(why);
                    }
                    req.ignored.push(key.clone());
                    continue;
                }
                if let Some((t, p)) = &chain {
                    let Some(def) =
                        params::find(rtype, name).filter(|d| d.kind == ParamKind::Reference)
                    else {
                        return bad(format!("{name} is not a reference and cannot be chained"));
                    };
                    let targets = chain_targets(def, t.as_deref());
                    if !targets.iter().any(|tt| params::find(tt, p).is_some()) {
                        return bad(format!("chained parameter {p:?} is unknown on {targets:?}"));
                    }
                }
                if req.clauses.len() == MAX_CLAUSES {
                    return bad(format!("at most {MAX_CLAUSES} search parameters in one search"));
                }
                let values = split_values(value);
                if values.len() > MAX_VALUES_PER_CLAUSE {
                    return bad(format!(
                        "{key}: at most {MAX_VALUES_PER_CLAUSE} comma-separated values"
                    ));
                }
                req.clauses.push(Clause {
                    code: name.to_owned(),
                    modifier: modifier.filter(|_| chain.is_none()),
                    chain,
                    values,
                });
            }
        }
    }
    // Validate every clause's values now: bad syntax is a 400, never a 500 later.
    for c in &req.clauses {
        validate_clause(rtype, c)?;
    }
    Ok(req)
}

pub fn chain_targets(def: &SearchParamDef, explicit: Option<&str>) -> Vec<String> {
    match explicit {
        Some(t) => vec![t.to_owned()],
        None => def.targets.iter().map(|t| (*t).to_owned()).collect(),
    }
}

pub fn validate_clause(rtype: &str, c: &Clause) -> Result<(), Invalid> {
    let kind = clause_kind(rtype, c);
    for v in &c.values {
        if v.is_empty() {
            return Err(Invalid::BadRequest(format!(
                "empty value for search parameter {}",
                c.code
            )));
        }
        match kind {
            ParamKind::Date => {
                let (_, d) = split_prefix(v);
                if date::parse_range(d).is_none() {
                    return Err(Invalid::BadRequest(format!(
                        "{}: {v:?} is not a FHIR date",
                        c.code
                    )));
                }
            }
            ParamKind::Quantity | ParamKind::Number => {
                let (_, rest) = split_prefix(v);
                let num = rest.split('|').next().unwrap_or("");
                if num.parse::<f64>().map_or(true, |n| !n.is_finite()) {
                    return Err(Invalid::BadRequest(format!("{}: {v:?} is not a number", c.code)));
                }
            }
            _ => {}
        }
    }
    if let Some(m) = &c.modifier {
        let ok = match kind {
            ParamKind::String => matches!(m.as_str(), "exact" | "contains" | "missing"),
            ParamKind::Token | ParamKind::Uri => matches!(m.as_str(), "not" | "text" | "missing"),
            ParamKind::Reference => m == "missing" || crate::is_resource_type(m),
            _ => m == "missing",
        };
        if !ok {
            return Err(Invalid::BadRequest(format!(
                "modifier :{m} is not supported on {}",
                c.code
            )));
        }
    }
    Ok(())
}

pub fn clause_kind(rtype: &str, c: &Clause) -> ParamKind {
    match c.code.as_str() {
        "_id" => ParamKind::Token,
        "_lastUpdated" => ParamKind::Date,
        code => match &c.chain {
            Some((t, p)) => {
                let def = params::find(rtype, code).expect("validated");
                chain_targets(def, t.as_deref())
                    .iter()
                    .find_map(|tt| params::find(tt, p))
                    .map_or(ParamKind::Token, |d| d.kind)
            }
            None => params::find(rtype, code).map_or(ParamKind::Token, |d| d.kind),
        },
    }
}

pub fn split_prefix(v: &str) -> (Prefix, &str) {
    let p = match v.get(..2) {
        Some("eq") => Prefix::Eq,
        Some("ne") => Prefix::Ne,
        Some("lt") => Prefix::Lt,
        Some("gt") => Prefix::Gt,
        Some("le") => Prefix::Le,
        Some("ge") => Prefix::Ge,
        Some("sa") => Prefix::Sa,
        Some("eb") => Prefix::Eb,
        Some("ap") => Prefix::Ap,
        _ => return (Prefix::Eq, v),
    };
    (p, &v[2..])
}
