//! Errors of the log writer and reader.

use std::io;

use thiserror::Error;

/// Everything that can go wrong writing or reading a log.
#[derive(Debug, Error)]
pub enum LogError {
    /// The stream holds no byte at all.
    #[error("empty file: not an ftvm log")]
    Empty,
    /// The stream does not start with the magic.
    #[error("not an ftvm log (it does not start with \"FTVMLOG\\0\")")]
    NotALog,
    /// The magic is right but the format version is not the one this build reads.
    #[error("log format version {found}, this ftvm reads {supported}")]
    UnsupportedVersion { found: u32, supported: u32 },
    /// The stream ends before the header frame is complete: there is nothing to replay.
    #[error("log ends inside its header (at byte offset {offset})")]
    TruncatedHeader { offset: u64 },
    /// A frame is damaged. `frame` is the frame's number, which is also the LSN it must carry
    /// (the header is frame 0).
    #[error("corrupt log at byte offset {offset}, frame {frame} (expected LSN {frame}): {what}")]
    Corrupt { offset: u64, frame: u64, what: Corruption },
    /// The underlying reader or writer failed. The reader keeps its state: a later `next()`
    /// resumes (useful for non-blocking sources).
    #[error("log I/O error: {0}")]
    Io(#[from] io::Error),
    /// The writer's size limit would be passed; only an END record can still be appended.
    #[error("log size limit of {limit} bytes reached ({written} bytes written, the record needs {needed} more)")]
    SizeLimit { limit: u64, written: u64, needed: u64 },
    /// Records must be appended in exit order (positions are delta-coded, never negative).
    #[error("record at exit {exit} comes after a record at exit {prev}: exit indexes must not decrease")]
    ExitOrder { prev: u64, exit: u64 },
    /// An END record closes the log.
    #[error("the log already ended: nothing can be appended after END")]
    AfterEnd,
    /// A record too large for one frame.
    #[error("record of {len} bytes exceeds the frame limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u64 },
    /// The caller handed an inconsistent record or header.
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    /// A write failed earlier, so the stream may hold a partial frame; the writer refuses to
    /// go on rather than produce a corrupt log.
    #[error("the log writer failed earlier and cannot continue")]
    WriterFailed,
    /// The reader already reported corruption; it does not skip past it.
    #[error("the log reader stopped at an earlier error")]
    ReaderFailed,
}

impl LogError {
    /// The byte offset that the error refers to, when there is one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            LogError::Corrupt { offset, .. } | LogError::TruncatedHeader { offset } => Some(*offset),
            _ => None,
        }
    }
}

/// What exactly is wrong with a corrupt frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Corruption {
    /// The length word's check bits do not match its length bits.
    #[error("bad length word {word:#010x} (its check bits do not match)")]
    BadLengthWord { word: u32 },
    /// A body too short to hold an LSN and a kind.
    #[error("frame body of {len} bytes is too short")]
    ShortFrame { len: u32 },
    /// The body's CRC32 differs from the stored one.
    #[error("CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc { stored: u32, computed: u32 },
    /// The frame carries another LSN than the next one.
    #[error("LSN gap: found LSN {found}")]
    LsnGap { found: u64 },
    /// A record kind this format does not define.
    #[error("unknown record kind {0:#04x}")]
    UnknownKind(u8),
    /// The payload does not decode as its kind.
    #[error("undecodable {kind} record: {why}")]
    Undecodable { kind: &'static str, why: String },
    /// The header frame is missing or its JSON is not a header.
    #[error("bad header: {0}")]
    BadHeader(String),
    /// A record follows END.
    #[error("a record follows END")]
    AfterEnd,
}
