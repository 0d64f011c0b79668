//! Encrypted blob files for large objects (DICOM instances, bulk data).
//!
//! File format (version 1), all integers big-endian:
//!
//! ```text
//! "HMSB" | version u8 = 1 | log2(chunk size) u8 | salt [32]
//! chunk 0 ciphertext+tag | chunk 1 ... | final chunk (shorter than a full chunk, possibly empty)
//! ```
//!
//! Each blob gets its own AES-256-GCM key, `HKDF(blob key, salt = random 32 bytes)`, so nonces are
//! fresh per blob by construction and can simply count chunks. The chunk nonce is
//! `chunk index (u64) || last-chunk flag (u32)` and the blob id is the associated data of every
//! chunk: chunks cannot be reordered, truncated, extended or moved to another blob without the read
//! failing with an integrity error (the STREAM construction of Hoang et al.).
//!
//! Writes stream in bounded memory (one chunk) into a temporary file that is fsynced, renamed into
//! place and whose directory is fsynced before the caller is told the blob exists. Only then may a
//! database row reference it; blob files without a row are swept at start (see [`super::Store`]).

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};

use hms_edge_config::keys::Key;

const MAGIC: &[u8; 4] = b"HMSB";
const FORMAT_VERSION: u8 = 1;
const CHUNK_LOG2: u8 = 16;
/// Plaintext bytes per chunk (64 KiB): the memory a blob write or read needs.
pub const CHUNK_SIZE: usize = 1 << CHUNK_LOG2;
const TAG_LEN: usize = 16;
const SALT_LEN: usize = 32;
const HEADER_LEN: usize = 4 + 1 + 1 + SALT_LEN;
const CHUNK_KEY_LABEL: &[u8] = b"hms-edge/v1/blob-chunk";

/// A blob's identity: 128 random bits, hex. Also its file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobId(String);

impl BlobId {
    pub fn new_random() -> Self {
        let mut b = [0u8; 16];
        rand::fill(&mut b);
        BlobId(hex::encode(b))
    }

    /// Accepts only the 32-lowercase-hex form (ids also come back from the database).
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| BlobId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the index stores about a finished blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobMeta {
    pub id: BlobId,
    /// Plaintext length, bytes.
    pub size: u64,
    /// SHA-256 (hex) of the plaintext after the header given to [`BlobStore::create_with_header`]
    /// (the whole plaintext for [`BlobStore::create`]). For a DICOM instance that is the data set
    /// as received: one pass of hashing serves the index's duplicate check and the blob record.
    pub sha256: String,
}

/// The blob folder and the key blobs are encrypted under.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    key: Key,
}

impl BlobStore {
    /// Opens (creating) `root` with its 256 fan-out folders and `tmp/`, all fsynced once here so
    /// that a blob write only needs to fsync its own fan-out folder.
    pub fn open(root: &Path, key: Key) -> io::Result<Self> {
        create_private_dir(root)?;
        let tmp = root.join("tmp");
        create_private_dir(&tmp)?;
        for i in 0..=255u8 {
            create_private_dir(&root.join(format!("{i:02x}")))?;
        }
        super::fsync_dir(root)?;
        Ok(BlobStore { root: root.to_owned(), key })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Final path of a blob: `<root>/<first two hex digits>/<id>`.
    pub fn path_of(&self, id: &BlobId) -> PathBuf {
        self.root.join(&id.0[..2]).join(&id.0)
    }

    /// Starts a streaming write of a new blob.
    pub fn create(&self) -> io::Result<BlobWriter> {
        self.create_with_header(&[])
    }

    /// Starts a streaming write whose first bytes are `unhashed`, stored (encrypted) like the rest
    /// but left out of the blob's SHA-256.
    pub fn create_with_header(&self, unhashed: &[u8]) -> io::Result<BlobWriter> {
        self.create_as(&BlobId::new_random(), unhashed)
    }

    /// As [`BlobStore::create_with_header`], for a blob with a given id: an offloaded blob
    /// brought back, so that the rows referencing it keep their meaning. The file appears under
    /// its name only at [`BlobWriter::finish`].
    pub fn create_as(&self, id: &BlobId, unhashed: &[u8]) -> io::Result<BlobWriter> {
        let id = id.clone();
        let tmp_path =
            self.root.join("tmp").join(format!("{}.{:016x}.tmp", id.0, rand::random::<u64>()));
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp_path)?;
        let mut salt = [0u8; SALT_LEN];
        rand::fill(&mut salt);
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&[FORMAT_VERSION, CHUNK_LOG2]);
        header.extend_from_slice(&salt);
        file.write_all(&header)?;
        let cipher = chunk_cipher(&self.key, &salt);
        let mut writer = BlobWriter {
            final_path: self.path_of(&id),
            id,
            tmp_path,
            file: Some(file),
            cipher,
            buf: Vec::with_capacity(CHUNK_SIZE * 2),
            chunk_index: 0,
            size: 0,
            hasher: Sha256::new(),
        };
        writer.append(unhashed, false)?;
        Ok(writer)
    }

    /// Writes a whole in-memory blob (small objects, tests).
    pub fn put(&self, data: &[u8]) -> io::Result<BlobMeta> {
        let mut w = self.create()?;
        w.write_all(data)?;
        w.finish()
    }

    /// Opens a blob for streaming, authenticated reading.
    pub fn open_reader(&self, id: &BlobId) -> io::Result<BlobReader> {
        let mut file =
            BufReader::with_capacity(CHUNK_SIZE + TAG_LEN, File::open(self.path_of(id))?);
        let mut header = [0u8; HEADER_LEN];
        file.read_exact(&mut header).map_err(|_| integrity_error(id))?;
        if &header[..4] != MAGIC || header[4] != FORMAT_VERSION || header[5] != CHUNK_LOG2 {
            return Err(integrity_error(id));
        }
        let cipher = chunk_cipher(&self.key, &header[6..]);
        Ok(BlobReader {
            id: id.clone(),
            file,
            cipher,
            chunk_index: 0,
            plain: Vec::new(),
            pos: 0,
            done: false,
        })
    }

    /// Reads a whole blob into memory (small objects, tests).
    pub fn get(&self, id: &BlobId) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_reader(id)?.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Removes a blob file (after the row referencing it is gone).
    pub fn remove(&self, id: &BlobId) -> io::Result<()> {
        match std::fs::remove_file(self.path_of(id)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Every blob file present on disk (for the orphan sweep), and removes leftover temp files.
    pub(crate) fn list_and_clean_tmp(&self) -> io::Result<Vec<BlobId>> {
        for entry in std::fs::read_dir(self.root.join("tmp"))? {
            std::fs::remove_file(entry?.path())?;
        }
        let mut ids = Vec::new();
        for i in 0..=255u8 {
            for entry in std::fs::read_dir(self.root.join(format!("{i:02x}")))? {
                let entry = entry?;
                if let Some(id) = entry.file_name().to_str().and_then(BlobId::parse) {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }
}

fn create_private_dir(p: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn chunk_cipher(key: &Key, salt: &[u8]) -> Aes256Gcm {
    let k = key.derive_with(CHUNK_KEY_LABEL, salt);
    Aes256Gcm::new_from_slice(k.expose()).expect("32-byte key")
}

fn chunk_nonce(index: u64, last: bool) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_be_bytes());
    n[8..].copy_from_slice(&u32::from(last).to_be_bytes());
    n.into()
}

fn integrity_error(id: &BlobId) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("blob {} failed its integrity check (tampered, truncated or wrong key)", id.0),
    )
}

/// A blob being written. Dropping it without [`BlobWriter::finish`] deletes the temp file: an
/// aborted transfer leaves nothing behind.
pub struct BlobWriter {
    id: BlobId,
    tmp_path: PathBuf,
    final_path: PathBuf,
    file: Option<File>,
    cipher: Aes256Gcm,
    buf: Vec<u8>,
    chunk_index: u64,
    size: u64,
    hasher: Sha256,
}

impl BlobWriter {
    pub fn id(&self) -> &BlobId {
        &self.id
    }

    /// Plaintext bytes written so far.
    pub fn len(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// SHA-256 (hex) of the hashed bytes written so far: what [`BlobWriter::finish`] would
    /// record, known before the blob is committed to its name.
    pub fn sha256_so_far(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    fn append(&mut self, data: &[u8], hashed: bool) -> io::Result<()> {
        if hashed {
            self.hasher.update(data);
        }
        self.size += data.len() as u64;
        self.buf.extend_from_slice(data);
        // Full chunks are emitted as they fill; the final chunk (written by `finish`) is always
        // shorter than CHUNK_SIZE, possibly empty, which is how the reader recognises it.
        while self.buf.len() >= CHUNK_SIZE {
            self.emit(CHUNK_SIZE, false)?;
        }
        Ok(())
    }

    fn emit(&mut self, len: usize, last: bool) -> io::Result<()> {
        let ct = self
            .cipher
            .encrypt(
                &chunk_nonce(self.chunk_index, last),
                Payload { msg: &self.buf[..len], aad: self.id.0.as_bytes() },
            )
            .map_err(|_| io::Error::other("blob encryption failed"))?;
        self.file.as_mut().expect("open until finish").write_all(&ct)?;
        self.buf.drain(..len);
        self.chunk_index += 1;
        Ok(())
    }

    /// Flushes the last chunk, fsyncs the file, renames it into place and fsyncs its folder.
    /// When this returns the blob survives power loss.
    pub fn finish(mut self) -> io::Result<BlobMeta> {
        let len = self.buf.len();
        self.emit(len, true)?;
        let file = self.file.take().expect("open until finish");
        file.sync_data()?;
        drop(file);
        std::fs::rename(&self.tmp_path, &self.final_path)?;
        super::fsync_parent(&self.final_path)?;
        let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        Ok(BlobMeta { id: self.id.clone(), size: self.size, sha256 })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.append(data, true)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Streaming, authenticated reader: every chunk is verified before its bytes are returned.
pub struct BlobReader {
    id: BlobId,
    file: BufReader<File>,
    cipher: Aes256Gcm,
    chunk_index: u64,
    plain: Vec<u8>,
    pos: usize,
    done: bool,
}

impl BlobReader {
    fn next_chunk(&mut self) -> io::Result<()> {
        let mut ct = vec![0u8; CHUNK_SIZE + TAG_LEN];
        let mut filled = 0;
        while filled < ct.len() {
            match self.file.read(&mut ct[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        let last = filled < ct.len();
        ct.truncate(filled);
        let plain = self
            .cipher
            .decrypt(
                &chunk_nonce(self.chunk_index, last),
                Payload { msg: &ct, aad: self.id.0.as_bytes() },
            )
            .map_err(|_| integrity_error(&self.id))?;
        self.chunk_index += 1;
        self.plain = plain;
        self.pos = 0;
        self.done = last;
        Ok(())
    }
}

impl Read for BlobReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(&dir.path().join("blobs"), Key::from_bytes([3; 32])).unwrap();
        (dir, s)
    }

    #[test]
    fn round_trips_at_chunk_boundaries() {
        let (_d, s) = store();
        for len in [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE, 200_001] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let meta = s.put(&data).unwrap();
            assert_eq!(meta.size, len as u64);
            assert_eq!(meta.sha256, hex::encode(Sha256::digest(&data)));
            assert_eq!(s.get(&meta.id).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn a_header_is_stored_but_not_hashed() {
        let (_d, s) = store();
        let body = vec![7u8; CHUNK_SIZE + 5];
        let mut w = s.create_with_header(b"HEADER").unwrap();
        w.write_all(&body).unwrap();
        let meta = w.finish().unwrap();
        assert_eq!(meta.size, body.len() as u64 + 6);
        assert_eq!(meta.sha256, hex::encode(Sha256::digest(&body)));
        assert_eq!(s.get(&meta.id).unwrap(), [b"HEADER".as_slice(), &body].concat());
    }

    #[test]
    fn plaintext_is_not_on_disk() {
        let (_d, s) = store();
        let marker = b"PLAINTEXT-MARKER-0123456789".repeat(1000);
        let meta = s.put(&marker).unwrap();
        let raw = std::fs::read(s.path_of(&meta.id)).unwrap();
        assert!(!raw.windows(16).any(|w| w == &marker[..16]));
    }

    #[test]
    fn tampering_truncation_and_swaps_are_detected() {
        let (_d, s) = store();
        let data = vec![42u8; 3 * CHUNK_SIZE + 10];
        let meta = s.put(&data).unwrap();
        let path = s.path_of(&meta.id);
        let orig = std::fs::read(&path).unwrap();

        let mut flipped = orig.clone();
        flipped[HEADER_LEN + CHUNK_SIZE + 100] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let err = s.get(&meta.id).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("integrity"));

        // Truncated exactly at a chunk boundary.
        std::fs::write(&path, &orig[..HEADER_LEN + 2 * (CHUNK_SIZE + TAG_LEN)]).unwrap();
        assert_eq!(s.get(&meta.id).unwrap_err().kind(), io::ErrorKind::InvalidData);

        // Another blob's file under this id (wrong associated data).
        let other = s.put(&data).unwrap();
        std::fs::copy(s.path_of(&other.id), &path).unwrap();
        assert_eq!(s.get(&meta.id).unwrap_err().kind(), io::ErrorKind::InvalidData);

        std::fs::write(&path, &orig).unwrap();
        assert_eq!(s.get(&meta.id).unwrap(), data);
    }

    #[test]
    fn wrong_key_cannot_read() {
        let (d, s) = store();
        let meta = s.put(b"hello").unwrap();
        let other = BlobStore::open(&d.path().join("blobs"), Key::from_bytes([4; 32])).unwrap();
        assert_eq!(other.get(&meta.id).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn abandoned_writer_leaves_nothing() {
        let (_d, s) = store();
        let mut w = s.create().unwrap();
        w.write_all(&[1u8; 100_000]).unwrap();
        let id = w.id().clone();
        drop(w);
        assert!(!s.path_of(&id).exists());
        assert_eq!(std::fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    }
}
