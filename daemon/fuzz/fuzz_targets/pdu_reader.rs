//! The PDU framing of every DICOM association: bytes off the socket, PDUs out.
#![no_main]
use libfuzzer_sys::fuzz_target;

thread_local! {
    static RT: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().build().unwrap();
}

fuzz_target!(|data: &[u8]| {
    RT.with(|rt| {
        rt.block_on(async {
            let mut reader = hms_edge::dicom::pdu::PduReader::new(16 * 1024);
            let mut input = data;
            for _ in 0..64 {
                if reader.read(&mut input).await.is_err() {
                    break;
                }
            }
        })
    });
});
