//! Search parameter definitions: the R4 table (generated into `params_r4.rs` from the
//! specification's SearchParameter resources by `scripts/gen-fhir-search-params`) plus the
//! parameters every resource has. The same table drives indexing, search and the
//! CapabilityStatement, so what we advertise is what we do.

use super::params_r4;

/// FHIR search parameter types we index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    String,
    Date,
    Reference,
    Quantity,
    Number,
    Uri,
}

impl ParamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::Token => "token",
            ParamKind::String => "string",
            ParamKind::Date => "date",
            ParamKind::Reference => "reference",
            ParamKind::Quantity => "quantity",
            ParamKind::Number => "number",
            ParamKind::Uri => "uri",
        }
    }
}

/// One search parameter of one resource type.
#[derive(Debug)]
pub struct SearchParamDef {
    /// The name used in URLs (`subject`, `code`, `birthdate`).
    pub code: &'static str,
    pub kind: ParamKind,
    /// FHIRPath expression restricted to this resource type.
    pub expression: &'static str,
    /// Allowed target types for references (empty: any).
    pub targets: &'static [&'static str],
}

/// Resource types with a search index.
pub fn indexed_types() -> impl Iterator<Item = &'static str> {
    params_r4::BY_TYPE.iter().map(|(t, _)| *t)
}

/// The search parameters of `rtype`, if it is an indexed type.
pub fn params_for(rtype: &str) -> Option<&'static [SearchParamDef]> {
    params_r4::BY_TYPE.iter().find(|(t, _)| *t == rtype).map(|(_, p)| *p)
}

/// One parameter by type and code.
pub fn find(rtype: &str, code: &str) -> Option<&'static SearchParamDef> {
    params_for(rtype)?.iter().find(|p| p.code == code)
}
