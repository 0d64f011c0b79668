//! Bearer tokens checked against a JWKS (the header, the claims, the signature), and the JWKS
//! file itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (jwks, token) = s.split_once('\n').unwrap_or((
        r#"{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"k1","alg":"ES256"}]}"#,
        s,
    ));
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(jwks.as_bytes()).unwrap();
    let Ok(v) = hms_edge_fhir::auth::Verifier::load(f.path(), "iss", "aud", 0, "tenant", "t")
    else {
        return;
    };
    let _ = v.verify(Some(&format!("Bearer {token}")));
});
