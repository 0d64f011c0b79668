//! The STOW-RS multipart/related parser, fed in uneven pieces.
#![no_main]
use hms_edge_dicom::multipart::{MediaType, Parser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(nl) = data.iter().position(|&b| b == b'\n') else { return };
    let Ok(ct) = std::str::from_utf8(&data[..nl]) else { return };
    let mt = MediaType::parse(ct);
    let Ok(mut p) = Parser::new(mt.param("boundary").unwrap_or("b")) else { return };
    let body = &data[nl + 1..];
    let step = (body.len() / 3).max(1);
    for piece in body.chunks(step) {
        if p.feed(piece).is_err() {
            return;
        }
    }
    let _ = p.finish();
});
