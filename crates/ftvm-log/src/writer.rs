//! The streaming writer: append-only, no seeking, so it works over a file or a socket.

use std::io::Write;

use crate::codec::{self, kind, length_word, put_varint, Ctx, MAX_BODY};
use crate::error::LogError;
use crate::header::LogHeader;
use crate::record::{Lsn, Record};
use crate::{FORMAT_VERSION, MAGIC};

/// Bytes kept free under a size limit so that an END record always fits. An END frame takes at
/// most 8 (prefix) + 10 (LSN) + 1 (kind) + 10 (exit delta) + 1 (reason) = 30 bytes; the rest
/// leaves room for a short `EndReason::Error` message.
pub const END_RESERVE: u64 = 64;

/// Payloads at least this long are tried with LZ4 (kept only when smaller).
pub const DEFAULT_COMPRESS_MIN: usize = 64;

/// Writes a log: magic, version and header frame on creation, then one frame per record.
///
/// Each frame goes out in a single `write_all`; nothing is flushed unless asked (wrap a file in
/// a `BufWriter`, and call [`LogWriter::flush`] when the reader must see everything so far).
pub struct LogWriter<W: Write> {
    w: W,
    next_lsn: Lsn,
    written: u64,
    max_size: Option<u64>,
    compress_min: Option<usize>,
    ctx: Ctx,
    ended: bool,
    failed: bool,
    payload: Vec<u8>,
    frame: Vec<u8>,
}

impl<W: Write> LogWriter<W> {
    /// Starts a log on `w` by writing the magic, the format version and the header frame.
    pub fn new(w: W, header: &LogHeader) -> Result<Self, LogError> {
        if header.format_version != FORMAT_VERSION {
            return Err(LogError::InvalidRecord(format!(
                "header says format version {}, this writer writes {FORMAT_VERSION}",
                header.format_version
            )));
        }
        let json = serde_json::to_vec(header).map_err(|e| LogError::InvalidRecord(format!("header: {e}")))?;
        let mut lw = LogWriter {
            w,
            next_lsn: 0,
            written: 0,
            max_size: None,
            compress_min: Some(DEFAULT_COMPRESS_MIN),
            ctx: Ctx::default(),
            ended: false,
            failed: false,
            payload: Vec::new(),
            frame: Vec::with_capacity(json.len() + 32),
        };
        lw.frame.extend_from_slice(&MAGIC);
        lw.frame.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        lw.build_frame(kind::HEADER, &json)?;
        lw.emit()?;
        Ok(lw)
    }

    /// Refuses appends that would make the log larger than `max` bytes (header included),
    /// keeping [`END_RESERVE`] bytes for an END record, which is never refused.
    pub fn with_max_size(mut self, max: u64) -> Self {
        self.max_size = Some(max);
        self
    }

    /// Compresses payloads of at least `min` bytes when that makes them smaller; `None` turns
    /// compression off.
    pub fn with_compression(mut self, min: Option<usize>) -> Self {
        self.compress_min = min;
        self
    }

    /// Appends one record and returns its LSN.
    ///
    /// Fails without writing anything if the record is out of exit order, inconsistent, too
    /// large, follows END, or would pass the size limit ([`LogError::SizeLimit`]: append an
    /// `End { reason: EndReason::SizeLimit }` next).
    pub fn append(&mut self, rec: &Record) -> Result<Lsn, LogError> {
        if self.failed {
            return Err(LogError::WriterFailed);
        }
        if self.ended {
            return Err(LogError::AfterEnd);
        }
        if rec.exit() < self.ctx.exit() {
            return Err(LogError::ExitOrder { prev: self.ctx.exit(), exit: rec.exit() });
        }
        if let Record::Output { len, data: Some(d), .. } = rec {
            if *len as usize != d.len() {
                return Err(LogError::InvalidRecord(format!("output len {len} but {} data bytes", d.len())));
            }
        }
        // Encode against a copy of the context: nothing changes unless the frame goes out.
        let mut ctx = self.ctx;
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        let mut k = codec::encode(rec, &mut ctx, &mut payload);
        // Entropy is random by definition: LZ4 would only burn time on it.
        let compressible = !matches!(rec, Record::Entropy { .. });
        let compressed = match self.compress_min {
            Some(min) if compressible && payload.len() >= min => codec::compress(&payload),
            _ => None,
        };
        if compressed.is_some() {
            k |= kind::COMPRESSED;
        }
        let built = self.build_frame(k, compressed.as_deref().unwrap_or(&payload));
        self.payload = payload;
        built?;
        let is_end = matches!(rec, Record::End { .. });
        if let (Some(limit), false) = (self.max_size, is_end) {
            let needed = self.frame.len() as u64;
            if self.written + needed + END_RESERVE > limit {
                self.frame.clear();
                return Err(LogError::SizeLimit { limit, written: self.written, needed });
            }
        }
        let lsn = self.next_lsn;
        self.emit()?;
        self.ctx = ctx;
        self.ended = is_end;
        Ok(lsn)
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), LogError> {
        if self.failed {
            return Err(LogError::WriterFailed);
        }
        self.w.flush().map_err(|e| {
            self.failed = true;
            LogError::Io(e)
        })
    }

    /// Bytes written so far, magic and header included.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// The LSN the next record will get.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// Whether an END record was written.
    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn get_ref(&self) -> &W {
        &self.w
    }

    /// Flushes and returns the underlying writer.
    pub fn into_inner(mut self) -> Result<W, LogError> {
        self.flush()?;
        Ok(self.w)
    }

    /// Appends a frame (prefix + LSN + kind + payload) to `self.frame`, which may already hold
    /// the file preamble.
    fn build_frame(&mut self, k: u8, payload: &[u8]) -> Result<(), LogError> {
        let start = self.frame.len();
        self.frame.extend_from_slice(&[0; 8]);
        put_varint(&mut self.frame, self.next_lsn);
        self.frame.push(k);
        self.frame.extend_from_slice(payload);
        let body_len = self.frame.len() - start - 8;
        if body_len > MAX_BODY as usize {
            self.frame.clear();
            return Err(LogError::FrameTooLarge { len: body_len as u64, max: u64::from(MAX_BODY) });
        }
        let crc = crc32fast::hash(&self.frame[start + 8..]);
        self.frame[start..start + 4].copy_from_slice(&length_word(body_len as u32).to_le_bytes());
        self.frame[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    fn emit(&mut self) -> Result<(), LogError> {
        let r = self.w.write_all(&self.frame);
        let n = self.frame.len() as u64;
        self.frame.clear();
        if let Err(e) = r {
            // Part of the frame may be out: appending more would corrupt the stream.
            self.failed = true;
            return Err(LogError::Io(e));
        }
        self.written += n;
        self.next_lsn += 1;
        Ok(())
    }
}
