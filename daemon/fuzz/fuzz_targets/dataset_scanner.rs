//! The streaming data set scanner of C-STORE and STOW-RS, fed in uneven pieces.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let mut s = hms_edge_dicom::dataset::DatasetScanner::new(first & 1 == 1);
    let step = usize::from(first >> 1).max(1);
    for piece in rest.chunks(step) {
        s.feed(piece);
    }
    let _ = s.finish();
});
