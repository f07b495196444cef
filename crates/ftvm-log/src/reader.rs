//! The streaming reader. It trusts nothing it reads: lengths are checked before anything is
//! allocated or sliced, and every frame's CRC and LSN are verified before it is decoded.

use std::io::{self, Read};

use crate::codec::{self, kind, parse_length_word, Ctx, Cur};
use crate::error::{Corruption, LogError};
use crate::header::LogHeader;
use crate::record::{Lsn, Record};
use crate::{FORMAT_VERSION, MAGIC};

/// Bytes before the header frame: magic + format version.
pub const PREAMBLE_LEN: u64 = 12;
/// Frame prefix: length word + CRC32.
pub const FRAME_PREFIX_LEN: usize = 8;
/// Read granularity: a claimed frame length only costs memory as its bytes actually arrive.
const READ_CHUNK: usize = 64 << 10;

/// Reads a log frame by frame. Reads are small: wrap a file in a `BufReader`.
///
/// At the end of the stream [`LogReader::next`] returns `Ok(None)`; if the stream ended inside a
/// frame (a torn tail, e.g. the writer crashed), [`LogReader::truncated`] says so and
/// [`LogReader::valid_len`] is the offset just past the last complete frame. The partial frame is
/// kept, so calling `next` again after more bytes arrived (a log still being written) resumes.
pub struct LogReader<R: Read> {
    r: R,
    /// The bytes of the frame being read.
    pending: Vec<u8>,
    /// Offset of `pending[0]`: the end of the last complete frame.
    offset: u64,
    next_lsn: Lsn,
    ctx: Ctx,
    truncated: bool,
    ended: bool,
    failed: bool,
    last_frame_len: u64,
}

impl<R: Read> LogReader<R> {
    /// Checks the magic and format version and reads the header.
    pub fn open(mut r: R) -> Result<(Self, LogHeader), LogError> {
        let mut pre = Vec::with_capacity(PREAMBLE_LEN as usize);
        (&mut r).take(PREAMBLE_LEN).read_to_end(&mut pre)?;
        if pre.is_empty() {
            return Err(LogError::Empty);
        }
        let m = pre.len().min(MAGIC.len());
        if pre[..m] != MAGIC[..m] {
            return Err(LogError::NotALog);
        }
        if pre.len() < PREAMBLE_LEN as usize {
            return Err(LogError::TruncatedHeader { offset: pre.len() as u64 });
        }
        let found = u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]);
        if found != FORMAT_VERSION {
            return Err(LogError::UnsupportedVersion { found, supported: FORMAT_VERSION });
        }
        let mut rd = LogReader {
            r,
            pending: Vec::new(),
            offset: PREAMBLE_LEN,
            next_lsn: 0,
            ctx: Ctx::default(),
            truncated: false,
            ended: false,
            failed: false,
            last_frame_len: 0,
        };
        let Some(len) = rd.fill_frame()? else {
            return Err(LogError::TruncatedHeader { offset: PREAMBLE_LEN + rd.pending.len() as u64 });
        };
        let header = rd.header_body(len).map_err(|what| rd.corrupt(what))?;
        rd.advance(len);
        Ok((rd, header))
    }

    /// The next record, `Ok(None)` at the end of the stream (check [`LogReader::truncated`]).
    #[allow(clippy::should_implement_trait)] // Fallible: an Iterator would hide the error/end distinction.
    pub fn next(&mut self) -> Result<Option<(Lsn, Record)>, LogError> {
        let Some(len) = self.fill_frame()? else { return Ok(None) };
        let rec = self.record_body(len).map_err(|what| self.corrupt(what))?;
        let lsn = self.next_lsn;
        self.ended |= matches!(rec, Record::End { .. });
        self.advance(len);
        Ok(Some((lsn, rec)))
    }

    /// Whether the stream ended inside a frame (a torn tail) at the last `next()`.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// For a torn tail, the offset just past the last complete frame.
    pub fn truncated_at(&self) -> Option<u64> {
        self.truncated.then_some(self.offset)
    }

    /// Offset just past the last complete frame read.
    pub fn valid_len(&self) -> u64 {
        self.offset
    }

    /// Size in bytes of the last frame read (prefix included).
    pub fn last_frame_len(&self) -> u64 {
        self.last_frame_len
    }

    /// The LSN the next record must carry.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// Whether an END record was read.
    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn into_inner(self) -> R {
        self.r
    }

    fn corrupt(&mut self, what: Corruption) -> LogError {
        self.failed = true;
        LogError::Corrupt { offset: self.offset, frame: self.next_lsn, what }
    }

    fn advance(&mut self, len: u32) {
        let n = FRAME_PREFIX_LEN as u64 + u64::from(len);
        self.offset += n;
        self.last_frame_len = n;
        self.next_lsn += 1;
        self.pending.clear();
    }

    /// Reads until `pending` holds `need` bytes; false at end of stream.
    fn fill(&mut self, need: usize) -> io::Result<bool> {
        while self.pending.len() < need {
            let have = self.pending.len();
            self.pending.resize(have + (need - have).min(READ_CHUNK), 0);
            let r = self.r.read(&mut self.pending[have..]);
            let got = *r.as_ref().unwrap_or(&0);
            self.pending.truncate(have + got);
            match r {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads one whole frame into `pending` and checks its length word and CRC. Returns the body
    /// length, or `None` at the end of the stream.
    fn fill_frame(&mut self) -> Result<Option<u32>, LogError> {
        if self.failed {
            return Err(LogError::ReaderFailed);
        }
        if !self.fill(FRAME_PREFIX_LEN)? {
            self.truncated = !self.pending.is_empty();
            return Ok(None);
        }
        let word = u32::from_le_bytes([self.pending[0], self.pending[1], self.pending[2], self.pending[3]]);
        let Some(len) = parse_length_word(word) else {
            return Err(self.corrupt(Corruption::BadLengthWord { word }));
        };
        if len < 2 {
            return Err(self.corrupt(Corruption::ShortFrame { len }));
        }
        if !self.fill(FRAME_PREFIX_LEN + len as usize)? {
            self.truncated = true;
            return Ok(None);
        }
        self.truncated = false;
        let stored = u32::from_le_bytes([self.pending[4], self.pending[5], self.pending[6], self.pending[7]]);
        let computed = crc32fast::hash(&self.pending[FRAME_PREFIX_LEN..]);
        if stored != computed {
            return Err(self.corrupt(Corruption::BadCrc { stored, computed }));
        }
        Ok(Some(len))
    }

    /// The LSN check and kind byte of the frame in `pending`; returns the kind and the payload.
    fn body(&self, len: u32) -> Result<(u8, &[u8]), Corruption> {
        let body = &self.pending[FRAME_PREFIX_LEN..FRAME_PREFIX_LEN + len as usize];
        let mut c = Cur::new(body);
        let bad = |why: String| Corruption::Undecodable { kind: "frame", why };
        let found = c.varint().map_err(bad)?;
        if found != self.next_lsn {
            return Err(Corruption::LsnGap { found });
        }
        let k = c.u8().map_err(bad)?;
        Ok((k, c.rest()))
    }

    fn header_body(&self, len: u32) -> Result<LogHeader, Corruption> {
        let (k, payload) = self.body(len)?;
        if k != kind::HEADER {
            return Err(Corruption::BadHeader(format!("frame 0 is a {} record, not the header", kind::name(k))));
        }
        let h: LogHeader = serde_json::from_slice(payload).map_err(|e| Corruption::BadHeader(e.to_string()))?;
        if h.format_version != FORMAT_VERSION {
            return Err(Corruption::BadHeader(format!(
                "header says format version {}, the file {FORMAT_VERSION}",
                h.format_version
            )));
        }
        Ok(h)
    }

    fn record_body(&mut self, len: u32) -> Result<Record, Corruption> {
        let (k, payload) = self.body(len)?;
        let base = k & !kind::COMPRESSED;
        if !codec::is_record_kind(base) {
            return Err(Corruption::UnknownKind(k));
        }
        if self.ended {
            return Err(Corruption::AfterEnd);
        }
        let bad = |why: String| Corruption::Undecodable { kind: kind::name(base), why };
        let raw;
        let payload = if k & kind::COMPRESSED != 0 {
            raw = codec::decompress(payload).map_err(bad)?;
            &raw[..]
        } else {
            payload
        };
        // `body` borrows `pending`, so decode into a copy of the context and store it after.
        let mut ctx = self.ctx;
        let rec = codec::decode(base, payload, &mut ctx).map_err(bad)?;
        self.ctx = ctx;
        Ok(rec)
    }
}
