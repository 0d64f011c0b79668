//! The subset of FHIRPath that the R4 search parameter expressions of our indexed types use:
//! paths with choice types, `(x as T)`, `.as(T)`, `.where(resolve() is T)`, `.where(f='v')`,
//! `.extension('url')`, and `|` unions. An expression outside this subset fails to compile and
//! its parameter is reported as unsupported rather than indexed wrongly.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    As(String),
    WhereResolveIs(String),
    WhereEq(String, String),
    Extension(String),
}

/// A compiled expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    paths: Vec<Vec<Step>>,
}

/// A value reached by an expression, with its FHIR type when a choice element told us.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    pub value: &'a Value,
    pub ty: Option<&'a str>,
}

fn split_top(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut quote, mut start) = (0i32, false, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '\'' => quote = !quote,
            '(' if !quote => depth += 1,
            ')' if !quote => depth -= 1,
            c if c == sep && depth == 0 && !quote => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn matching_paren(s: &str) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn unquote(s: &str) -> Option<&str> {
    s.trim().strip_prefix('\'')?.strip_suffix('\'')
}

/// Compiles `expr` for resource type `rtype`.
pub fn compile(expr: &str) -> Result<Compiled, String> {
    let mut paths = Vec::new();
    for part in split_top(expr, '|') {
        paths.push(parse_path(part.trim(), true)?);
    }
    Ok(Compiled { paths })
}

fn parse_path(s: &str, skip_type: bool) -> Result<Vec<Step>, String> {
    if let Some(rest) = s.strip_prefix('(') {
        let close = matching_paren(s).ok_or_else(|| format!("unbalanced parentheses in {s}"))?;
        let inner = &rest[..close - 1];
        let (path, ty) =
            inner.rsplit_once(" as ").ok_or_else(|| format!("unsupported group {inner}"))?;
        let mut steps = parse_path(path.trim(), skip_type)?;
        steps.push(Step::As(ty.trim().to_owned()));
        let tail = &s[close + 1..];
        if let Some(t) = tail.strip_prefix('.') {
            steps.extend(parse_steps(t)?);
        } else if !tail.trim().is_empty() {
            return Err(format!("unsupported expression {s}"));
        }
        return Ok(steps);
    }
    let segs = split_top(s, '.');
    let (first, rest) = segs.split_first().ok_or("empty expression")?;
    if !skip_type || !is_ident(first) {
        return Err(format!("unsupported expression {s}"));
    }
    parse_steps(&rest.join("."))
}

fn parse_steps(s: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for seg in split_top(s, '.') {
        let seg = seg.trim();
        if is_ident(seg) {
            steps.push(Step::Field(seg.to_owned()));
        } else if let Some(t) = seg.strip_prefix("as(").and_then(|x| x.strip_suffix(')')) {
            steps.push(Step::As(t.trim().to_owned()));
        } else if let Some(w) = seg.strip_prefix("where(").and_then(|x| x.strip_suffix(')')) {
            if let Some(t) = w.strip_prefix("resolve() is ") {
                steps.push(Step::WhereResolveIs(t.trim().to_owned()));
            } else if let Some((f, v)) = w.split_once('=') {
                let v = unquote(v).ok_or_else(|| format!("unsupported where({w})"))?;
                steps.push(Step::WhereEq(f.trim().to_owned(), v.to_owned()));
            } else {
                return Err(format!("unsupported where({w})"));
            }
        } else if let Some(u) = seg.strip_prefix("extension(").and_then(|x| x.strip_suffix(')')) {
            let u = unquote(u).ok_or_else(|| format!("unsupported extension({u})"))?;
            steps.push(Step::Extension(u.to_owned()));
        } else {
            return Err(format!("unsupported FHIRPath step `{seg}`"));
        }
    }
    Ok(steps)
}

fn push_value<'a>(out: &mut Vec<Node<'a>>, v: &'a Value, ty: Option<&'a str>) {
    match v {
        Value::Array(items) => out.extend(items.iter().map(|value| Node { value, ty })),
        Value::Null => {}
        value => out.push(Node { value, ty }),
    }
}

fn type_matches(ty: Option<&str>, wanted: &str) -> bool {
    ty.is_some_and(|t| t.eq_ignore_ascii_case(wanted))
}

impl Compiled {
    /// Every value the expression selects in `resource`.
    pub fn evaluate<'a>(&self, resource: &'a Value) -> Vec<Node<'a>> {
        let mut out = Vec::new();
        for path in &self.paths {
            let mut nodes = vec![Node { value: resource, ty: None }];
            for step in path {
                nodes = apply(step, nodes);
                if nodes.is_empty() {
                    break;
                }
            }
            out.extend(nodes);
        }
        out
    }
}

fn apply<'a>(step: &Step, nodes: Vec<Node<'a>>) -> Vec<Node<'a>> {
    let mut out = Vec::new();
    match step {
        Step::Field(name) => {
            for n in nodes {
                let Value::Object(map) = n.value else { continue };
                if let Some(v) = map.get(name) {
                    push_value(&mut out, v, None);
                    continue;
                }
                // Choice element: `value` matches `valueQuantity`, `valueString`, …
                for (k, v) in map {
                    if let Some(suffix) = k.strip_prefix(name.as_str())
                        && suffix.starts_with(|c: char| c.is_ascii_uppercase())
                    {
                        push_value(&mut out, v, Some(suffix));
                    }
                }
            }
        }
        Step::As(t) => out.extend(nodes.into_iter().filter(|n| type_matches(n.ty, t))),
        Step::WhereResolveIs(t) => out.extend(nodes.into_iter().filter(|n| {
            n.value
                .get("reference")
                .and_then(Value::as_str)
                .and_then(|r| super::index::split_reference(r))
                .is_some_and(|(rt, _)| rt == t)
        })),
        Step::WhereEq(f, v) => out.extend(
            nodes
                .into_iter()
                .filter(|n| n.value.get(f).and_then(Value::as_str) == Some(v.as_str())),
        ),
        Step::Extension(url) => {
            for n in nodes {
                let Some(Value::Array(exts)) = n.value.get("extension") else { continue };
                for e in exts {
                    if e.get("url").and_then(Value::as_str) == Some(url.as_str()) {
                        out.push(Node { value: e, ty: Some("Extension") });
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_generated_expression_compiles_or_is_known_unsupported() {
        let mut unsupported = Vec::new();
        for t in crate::params::indexed_types() {
            for p in crate::params::params_for(t).unwrap() {
                if compile(p.expression).is_err() {
                    unsupported.push(format!("{t}.{}", p.code));
                }
            }
        }
        assert_eq!(unsupported, vec!["Patient.deceased"], "{unsupported:?}");
    }

    #[test]
    fn evaluates_choices_casts_and_filters() {
        let obs = json!({
            "resourceType": "Observation",
            "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": "Practitioner/x"}, {"reference": "Patient/p1"}],
            "valueQuantity": {"value": 7.2, "unit": "mmol/L"},
            "component": [{"valueQuantity": {"value": 1}}, {"valueString": "s"}]
        });
        let c =
            compile("(Observation.value as Quantity) | (Observation.component.value as Quantity)")
                .unwrap();
        assert_eq!(c.evaluate(&obs).len(), 2);
        let c = compile("Observation.subject.where(resolve() is Patient)").unwrap();
        assert_eq!(c.evaluate(&obs).len(), 1);
        let c = compile("Observation.performer.where(resolve() is Practitioner)").unwrap();
        assert_eq!(c.evaluate(&obs)[0].value["reference"], "Practitioner/x");
        let p = json!({"telecom": [{"system": "phone", "value": "1"}, {"system": "email", "value": "a@b"}]});
        let c = compile("Patient.telecom.where(system='email')").unwrap();
        assert_eq!(c.evaluate(&p)[0].value["value"], "a@b");
        let cond = json!({"onsetDateTime": "2020-01-01"});
        assert_eq!(
            compile("Condition.onset.as(dateTime) | Condition.onset.as(Period)")
                .unwrap()
                .evaluate(&cond)
                .len(),
            1
        );
    }
}
