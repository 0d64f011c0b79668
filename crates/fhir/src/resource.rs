//! A resource body as the API receives it: JSON of the right type with a valid id.

use serde_json::Value;

use crate::Invalid;

/// Parses and checks a resource body for `rtype`.
pub fn parse_resource(bytes: &[u8], rtype: &str) -> Result<Value, Invalid> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| Invalid::BadRequest(format!("invalid JSON: {e}")))?;
    validate_resource(&v, rtype)?;
    Ok(v)
}

/// Checks a parsed resource for `rtype`: an object of that `resourceType`, a valid id, an
/// object `meta`.
pub fn validate_resource(v: &Value, rtype: &str) -> Result<(), Invalid> {
    let Value::Object(map) = v else {
        return Err(Invalid::BadRequest("the body must be a JSON object (a FHIR resource)".into()));
    };
    match map.get("resourceType").and_then(Value::as_str) {
        None => return Err(Invalid::BadRequest("resourceType is missing".into())),
        Some(t) if t != rtype => {
            return Err(Invalid::BadRequest(format!(
                "resourceType {t} does not match the URL type {rtype}"
            )));
        }
        Some(_) => {}
    }
    if let Some(id) = map.get("id") {
        match id.as_str() {
            Some(s) if crate::valid_id(s) => {}
            _ => return Err(Invalid::BadRequest(format!("invalid id {id}"))),
        }
    }
    if let Some(m) = map.get("meta")
        && !m.is_object()
    {
        return Err(Invalid::BadRequest("meta must be an object".into()));
    }
    Ok(())
}
