//! PDU framing (PS3.8 section 9), without I/O: the daemon's `dicom::pdu` feeds it a byte stream.
//!
//! We read the 6-byte PDU header ourselves so that a PDU is length-checked *before* its body is
//! buffered: a P-DATA-TF PDU longer than the Maximum Length we announced, or any other PDU longer
//! than [`MAX_CONTROL_PDU`], is refused without reading it. P-DATA-TF bodies are split into PDVs
//! without copying (each PDV is a [`Bytes`] slice of the PDU buffer), so instance data flows from
//! the socket to the blob writer in PDU-sized pieces. The other PDU types (association request,
//! release, abort) are decoded and encoded with `dicom-ul`'s `pdu` codec.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, Pdu};

/// PDU header: type (1), reserved (1), length (4, big-endian).
pub const PDU_HEADER_LEN: usize = 6;
/// PDV item header inside a P-DATA-TF: item length (4), context id (1), control header (1).
pub const PDV_HEADER_LEN: usize = 6;
/// Largest non-P-DATA PDU we read (an A-ASSOCIATE-RQ proposing every storage class with a dozen
/// transfer syntaxes each is about 200 KiB).
pub const MAX_CONTROL_PDU: u32 = 1024 * 1024;

/// PDU types (PS3.8 Table 9-11).
pub mod pdu_type {
    pub const ASSOCIATE_RQ: u8 = 0x01;
    pub const ASSOCIATE_AC: u8 = 0x02;
    pub const ASSOCIATE_RJ: u8 = 0x03;
    pub const P_DATA_TF: u8 = 0x04;
    pub const RELEASE_RQ: u8 = 0x05;
    pub const RELEASE_RP: u8 = 0x06;
    pub const ABORT: u8 = 0x07;
}

/// One presentation data value: a fragment of a command or of a data set.
#[derive(Debug, Clone)]
pub struct Pdv {
    pub context_id: u8,
    /// Command fragment (else data set fragment).
    pub is_command: bool,
    /// Last fragment of its command or data set.
    pub is_last: bool,
    pub data: Bytes,
}

/// What arrived.
#[derive(Debug)]
pub enum Incoming {
    /// A P-DATA-TF PDU, split into its PDVs.
    PData(Vec<Pdv>),
    /// Any other PDU, decoded by `dicom-ul`.
    Control(Pdu),
}

/// Why a PDU could not be read. Every variant but `Closed` and `Io` is answered with an A-ABORT
/// carrying [`FramingError::abort_reason`].
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a PDU")]
    Truncated,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("unrecognized PDU type {0:#04x}")]
    UnknownType(u8),
    #[error("PDU of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("malformed PDU: {0}")]
    Malformed(String),
}

impl FramingError {
    /// The A-ABORT reason for this error, when one is to be sent.
    pub fn abort_reason(&self) -> Option<AbortRQServiceProviderReason> {
        match self {
            FramingError::Closed | FramingError::Truncated | FramingError::Io(_) => None,
            FramingError::UnknownType(_) => Some(AbortRQServiceProviderReason::UnrecognizedPdu),
            FramingError::TooLarge { .. } | FramingError::Malformed(_) => {
                Some(AbortRQServiceProviderReason::InvalidPduParameter)
            }
        }
    }
}

/// Reads PDUs from a stream, enforcing the size limits.
#[derive(Debug)]
pub struct PduReader {
    buf: BytesMut,
    /// Largest P-DATA-TF PDU (its length field) we accept: the Maximum Length we announced.
    max_pdata: u32,
}

impl PduReader {
    pub fn new(max_pdata: u32) -> Self {
        Self { buf: BytesMut::with_capacity(max_pdata as usize + PDU_HEADER_LEN), max_pdata }
    }

    /// True when bytes of a next PDU are already buffered.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The buffer to read more bytes into, with room for at least 16 KiB: the I/O side
    /// (`hms_edge::dicom::pdu::ReadPdu`) fills it, then calls [`PduReader::try_parse`].
    pub fn read_buffer(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        &mut self.buf
    }

    /// What the end of the stream means now: a clean close between PDUs, or a truncated PDU.
    pub fn end_of_stream(&self) -> FramingError {
        if self.buf.is_empty() { FramingError::Closed } else { FramingError::Truncated }
    }

    /// Parses one PDU from the buffer if it is complete; checks the header as soon as it is there.
    pub fn try_parse(&mut self) -> Result<Option<Incoming>, FramingError> {
        if self.buf.len() < PDU_HEADER_LEN {
            return Ok(None);
        }
        let ty = self.buf[0];
        let len = u32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]);
        let max = match ty {
            pdu_type::P_DATA_TF => self.max_pdata,
            pdu_type::RELEASE_RQ | pdu_type::RELEASE_RP | pdu_type::ABORT => 4,
            pdu_type::ASSOCIATE_RQ | pdu_type::ASSOCIATE_AC | pdu_type::ASSOCIATE_RJ => {
                MAX_CONTROL_PDU
            }
            other => return Err(FramingError::UnknownType(other)),
        };
        if len > max {
            return Err(FramingError::TooLarge { len, max });
        }
        let total = PDU_HEADER_LEN + len as usize;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut pdu = self.buf.split_to(total);
        if ty == pdu_type::P_DATA_TF {
            pdu.advance(PDU_HEADER_LEN);
            return split_pdvs(pdu.freeze()).map(|v| Some(Incoming::PData(v)));
        }
        let mut whole = pdu.freeze();
        let decoded = dicom_ul::pdu::read_pdu(&mut whole, MAX_CONTROL_PDU, true)
            .map_err(|e| FramingError::Malformed(e.to_string()))?
            .ok_or_else(|| FramingError::Malformed("incomplete PDU".into()))?;
        if whole.has_remaining() {
            return Err(FramingError::Malformed("trailing bytes after PDU".into()));
        }
        Ok(Some(Incoming::Control(decoded)))
    }
}

/// Splits a P-DATA-TF body into PDVs (PS3.8 9.3.5.1), refusing any item that does not fit.
fn split_pdvs(mut body: Bytes) -> Result<Vec<Pdv>, FramingError> {
    let mut out = Vec::with_capacity(1);
    if body.is_empty() {
        return Err(FramingError::Malformed("P-DATA-TF without PDV".into()));
    }
    while !body.is_empty() {
        if body.len() < PDV_HEADER_LEN {
            return Err(FramingError::Malformed("truncated PDV item header".into()));
        }
        let item_len = body.get_u32() as usize;
        if item_len < 2 || item_len > body.len() {
            return Err(FramingError::Malformed(format!("PDV item length {item_len} invalid")));
        }
        let context_id = body.get_u8();
        let control = body.get_u8();
        if control & !0x03 != 0 {
            return Err(FramingError::Malformed("reserved bits set in PDV control header".into()));
        }
        if context_id == 0 || context_id.is_multiple_of(2) {
            return Err(FramingError::Malformed(format!(
                "invalid presentation context {context_id}"
            )));
        }
        let data = body.split_to(item_len - 2);
        out.push(Pdv { context_id, is_command: control & 1 != 0, is_last: control & 2 != 0, data });
    }
    Ok(out)
}

/// Encodes a control PDU with `dicom-ul`.
pub fn encode(pdu: &Pdu) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    dicom_ul::pdu::write_pdu(&mut out, pdu).expect("PDUs we build are encodable");
    out
}

/// An A-ABORT from us (the service provider) with a reason.
pub fn abort_pdu(reason: AbortRQServiceProviderReason) -> Vec<u8> {
    encode(&Pdu::AbortRQ { source: AbortRQSource::ServiceProvider(reason) })
}

/// Largest PDV data we put in one P-DATA-TF PDU for a peer with this Maximum Length (`0` =
/// unlimited; we then use 64 KiB).
pub fn max_fragment(peer_max: u32) -> usize {
    const OWN_FRAGMENT: usize = 64 * 1024;
    if peer_max == 0 {
        OWN_FRAGMENT
    } else {
        (peer_max as usize).saturating_sub(PDV_HEADER_LEN).clamp(1, OWN_FRAGMENT)
    }
}

/// Appends P-DATA-TF PDUs carrying one whole message part (command or data set) to `out`,
/// fragmented so that no PDU exceeds the peer's Maximum Length (`0` = unlimited).
pub fn encode_pdata(
    out: &mut Vec<u8>,
    context_id: u8,
    is_command: bool,
    data: &[u8],
    peer_max: u32,
) {
    let mut chunks: Vec<&[u8]> = data.chunks(max_fragment(peer_max)).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let n = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        encode_fragment(out, context_id, is_command, chunk, i + 1 == n);
    }
}

/// Appends one P-DATA-TF PDU with one PDV (the caller keeps `data` within [`max_fragment`]).
pub fn encode_fragment(
    out: &mut Vec<u8>,
    context_id: u8,
    is_command: bool,
    data: &[u8],
    last: bool,
) {
    let control = u8::from(is_command) | if last { 2 } else { 0 };
    let item_len = (data.len() + 2) as u32;
    out.put_u8(pdu_type::P_DATA_TF);
    out.put_u8(0);
    out.put_u32(item_len + 4);
    out.put_u32(item_len);
    out.put_u8(context_id);
    out.put_u8(control);
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pdata(items: &[(u8, u8, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (pc, ctl, data) in items {
            body.put_u32(data.len() as u32 + 2);
            body.put_u8(*pc);
            body.put_u8(*ctl);
            body.extend_from_slice(data);
        }
        let mut out = vec![4, 0];
        out.put_u32(body.len() as u32);
        out.extend(body);
        out
    }

    #[test]
    fn refuses_oversized_and_malformed() {
        let mut r = PduReader::new(4096);
        r.buf.extend_from_slice(&[4, 0, 0, 0, 0x20, 0x00]);
        assert!(matches!(r.try_parse(), Err(FramingError::TooLarge { len: 8192, max: 4096 })));
        let mut r = PduReader::new(4096);
        r.buf.extend_from_slice(&[0x16, 3, 1, 0, 0, 0]);
        assert!(matches!(r.try_parse(), Err(FramingError::UnknownType(0x16))));
        // PDV item claiming more than the PDU holds.
        let mut wire = pdata(&[(1, 3, b"abcd")]);
        wire[9] = 0x40;
        let mut r = PduReader::new(4096);
        r.buf.extend_from_slice(&wire);
        assert!(matches!(r.try_parse(), Err(FramingError::Malformed(_))));
        // Even presentation context id.
        let mut r = PduReader::new(4096);
        r.buf.extend_from_slice(&pdata(&[(2, 3, b"abcd")]));
        assert!(matches!(r.try_parse(), Err(FramingError::Malformed(_))));
        // Release RQ with a wrong length.
        let mut r = PduReader::new(4096);
        r.buf.extend_from_slice(&[5, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0]);
        assert!(matches!(r.try_parse(), Err(FramingError::TooLarge { .. })));
    }

    #[test]
    fn fragments_to_peer_max() {
        let mut out = Vec::new();
        let data = vec![7u8; 100];
        encode_pdata(&mut out, 5, false, &data, 46);
        let mut r = PduReader::new(4096);
        r.buf.extend_from_slice(&out);
        let mut got = Vec::new();
        let mut lasts = 0;
        while let Some(Incoming::PData(pdvs)) = r.try_parse().unwrap() {
            for p in pdvs {
                assert!(p.data.len() <= 40);
                lasts += usize::from(p.is_last);
                got.extend_from_slice(&p.data);
            }
        }
        assert_eq!(got, data);
        assert_eq!(lasts, 1);
    }

    #[test]
    fn control_pdus_roundtrip_through_dicom_ul() {
        let mut r = PduReader::new(4096);
        r.buf.extend_from_slice(&encode(&Pdu::ReleaseRQ));
        r.buf.extend_from_slice(&abort_pdu(AbortRQServiceProviderReason::UnexpectedPdu));
        assert!(matches!(r.try_parse().unwrap(), Some(Incoming::Control(Pdu::ReleaseRQ))));
        assert!(matches!(r.try_parse().unwrap(), Some(Incoming::Control(Pdu::AbortRQ { .. }))));
        assert!(r.try_parse().unwrap().is_none());
    }
}
