//! DICOM JSON (WADO-RS metadata, QIDO-RS) of a stored, possibly crafted, instance.
#![no_main]
use hms_edge_dicom::json::{WalkOptions, walk};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let opts = WalkOptions { inline_max: 64, stop_at_pixel_data: first & 2 != 0 };
    let _ = walk(rest, first & 1 == 1, opts, &|_| String::from("bulk"));
});
