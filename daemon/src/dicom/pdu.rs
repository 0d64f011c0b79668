//! PDU I/O: the framing of [`hms_edge_dicom::pdu`] over a tokio byte stream.

pub use hms_edge_dicom::pdu::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads whole PDUs from an async stream.
#[allow(async_fn_in_trait)] // used with concrete readers inside this crate only
pub trait ReadPdu {
    /// Reads the next whole PDU. Cancel-safe: a partially received PDU stays buffered.
    async fn read<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Incoming, FramingError>;
}

impl ReadPdu for PduReader {
    async fn read<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Incoming, FramingError> {
        loop {
            if let Some(pdu) = self.try_parse()? {
                return Ok(pdu);
            }
            if r.read_buf(self.read_buffer()).await? == 0 {
                return Err(self.end_of_stream());
            }
        }
    }
}

/// Writes and flushes bytes.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_pdvs_across_partial_reads() {
        let mut wire = Vec::new();
        encode_pdata(&mut wire, 1, true, b"cmd", 4096);
        encode_pdata(&mut wire, 3, false, b"data1", 4096);
        let mut r = PduReader::new(4096);
        let (a, b) = wire.split_at(7);
        // `chain` hands out the two halves in separate reads.
        let mut stream = AsyncReadExt::chain(a, b);
        let Incoming::PData(pdvs) = r.read(&mut stream).await.unwrap() else { panic!() };
        assert!(pdvs[0].is_command && pdvs[0].is_last);
        assert_eq!(&pdvs[0].data[..], b"cmd");
        let Incoming::PData(pdvs) = r.read(&mut stream).await.unwrap() else { panic!() };
        assert_eq!((pdvs[0].context_id, &pdvs[0].data[..]), (3, &b"data1"[..]));
        assert!(!pdvs[0].is_command && pdvs[0].is_last);
        assert!(matches!(r.read(&mut stream).await, Err(FramingError::Closed)));
        let mut r = PduReader::new(4096);
        assert!(matches!(r.read(&mut &wire[..9]).await, Err(FramingError::Truncated)));
    }
}
