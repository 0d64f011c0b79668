//! `multipart/related` (RFC 2387 over RFC 2046 framing), no I/O: the writer pieces of the WADO-RS
//! responses and a push parser for STOW-RS request bodies that never holds more than one chunk
//! plus a delimiter's length of a part's body.

use bytes::{Buf, Bytes, BytesMut};

/// Largest header block of one part we accept.
const MAX_PART_HEADERS: usize = 16 * 1024;

/// A fresh random boundary.
pub fn new_boundary() -> String {
    let mut rnd = [0u8; 16];
    rand::fill(&mut rnd);
    format!("hms-edge-{}", hex::encode(rnd))
}

/// The response `Content-Type` of a multipart body of parts of type `part_type`.
pub fn content_type(part_type: &str, boundary: &str) -> String {
    format!("multipart/related; type=\"{part_type}\"; boundary={boundary}")
}

/// The delimiter and headers that open a part (the first part has no leading CRLF).
pub fn part_head(boundary: &str, first: bool, content_type: &str, location: Option<&str>) -> Bytes {
    let mut s = String::with_capacity(128);
    if !first {
        s.push_str("\r\n");
    }
    s.push_str("--");
    s.push_str(boundary);
    s.push_str("\r\nContent-Type: ");
    s.push_str(content_type);
    if let Some(l) = location {
        s.push_str("\r\nContent-Location: ");
        s.push_str(l);
    }
    s.push_str("\r\n\r\n");
    Bytes::from(s)
}

/// The close delimiter (after the last part; also valid for a body of zero parts).
pub fn closing(boundary: &str, any_part: bool) -> Bytes {
    Bytes::from(format!("{}--{boundary}--\r\n", if any_part { "\r\n" } else { "" }))
}

/// A parsed media type: `type/subtype` lowercased and its parameters (names lowercased, quotes
/// removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    pub essence: String,
    pub params: Vec<(String, String)>,
}

impl MediaType {
    pub fn parse(s: &str) -> MediaType {
        let mut it = split_unquoted(s, ';').into_iter();
        let essence = it.next().unwrap_or_default().trim().to_ascii_lowercase();
        let params = it
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                let v = v.trim();
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
                Some((k.trim().to_ascii_lowercase(), v.to_owned()))
            })
            .collect();
        MediaType { essence, params }
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Splits on `sep` outside double quotes.
pub fn split_unquoted(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c == sep && !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// What the parser found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A part begins; its headers as (lowercased name, value).
    Part(Vec<(String, String)>),
    /// Body bytes of the current part.
    Data(Bytes),
    /// The current part ended.
    PartEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter (preamble is ignored).
    Preamble,
    /// Just after a delimiter: `--` (close) or transport padding and CRLF.
    AfterDelimiter,
    Headers,
    Body,
    Done,
}

/// Push parser for a multipart body with a known boundary.
#[derive(Debug)]
pub struct Parser {
    /// `\r\n--boundary`.
    delim: Vec<u8>,
    buf: BytesMut,
    state: State,
}

/// Why a multipart body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed multipart body: {0}")]
pub struct MultipartError(pub String);

impl Parser {
    pub fn new(boundary: &str) -> Result<Parser, MultipartError> {
        if boundary.is_empty() || boundary.len() > 70 {
            return Err(MultipartError("the boundary must be 1 to 70 characters".into()));
        }
        let mut delim = b"\r\n--".to_vec();
        delim.extend_from_slice(boundary.as_bytes());
        // A body may start with the delimiter without the CRLF: pretend one preceded it.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"\r\n");
        Ok(Parser { delim, buf, state: State::Preamble })
    }

    /// Consumes the next bytes, returning what they completed.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<Event>, MultipartError> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Done => {
                    // Epilogue: ignored.
                    self.buf.clear();
                    return Ok(out);
                }
                State::Preamble => match find(&self.buf, &self.delim) {
                    Some(i) => {
                        self.buf.advance(i + self.delim.len());
                        self.state = State::AfterDelimiter;
                    }
                    None => {
                        let keep = self.delim.len().min(self.buf.len());
                        let drop = self.buf.len() - keep;
                        self.buf.advance(drop);
                        return Ok(out);
                    }
                },
                State::AfterDelimiter => {
                    if self.buf.len() < 2 {
                        return Ok(out);
                    }
                    if &self.buf[..2] == b"--" {
                        self.state = State::Done;
                        continue;
                    }
                    match find(&self.buf, b"\r\n") {
                        Some(i) => {
                            if !self.buf[..i].iter().all(|b| *b == b' ' || *b == b'\t') {
                                return Err(MultipartError(
                                    "unexpected bytes after a boundary delimiter".into(),
                                ));
                            }
                            self.buf.advance(i + 2);
                            self.state = State::Headers;
                        }
                        None if self.buf.len() > 256 => {
                            return Err(MultipartError("boundary line too long".into()));
                        }
                        None => return Ok(out),
                    }
                }
                State::Headers => {
                    // An empty header block is a bare CRLF.
                    let end = if self.buf.starts_with(b"\r\n") {
                        Some((0, 2))
                    } else {
                        find(&self.buf, b"\r\n\r\n").map(|i| (i, 4))
                    };
                    match end {
                        Some((i, n)) => {
                            let text = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                            self.buf.advance(i + n);
                            out.push(Event::Part(parse_headers(&text)?));
                            self.state = State::Body;
                        }
                        None if self.buf.len() > MAX_PART_HEADERS => {
                            return Err(MultipartError("part headers too long".into()));
                        }
                        None => return Ok(out),
                    }
                }
                State::Body => match find(&self.buf, &self.delim) {
                    Some(i) => {
                        if i > 0 {
                            out.push(Event::Data(self.buf.split_to(i).freeze()));
                        }
                        self.buf.advance(self.delim.len());
                        out.push(Event::PartEnd);
                        self.state = State::AfterDelimiter;
                    }
                    None => {
                        // Keep what could be the start of a delimiter.
                        let keep = (self.delim.len() - 1).min(self.buf.len());
                        let n = self.buf.len() - keep;
                        if n > 0 {
                            out.push(Event::Data(self.buf.split_to(n).freeze()));
                        }
                        return Ok(out);
                    }
                },
            }
        }
    }

    /// The body ended: it must have been closed by the close delimiter.
    pub fn finish(&self) -> Result<(), MultipartError> {
        match self.state {
            State::Done => Ok(()),
            State::Preamble => Err(MultipartError("no part found (boundary not seen)".into())),
            _ => Err(MultipartError("the body ends before the closing boundary".into())),
        }
    }
}

fn parse_headers(text: &str) -> Result<Vec<(String, String)>, MultipartError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            // Folded continuation.
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
                continue;
            }
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| MultipartError(format!("bad part header line {line:?}")))?;
        out.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    Ok(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..=hay.len() - needle.len()].iter().position(|b| *b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = b"preamble to ignore\r\n".to_vec();
        for (i, (ct, data)) in parts.iter().enumerate() {
            out.extend_from_slice(&part_head(boundary, i == 0, ct, None));
            out.extend_from_slice(data);
        }
        out.extend_from_slice(&closing(boundary, !parts.is_empty()));
        out
    }

    fn parse_in_pieces(boundary: &str, data: &[u8], piece: usize) -> Vec<(String, Vec<u8>)> {
        let mut p = Parser::new(boundary).unwrap();
        let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
        let mut open = false;
        for chunk in data.chunks(piece) {
            for ev in p.feed(chunk).unwrap() {
                match ev {
                    Event::Part(h) => {
                        assert!(!open);
                        open = true;
                        let ct = h.iter().find(|(k, _)| k == "content-type").unwrap().1.clone();
                        parts.push((ct, Vec::new()));
                    }
                    Event::Data(b) => parts.last_mut().unwrap().1.extend_from_slice(&b),
                    Event::PartEnd => open = false,
                }
            }
        }
        p.finish().unwrap();
        assert!(!open);
        parts
    }

    #[test]
    fn round_trip_in_any_chunking() {
        let b = new_boundary();
        // Data containing near-delimiters and CRLFs.
        let tricky = format!("x\r\n--{}y\r\n-\r\n--", &b[..b.len() - 1]).into_bytes();
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let parts: Vec<(&str, &[u8])> =
            vec![("application/dicom", &tricky), ("text/plain", b""), ("application/dicom", &big)];
        let data = body(&b, &parts);
        for piece in [1, 2, 3, 7, 64, 1000, data.len()] {
            let got = parse_in_pieces(&b, &data, piece);
            assert_eq!(got.len(), 3, "piece {piece}");
            for ((ct, d), (gct, gd)) in parts.iter().zip(&got) {
                assert_eq!(ct, gct);
                assert_eq!(*d, gd.as_slice(), "piece {piece}");
            }
        }
    }

    #[test]
    fn truncated_and_garbage_bodies_are_refused() {
        let b = "XYZ";
        let data = body(b, &[("application/dicom", b"abc")]);
        let mut p = Parser::new(b).unwrap();
        p.feed(&data[..data.len() - 8]).unwrap();
        assert!(p.finish().is_err());
        let mut p = Parser::new(b).unwrap();
        p.feed(b"no boundary here").unwrap();
        assert!(p.finish().is_err());
        let mut p = Parser::new(b).unwrap();
        assert!(p.feed(b"--XYZjunk\r\n").is_err());
    }

    #[test]
    fn media_types() {
        let m = MediaType::parse(
            "Multipart/Related; type=\"application/dicom\"; boundary=\"a;b\"; transfer-syntax=*",
        );
        assert_eq!(m.essence, "multipart/related");
        assert_eq!(m.param("type"), Some("application/dicom"));
        assert_eq!(m.param("boundary"), Some("a;b"));
        assert_eq!(m.param("transfer-syntax"), Some("*"));
    }
}
