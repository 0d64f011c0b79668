//! Streaming inspection of a received data set, and the Part 10 File Meta Information we write.
//!
//! [`DatasetScanner`] is a push parser: it is fed the data set bytes in whatever pieces they arrive
//! and walks the element structure (explicit or implicit VR little endian, defined and undefined
//! lengths, nested sequences and encapsulated pixel data) without keeping anything but the few
//! short top-level values the index needs. Values are skipped by count, so a 1 GiB pixel data
//! element costs no memory. Walking to the very end is what lets us tell a complete data set from
//! one that stops in the middle of an element.

use std::collections::BTreeMap;

use dicom_encoding::text::{SpecificCharacterSet, TextCodec};

/// Attribute tags as `(group << 16) | element`.
pub mod tags {
    pub const SPECIFIC_CHARACTER_SET: u32 = 0x0008_0005;
    pub const SOP_CLASS_UID: u32 = 0x0008_0016;
    pub const SOP_INSTANCE_UID: u32 = 0x0008_0018;
    pub const STUDY_DATE: u32 = 0x0008_0020;
    pub const STUDY_TIME: u32 = 0x0008_0030;
    pub const ACCESSION_NUMBER: u32 = 0x0008_0050;
    pub const QUERY_RETRIEVE_LEVEL: u32 = 0x0008_0052;
    pub const RETRIEVE_AE_TITLE: u32 = 0x0008_0054;
    pub const MODALITY: u32 = 0x0008_0060;
    pub const MODALITIES_IN_STUDY: u32 = 0x0008_0061;
    /// ONLINE, or NEARLINE when some instance was evicted (the cloud PACS holds it).
    pub const INSTANCE_AVAILABILITY: u32 = 0x0008_0056;
    pub const REFERRING_PHYSICIAN_NAME: u32 = 0x0008_0090;
    pub const STUDY_DESCRIPTION: u32 = 0x0008_1030;
    pub const SERIES_DESCRIPTION: u32 = 0x0008_103E;
    pub const PATIENT_NAME: u32 = 0x0010_0010;
    pub const PATIENT_ID: u32 = 0x0010_0020;
    pub const PATIENT_BIRTH_DATE: u32 = 0x0010_0030;
    pub const PATIENT_SEX: u32 = 0x0010_0040;
    pub const STUDY_INSTANCE_UID: u32 = 0x0020_000D;
    pub const SERIES_INSTANCE_UID: u32 = 0x0020_000E;
    pub const STUDY_ID: u32 = 0x0020_0010;
    pub const SERIES_NUMBER: u32 = 0x0020_0011;
    pub const INSTANCE_NUMBER: u32 = 0x0020_0013;
    pub const NUMBER_OF_STUDY_RELATED_SERIES: u32 = 0x0020_1206;
    pub const NUMBER_OF_STUDY_RELATED_INSTANCES: u32 = 0x0020_1208;
    pub const NUMBER_OF_SERIES_RELATED_INSTANCES: u32 = 0x0020_1209;
    pub const NUMBER_OF_FRAMES: u32 = 0x0028_0008;
    pub const PIXEL_DATA: u32 = 0x7FE0_0010;
}

/// The top-level attributes the index keeps.
const COLLECTED: &[u32] = &[
    tags::SPECIFIC_CHARACTER_SET,
    tags::SOP_CLASS_UID,
    tags::SOP_INSTANCE_UID,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::ACCESSION_NUMBER,
    tags::MODALITY,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_DESCRIPTION,
    tags::SERIES_DESCRIPTION,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::STUDY_ID,
    tags::SERIES_NUMBER,
    tags::INSTANCE_NUMBER,
    tags::NUMBER_OF_FRAMES,
];
/// Values longer than this are not indexed (no indexed attribute is legitimately longer).
const MAX_COLLECTED_VALUE: u32 = 1024;
/// Deepest nesting of sequences and items accepted in any data set we receive (C-STORE data sets,
/// C-FIND/worklist/C-GET/C-MOVE identifiers, N-ACTION, N-CREATE, N-SET): the one limit, checked
/// by [`DatasetScanner`] for streamed instances and by [`check_nesting`] for every data set that
/// the (recursive) object model parses. Real IODs nest well under 10 levels.
pub const MAX_NESTING_DEPTH: usize = 64;
const MAX_DEPTH: usize = MAX_NESTING_DEPTH;
const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_DELIMITER: u32 = 0xFFFE_E00D;
const SEQUENCE_DELIMITER: u32 = 0xFFFE_E0DD;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// Inside an undefined-length sequence (or encapsulated pixel data): expect items.
    Sequence { implicit: bool },
    /// Inside an undefined-length item: expect elements.
    Item { implicit: bool },
}

#[derive(Debug)]
enum State {
    /// At an element or item boundary, with this many header bytes gathered in `head`.
    Header,
    /// Skipping the rest of a value.
    Skip(u64),
    /// Gathering a value we index.
    Collect { tag: u32, remaining: u32 },
    /// Structure error; everything else is ignored.
    Failed(String),
}

/// The push parser. Feed with [`DatasetScanner::feed`], then call [`DatasetScanner::finish`].
#[derive(Debug)]
pub struct DatasetScanner {
    explicit_vr: bool,
    state: State,
    head: [u8; 12],
    head_len: usize,
    stack: Vec<Frame>,
    values: BTreeMap<u32, Vec<u8>>,
    offset: u64,
}

impl DatasetScanner {
    pub fn new(explicit_vr: bool) -> Self {
        Self {
            explicit_vr,
            state: State::Header,
            head: [0; 12],
            head_len: 0,
            stack: Vec::new(),
            values: BTreeMap::new(),
            offset: 0,
        }
    }

    /// Consumes the next bytes of the data set.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Failed(_) => return,
                State::Skip(n) => {
                    let take = (*n).min(data.len() as u64) as usize;
                    *n -= take as u64;
                    data = &data[take..];
                    self.offset += take as u64;
                    if *n == 0 {
                        self.state = State::Header;
                    }
                }
                State::Collect { tag, remaining } => {
                    let take = (*remaining as usize).min(data.len());
                    self.values.entry(*tag).or_default().extend_from_slice(&data[..take]);
                    *remaining -= take as u32;
                    data = &data[take..];
                    self.offset += take as u64;
                    if *remaining == 0 {
                        self.state = State::Header;
                    }
                }
                State::Header => {
                    let need = self.header_len_needed();
                    let take = (need - self.head_len).min(data.len());
                    self.head[self.head_len..self.head_len + take].copy_from_slice(&data[..take]);
                    self.head_len += take;
                    data = &data[take..];
                    self.offset += take as u64;
                    if self.head_len == self.header_len_needed() {
                        self.on_header();
                    }
                }
            }
        }
    }

    fn implicit_here(&self) -> bool {
        match self.stack.last() {
            Some(Frame::Sequence { implicit } | Frame::Item { implicit }) => *implicit,
            None => !self.explicit_vr,
        }
    }

    /// Header bytes needed for what has been gathered so far (8, or 12 for long explicit VRs).
    fn header_len_needed(&self) -> usize {
        if self.head_len < 8 || self.implicit_here() {
            return 8;
        }
        let group = u16::from_le_bytes([self.head[0], self.head[1]]);
        if group == 0xFFFE {
            return 8;
        }
        if has_long_length(&self.head[4..6]) { 12 } else { 8 }
    }

    fn fail(&mut self, why: impl Into<String>) {
        let at = self.offset;
        self.state = State::Failed(format!("{} (at byte {at} of the data set)", why.into()));
    }

    fn on_header(&mut self) {
        let h = self.head;
        self.head_len = 0;
        let group = u16::from_le_bytes([h[0], h[1]]);
        let element = u16::from_le_bytes([h[2], h[3]]);
        let tag = (u32::from(group) << 16) | u32::from(element);
        let implicit = self.implicit_here();
        let in_sequence = matches!(self.stack.last(), Some(Frame::Sequence { .. }));
        if group == 0xFFFE {
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            match (tag, in_sequence) {
                (ITEM, true) if len == UNDEFINED => self.push(Frame::Item { implicit }),
                (ITEM, true) => self.skip(len),
                (SEQUENCE_DELIMITER, true) => {
                    self.stack.pop();
                    self.state = State::Header;
                }
                (ITEM_DELIMITER, false)
                    if matches!(self.stack.last(), Some(Frame::Item { .. })) =>
                {
                    self.stack.pop();
                    self.state = State::Header;
                }
                _ => self.fail(format!("unexpected delimiter ({group:04X},{element:04X})")),
            }
            return;
        }
        if in_sequence {
            return self.fail(format!("element ({group:04X},{element:04X}) where an item belongs"));
        }
        let (vr, len) = if implicit {
            (None, u32::from_le_bytes([h[4], h[5], h[6], h[7]]))
        } else if has_long_length(&h[4..6]) {
            (Some([h[4], h[5]]), u32::from_le_bytes([h[8], h[9], h[10], h[11]]))
        } else {
            if !h[4].is_ascii_uppercase() || !h[5].is_ascii_uppercase() {
                return self.fail(format!("invalid VR in element ({group:04X},{element:04X})"));
            }
            (Some([h[4], h[5]]), u32::from(u16::from_le_bytes([h[6], h[7]])))
        };
        if group == 0x0002 && self.stack.is_empty() {
            return self.fail("file meta element inside the data set");
        }
        if len == UNDEFINED {
            // Sequences and encapsulated pixel data. Inside an explicit-VR UN of undefined length
            // the content is implicit VR (PS3.5 6.2.2).
            let inner_implicit = implicit || vr == Some(*b"UN");
            return self.push(Frame::Sequence { implicit: inner_implicit });
        }
        if self.stack.is_empty() && len <= MAX_COLLECTED_VALUE && COLLECTED.contains(&tag) {
            self.values.insert(tag, Vec::with_capacity(len as usize));
            self.state =
                if len == 0 { State::Header } else { State::Collect { tag, remaining: len } };
            return;
        }
        self.skip(len);
    }

    fn skip(&mut self, len: u32) {
        self.state = if len == 0 { State::Header } else { State::Skip(u64::from(len)) };
    }

    fn push(&mut self, frame: Frame) {
        if self.stack.len() >= MAX_DEPTH {
            return self.fail("sequences nested too deeply");
        }
        self.stack.push(frame);
        self.state = State::Header;
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Ends the data set: it must stop exactly at an element boundary, outside any sequence.
    pub fn finish(self) -> Result<IndexAttrs, String> {
        match self.state {
            State::Failed(why) => return Err(why),
            State::Skip(_) | State::Collect { .. } => {
                return Err(format!("data set ends inside a value (after {} bytes)", self.offset));
            }
            State::Header if self.head_len > 0 => {
                return Err(format!(
                    "data set ends inside an element header (after {} bytes)",
                    self.offset
                ));
            }
            State::Header => {}
        }
        if !self.stack.is_empty() {
            return Err("data set ends inside an undefined-length sequence".into());
        }
        if self.offset == 0 {
            return Err("empty data set".into());
        }
        Ok(IndexAttrs::from_values(&self.values))
    }
}

/// Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
fn has_long_length(vr: &[u8]) -> bool {
    matches!(
        vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

/// What the index keeps of one instance (text already decoded to UTF-8, padding removed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexAttrs {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub patient_id: String,
    pub patient_name: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub accession_number: String,
    pub study_date: String,
    pub study_time: String,
    pub study_id: String,
    pub study_description: String,
    pub referring_physician_name: String,
    pub modality: String,
    pub series_number: Option<i64>,
    pub series_description: String,
    pub instance_number: Option<i64>,
    pub number_of_frames: Option<i64>,
}

impl IndexAttrs {
    fn from_values(values: &BTreeMap<u32, Vec<u8>>) -> Self {
        let charset = values
            .get(&tags::SPECIFIC_CHARACTER_SET)
            .map(|v| String::from_utf8_lossy(v).to_string())
            .unwrap_or_default();
        let codec = charset_codec(&charset);
        let text = |tag: u32| -> String {
            let Some(raw) = values.get(&tag) else {
                return String::new();
            };
            let s = codec.decode(raw).unwrap_or_else(|_| String::from_utf8_lossy(raw).into_owned());
            s.trim_end_matches(['\0', ' ']).trim_start().to_owned()
        };
        let int = |tag: u32| -> Option<i64> {
            let t = text(tag);
            t.split('\\').next().and_then(|v| v.trim().parse::<f64>().ok()).map(|v| v as i64)
        };
        IndexAttrs {
            sop_class_uid: text(tags::SOP_CLASS_UID),
            sop_instance_uid: text(tags::SOP_INSTANCE_UID),
            study_instance_uid: text(tags::STUDY_INSTANCE_UID),
            series_instance_uid: text(tags::SERIES_INSTANCE_UID),
            patient_id: text(tags::PATIENT_ID),
            patient_name: text(tags::PATIENT_NAME),
            patient_birth_date: text(tags::PATIENT_BIRTH_DATE),
            patient_sex: text(tags::PATIENT_SEX),
            accession_number: text(tags::ACCESSION_NUMBER),
            study_date: text(tags::STUDY_DATE),
            study_time: text(tags::STUDY_TIME),
            study_id: text(tags::STUDY_ID),
            study_description: text(tags::STUDY_DESCRIPTION),
            referring_physician_name: text(tags::REFERRING_PHYSICIAN_NAME),
            modality: text(tags::MODALITY),
            series_number: int(tags::SERIES_NUMBER),
            series_description: text(tags::SERIES_DESCRIPTION),
            instance_number: int(tags::INSTANCE_NUMBER),
            number_of_frames: int(tags::NUMBER_OF_FRAMES),
        }
    }
}

/// The text codec for a Specific Character Set value. With code extensions (several values) the
/// last one is used; unknown terms fall back to the default repertoire.
pub fn charset_codec(value: &str) -> SpecificCharacterSet {
    value
        .split('\\')
        .map(str::trim)
        .rfind(|s| !s.is_empty())
        .and_then(|code| {
            SpecificCharacterSet::from_code(code)
                .or_else(|| SpecificCharacterSet::from_code(&code.replace("ISO 2022", "ISO_IR")))
        })
        .unwrap_or(SpecificCharacterSet::ISO_IR_100)
}

/// What goes into the File Meta Information of a stored instance.
#[derive(Debug, Clone)]
pub struct FileMeta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    pub source_ae_title: String,
}

/// The 128-byte preamble, "DICM" and the File Meta Information group (PS3.10 7.1), encoded in
/// Explicit VR Little Endian with its group length.
pub fn part10_header(meta: &FileMeta) -> Vec<u8> {
    fn element(out: &mut Vec<u8>, element: u16, vr: &[u8; 2], value: &[u8], pad: u8) {
        let mut v = value.to_vec();
        if v.len() % 2 == 1 {
            v.push(pad);
        }
        out.extend_from_slice(&0x0002u16.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(vr);
        if vr == b"OB" {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(&v);
    }
    let mut group = Vec::with_capacity(256);
    element(&mut group, 0x0001, b"OB", &[0, 1], 0);
    element(&mut group, 0x0002, b"UI", meta.sop_class_uid.as_bytes(), 0);
    element(&mut group, 0x0003, b"UI", meta.sop_instance_uid.as_bytes(), 0);
    element(&mut group, 0x0010, b"UI", meta.transfer_syntax.as_bytes(), 0);
    element(&mut group, 0x0012, b"UI", super::uids::IMPLEMENTATION_CLASS_UID.as_bytes(), 0);
    element(&mut group, 0x0013, b"SH", super::uids::IMPLEMENTATION_VERSION_NAME.as_bytes(), b' ');
    let ae: String = meta.source_ae_title.chars().filter(|c| *c != '\\').take(16).collect();
    if !ae.trim().is_empty() {
        element(&mut group, 0x0016, b"AE", ae.trim().as_bytes(), b' ');
    }
    let mut out = Vec::with_capacity(128 + 4 + 12 + group.len());
    out.resize(128, 0);
    out.extend_from_slice(b"DICM");
    element(&mut out, 0x0000, b"UL", &(group.len() as u32).to_le_bytes(), 0);
    out.extend_from_slice(&group);
    out
}

/// Splits a stored Part 10 file into (File Meta bytes, data set start offset) by reading the
/// group length. Used by export to hand back the data set exactly as received.
pub fn part10_dataset_offset(head: &[u8]) -> Option<usize> {
    if head.len() < 144 || &head[128..132] != b"DICM" || &head[132..138] != b"\x02\x00\x00\x00UL" {
        return None;
    }
    let len = u32::from_le_bytes(head[140..144].try_into().ok()?) as usize;
    Some(144 + len)
}

/// Walks a complete, in-memory data set (little endian, explicit or implicit VR) without
/// recursion and refuses one whose sequences nest deeper than [`MAX_NESTING_DEPTH`], or whose
/// structure is broken (a value running past the end, a delimiter out of place). Runs before
/// the object model parses a data set, because that parser recurses once per level and a
/// crafted identifier of 50,000 levels (under 1 MB) overflows the stack.
///
/// Sequences are recognised as the object model does: VR `SQ`, an undefined length, or, in
/// implicit VR, a tag the standard dictionary lists as a sequence.
pub fn check_nesting(bytes: &[u8], explicit_vr: bool) -> Result<(), String> {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
    use dicom_core::{Tag, VR};
    use dicom_dictionary_std::StandardDataDictionary;

    #[derive(Clone, Copy)]
    struct Open {
        /// Offset where a defined-length frame ends; `None` for undefined length.
        end: Option<usize>,
        /// A sequence (holds items) rather than an item (holds elements).
        sequence: bool,
        implicit: bool,
    }
    let u16_at =
        |p: usize| -> Option<u16> { bytes.get(p..p + 2).map(|b| u16::from_le_bytes([b[0], b[1]])) };
    let u32_at = |p: usize| -> Option<u32> {
        bytes.get(p..p + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let truncated = || "data set ends inside an element".to_string();
    let mut stack: Vec<Open> = Vec::new();
    let mut pos = 0usize;
    loop {
        while let Some(Open { end: Some(end), .. }) = stack.last().copied() {
            if pos < end {
                break;
            }
            if pos > end {
                return Err("an element runs past the end of its sequence or item".into());
            }
            stack.pop();
        }
        if pos == bytes.len() {
            break;
        }
        let top = stack.last().copied();
        let implicit = top.map_or(!explicit_vr, |f| f.implicit);
        let in_sequence = top.is_some_and(|f| f.sequence);
        let group = u16_at(pos).ok_or_else(truncated)?;
        let element = u16_at(pos + 2).ok_or_else(truncated)?;
        let tag = (u32::from(group) << 16) | u32::from(element);
        if group == 0xFFFE {
            let len = u32_at(pos + 4).ok_or_else(truncated)?;
            pos += 8;
            match tag {
                ITEM if in_sequence => {
                    let end = if len == UNDEFINED {
                        None
                    } else {
                        Some(pos.checked_add(len as usize).ok_or_else(truncated)?)
                    };
                    stack.push(Open { end, sequence: false, implicit });
                }
                ITEM_DELIMITER if top.is_some_and(|f| !f.sequence && f.end.is_none()) => {
                    stack.pop();
                }
                SEQUENCE_DELIMITER if top.is_some_and(|f| f.sequence && f.end.is_none()) => {
                    stack.pop();
                }
                _ => return Err(format!("item tag ({group:04X},{element:04X}) out of place")),
            }
        } else {
            if in_sequence {
                return Err("a sequence holds an element where an item belongs".into());
            }
            let (vr, len, header) = if implicit {
                (None, u32_at(pos + 4).ok_or_else(truncated)?, 8)
            } else {
                let vr = bytes.get(pos + 4..pos + 6).ok_or_else(truncated)?;
                // A VR the object model does not know it reads with another length layout and
                // could take a short value's bytes for a huge length (and allocate it): refuse.
                if VR::from_binary([vr[0], vr[1]]).is_none() {
                    return Err(format!("unknown VR {:?}", String::from_utf8_lossy(vr)));
                }
                if has_long_length(vr) {
                    (Some([vr[0], vr[1]]), u32_at(pos + 8).ok_or_else(truncated)?, 12)
                } else {
                    (Some([vr[0], vr[1]]), u32::from(u16_at(pos + 6).ok_or_else(truncated)?), 8)
                }
            };
            pos += header;
            let dictionary_sq = implicit
                && StandardDataDictionary
                    .by_tag(Tag(group, element))
                    .is_some_and(|e| matches!(e.vr(), VirtualVr::Exact(VR::SQ)));
            let sequence = vr == Some(*b"SQ") || len == UNDEFINED || dictionary_sq;
            // A binary value whose length is not a whole number of its items is consumed short
            // by the object model, which then reads the next header out of step (the fuzzer
            // found a 2.2 GB "length" that way): refuse it, as the standard does.
            if !sequence && len != UNDEFINED {
                let effective = match vr {
                    Some(v) => VR::from_binary(v),
                    None => {
                        match StandardDataDictionary.by_tag(Tag(group, element)).map(|e| e.vr()) {
                            Some(VirtualVr::Exact(v)) => Some(v),
                            Some(_) => Some(VR::OW), // US/SS or OB/OW by context: 2-byte items at most
                            None => None,
                        }
                    }
                };
                let item = match effective {
                    Some(VR::US | VR::SS | VR::OW) => 2,
                    Some(VR::UL | VR::SL | VR::FL | VR::OL | VR::OF | VR::AT) => 4,
                    Some(VR::FD | VR::OD | VR::SV | VR::UV | VR::OV) => 8,
                    _ => 1,
                };
                if len % item != 0 {
                    return Err(format!(
                        "({group:04X},{element:04X}): a value of {len} bytes is not a whole number of {item}-byte items"
                    ));
                }
            }
            if sequence {
                let end = if len == UNDEFINED {
                    None
                } else {
                    Some(pos.checked_add(len as usize).ok_or_else(truncated)?)
                };
                let inner_implicit = implicit || vr == Some(*b"UN");
                stack.push(Open { end, sequence: true, implicit: inner_implicit });
            } else {
                pos = pos.checked_add(len as usize).ok_or_else(truncated)?;
                if pos > bytes.len() {
                    return Err(truncated());
                }
            }
        }
        // Items and sequences each count as a level, as the object model recurses for both.
        if stack.len() > 2 * MAX_NESTING_DEPTH {
            return Err(format!("sequences nested deeper than {MAX_NESTING_DEPTH} levels"));
        }
    }
    if !stack.is_empty() {
        return Err("data set ends inside a sequence".into());
    }
    Ok(())
}

/// Parses a small data set received in a DIMSE message (an identifier, an N-ACTION, N-CREATE or
/// N-SET data set) into the object model, after [`check_nesting`] has bounded its depth. Every
/// such data set goes through here; none is parsed by the object model directly.
pub fn read_small(bytes: &[u8], ts_uid: &str) -> Result<dicom_object::InMemDicomObject, String> {
    use dicom_encoding::TransferSyntaxIndex;
    let uid = ts_uid.trim_end_matches(['\0', ' ']);
    let explicit_vr = match uid {
        dicom_dictionary_std::uids::IMPLICIT_VR_LITTLE_ENDIAN => false,
        dicom_dictionary_std::uids::EXPLICIT_VR_LITTLE_ENDIAN => true,
        other => return Err(format!("transfer syntax {other} not accepted for this data set")),
    };
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(uid)
        .ok_or_else(|| format!("transfer syntax {uid} unknown"))?;
    check_nesting(bytes, explicit_vr)?;
    dicom_object::InMemDicomObject::read_dataset_with_ts(bytes, ts).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested_implicit(levels: usize, closed: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..levels {
            out.extend_from_slice(&[0x40, 0x00, 0x75, 0x02, 0xFF, 0xFF, 0xFF, 0xFF]);
            out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        if closed {
            for _ in 0..levels {
                out.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
                out.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
            }
        }
        out
    }

    /// Defined-length nesting in implicit VR, recognised by the dictionary (the object model
    /// recurses into it although no VR says SQ).
    fn nested_defined_implicit(levels: usize) -> Vec<u8> {
        let mut inner = Vec::new();
        for _ in 0..levels {
            let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
            item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
            item.extend_from_slice(&inner);
            let mut seq = vec![0x40, 0x00, 0x75, 0x02];
            seq.extend_from_slice(&(item.len() as u32).to_le_bytes());
            seq.extend_from_slice(&item);
            inner = seq;
        }
        inner
    }

    #[test]
    fn nesting_is_bounded_before_the_object_model_parses() {
        let ts = "1.2.840.10008.1.2";
        assert!(check_nesting(&nested_implicit(10, true), false).is_ok());
        assert!(read_small(&nested_implicit(10, true), ts).is_ok());
        let err = check_nesting(&nested_implicit(MAX_NESTING_DEPTH + 1, true), false).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
        // 50,000 levels: refused without recursion (this would overflow the stack otherwise).
        assert!(read_small(&nested_implicit(50_000, false), ts).is_err());
        assert!(read_small(&nested_implicit(50_000, true), ts).is_err());
        assert!(check_nesting(&nested_defined_implicit(10), false).is_ok());
        assert!(read_small(&nested_defined_implicit(10), ts).is_ok());
        assert!(read_small(&nested_defined_implicit(5_000), ts).is_err());
        // Broken structure: unclosed, a value past the end, a stray delimiter.
        assert!(check_nesting(&nested_implicit(3, false), false).is_err());
        assert!(check_nesting(&[0x10, 0x00, 0x10, 0x00, 9, 0, 0, 0, b'A'], false).is_err());
        assert!(check_nesting(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0], false).is_err());
        // Found by the fuzzer: an unknown VR ("QI") that the object model read as a 4-byte
        // length of 775 MB and allocated.
        let mut crafted = vec![0x20, 0x00, 0x0D, 0x00, b'Q', b'I', 0x2a, 0x00];
        crafted.extend_from_slice(b"1.2.840.10008.5.1.4.1.1.4.1.2.3.4.5.6.7.8.9");
        crafted.truncate(8 + 0x2a);
        crafted.resize(8 + 0x2a, b'1');
        assert!(check_nesting(&crafted, true).unwrap_err().contains("unknown VR"));
        assert!(read_small(&crafted, "1.2.840.10008.1.2.1").is_err());
        // Found by the fuzzer: (0000,0000) UL of 39 bytes; the object model read 36, then the
        // next header out of step, and allocated a 2.2 GB value.
        let mut short = vec![0u8; 8 * 6];
        short.extend_from_slice(&[0, 0, 0, 0, 0x27, 0, 0, 0]);
        short.extend_from_slice(&[0u8; 0x27]);
        short.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(check_nesting(&short, false).unwrap_err().contains("whole number"));
        assert!(read_small(&short, "1.2.840.10008.1.2").is_err());
        // Other transfer syntaxes are not taken for these small data sets.
        assert!(read_small(&nested_implicit(1, true), "1.2.840.10008.1.2.2").is_err());
    }

    proptest::proptest! {
        /// No byte string makes the checker panic.
        #[test]
        fn check_nesting_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512), explicit: bool) {
            let _ = check_nesting(&bytes, explicit);
        }
    }

    fn explicit(tag: u32, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
        out.extend_from_slice(&(tag as u16).to_le_bytes());
        out.extend_from_slice(vr);
        if has_long_length(vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    fn raw(tag: u32, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
        out.extend_from_slice(&(tag as u16).to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out
    }

    /// A data set and the offsets of its top-level element boundaries.
    fn sample() -> (Vec<u8>, Vec<usize>) {
        let mut ds = Vec::new();
        let mut cuts = Vec::new();
        let mut top = |ds: &mut Vec<u8>, bytes: Vec<u8>| {
            ds.extend(bytes);
            cuts.push(ds.len());
        };
        top(&mut ds, explicit(tags::SPECIFIC_CHARACTER_SET, b"CS", b"ISO_IR 100"));
        top(&mut ds, explicit(tags::SOP_CLASS_UID, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0"));
        top(&mut ds, explicit(tags::SOP_INSTANCE_UID, b"UI", b"1.2.3.4\0"));
        // An undefined-length sequence with an undefined-length item, then a defined item.
        let mut sq = vec![0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0];
        sq.extend_from_slice(&UNDEFINED.to_le_bytes());
        sq.extend(raw(ITEM, UNDEFINED));
        sq.extend(explicit(0x0008_1150, b"UI", b"1.2\0"));
        sq.extend(raw(ITEM_DELIMITER, 0));
        sq.extend(raw(ITEM, 4));
        sq.extend_from_slice(b"abcd");
        sq.extend(raw(SEQUENCE_DELIMITER, 0));
        top(&mut ds, sq);
        top(&mut ds, explicit(tags::PATIENT_NAME, b"PN", b"M\xfcller^Hans"));
        top(&mut ds, explicit(tags::PATIENT_ID, b"LO", b"PID-1 "));
        top(&mut ds, explicit(tags::SERIES_NUMBER, b"IS", b"12"));
        top(&mut ds, explicit(tags::NUMBER_OF_FRAMES, b"IS", b"3 "));
        // Encapsulated pixel data: empty offset table + one fragment.
        let mut px = vec![0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0];
        px.extend_from_slice(&UNDEFINED.to_le_bytes());
        px.extend(raw(ITEM, 0));
        px.extend(raw(ITEM, 6));
        px.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        px.extend(raw(SEQUENCE_DELIMITER, 0));
        top(&mut ds, px);
        (ds, cuts)
    }

    #[test]
    fn collects_top_level_values_in_any_split() {
        let (ds, _) = sample();
        for split in [1usize, 2, 3, 7, 13, ds.len()] {
            let mut s = DatasetScanner::new(true);
            for piece in ds.chunks(split) {
                s.feed(piece);
            }
            let a = s.finish().unwrap();
            assert_eq!(a.sop_instance_uid, "1.2.3.4");
            assert_eq!(a.patient_name, "Müller^Hans");
            assert_eq!(a.patient_id, "PID-1");
            assert_eq!(a.series_number, Some(12));
            assert_eq!(a.number_of_frames, Some(3));
        }
    }

    #[test]
    fn truncation_anywhere_is_detected() {
        let (ds, cuts) = sample();
        for cut in 1..ds.len() {
            let mut s = DatasetScanner::new(true);
            s.feed(&ds[..cut]);
            // Only a cut at a top-level element boundary is a (shorter) complete data set.
            assert_eq!(s.finish().is_ok(), cuts.contains(&cut), "cut at {cut}");
        }
    }

    #[test]
    fn implicit_vr() {
        let mut ds = Vec::new();
        ds.extend(raw(tags::SOP_INSTANCE_UID, 4));
        ds.extend_from_slice(b"1.5\0");
        ds.extend(raw(0x0008_1140, UNDEFINED));
        ds.extend(raw(ITEM, UNDEFINED));
        ds.extend(raw(0x0008_1155, 2));
        ds.extend_from_slice(b"1\0");
        ds.extend(raw(ITEM_DELIMITER, 0));
        ds.extend(raw(SEQUENCE_DELIMITER, 0));
        ds.extend(raw(tags::STUDY_INSTANCE_UID, 2));
        ds.extend_from_slice(b"9\0");
        let mut s = DatasetScanner::new(false);
        s.feed(&ds);
        let a = s.finish().unwrap();
        assert_eq!(a.sop_instance_uid, "1.5");
        assert_eq!(a.study_instance_uid, "9");
    }

    #[test]
    fn garbage_is_refused() {
        let mut s = DatasetScanner::new(true);
        s.feed(&[0x08, 0x00, 0x18, 0x00, 0x01, 0x02, 0x04, 0x00, 1, 2, 3, 4]);
        assert!(s.finish().unwrap_err().contains("invalid VR"));
        let mut s = DatasetScanner::new(true);
        s.feed(&raw(SEQUENCE_DELIMITER, 0));
        assert!(s.finish().is_err());
    }

    #[test]
    fn part10_header_layout() {
        let h = part10_header(&FileMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: "1.2.3".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            source_ae_title: "STORESCU".into(),
        });
        assert_eq!(part10_dataset_offset(&h), Some(h.len()));
        assert_eq!(h.len() % 2, 0);
    }
}
