//! The File Meta Information at the head of a Part 10 file (PS3.10 7.1), read incrementally from
//! a STOW-RS part, no I/O. Only what storing needs: the UIDs, the transfer syntax and where the
//! data set begins.

/// What the File Meta says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part10Meta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    /// Offset of the first data set byte.
    pub dataset_offset: usize,
}

/// Largest File Meta we read.
pub const MAX_META: usize = 64 * 1024;

/// `Ok(None)`: more bytes are needed. `Err`: this is not a Part 10 file we can read.
pub fn parse(buf: &[u8]) -> Result<Option<Part10Meta>, String> {
    if buf.len() < 132 {
        return Ok(None);
    }
    if &buf[128..132] != b"DICM" {
        return Err("not a DICOM Part 10 file (no \"DICM\" after the 128-byte preamble)".into());
    }
    let mut pos = 132;
    let (mut class, mut instance, mut ts) = (None, None, None);
    let mut end: Option<usize> = None;
    loop {
        if let Some(e) = end
            && pos >= e
        {
            break;
        }
        if pos > MAX_META {
            return Err("File Meta Information too long".into());
        }
        if buf.len() < pos + 8 {
            return Ok(None);
        }
        let group = u16::from_le_bytes([buf[pos], buf[pos + 1]]);
        let element = u16::from_le_bytes([buf[pos + 2], buf[pos + 3]]);
        if group != 0x0002 {
            if end.is_some() {
                return Err("File Meta group length disagrees with its elements".into());
            }
            break;
        }
        let vr = [buf[pos + 4], buf[pos + 5]];
        if !vr[0].is_ascii_uppercase() || !vr[1].is_ascii_uppercase() {
            return Err("File Meta Information is not explicit VR".into());
        }
        let (head, len) = if matches!(&vr, b"OB" | b"OW" | b"UN" | b"UT" | b"SQ" | b"UC" | b"UR") {
            if buf.len() < pos + 12 {
                return Ok(None);
            }
            (12, u32::from_le_bytes(buf[pos + 8..pos + 12].try_into().unwrap_or_default()) as usize)
        } else {
            (8, usize::from(u16::from_le_bytes([buf[pos + 6], buf[pos + 7]])))
        };
        if len > MAX_META {
            return Err("File Meta element too long".into());
        }
        if buf.len() < pos + head + len {
            return Ok(None);
        }
        let value = &buf[pos + head..pos + head + len];
        let text =
            || String::from_utf8_lossy(value).trim_end_matches(['\0', ' ']).trim().to_owned();
        match element {
            0x0000 if len == 4 => {
                let glen = u32::from_le_bytes(value.try_into().unwrap_or_default()) as usize;
                end = Some(pos + head + len + glen);
            }
            0x0002 => class = Some(text()),
            0x0003 => instance = Some(text()),
            0x0010 => ts = Some(text()),
            _ => {}
        }
        pos += head + len;
    }
    let missing = |what: &str| format!("File Meta Information lacks the {what}");
    Ok(Some(Part10Meta {
        sop_class_uid: class
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("Media Storage SOP Class UID"))?,
        sop_instance_uid: instance
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("Media Storage SOP Instance UID"))?,
        transfer_syntax: ts
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("Transfer Syntax UID"))?,
        dataset_offset: pos,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::dataset::{FileMeta, part10_header};

    #[test]
    fn reads_our_own_header_at_any_cut() {
        let meta = FileMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: "1.2.3.4".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            source_ae_title: "X".into(),
        };
        let mut file = part10_header(&meta);
        let ds_at = file.len();
        file.extend_from_slice(&[0x08, 0x00, 0x60, 0x00, b'C', b'S', 2, 0, b'C', b'T']);
        for cut in 0..file.len() {
            match parse(&file[..cut]) {
                Ok(None) => {}
                Ok(Some(m)) => assert_eq!(m.dataset_offset, ds_at),
                Err(e) => panic!("cut {cut}: {e}"),
            }
        }
        let m = parse(&file).unwrap().unwrap();
        assert_eq!(m.sop_instance_uid, "1.2.3.4");
        assert_eq!(m.transfer_syntax, "1.2.840.10008.1.2.1");
        assert_eq!(m.dataset_offset, ds_at);
        assert!(parse(&[0u8; 200]).is_err());
    }
}
