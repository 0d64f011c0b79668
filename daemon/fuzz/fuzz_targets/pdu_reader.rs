//! The PDU framing of every DICOM association: bytes off the socket, PDUs out. The input arrives
//! in pieces (the first byte sets their size), as reads from a socket would.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let piece = usize::from(first).max(1);
    let mut reader = hms_edge_dicom::pdu::PduReader::new(16 * 1024);
    let mut pdus = 0;
    'feed: for chunk in rest.chunks(piece) {
        reader.read_buffer().extend_from_slice(chunk);
        loop {
            match reader.try_parse() {
                Ok(Some(_)) if pdus < 64 => pdus += 1,
                Ok(Some(_)) | Err(_) => break 'feed,
                Ok(None) => break,
            }
        }
    }
    let _ = reader.end_of_stream();
});
