//! DICOM JSON (PS3.18 F.2) from a data set as it streams, no I/O beyond a [`Read`]: a walker that
//! turns every element into its JSON form except large values, which become `BulkDataURI`s (their
//! bytes are skipped, never held), and that records where the Pixel Data and its frames are.
//!
//! Data sets are little endian, explicit or implicit VR (deflated ones are inflated by the caller),
//! with defined or undefined lengths, nested sequences and encapsulated Pixel Data.

use std::io::{self, Read};

use base64::Engine;
use dicom_core::Tag;
use dicom_core::VR;
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_encoding::text::{SpecificCharacterSet, TextCodec};
use serde_json::{Map, Value, json};

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_DELIMITER: u32 = 0xFFFE_E00D;
const SEQUENCE_DELIMITER: u32 = 0xFFFE_E0DD;
const PIXEL_DATA: u32 = 0x7FE0_0010;
const MAX_DEPTH: usize = 32;
/// Text values longer than this are not inlined either.
const MAX_INLINE_TEXT: u64 = 64 * 1024;
/// Most fragments of encapsulated Pixel Data we keep ranges of (16 bytes each): a crafted stored
/// instance of empty items must not turn a viewer's request into gigabytes of memory. Real
/// multi-frame instances have one fragment per frame, a few thousand at most.
pub const MAX_FRAGMENTS: usize = 262_144;
/// Largest Basic Offset Table we read (4 bytes a frame: a million frames).
pub const MAX_OFFSET_TABLE_BYTES: u32 = 4 * 1024 * 1024;

/// Where a large value is, for its `BulkDataURI`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bulk {
    /// The top-level Pixel Data (native or encapsulated).
    PixelData,
    /// A value of `length` bytes at `offset` of the (inflated) data set.
    Range { offset: u64, length: u64 },
}

/// Where the top-level Pixel Data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PixelData {
    /// Native: the value's offset in the data set and its length.
    Native { offset: u64, length: u64 },
    /// Encapsulated: the Basic Offset Table and every fragment (value offset, length). The
    /// fragments are only listed when the walk did not stop at the Pixel Data.
    Encapsulated { offset_table: Vec<u32>, fragments: Vec<(u64, u64)> },
}

/// What a walk found.
#[derive(Debug, Clone)]
pub struct Walked {
    /// The DICOM JSON object of the data set.
    pub attrs: Map<String, Value>,
    pub pixel: Option<PixelData>,
}

impl Walked {
    /// The first value of a top-level numeric attribute.
    pub fn number(&self, tag: u32) -> Option<u64> {
        let v = &self.attrs.get(&tag_key(tag))?["Value"][0];
        v.as_u64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
    }
}

/// Options of a walk.
#[derive(Debug, Clone, Copy)]
pub struct WalkOptions {
    /// Binary values longer than this become bulk data.
    pub inline_max: u64,
    /// Stop right after the top-level Pixel Data header (metadata needs nothing after it, and
    /// then the pixels are never read).
    pub stop_at_pixel_data: bool,
}

/// `GGGGEEEE`.
pub fn tag_key(tag: u32) -> String {
    format!("{tag:08X}")
}

/// Walks a whole data set from `r`. `bulk_uri` names the bulk data of an element.
pub fn walk(
    r: impl Read,
    explicit_vr: bool,
    opts: WalkOptions,
    bulk_uri: &dyn Fn(Bulk) -> String,
) -> io::Result<Walked> {
    let mut w = Walker {
        r,
        pos: 0,
        opts,
        bulk_uri,
        codec: SpecificCharacterSet::default(),
        pixel: None,
        stopped: false,
    };
    let attrs = w.elements(!explicit_vr, Until::Eof, 0)?;
    Ok(Walked { attrs, pixel: w.pixel })
}

#[derive(Debug, Clone, Copy)]
enum Until {
    /// Top level: the end of the stream.
    Eof,
    /// A defined-length item: this offset.
    Offset(u64),
    /// An undefined-length item: the item delimiter.
    Delimiter,
}

struct Walker<'a, R> {
    r: R,
    pos: u64,
    opts: WalkOptions,
    bulk_uri: &'a dyn Fn(Bulk) -> String,
    codec: SpecificCharacterSet,
    pixel: Option<PixelData>,
    stopped: bool,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<R: Read> Walker<'_, R> {
    /// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end before the first byte.
    fn read_or_eof(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(bad(format!(
                        "data set ends inside an element (byte {})",
                        self.pos
                    )));
                }
                Ok(n) => {
                    got += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() || self.read_or_eof(buf)? {
            Ok(())
        } else {
            Err(bad(format!("data set ends early (byte {})", self.pos)))
        }
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let copied = io::copy(&mut (&mut self.r).take(n), &mut io::sink())?;
        self.pos += copied;
        if copied < n {
            return Err(bad(format!("data set ends inside a value (byte {})", self.pos)));
        }
        Ok(())
    }

    fn read_value(&mut self, n: u64) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n as usize];
        self.read_exact(&mut v)?;
        Ok(v)
    }

    fn elements(
        &mut self,
        implicit: bool,
        until: Until,
        depth: usize,
    ) -> io::Result<Map<String, Value>> {
        if depth > MAX_DEPTH {
            return Err(bad("sequences nested too deeply"));
        }
        let mut out = Map::new();
        loop {
            if self.stopped {
                return Ok(out);
            }
            if let Until::Offset(end) = until {
                if self.pos == end {
                    return Ok(out);
                }
                if self.pos > end {
                    return Err(bad("an element overruns its item"));
                }
            }
            let mut h = [0u8; 8];
            if !self.read_or_eof(&mut h)? {
                return match until {
                    Until::Eof => Ok(out),
                    _ => Err(bad("data set ends inside an item")),
                };
            }
            let group = u16::from_le_bytes([h[0], h[1]]);
            let element = u16::from_le_bytes([h[2], h[3]]);
            let tag = (u32::from(group) << 16) | u32::from(element);
            if tag == ITEM_DELIMITER {
                if matches!(until, Until::Delimiter) {
                    return Ok(out);
                }
                return Err(bad("unexpected item delimiter"));
            }
            if group == 0xFFFE {
                return Err(bad(format!("unexpected delimiter ({group:04X},{element:04X})")));
            }
            let (vr, len) = if implicit {
                (implicit_vr(tag), u32::from_le_bytes([h[4], h[5], h[6], h[7]]))
            } else {
                let code = [h[4], h[5]];
                let vr = VR::from_binary(code)
                    .ok_or_else(|| bad(format!("invalid VR in ({group:04X},{element:04X})")))?;
                if long_length(vr) {
                    let mut l = [0u8; 4];
                    self.read_exact(&mut l)?;
                    (vr, u32::from_le_bytes(l))
                } else {
                    (vr, u32::from(u16::from_le_bytes([h[6], h[7]])))
                }
            };
            let value_start = self.pos;
            let top = depth == 0;
            let entry = if tag == PIXEL_DATA && top {
                self.pixel_data(vr, len, value_start)?
            } else if len == UNDEFINED {
                if vr == VR::SQ || vr == VR::UN || implicit {
                    // Inside an undefined-length UN the content is implicit VR (PS3.5 6.2.2).
                    let inner = implicit || vr == VR::UN;
                    let items = self.sequence(inner, None, depth)?;
                    json!({"vr": "SQ", "Value": items})
                } else {
                    return Err(bad(format!(
                        "undefined length on ({group:04X},{element:04X}) {vr:?}"
                    )));
                }
            } else if vr == VR::SQ {
                let items = self.sequence(implicit, Some(value_start + u64::from(len)), depth)?;
                json!({"vr": "SQ", "Value": items})
            } else {
                self.value(tag, vr, u64::from(len), value_start)?
            };
            if tag == 0x0008_0005
                && let Some(cs) = entry["Value"][0].as_str()
            {
                self.codec = crate::dataset::charset_codec(cs);
            }
            // Group lengths are deprecated in data sets and meaningless after any change.
            if element != 0x0000 {
                out.insert(tag_key(tag), entry);
            }
        }
    }

    fn sequence(
        &mut self,
        implicit: bool,
        end: Option<u64>,
        depth: usize,
    ) -> io::Result<Vec<Value>> {
        let mut items = Vec::new();
        loop {
            if let Some(e) = end
                && self.pos >= e
            {
                return Ok(items);
            }
            let mut h = [0u8; 8];
            self.read_exact(&mut h)?;
            let tag = (u32::from(u16::from_le_bytes([h[0], h[1]])) << 16)
                | u32::from(u16::from_le_bytes([h[2], h[3]]));
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            match tag {
                SEQUENCE_DELIMITER if end.is_none() => return Ok(items),
                ITEM if len == UNDEFINED => {
                    items.push(Value::Object(self.elements(
                        implicit,
                        Until::Delimiter,
                        depth + 1,
                    )?));
                }
                ITEM => {
                    let until = Until::Offset(self.pos + u64::from(len));
                    items.push(Value::Object(self.elements(implicit, until, depth + 1)?));
                }
                _ => return Err(bad(format!("expected an item, found ({:08X})", tag))),
            }
        }
    }

    fn pixel_data(&mut self, vr: VR, len: u32, start: u64) -> io::Result<Value> {
        let vr_text = if vr == VR::OW { "OW" } else { "OB" };
        if len == UNDEFINED {
            let mut table = Vec::new();
            let mut fragments = Vec::new();
            if self.opts.stop_at_pixel_data {
                self.stopped = true;
                self.pixel = Some(PixelData::Encapsulated { offset_table: table, fragments });
                return Ok(json!({"vr": vr_text, "BulkDataURI": (self.bulk_uri)(Bulk::PixelData)}));
            }
            let mut first = true;
            loop {
                let mut h = [0u8; 8];
                self.read_exact(&mut h)?;
                let tag = (u32::from(u16::from_le_bytes([h[0], h[1]])) << 16)
                    | u32::from(u16::from_le_bytes([h[2], h[3]]));
                let l = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
                match tag {
                    SEQUENCE_DELIMITER => break,
                    ITEM if l != UNDEFINED => {
                        if first {
                            if !l.is_multiple_of(4) || l > MAX_OFFSET_TABLE_BYTES {
                                return Err(bad("bad Basic Offset Table"));
                            }
                            let v = self.read_value(u64::from(l))?;
                            table = v
                                .chunks_exact(4)
                                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                                .collect();
                        } else {
                            if fragments.len() == MAX_FRAGMENTS {
                                return Err(bad("too many Pixel Data fragments"));
                            }
                            fragments.push((self.pos, u64::from(l)));
                            self.skip(u64::from(l))?;
                        }
                        first = false;
                    }
                    _ => return Err(bad("bad item in encapsulated Pixel Data")),
                }
            }
            self.pixel = Some(PixelData::Encapsulated { offset_table: table, fragments });
        } else {
            self.pixel = Some(PixelData::Native { offset: start, length: u64::from(len) });
            if self.opts.stop_at_pixel_data {
                self.stopped = true;
            } else {
                self.skip(u64::from(len))?;
            }
        }
        if len == 0 {
            return Ok(json!({"vr": vr_text}));
        }
        Ok(json!({"vr": vr_text, "BulkDataURI": (self.bulk_uri)(Bulk::PixelData)}))
    }

    fn value(&mut self, tag: u32, vr: VR, len: u64, start: u64) -> io::Result<Value> {
        let vr_text = vr.to_string();
        if len == 0 {
            return Ok(json!({"vr": vr_text}));
        }
        let binary = matches!(vr, VR::OB | VR::OD | VR::OF | VR::OL | VR::OV | VR::OW | VR::UN);
        if (binary && len > self.opts.inline_max) || len > MAX_INLINE_TEXT {
            self.skip(len)?;
            let uri = (self.bulk_uri)(Bulk::Range { offset: start, length: len });
            return Ok(json!({"vr": vr_text, "BulkDataURI": uri}));
        }
        let v = self.read_value(len)?;
        if binary {
            let b64 = base64::engine::general_purpose::STANDARD.encode(&v);
            return Ok(json!({"vr": vr_text, "InlineBinary": b64}));
        }
        let values = decode_values(tag, vr, &v, &self.codec);
        if values.is_empty() {
            return Ok(json!({"vr": vr_text}));
        }
        Ok(json!({"vr": vr_text, "Value": values}))
    }
}

/// The VR of an element in an implicit VR data set, from the standard dictionary.
fn implicit_vr(tag: u32) -> VR {
    let (group, element) = ((tag >> 16) as u16, tag as u16);
    if element == 0 {
        return VR::UL;
    }
    if group % 2 == 1 {
        return if (0x0010..=0x00FF).contains(&element) { VR::LO } else { VR::UN };
    }
    match StandardDataDictionary.by_tag(Tag(group, element)).map(|e| e.vr()) {
        Some(VirtualVr::Exact(vr)) => vr,
        Some(VirtualVr::Xs) => VR::US,
        Some(VirtualVr::Px | VirtualVr::Ox | VirtualVr::Lt) => VR::OW,
        _ => VR::UN,
    }
}

/// The VR of an attribute from the dictionary (for query keys and index attributes).
pub fn dictionary_vr(tag: u32) -> VR {
    implicit_vr(tag)
}

fn long_length(vr: VR) -> bool {
    matches!(
        vr,
        VR::OB
            | VR::OD
            | VR::OF
            | VR::OL
            | VR::OV
            | VR::OW
            | VR::SQ
            | VR::SV
            | VR::UC
            | VR::UN
            | VR::UR
            | VR::UT
            | VR::UV
    )
}

/// The JSON values of one element's value bytes.
pub fn decode_values(tag: u32, vr: VR, v: &[u8], codec: &SpecificCharacterSet) -> Vec<Value> {
    let nums = |size: usize, f: &dyn Fn(&[u8]) -> Value| -> Vec<Value> {
        v.chunks_exact(size).map(f).collect()
    };
    match vr {
        VR::US => nums(2, &|c| json!(u16::from_le_bytes([c[0], c[1]]))),
        VR::SS => nums(2, &|c| json!(i16::from_le_bytes([c[0], c[1]]))),
        VR::UL => nums(4, &|c| json!(u32::from_le_bytes(c.try_into().unwrap_or_default()))),
        VR::SL => nums(4, &|c| json!(i32::from_le_bytes(c.try_into().unwrap_or_default()))),
        VR::UV => nums(8, &|c| json!(u64::from_le_bytes(c.try_into().unwrap_or_default()))),
        VR::SV => nums(8, &|c| json!(i64::from_le_bytes(c.try_into().unwrap_or_default()))),
        VR::FL => {
            nums(4, &|c| float(f64::from(f32::from_le_bytes(c.try_into().unwrap_or_default()))))
        }
        VR::FD => nums(8, &|c| float(f64::from_le_bytes(c.try_into().unwrap_or_default()))),
        VR::AT => nums(4, &|c| {
            let g = u16::from_le_bytes([c[0], c[1]]);
            let e = u16::from_le_bytes([c[2], c[3]]);
            json!(format!("{g:04X}{e:04X}"))
        }),
        _ => {
            let text = match vr {
                VR::SH | VR::LO | VR::ST | VR::LT | VR::UC | VR::UT | VR::PN => {
                    codec.decode(v).unwrap_or_else(|_| String::from_utf8_lossy(v).into_owned())
                }
                _ => String::from_utf8_lossy(v).into_owned(),
            };
            let _ = tag;
            text_values(vr, &text)
        }
    }
}

fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// Values of a text attribute (already decoded): split, trimmed, typed for IS/DS/PN.
pub fn text_values(vr: VR, text: &str) -> Vec<Value> {
    let single = matches!(vr, VR::LT | VR::ST | VR::UT | VR::UR);
    let text = text.trim_end_matches(['\0', ' ']);
    if text.is_empty() {
        return Vec::new();
    }
    if single {
        return vec![json!(text)];
    }
    text.split('\\')
        .map(|s| {
            let s = s.trim_matches([' ', '\0']);
            if s.is_empty() {
                return Value::Null;
            }
            match vr {
                VR::IS => s.parse::<i64>().map_or_else(|_| json!(s), |n| json!(n)),
                VR::DS => s
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map_or_else(|| json!(s), Value::Number),
                VR::PN => {
                    let mut o = Map::new();
                    for (name, part) in
                        ["Alphabetic", "Ideographic", "Phonetic"].iter().zip(s.split('='))
                    {
                        if !part.is_empty() {
                            o.insert((*name).into(), json!(part));
                        }
                    }
                    Value::Object(o)
                }
                _ => json!(s),
            }
        })
        .collect()
}

/// Byte ranges of every frame, in one pass over the fragments (for the whole Pixel Data of a
/// multi-frame instance: calling [`frame_ranges`] per frame costs frames × fragments).
pub fn all_frame_ranges(
    pixel: &PixelData,
    frames: u64,
    frame_size: Option<u64>,
) -> Result<Vec<Vec<(u64, u64)>>, String> {
    if frames > MAX_FRAGMENTS as u64 {
        return Err(format!("{frames} frames is more than this server serves in one response"));
    }
    match pixel {
        PixelData::Encapsulated { offset_table, fragments }
            if frames > 1
                && fragments.len() as u64 != frames
                && offset_table.len() as u64 == frames
                && !fragments.is_empty() =>
        {
            let base = fragments[0].0.saturating_sub(8);
            let mut out = vec![Vec::new(); frames as usize];
            for &(o, l) in fragments {
                let rel = o.saturating_sub(8).saturating_sub(base);
                // The frame whose offset is the last one not above `rel`.
                let i = offset_table.partition_point(|&t| u64::from(t) <= rel);
                if i > 0 {
                    out[i - 1].push((o, l));
                }
            }
            Ok(out)
        }
        _ => (1..=frames).map(|f| frame_ranges(pixel, f, frames, frame_size)).collect(),
    }
}

/// Byte ranges (offset, length) of frame `n` (1-based) of `frames` frames, or why not.
pub fn frame_ranges(
    pixel: &PixelData,
    n: u64,
    frames: u64,
    frame_size: Option<u64>,
) -> Result<Vec<(u64, u64)>, String> {
    if n == 0 || n > frames {
        return Err(format!("frame {n} does not exist (the instance has {frames})"));
    }
    match pixel {
        PixelData::Native { offset, length } => {
            let size = frame_size.ok_or("the frame size cannot be computed (Rows, Columns, Samples per Pixel or Bits Allocated missing, or Bits Allocated 1)")?;
            // Checked: Number of Frames and the frame size come from a stored, maybe crafted,
            // instance.
            let beyond = || format!("frame {n} lies beyond the Pixel Data");
            let start = (n - 1).checked_mul(size).ok_or_else(beyond)?;
            if start.checked_add(size).is_none_or(|end| end > *length) {
                return Err(beyond());
            }
            Ok(vec![(offset + start, size)])
        }
        PixelData::Encapsulated { offset_table, fragments } => {
            if fragments.is_empty() {
                return Err("the Pixel Data has no fragments".into());
            }
            if frames == 1 {
                return Ok(fragments.clone());
            }
            if fragments.len() as u64 == frames {
                return Ok(vec![fragments[(n - 1) as usize]]);
            }
            if offset_table.len() as u64 == frames {
                // Offsets are from the first fragment's item tag (8 bytes before its value).
                let base = fragments[0].0.saturating_sub(8);
                let lo = u64::from(offset_table[(n - 1) as usize]);
                let hi = offset_table.get(n as usize).map_or(u64::MAX, |v| u64::from(*v));
                return Ok(fragments
                    .iter()
                    .filter(|(o, _)| {
                        let rel = o.saturating_sub(8).saturating_sub(base);
                        rel >= lo && rel < hi
                    })
                    .copied()
                    .collect());
            }
            Err("the frames of this encapsulated Pixel Data cannot be told apart (no Basic Offset Table)".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_frame_ranges_equals_frame_by_frame_and_is_bounded() {
        let base = 1000u64;
        let fragments = vec![(base, 16), (base + 24, 8), (base + 40, 8), (base + 56, 4)];
        let pixel = PixelData::Encapsulated { offset_table: vec![0, 24, 40], fragments };
        let one_pass = all_frame_ranges(&pixel, 3, None).unwrap();
        let by_frame: Vec<_> = (1..=3).map(|f| frame_ranges(&pixel, f, 3, None).unwrap()).collect();
        assert_eq!(one_pass, by_frame);
        assert_eq!(one_pass[2].len(), 2);
        let native = PixelData::Native { offset: 10, length: 40 };
        assert_eq!(all_frame_ranges(&native, 4, Some(10)).unwrap().len(), 4);
        // Crafted geometry: overflow and absurd frame counts are errors, not panics.
        assert!(frame_ranges(&native, u64::MAX, u64::MAX, Some(u64::MAX)).is_err());
        assert!(all_frame_ranges(&native, 1 << 40, Some(1)).is_err());
    }

    fn explicit(tag: u32, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
        out.extend_from_slice(&(tag as u16).to_le_bytes());
        out.extend_from_slice(vr);
        let vr_parsed = VR::from_binary(*vr).unwrap();
        if long_length(vr_parsed) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    fn uri(b: Bulk) -> String {
        match b {
            Bulk::PixelData => "px".into(),
            Bulk::Range { offset, length } => format!("{offset}.{length}"),
        }
    }

    #[test]
    fn values_sequences_and_bulk() {
        let mut ds = Vec::new();
        ds.extend(explicit(0x0008_0060, b"CS", b"CT"));
        ds.extend(explicit(0x0010_0010, b"PN", b"Doe^John=Ideo"));
        ds.extend(explicit(0x0018_0050, b"DS", b"1.5\\2 "));
        ds.extend(explicit(0x0020_0013, b"IS", b"7 "));
        ds.extend(explicit(0x0028_0010, b"US", &512u16.to_le_bytes()));
        let item = explicit(0x0008_0100, b"SH", b"ABC ");
        let mut seq_item = vec![0xFE, 0xFF, 0x00, 0xE0];
        seq_item.extend_from_slice(&(item.len() as u32).to_le_bytes());
        seq_item.extend(item);
        ds.extend(explicit(0x0008_1032, b"SQ", &seq_item));
        ds.extend(explicit(0x0009_1001, b"OB", &[1, 2, 3, 4]));
        let big_at = ds.len() as u64 + 12;
        ds.extend(explicit(0x0009_1002, b"OB", &[9; 100]));
        ds.extend(explicit(0x7FE0_0010, b"OW", &[0; 8]));
        let w =
            walk(&ds[..], true, WalkOptions { inline_max: 16, stop_at_pixel_data: false }, &uri)
                .unwrap();
        let a = Value::Object(w.attrs.clone());
        assert_eq!(a["00080060"], json!({"vr": "CS", "Value": ["CT"]}));
        assert_eq!(
            a["00100010"]["Value"][0],
            json!({"Alphabetic": "Doe^John", "Ideographic": "Ideo"})
        );
        assert_eq!(a["00180050"]["Value"], json!([1.5, 2.0]));
        assert_eq!(a["00200013"]["Value"], json!([7]));
        assert_eq!(a["00081032"]["Value"][0]["00080100"]["Value"][0], "ABC");
        assert_eq!(a["00091001"]["InlineBinary"], "AQIDBA==");
        assert_eq!(a["00091002"]["BulkDataURI"], format!("{big_at}.100"));
        assert_eq!(a["7FE00010"]["BulkDataURI"], "px");
        assert_eq!(w.number(0x0028_0010), Some(512));
        assert_eq!(w.number(0x0020_0013), Some(7));
        let Some(PixelData::Native { offset, length: 8 }) = w.pixel else { panic!() };
        assert_eq!(offset, ds.len() as u64 - 8);
        assert!(
            frame_ranges(w.pixel.as_ref().unwrap(), 2, 2, Some(4)).unwrap()
                == vec![(offset + 4, 4)]
        );
        // Truncated data sets are errors.
        assert!(
            walk(
                &ds[..ds.len() - 3],
                true,
                WalkOptions { inline_max: 16, stop_at_pixel_data: false },
                &uri
            )
            .is_err()
        );
    }
}
