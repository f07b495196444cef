//! An authenticated replication channel: a pre-shared key (PSK), an HMAC-SHA256 on every
//! frame and datagram, and sequence numbers, so that a frame that is not from the peer, that
//! was altered, or that is replayed, duplicated or dropped is rejected and reported as such.
//!
//! # Why this design
//!
//! The two halves of a pair are set up by the same operator, so a key file copied to both
//! hosts is the simplest credential there is: no certificates, no expiry, no clock. An HMAC
//! proves who sent a frame and that it is intact; a sequence number in the MAC'd bytes makes a
//! replayed, duplicated, reordered or dropped frame visible; and fresh random nonces from both
//! sides, mixed into the session keys, make every connection's keys unique, so a frame recorded
//! from an earlier session does not verify in a later one. The traffic is not encrypted: the
//! log holds nothing a host able to watch the link could not learn anyway, and what matters for
//! a fault-tolerant pair is that the backup never replays a forged event and that no one can
//! speak for the primary or the backup.
//!
//! Without a key ([`Key::unauthenticated`]) the channel runs the same protocol under a fixed,
//! public key: sequence numbers and the MAC still catch corruption and bugs, but anyone can
//! compute the MACs; [`Key::is_authenticated`] is false so that callers can warn.
//!
//! # Handshake (protocol version 1)
//!
//! All integers are little-endian. `I` is the initiator (the side that connected: the
//! primary), `R` the responder (the backup); `psk` is the key.
//!
//! ```text
//! I -> R  "FTVMAUTH" (8 bytes), version u32 (1), nonce_i (32 random bytes)
//! R -> I  "FTVMAUTH", version u32 (1), nonce_r (32 random bytes),
//!         proof_r = HMAC(psk, "ftvm-auth-responder" || nonce_i || nonce_r)
//! I -> R  proof_i = HMAC(psk, "ftvm-auth-initiator" || nonce_i || nonce_r)
//! R -> I  0x01 (accepted) or 0x02 (refused, then R closes)
//! ```
//!
//! - A responder that receives anything but the magic closes the connection ("not an ftvm
//!   replication peer"); one that receives another version answers with its own magic and
//!   version before closing, so that both sides can say which versions met.
//! - The initiator checks proof_r and sends proof_i either way, so that with different keys
//!   *both* sides learn it from a MAC check, not from a closed connection. The two proofs use
//!   distinct labels, so neither can be reflected back as the other.
//! - Each side also checks a failed proof against the public unauthenticated key, to tell
//!   "the peer has no key" from "the keys differ".
//!
//! Session keys, one per direction and channel, are `HMAC(psk, label || nonce_i || nonce_r)`
//! with the labels `ftvm-stream-i2r`, `ftvm-stream-r2i`, `ftvm-datagram-i2r` and
//! `ftvm-datagram-r2i`.
//!
//! # Stream frames (TCP, both directions)
//!
//! ```text
//! [len u32][seq u64][payload: len bytes][mac: 32 bytes]
//! mac = HMAC(session key of this direction, seq || len || payload)
//! ```
//!
//! [`SecureWriter`] buffers what is written and sends one frame on each `flush()` and every
//! [`MAX_WRITE_FRAME`] bytes. Sequence numbers start at 0 in each direction and
//! [`SecureReader`] accepts exactly the next one (TCP delivers in order), so any replayed,
//! duplicated, reordered or dropped frame is an error. A frame longer than [`MAX_FRAME`] is
//! refused before anything is allocated for it. The first bad frame fails the reader for good.
//!
//! # Datagrams (UDP heartbeats)
//!
//! ```text
//! [seq u64][payload][mac: 32 bytes]
//! mac = HMAC(datagram session key of this direction, seq || payload)
//! ```
//!
//! Datagrams may be lost or reordered, so [`DatagramOpener`] accepts any sequence number above
//! the highest it accepted so far: a replayed or duplicated datagram is refused, and a late one
//! is dropped like a lost one, which is harmless for heartbeats.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The first bytes of each side's handshake message.
pub const MAGIC: [u8; 8] = *b"FTVMAUTH";
/// The version of this protocol (handshake and framing).
pub const PROTOCOL_VERSION: u32 = 1;
/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// The length of an HMAC-SHA256 tag, on frames and datagrams alike.
pub const MAC_LEN: usize = 32;
/// A stream frame's header: `len` (u32) and `seq` (u64).
pub const FRAME_HEADER_LEN: usize = 12;
/// [`SecureWriter`] sends a frame whenever this many bytes are pending.
pub const MAX_WRITE_FRAME: usize = 64 * 1024;
/// The longest frame payload [`SecureReader`] accepts.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// What sealing adds to a datagram: the sequence number and the MAC.
pub const DATAGRAM_OVERHEAD: usize = 8 + MAC_LEN;

const NONCE_LEN: usize = 32;
const HELLO_LEN: usize = MAGIC.len() + 4 + NONCE_LEN;
/// The responder's verdict on the initiator's proof.
const ACCEPTED: u8 = 0x01;
const REFUSED: u8 = 0x02;
/// A key file larger than this is not a key file.
const MAX_KEY_FILE: u64 = 64 * 1024;
/// The key of a channel without one: public, so it gives integrity only.
const UNAUTHENTICATED_KEY: &[u8] = b"ftvm replication: no key given, integrity only (this key is public)";

const LABEL_PROOF_RESPONDER: &[u8] = b"ftvm-auth-responder";
const LABEL_PROOF_INITIATOR: &[u8] = b"ftvm-auth-initiator";
const LABEL_STREAM_I2R: &[u8] = b"ftvm-stream-i2r";
const LABEL_STREAM_R2I: &[u8] = b"ftvm-stream-r2i";
const LABEL_DATAGRAM_I2R: &[u8] = b"ftvm-datagram-i2r";
const LABEL_DATAGRAM_R2I: &[u8] = b"ftvm-datagram-r2i";

type Nonce = [u8; NONCE_LEN];

#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer does not know our key.
    #[error("authentication failed: {0}")]
    WrongKey(String),
    /// A frame or datagram whose MAC does not match.
    #[error("message {seq} failed its integrity check: altered in transit, forged, or from another session")]
    Altered { seq: u64 },
    /// A frame or datagram with a valid MAC but not the next sequence number.
    #[error("message {seq} is out of sequence (expected {expected}): replayed, duplicated or dropped")]
    Replayed { seq: u64, expected: u64 },
    /// Not an ftvm peer, another protocol version, an oversize frame.
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    KeyFile(String),
}

impl SecureError {
    /// The `SecureError` inside an `io::Error` from [`SecureReader`] or [`SecureWriter`], if
    /// it is one of theirs (and not a plain I/O failure).
    pub fn in_io_error(e: &io::Error) -> Option<&SecureError> {
        e.get_ref()?.downcast_ref()
    }

    /// An equal error, for the reader that reports its failure again on each read.
    fn duplicate(&self) -> SecureError {
        match self {
            SecureError::Io(e) => SecureError::Io(io::Error::new(e.kind(), e.to_string())),
            SecureError::WrongKey(s) => SecureError::WrongKey(s.clone()),
            SecureError::Altered { seq } => SecureError::Altered { seq: *seq },
            SecureError::Replayed { seq, expected } => SecureError::Replayed { seq: *seq, expected: *expected },
            SecureError::Protocol(s) => SecureError::Protocol(s.clone()),
            SecureError::KeyFile(s) => SecureError::KeyFile(s.clone()),
        }
    }

    fn into_io(self) -> io::Error {
        match self {
            SecureError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// A pre-shared key (at least [`MIN_KEY_LEN`] bytes). `Debug` does not show it.
#[derive(Clone)]
pub struct Key {
    bytes: Vec<u8>,
    authenticated: bool,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("authenticated", &self.authenticated).finish_non_exhaustive()
    }
}

impl Key {
    /// Reads a key file: either 32 or more hex characters (surrounding whitespace ignored), or
    /// else its raw bytes, at least [`MIN_KEY_LEN`] of them, used as they are (a trailing
    /// newline included). A file that every user can read is accepted with a warning.
    pub fn load(path: &Path) -> Result<Key, SecureError> {
        let shown = path.display();
        let failed = |e: io::Error| SecureError::KeyFile(format!("key file {shown}: {e}"));
        let file = File::open(path).map_err(failed)?;
        #[cfg(unix)]
        if let Ok(meta) = file.metadata() {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode();
            if mode & 0o004 != 0 {
                tracing::warn!("key file {shown} can be read by every user (mode {:o}): chmod 600 it", mode & 0o7777);
            }
        }
        let mut contents = Vec::new();
        file.take(MAX_KEY_FILE + 1).read_to_end(&mut contents).map_err(failed)?;
        if contents.len() as u64 > MAX_KEY_FILE {
            return Err(SecureError::KeyFile(format!(
                "key file {shown} is larger than {} KiB: not a key file",
                MAX_KEY_FILE / 1024
            )));
        }
        Key::parse(&contents).map_err(|why| SecureError::KeyFile(format!("key file {shown}: {why}")))
    }

    fn parse(contents: &[u8]) -> Result<Key, String> {
        let text = contents.trim_ascii();
        if text.is_empty() {
            return Err("it is empty".into());
        }
        if text.iter().all(u8::is_ascii_hexdigit) {
            if text.len() < 2 * MIN_KEY_LEN {
                return Err(format!(
                    "too short: {} hex characters, a key needs at least {}",
                    text.len(),
                    2 * MIN_KEY_LEN
                ));
            }
            let bytes = decode_hex(text).ok_or_else(|| format!("an odd number ({}) of hex characters", text.len()))?;
            return Ok(Key { bytes, authenticated: true });
        }
        if contents.len() < MIN_KEY_LEN {
            return Err(format!(
                "too short: {} bytes, a key needs at least {MIN_KEY_LEN} bytes (or {} hex characters)",
                contents.len(),
                2 * MIN_KEY_LEN
            ));
        }
        Ok(Key { bytes: contents.to_vec(), authenticated: true })
    }

    /// A key made of these bytes (at least [`MIN_KEY_LEN`]).
    pub fn from_bytes(b: &[u8]) -> Result<Key, SecureError> {
        if b.len() < MIN_KEY_LEN {
            return Err(SecureError::KeyFile(format!(
                "a key of {} bytes is too short: at least {MIN_KEY_LEN} are needed",
                b.len()
            )));
        }
        Ok(Key { bytes: b.to_vec(), authenticated: true })
    }

    /// No key given: the channel still has sequence numbers and an integrity MAC, under a
    /// fixed public key; [`is_authenticated`](Key::is_authenticated) is false.
    pub fn unauthenticated() -> Key {
        Key { bytes: UNAUTHENTICATED_KEY.to_vec(), authenticated: false }
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// A fresh random key (32 bytes) as 64 hex characters, the format of a key file.
    ///
    /// # Panics
    ///
    /// If the host's random source fails, which leaves nothing to make a key from.
    pub fn generate_hex() -> String {
        let mut b = [0u8; 32];
        if let Err(e) = getrandom::fill(&mut b) {
            panic!("the host's random source failed: {e}");
        }
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

/// HMAC-SHA256 of `data` under `key` (a snapshot's manifest is sealed with it).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Result<[u8; 32], SecureError> {
    let mut mac = keyed(key)?;
    mac.update(data);
    Ok(mac.finalize().into_bytes().into())
}

/// Whether `tag` is the HMAC-SHA256 of `data` under `key` (compared in constant time).
pub fn hmac_sha256_verify(key: &[u8], data: &[u8], tag: &[u8]) -> bool {
    keyed(key).is_ok_and(|mut mac| {
        mac.update(data);
        mac.verify_slice(tag).is_ok()
    })
}

/// Fills `buf` from the host's random source.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    getrandom::fill(buf).map_err(|e| io::Error::other(format!("the host's random source failed: {e}")))
}

fn decode_hex(text: &[u8]) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    if text.len() % 2 != 0 {
        return None;
    }
    text.chunks_exact(2).map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?)).collect()
}

/// An HMAC-SHA256 keyed with `key`.
fn keyed(key: &[u8]) -> Result<HmacSha256, SecureError> {
    // HMAC takes keys of any length; the error cannot happen, but is no reason to panic.
    HmacSha256::new_from_slice(key).map_err(|e| SecureError::Protocol(format!("HMAC key: {e}")))
}

/// `HMAC(key, label || nonce_i || nonce_r)`, not finalized yet.
fn prf(key: &[u8], label: &[u8], nonce_i: &Nonce, nonce_r: &Nonce) -> Result<HmacSha256, SecureError> {
    let mut mac = keyed(key)?;
    mac.update(label);
    mac.update(nonce_i);
    mac.update(nonce_r);
    Ok(mac)
}

/// Checks the peer's `proof` under `label`; a mismatch is a `WrongKey` that says, where it
/// can, which side lacks a key.
fn check_proof(ours: &Key, label: &[u8], nonce_i: &Nonce, nonce_r: &Nonce, proof: &[u8]) -> Result<(), SecureError> {
    if prf(&ours.bytes, label, nonce_i, nonce_r)?.verify_slice(proof).is_ok() {
        return Ok(());
    }
    let why = if !ours.authenticated {
        "the peer uses a key (--key-file) and we have none"
    } else if prf(UNAUTHENTICATED_KEY, label, nonce_i, nonce_r)?.verify_slice(proof).is_ok() {
        "the peer has no key (it runs without --key-file) and ours is set"
    } else {
        "the peer's key differs from ours (--key-file)"
    };
    Err(SecureError::WrongKey(why.into()))
}

fn random_nonce() -> Result<Nonce, SecureError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n)
        .map_err(|e| SecureError::Io(io::Error::other(format!("the host's random source failed: {e}"))))?;
    Ok(n)
}

/// The handshake's I/O, all of it before one deadline.
struct Exchange<'a> {
    stream: &'a TcpStream,
    deadline: Option<Instant>,
    timeout: Duration,
}

impl Exchange<'_> {
    /// Sets the socket's timeouts to the time left.
    fn arm(&self, what: &str) -> Result<(), SecureError> {
        let left = match self.deadline {
            None => None,
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Err(self.timed_out(what)),
            },
        };
        self.stream.set_read_timeout(left).map_err(|e| self.failed(e, what))?;
        self.stream.set_write_timeout(left).map_err(|e| self.failed(e, what))
    }

    fn timed_out(&self, what: &str) -> SecureError {
        SecureError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer did not complete the handshake within {:?} ({what})", self.timeout),
        ))
    }

    fn failed(&self, e: io::Error, what: &str) -> SecureError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.timed_out(what),
            kind => SecureError::Io(io::Error::new(kind, format!("handshake ({what}): {e}"))),
        }
    }

    fn send(&self, bytes: &[u8], what: &str) -> Result<(), SecureError> {
        self.arm(what)?;
        let mut s = self.stream;
        s.write_all(bytes).map_err(|e| self.failed(e, what))
    }

    /// Fills `buf`; if the peer closes the connection first, the error is `closed(what it
    /// sent of buf)`.
    fn recv(&self, buf: &mut [u8], what: &str, closed: impl FnOnce(&[u8]) -> SecureError) -> Result<(), SecureError> {
        let mut s = self.stream;
        let mut got = 0;
        while got < buf.len() {
            self.arm(what)?;
            match s.read(&mut buf[got..]) {
                Ok(0) => return Err(closed(&buf[..got])),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => {
                    return Err(closed(&buf[..got]))
                }
                Err(e) => return Err(self.failed(e, what)),
            }
        }
        Ok(())
    }
}

fn hello(nonce: &Nonce) -> Vec<u8> {
    let mut m = Vec::with_capacity(HELLO_LEN);
    m.extend_from_slice(&MAGIC);
    m.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    m.extend_from_slice(nonce);
    m
}

fn not_ftvm(first: &[u8]) -> SecureError {
    SecureError::Protocol(format!("not an ftvm replication peer (first bytes \"{}\")", first.escape_ascii()))
}

fn other_version(v: u32) -> SecureError {
    SecureError::Protocol(format!("the peer speaks protocol version {v}, this ftvm speaks {PROTOCOL_VERSION}"))
}

fn closed_during_handshake(_: &[u8]) -> SecureError {
    SecureError::Protocol("the peer closed the connection in the middle of the handshake".into())
}

/// The start of the peer's hello: the magic (anything else is not an ftvm peer; nothing at
/// all, `closed_silently`) and the protocol version it speaks.
fn recv_hello_start(x: &Exchange<'_>, closed_silently: &str) -> Result<u32, SecureError> {
    let mut magic = [0u8; MAGIC.len()];
    x.recv(&mut magic, "waiting for the peer's hello", |got| {
        if got.is_empty() {
            SecureError::Protocol(closed_silently.into())
        } else {
            not_ftvm(got)
        }
    })?;
    if magic != MAGIC {
        return Err(not_ftvm(&magic));
    }
    let mut version = [0u8; 4];
    x.recv(&mut version, "waiting for the peer's version", closed_during_handshake)?;
    Ok(u32::from_le_bytes(version))
}

fn initiate(x: &Exchange<'_>, key: &Key) -> Result<(Nonce, Nonce), SecureError> {
    let nonce_i = random_nonce()?;
    x.send(&hello(&nonce_i), "sending our hello")?;
    let version = recv_hello_start(
        x,
        "the peer closed the connection without answering: not an ftvm replication peer, or an ftvm without \
         authentication",
    )?;
    if version != PROTOCOL_VERSION {
        return Err(other_version(version));
    }
    let mut rest = [0u8; NONCE_LEN + MAC_LEN];
    x.recv(&mut rest, "waiting for the peer's proof of key", closed_during_handshake)?;
    let (nonce_r, proof_r) = rest.split_at(NONCE_LEN);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(nonce_r);
    let nonce_r = nonce;
    let verdict = check_proof(key, LABEL_PROOF_RESPONDER, &nonce_i, &nonce_r, proof_r);
    // Sent even when the peer's proof failed, so that it learns of the mismatch from a MAC too.
    let proof_i = prf(&key.bytes, LABEL_PROOF_INITIATOR, &nonce_i, &nonce_r)?.finalize().into_bytes();
    let sent = x.send(&proof_i, "sending our proof of key");
    verdict?;
    sent?;
    let refused = || SecureError::WrongKey("the peer refused our key (--key-file)".into());
    let mut answer = [0u8; 1];
    x.recv(&mut answer, "waiting for the peer to accept our key", |_| refused())?;
    if answer[0] != ACCEPTED {
        return Err(refused());
    }
    Ok((nonce_i, nonce_r))
}

fn respond(x: &Exchange<'_>, key: &Key) -> Result<(Nonce, Nonce), SecureError> {
    let version = recv_hello_start(x, "the peer closed the connection without a handshake")?;
    if version != PROTOCOL_VERSION {
        // Our magic and version, so that the peer can say which versions met.
        let mut ours = MAGIC.to_vec();
        ours.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        let _ = x.send(&ours, "answering another version");
        return Err(other_version(version));
    }
    let mut nonce_i = [0u8; NONCE_LEN];
    x.recv(&mut nonce_i, "waiting for the peer's nonce", closed_during_handshake)?;
    let nonce_r = random_nonce()?;
    let mut answer = hello(&nonce_r);
    answer.extend_from_slice(&prf(&key.bytes, LABEL_PROOF_RESPONDER, &nonce_i, &nonce_r)?.finalize().into_bytes());
    x.send(&answer, "sending our hello and proof of key")?;
    let mut proof_i = [0u8; MAC_LEN];
    x.recv(&mut proof_i, "waiting for the peer's proof of key", |_| {
        SecureError::WrongKey(
            "the peer closed the connection instead of proving its key: its key (--key-file) probably differs from \
             ours"
                .into(),
        )
    })?;
    if let Err(e) = check_proof(key, LABEL_PROOF_INITIATOR, &nonce_i, &nonce_r, &proof_i) {
        let _ = x.send(&[REFUSED], "refusing the peer's key");
        return Err(e);
    }
    x.send(&[ACCEPTED], "accepting the peer's key")?;
    Ok((nonce_i, nonce_r))
}

/// Runs the handshake on a connected stream, within `timeout`. `initiator` is the side that
/// connected (the primary). Returns the two halves of the stream and the keys for this
/// session's datagrams. The stream's timeouts are cleared on success.
pub fn handshake(
    stream: TcpStream,
    key: &Key,
    initiator: bool,
    timeout: Duration,
) -> Result<(SecureWriter, SecureReader, DatagramKeys), SecureError> {
    let x = Exchange { stream: &stream, deadline: Instant::now().checked_add(timeout), timeout };
    let (nonce_i, nonce_r) = if initiator { initiate(&x, key)? } else { respond(&x, key)? };
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    let session = |label: &[u8]| -> Result<HmacSha256, SecureError> {
        keyed(&prf(&key.bytes, label, &nonce_i, &nonce_r)?.finalize().into_bytes())
    };
    let (i2r, r2i) = (session(LABEL_STREAM_I2R)?, session(LABEL_STREAM_R2I)?);
    let (d_i2r, d_r2i) = (session(LABEL_DATAGRAM_I2R)?, session(LABEL_DATAGRAM_R2I)?);
    let (send, recv, d_send, d_recv) = if initiator { (i2r, r2i, d_i2r, d_r2i) } else { (r2i, i2r, d_r2i, d_i2r) };
    let writer = SecureWriter::new(stream.try_clone()?, send);
    let reader = SecureReader::new(stream, recv);
    Ok((writer, reader, DatagramKeys { send: d_send, recv: d_recv, next_seq: Arc::new(AtomicU64::new(0)) }))
}

/// The sending half of the channel: what is written is buffered and goes out as one frame on
/// each `flush()`, and whenever [`MAX_WRITE_FRAME`] bytes are pending. Bytes not flushed when
/// it is dropped are discarded (a flush on drop could block on a dead peer). After a failed
/// send, every write fails: the peer cannot tell where the broken frame ends.
pub struct SecureWriter {
    stream: TcpStream,
    mac: HmacSha256,
    next_seq: u64,
    /// Room for the frame header, then the pending payload.
    frame: Vec<u8>,
    broken: bool,
}

impl fmt::Debug for SecureWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureWriter")
            .field("next_seq", &self.next_seq)
            .field("pending", &self.pending())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl SecureWriter {
    fn new(stream: TcpStream, mac: HmacSha256) -> SecureWriter {
        let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + MAX_WRITE_FRAME + MAC_LEN);
        frame.resize(FRAME_HEADER_LEN, 0);
        SecureWriter { stream, mac, next_seq: 0, frame, broken: false }
    }

    /// Shuts the socket down both ways (which also ends the [`SecureReader`] of this
    /// connection). Errors, such as a connection already gone, are ignored.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn pending(&self) -> usize {
        self.frame.len() - FRAME_HEADER_LEN
    }

    fn broken_error() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "the authenticated channel failed earlier: a frame was cut short")
    }

    /// Seals `payload` into frames (each at most [`MAX_WRITE_FRAME`] long) and returns their
    /// bytes, for the caller to send in order on [`Self::stream`]; the next frame, sent or
    /// sealed, follows them. Nothing may be pending (`write` without a `flush`).
    pub fn seal(&mut self, payload: &[u8]) -> io::Result<Vec<u8>> {
        if self.broken {
            return Err(Self::broken_error());
        }
        debug_assert_eq!(self.pending(), 0, "seal() with bytes written and not flushed");
        let mut out = Vec::with_capacity(payload.len() + FRAME_HEADER_LEN + MAC_LEN);
        for chunk in payload.chunks(MAX_WRITE_FRAME) {
            let seq = self.next_seq;
            self.next_seq = seq
                .checked_add(1)
                .ok_or_else(|| SecureError::Protocol("the stream's sequence numbers are exhausted".into()).into_io())?;
            let len = chunk.len() as u32;
            let mut mac = self.mac.clone();
            mac.update(&seq.to_le_bytes());
            mac.update(&len.to_le_bytes());
            mac.update(chunk);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(&mac.finalize().into_bytes());
        }
        Ok(out)
    }

    /// The socket frames from [`Self::seal`] go out on.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends the pending bytes as one frame (nothing if none are pending).
    fn send_frame(&mut self) -> io::Result<()> {
        if self.broken {
            return Err(Self::broken_error());
        }
        let len = self.pending();
        if len == 0 {
            return Ok(());
        }
        let seq = self.next_seq;
        let next = seq
            .checked_add(1)
            .ok_or_else(|| SecureError::Protocol("the stream's sequence numbers are exhausted".into()).into_io())?;
        let len = u32::try_from(len).map_err(|_| io::Error::other("frame too long"))?;
        self.frame[0..4].copy_from_slice(&len.to_le_bytes());
        self.frame[4..12].copy_from_slice(&seq.to_le_bytes());
        let mut mac = self.mac.clone();
        mac.update(&seq.to_le_bytes());
        mac.update(&len.to_le_bytes());
        mac.update(&self.frame[FRAME_HEADER_LEN..]);
        self.frame.extend_from_slice(&mac.finalize().into_bytes());
        let sent = self.stream.write_all(&self.frame);
        self.frame.truncate(FRAME_HEADER_LEN);
        match sent {
            Ok(()) => {
                self.next_seq = next;
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }
}

impl Write for SecureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.broken {
            return Err(Self::broken_error());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pending() >= MAX_WRITE_FRAME {
            self.send_frame()?;
        }
        let n = buf.len().min(MAX_WRITE_FRAME - self.pending());
        self.frame.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_frame()?;
        self.stream.flush()
    }
}

/// The receiving half of the channel: yields the verified payloads in order. On a frame whose
/// MAC does not match, whose sequence number is not the next one, or that is longer than
/// [`MAX_FRAME`], a read fails with `io::ErrorKind::InvalidData` around the [`SecureError`]
/// (see [`SecureError::in_io_error`]); the reader remembers it ([`failure`](Self::failure))
/// and every later read fails the same way. A read timeout or other I/O error loses nothing:
/// the next read goes on where it stopped. The peer closing the connection between frames is
/// the end of the stream (`Ok(0)`), in the middle of one an `UnexpectedEof` error.
pub struct SecureReader {
    stream: TcpStream,
    mac: HmacSha256,
    next_seq: u64,
    /// Received bytes; `buf[lo..hi]` are not parsed yet.
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
    /// The verified payload not yet read, inside `buf` (before `lo`).
    plain: Range<usize>,
    failure: Option<SecureError>,
    /// Bytes of the current frame's payload not yet read, as of the last read: zero at the
    /// end of each frame (one flush of the sender).
    buffered: Arc<AtomicUsize>,
}

impl fmt::Debug for SecureReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureReader")
            .field("next_seq", &self.next_seq)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

/// Why no frame came.
enum NoFrame {
    /// A failure of the connection, not of the peer: reported, not remembered.
    Io(io::Error),
    /// A bad frame: the channel is done for.
    Bad(SecureError),
}

impl SecureReader {
    fn new(stream: TcpStream, mac: HmacSha256) -> SecureReader {
        let buf = vec![0u8; 2 * (FRAME_HEADER_LEN + MAX_WRITE_FRAME + MAC_LEN)];
        SecureReader {
            stream,
            mac,
            next_seq: 0,
            buf,
            lo: 0,
            hi: 0,
            plain: 0..0,
            failure: None,
            buffered: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A gauge of the current frame's payload bytes not yet read, updated by every read: a
    /// reader above can tell where a frame (one flush of the sender) ends (the backup
    /// acknowledges there).
    pub fn buffered_gauge(&self) -> Arc<AtomicUsize> {
        self.buffered.clone()
    }

    /// The bad frame that ended this channel, if one did.
    pub fn failure(&self) -> Option<&SecureError> {
        self.failure.as_ref()
    }

    /// The socket's read timeout (as `TcpStream::set_read_timeout`: `Some(Duration::ZERO)`
    /// is an error).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    /// Shuts the socket down both ways, as [`SecureWriter::shutdown`].
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Verifies the next frame and makes its payload `plain`. `Ok(false)`: the peer closed
    /// the connection at a frame boundary.
    fn next_frame(&mut self) -> Result<bool, NoFrame> {
        loop {
            let avail = &self.buf[self.lo..self.hi];
            let need = if avail.len() < FRAME_HEADER_LEN {
                FRAME_HEADER_LEN
            } else {
                let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]);
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&avail[4..12]);
                let seq = u64::from_le_bytes(seq);
                let n = len as usize;
                if n > MAX_FRAME {
                    return Err(NoFrame::Bad(SecureError::Protocol(format!(
                        "frame {seq} claims {n} bytes, more than the limit of {} MiB: corrupt stream or not an ftvm \
                         peer",
                        MAX_FRAME >> 20
                    ))));
                }
                let total = FRAME_HEADER_LEN + n + MAC_LEN;
                if avail.len() >= total {
                    let payload = &avail[FRAME_HEADER_LEN..FRAME_HEADER_LEN + n];
                    let mut mac = self.mac.clone();
                    mac.update(&seq.to_le_bytes());
                    mac.update(&len.to_le_bytes());
                    mac.update(payload);
                    if mac.verify_slice(&avail[FRAME_HEADER_LEN + n..total]).is_err() {
                        return Err(NoFrame::Bad(SecureError::Altered { seq }));
                    }
                    if seq != self.next_seq {
                        return Err(NoFrame::Bad(SecureError::Replayed { seq, expected: self.next_seq }));
                    }
                    self.next_seq = seq.checked_add(1).ok_or_else(|| {
                        NoFrame::Bad(SecureError::Protocol("the stream's sequence numbers are exhausted".into()))
                    })?;
                    let start = self.lo + FRAME_HEADER_LEN;
                    self.plain = start..start + n;
                    self.lo += total;
                    return Ok(true);
                }
                total
            };
            // More bytes are needed; no payload is left to read, so the buffer can move.
            if self.lo > 0 {
                self.buf.copy_within(self.lo..self.hi, 0);
                self.hi -= self.lo;
                self.lo = 0;
                self.plain = 0..0;
            }
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
            match self.stream.read(&mut self.buf[self.hi..]) {
                Ok(0) if self.hi == self.lo => return Ok(false),
                Ok(0) => {
                    return Err(NoFrame::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the peer closed the connection in the middle of frame {}", self.next_seq),
                    )))
                }
                Ok(n) => self.hi += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(NoFrame::Io(e)),
            }
        }
    }
}

impl Read for SecureReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(f) = &self.failure {
            return Err(f.duplicate().into_io());
        }
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.plain.is_empty() {
                let n = out.len().min(self.plain.len());
                out[..n].copy_from_slice(&self.buf[self.plain.start..self.plain.start + n]);
                self.plain.start += n;
                self.buffered.store(self.plain.len(), Ordering::Relaxed);
                return Ok(n);
            }
            match self.next_frame() {
                Ok(true) => {} // possibly an empty payload: on to the next frame
                Ok(false) => return Ok(0),
                Err(NoFrame::Io(e)) => return Err(e),
                Err(NoFrame::Bad(e)) => {
                    let reported = e.duplicate().into_io();
                    self.failure = Some(e);
                    return Err(reported);
                }
            }
        }
    }
}

/// The keys for this session's UDP datagrams (the heartbeats), one per direction.
#[derive(Clone)]
pub struct DatagramKeys {
    send: HmacSha256,
    recv: HmacSha256,
    /// Shared by all the sealers, so that no two datagrams carry the same number.
    next_seq: Arc<AtomicU64>,
}

impl fmt::Debug for DatagramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramKeys").finish_non_exhaustive()
    }
}

impl DatagramKeys {
    /// Seals the datagrams this side sends. All the sealers of a session share one sequence.
    pub fn sealer(&self) -> DatagramSealer {
        DatagramSealer { mac: self.send.clone(), next_seq: self.next_seq.clone() }
    }

    /// Opens the datagrams the peer sends. Each opener keeps its own highest sequence number.
    pub fn opener(&self) -> DatagramOpener {
        DatagramOpener { mac: self.recv.clone(), highest: None }
    }
}

/// Seals datagrams: `[seq u64][payload][mac]`, see the [module documentation](self).
pub struct DatagramSealer {
    mac: HmacSha256,
    next_seq: Arc<AtomicU64>,
}

impl fmt::Debug for DatagramSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramSealer")
            .field("next_seq", &self.next_seq.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl DatagramSealer {
    /// The datagram to send for `payload` ([`DATAGRAM_OVERHEAD`] bytes longer).
    pub fn seal(&mut self, payload: &[u8]) -> Vec<u8> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed).to_le_bytes();
        let mut mac = self.mac.clone();
        mac.update(&seq);
        mac.update(payload);
        let mut d = Vec::with_capacity(DATAGRAM_OVERHEAD + payload.len());
        d.extend_from_slice(&seq);
        d.extend_from_slice(payload);
        d.extend_from_slice(&mac.finalize().into_bytes());
        d
    }
}

/// Opens datagrams sealed by the peer's [`DatagramSealer`].
pub struct DatagramOpener {
    mac: HmacSha256,
    highest: Option<u64>,
}

impl fmt::Debug for DatagramOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramOpener").field("highest", &self.highest).finish_non_exhaustive()
    }
}

impl DatagramOpener {
    /// The payload of `datagram`. Refuses a datagram too short to be sealed (`Protocol`), one
    /// whose MAC does not match (`Altered`) and one numbered at or below the highest accepted
    /// so far (`Replayed`).
    pub fn open(&mut self, datagram: &[u8]) -> Result<Vec<u8>, SecureError> {
        if datagram.len() < DATAGRAM_OVERHEAD {
            return Err(SecureError::Protocol(format!(
                "a datagram of {} bytes is too short to be sealed (at least {DATAGRAM_OVERHEAD})",
                datagram.len()
            )));
        }
        let (body, tag) = datagram.split_at(datagram.len() - MAC_LEN);
        let (seq, payload) = body.split_at(8);
        let mut mac = self.mac.clone();
        mac.update(seq);
        mac.update(payload);
        let mut n = [0u8; 8];
        n.copy_from_slice(seq);
        let seq = u64::from_le_bytes(n);
        if mac.verify_slice(tag).is_err() {
            return Err(SecureError::Altered { seq });
        }
        if let Some(highest) = self.highest {
            if seq <= highest {
                return Err(SecureError::Replayed { seq, expected: highest.saturating_add(1) });
            }
        }
        self.highest = Some(seq);
        Ok(payload.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener, UdpSocket};
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::thread;

    const T: Duration = Duration::from_secs(10);

    type Session = (SecureWriter, SecureReader, DatagramKeys);

    fn key(b: u8) -> Key {
        Key::from_bytes(&[b; 32]).unwrap()
    }

    fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    /// A responder with `key` on a fresh listener: its address and its handshake's outcome.
    fn responder(key: &Key) -> (SocketAddr, thread::JoinHandle<Result<Session, SecureError>>) {
        let (l, addr) = listener();
        let key = key.clone();
        (addr, thread::spawn(move || handshake(l.accept().unwrap().0, &key, false, T)))
    }

    /// An initiator with `ki` and a responder with `kr`, over localhost: both outcomes.
    fn pair(ki: &Key, kr: &Key) -> (Result<Session, SecureError>, Result<Session, SecureError>) {
        let (addr, r) = responder(kr);
        let i = handshake(TcpStream::connect(addr).unwrap(), ki, true, T);
        (i, r.join().unwrap())
    }

    fn ok_pair() -> (Session, Session) {
        let (i, r) = pair(&key(7), &key(7));
        (i.unwrap(), r.unwrap())
    }

    /// A man in the middle between an initiator and the responder at `target`: it forwards the
    /// handshake as it is, then passes each initiator-to-responder frame through `tamper`
    /// (its index and bytes; it returns what to forward instead).
    fn relay(target: SocketAddr, mut tamper: impl FnMut(usize, Vec<u8>) -> Vec<u8> + Send + 'static) -> SocketAddr {
        let (l, addr) = listener();
        thread::spawn(move || {
            let Ok((mut from_i, _)) = l.accept() else { return };
            let Ok(mut to_r) = TcpStream::connect(target) else { return };
            let (mut r2, mut i2) = (to_r.try_clone().unwrap(), from_i.try_clone().unwrap());
            thread::spawn(move || {
                let _ = io::copy(&mut r2, &mut i2);
                let _ = i2.shutdown(Shutdown::Write);
            });
            let mut hello = [0u8; HELLO_LEN];
            let mut proof = [0u8; MAC_LEN];
            if from_i.read_exact(&mut hello).is_err() || to_r.write_all(&hello).is_err() {
                return;
            }
            if from_i.read_exact(&mut proof).is_err() || to_r.write_all(&proof).is_err() {
                return;
            }
            for index in 0.. {
                let mut header = [0u8; FRAME_HEADER_LEN];
                if from_i.read_exact(&mut header).is_err() {
                    break;
                }
                let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
                let mut frame = header.to_vec();
                frame.resize(FRAME_HEADER_LEN + len + MAC_LEN, 0);
                if from_i.read_exact(&mut frame[FRAME_HEADER_LEN..]).is_err() {
                    break;
                }
                if to_r.write_all(&tamper(index, frame)).is_err() {
                    break;
                }
            }
            let _ = to_r.shutdown(Shutdown::Write);
        });
        addr
    }

    /// A session through [`relay`].
    fn tampered_pair(tamper: impl FnMut(usize, Vec<u8>) -> Vec<u8> + Send + 'static) -> (Session, Session) {
        let (target, r) = responder(&key(7));
        let via = relay(target, tamper);
        let i = handshake(TcpStream::connect(via).unwrap(), &key(7), true, T).unwrap();
        (i, r.join().unwrap().unwrap())
    }

    fn send(w: &mut SecureWriter, frames: &[&[u8]]) {
        for f in frames {
            w.write_all(f).unwrap();
            w.flush().unwrap();
        }
    }

    /// The `SecureError` a failed read carries.
    fn read_failure(r: &mut SecureReader) -> SecureError {
        let mut b = [0u8; 64];
        let e = r.read(&mut b).expect_err("the read should fail");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        SecureError::in_io_error(&e).unwrap_or_else(|| panic!("not a SecureError: {e:?}")).duplicate()
    }

    fn wrong_key_text(r: Result<Session, SecureError>) -> String {
        match r {
            Err(SecureError::WrongKey(why)) => why,
            Err(e) => panic!("expected WrongKey, got {e}"),
            Ok(_) => panic!("expected WrongKey, the handshake succeeded"),
        }
    }

    fn protocol_text<T>(r: Result<T, SecureError>) -> String {
        match r {
            Err(SecureError::Protocol(why)) => why,
            Err(e) => panic!("expected a Protocol error, got {e}"),
            Ok(_) => panic!("expected a Protocol error, it succeeded"),
        }
    }

    #[test]
    fn the_halves_are_send() {
        fn send<T: Send>() {}
        send::<SecureWriter>();
        send::<SecureReader>();
        send::<DatagramKeys>();
        send::<DatagramSealer>();
        send::<DatagramOpener>();
        send::<SecureError>();
    }

    fn message(i: usize) -> Vec<u8> {
        (0..i % 300).map(|j| (i * 31 + j) as u8).collect()
    }

    #[test]
    fn many_frames_both_ways_and_large_writes() {
        let ((mut iw, mut ir, _), (mut rw, mut rr, _)) = ok_pair();
        let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let expected: Vec<u8> = (0..1000).flat_map(message).chain(big.iter().copied()).collect();
        let writer = |mut w: SecureWriter, big: Vec<u8>| {
            thread::spawn(move || {
                for i in 0..1000 {
                    w.write_all(&message(i)).unwrap();
                    w.flush().unwrap();
                }
                let before = w.next_seq;
                w.write_all(&big).unwrap();
                w.flush().unwrap();
                // 1 MiB goes out in frames of at most MAX_WRITE_FRAME.
                assert_eq!(w.next_seq - before, (big.len() / MAX_WRITE_FRAME) as u64);
                w
            })
        };
        let (ti, tr) = (writer(iw, big.clone()), writer(rw, big));
        let len = expected.len();
        let reader = move |mut r: SecureReader| {
            thread::spawn(move || {
                let mut got = vec![0u8; len];
                r.read_exact(&mut got).unwrap();
                (r, got)
            })
        };
        let (hi, hr) = (reader(ir), reader(rr));
        let (got_i, got_r);
        (ir, got_i) = hi.join().unwrap();
        (rr, got_r) = hr.join().unwrap();
        assert!(got_i == expected, "responder to initiator");
        assert!(got_r == expected, "initiator to responder");
        (iw, rw) = (ti.join().unwrap(), tr.join().unwrap());
        // The end of the stream: shut down by the peer, at a frame boundary.
        iw.shutdown();
        assert_eq!(rr.read(&mut [0u8; 16]).unwrap(), 0);
        assert!(rr.failure().is_none() && ir.failure().is_none());
        drop(rw);
    }

    #[test]
    fn small_reads_cross_frame_boundaries() {
        let ((mut w, _, _), (_, mut r, _)) = ok_pair();
        send(&mut w, &[b"abc", b"defgh", b"", b"i", b"jklmnopq"]);
        // Unflushed bytes stay buffered; flushing an empty buffer sends nothing.
        w.write_all(b"rs").unwrap();
        assert_eq!(w.next_seq, 4);
        w.flush().unwrap();
        w.flush().unwrap();
        assert_eq!(w.next_seq, 5);
        let mut got = Vec::new();
        while got.len() < 19 {
            let mut b = [0u8; 3];
            let n = r.read(&mut b).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(got, b"abcdefghijklmnopqrs");
        assert_eq!(r.read(&mut []).unwrap(), 0);
    }

    #[test]
    fn a_read_timeout_loses_nothing() {
        let ((mut w, _, _), (_, mut r, _)) = ok_pair();
        r.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let e = r.read(&mut [0u8; 8]).unwrap_err();
        assert!(matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{e}");
        assert!(r.failure().is_none());
        send(&mut w, &[b"after the timeout"]);
        let mut b = [0u8; 17];
        r.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"after the timeout");
    }

    #[test]
    fn different_keys_fail_on_both_sides() {
        let (i, r) = pair(&key(1), &key(2));
        for why in [wrong_key_text(i), wrong_key_text(r)] {
            assert_eq!(why, "the peer's key differs from ours (--key-file)");
        }
        let e = SecureError::WrongKey("the peer's key differs from ours (--key-file)".into());
        assert_eq!(e.to_string(), "authentication failed: the peer's key differs from ours (--key-file)");
    }

    #[test]
    fn no_key_against_a_key_fails_and_says_which_side_lacks_one() {
        let (i, r) = pair(&Key::unauthenticated(), &key(3));
        assert_eq!(wrong_key_text(i), "the peer uses a key (--key-file) and we have none");
        assert_eq!(wrong_key_text(r), "the peer has no key (it runs without --key-file) and ours is set");
        let (i, r) = pair(&key(3), &Key::unauthenticated());
        assert_eq!(wrong_key_text(i), "the peer has no key (it runs without --key-file) and ours is set");
        assert_eq!(wrong_key_text(r), "the peer uses a key (--key-file) and we have none");
    }

    #[test]
    fn no_key_on_both_sides_still_has_integrity() {
        let k = Key::unauthenticated();
        assert!(!k.is_authenticated() && key(1).is_authenticated());
        let (i, r) = pair(&k, &k);
        let ((mut w, _, _), (_, mut r, _)) = (i.unwrap(), r.unwrap());
        send(&mut w, &[b"integrity only"]);
        let mut b = [0u8; 14];
        r.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"integrity only");
    }

    #[test]
    fn a_peer_speaking_http_is_refused() {
        // To a responder.
        let (addr, r) = responder(&key(1));
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: backup\r\n\r\n").unwrap();
        let why = protocol_text(r.join().unwrap());
        assert_eq!(why, "not an ftvm replication peer (first bytes \"GET / HT\")");
        // The responder closed without an answer.
        assert_eq!(c.read(&mut [0u8; 16]).unwrap_or(0), 0);

        // From a responder.
        let (l, addr) = listener();
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut request = [0u8; HELLO_LEN];
            s.read_exact(&mut request).unwrap();
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        });
        let why = protocol_text(handshake(TcpStream::connect(addr).unwrap(), &key(1), true, T));
        assert_eq!(why, "not an ftvm replication peer (first bytes \"HTTP/1.1\")");
        server.join().unwrap();

        // A peer that closes at once.
        let (l, addr) = listener();
        let server = thread::spawn(move || drop(l.accept().unwrap()));
        let why = protocol_text(handshake(TcpStream::connect(addr).unwrap(), &key(1), true, T));
        assert!(why.starts_with("the peer closed the connection without answering"), "{why}");
        server.join().unwrap();
    }

    #[test]
    fn another_protocol_version_is_refused_on_both_sides() {
        // An initiator from the future.
        let (addr, r) = responder(&key(1));
        let mut c = TcpStream::connect(addr).unwrap();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&2u32.to_le_bytes());
        hello.extend_from_slice(&[0u8; NONCE_LEN]);
        c.write_all(&hello).unwrap();
        assert_eq!(protocol_text(r.join().unwrap()), "the peer speaks protocol version 2, this ftvm speaks 1");
        // It is told our version.
        let mut answer = [0u8; 12];
        c.read_exact(&mut answer).unwrap();
        assert_eq!(&answer[..8], &MAGIC);
        assert_eq!(u32::from_le_bytes(answer[8..].try_into().unwrap()), 1);

        // A responder from the future.
        let (l, addr) = listener();
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut request = [0u8; HELLO_LEN];
            s.read_exact(&mut request).unwrap();
            let mut answer = MAGIC.to_vec();
            answer.extend_from_slice(&7u32.to_le_bytes());
            answer.extend_from_slice(&[0u8; NONCE_LEN + MAC_LEN]);
            s.write_all(&answer).unwrap();
        });
        let why = protocol_text(handshake(TcpStream::connect(addr).unwrap(), &key(1), true, T));
        assert_eq!(why, "the peer speaks protocol version 7, this ftvm speaks 1");
        server.join().unwrap();
    }

    #[test]
    fn a_refusal_after_the_proofs_is_a_wrong_key() {
        // A responder that proves the key, then refuses ours anyway.
        let (l, addr) = listener();
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut request = [0u8; HELLO_LEN];
            s.read_exact(&mut request).unwrap();
            let nonce_i: Nonce = request[12..].try_into().unwrap();
            let nonce_r = [9u8; NONCE_LEN];
            let mut answer = hello(&nonce_r);
            let proof = prf(&key(1).bytes, LABEL_PROOF_RESPONDER, &nonce_i, &nonce_r).unwrap();
            answer.extend_from_slice(&proof.finalize().into_bytes());
            s.write_all(&answer).unwrap();
            s.read_exact(&mut [0u8; MAC_LEN]).unwrap();
            s.write_all(&[REFUSED]).unwrap();
        });
        let why = wrong_key_text(handshake(TcpStream::connect(addr).unwrap(), &key(1), true, T));
        assert_eq!(why, "the peer refused our key (--key-file)");
        server.join().unwrap();

        // An initiator that leaves instead of proving its key.
        let (addr, r) = responder(&key(1));
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(&hello(&[1u8; NONCE_LEN])).unwrap();
        c.read_exact(&mut [0u8; HELLO_LEN + MAC_LEN]).unwrap();
        drop(c);
        assert!(wrong_key_text(r.join().unwrap()).starts_with("the peer closed the connection instead of proving"));
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (l, addr) = listener();
        let _c = TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        let start = Instant::now();
        match handshake(s, &key(1), false, Duration::from_millis(200)) {
            Err(SecureError::Io(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut);
                assert!(e.to_string().contains("did not complete the handshake within 200ms"), "{e}");
            }
            Err(e) => panic!("expected a timeout, got {e}"),
            Ok(_) => panic!("expected a timeout"),
        }
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn an_altered_frame_is_rejected_for_good() {
        let ((mut w, _, _), (_, mut r, _)) = tampered_pair(|index, mut frame| {
            if index == 1 {
                frame[FRAME_HEADER_LEN] ^= 0x20;
            }
            frame
        });
        send(&mut w, &[b"zero", b"one", b"two"]);
        let mut b = [0u8; 4];
        r.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"zero");
        let e = read_failure(&mut r);
        assert!(matches!(e, SecureError::Altered { seq: 1 }), "{e}");
        assert!(e.to_string().starts_with("message 1 failed its integrity check"), "{e}");
        // Remembered; later reads fail the same way, even with good frames behind.
        assert!(matches!(r.failure(), Some(SecureError::Altered { seq: 1 })));
        assert!(matches!(read_failure(&mut r), SecureError::Altered { seq: 1 }));
    }

    #[test]
    fn a_replayed_frame_is_rejected() {
        let ((mut w, _, _), (_, mut r, _)) =
            tampered_pair(|index, frame| if index == 0 { [frame.clone(), frame].concat() } else { frame });
        send(&mut w, &[b"pay 100", b"pay 200"]);
        let mut b = [0u8; 7];
        r.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"pay 100");
        let e = read_failure(&mut r);
        assert!(matches!(e, SecureError::Replayed { seq: 0, expected: 1 }), "{e}");
        assert_eq!(e.to_string(), "message 0 is out of sequence (expected 1): replayed, duplicated or dropped");
    }

    #[test]
    fn a_dropped_frame_is_detected() {
        let ((mut w, _, _), (_, mut r, _)) = tampered_pair(|index, frame| if index == 0 { Vec::new() } else { frame });
        send(&mut w, &[b"lost", b"next"]);
        assert!(matches!(read_failure(&mut r), SecureError::Replayed { seq: 1, expected: 0 }));
    }

    #[test]
    fn a_frame_from_an_earlier_session_is_rejected() {
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let rec = recorded.clone();
        let ((mut w, _, _), (_, mut r, _)) = tampered_pair(move |_, frame| {
            rec.lock().unwrap().push(frame.clone());
            frame
        });
        send(&mut w, &[b"session one"]);
        let mut b = [0u8; 11];
        r.read_exact(&mut b).unwrap();
        let old = recorded.lock().unwrap()[0].clone();

        // The same key, a new connection: the old frame 0 in place of the new frame 0.
        let ((mut w, _, _), (_, mut r, _)) =
            tampered_pair(move |index, frame| if index == 0 { old.clone() } else { frame });
        send(&mut w, &[b"session two"]);
        assert!(matches!(read_failure(&mut r), SecureError::Altered { seq: 0 }));
    }

    #[test]
    fn an_oversize_frame_is_refused_before_it_is_read() {
        let ((mut w, _, _), (_, mut r, _)) = tampered_pair(|_, mut frame| {
            frame[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
            frame
        });
        send(&mut w, &[b"small"]);
        let e = read_failure(&mut r);
        assert!(matches!(&e, SecureError::Protocol(why) if why.contains("more than the limit of 16 MiB")), "{e}");
    }

    #[test]
    fn a_connection_cut_inside_a_frame_is_an_unexpected_eof() {
        let ((mut w, _, _), (_, mut r, _)) = tampered_pair(|_, frame| frame[..frame.len() - 1].to_vec());
        send(&mut w, &[b"cut short"]);
        w.shutdown();
        let e = r.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(r.failure().is_none());
    }

    fn udp() -> (UdpSocket, SocketAddr) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let a = s.local_addr().unwrap();
        (s, a)
    }

    #[test]
    fn datagrams_seal_and_open_and_refuse_tampering() {
        let ((_, _, di), (_, _, dr)) = ok_pair();
        let (a, _) = udp();
        let (b, b_addr) = udp();
        let (mut seal, mut open) = (di.sealer(), dr.opener());
        let deliver = |d: &[u8]| {
            a.send_to(d, b_addr).unwrap();
            let mut buf = [0u8; 1500];
            let (n, _) = b.recv_from(&mut buf).unwrap();
            buf[..n].to_vec()
        };

        let d0 = seal.seal(b"heartbeat 0");
        assert_eq!(d0.len(), 11 + DATAGRAM_OVERHEAD);
        assert_eq!(open.open(&deliver(&d0)).unwrap(), b"heartbeat 0");

        // Altered: payload, sequence number, MAC.
        let d1 = seal.seal(b"heartbeat 1");
        for at in [0, 9, d1.len() - 1] {
            let mut bad = d1.clone();
            bad[at] ^= 1;
            assert!(matches!(open.open(&deliver(&bad)), Err(SecureError::Altered { .. })), "byte {at}");
        }
        assert_eq!(open.open(&deliver(&d1)).unwrap(), b"heartbeat 1");

        // Replayed.
        assert!(matches!(open.open(&deliver(&d1)), Err(SecureError::Replayed { seq: 1, expected: 2 })));
        assert!(matches!(open.open(&d0), Err(SecureError::Replayed { seq: 0, expected: 2 })));

        // Reordered: the late one is dropped, the sequence goes on.
        let (d2, d3, d4) = (seal.seal(b"2"), seal.seal(b"3"), seal.seal(b"4"));
        assert_eq!(open.open(&d3).unwrap(), b"3");
        assert!(matches!(open.open(&d2), Err(SecureError::Replayed { seq: 2, .. })));
        assert_eq!(open.open(&d4).unwrap(), b"4");

        // Two sealers of one session never repeat a number.
        let mut again = di.sealer();
        assert_eq!(open.open(&again.seal(b"5")).unwrap(), b"5");

        // The other direction.
        let mut back = dr.sealer();
        let r0 = back.seal(b"from the backup");
        assert_eq!(di.opener().open(&r0).unwrap(), b"from the backup");
        assert!(matches!(dr.opener().open(&r0), Err(SecureError::Altered { seq: 0 })));
        assert!(matches!(di.opener().open(&di.sealer().seal(b"x")), Err(SecureError::Altered { .. })));

        // Another session's datagram.
        let ((_, _, other), _) = ok_pair();
        assert!(matches!(dr.opener().open(&other.sealer().seal(b"old")), Err(SecureError::Altered { seq: 0 })));
    }

    #[test]
    fn garbage_datagrams_are_errors_not_panics() {
        let ((_, _, d), _) = ok_pair();
        let mut open = d.opener();
        let mut x = 0x1234_5678u32;
        for len in 0..200 {
            let g: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let e = open.open(&g).unwrap_err();
            if len < DATAGRAM_OVERHEAD {
                assert!(matches!(e, SecureError::Protocol(_)));
            } else {
                assert!(matches!(e, SecureError::Altered { .. }));
            }
        }
    }

    /// A fresh file in this test process's temporary folder, mode 0600.
    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-secure-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        path
    }

    fn key_file_error(r: Result<Key, SecureError>) -> String {
        match r {
            Err(SecureError::KeyFile(why)) => why,
            Err(e) => panic!("expected a KeyFile error, got {e}"),
            Ok(k) => panic!("expected a KeyFile error, got {k:?}"),
        }
    }

    #[test]
    fn key_files_hex_and_raw() {
        let hex = Key::generate_hex();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(hex, Key::generate_hex());
        let k = Key::load(&temp_file("hex", format!("  {hex}\n").as_bytes())).unwrap();
        assert_eq!(k.bytes, decode_hex(hex.as_bytes()).unwrap());
        assert!(k.is_authenticated());
        let upper = Key::load(&temp_file("upper", hex.to_uppercase().as_bytes())).unwrap();
        assert_eq!(upper.bytes, k.bytes);

        let raw: Vec<u8> = (0..20u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
        assert_eq!(Key::load(&temp_file("raw", &raw)).unwrap().bytes, raw);
        // Raw text is used as it is, newline included.
        let pass = b"correct horse battery staple\n";
        assert_eq!(Key::load(&temp_file("pass", pass)).unwrap().bytes, pass);

        // A key file every user can read still loads (with a warning).
        let open_file = temp_file("world-readable", hex.as_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&open_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        assert_eq!(Key::load(&open_file).unwrap().bytes, k.bytes);
    }

    #[test]
    fn bad_key_files_say_why() {
        let why = key_file_error(Key::load(&temp_file("short-hex", b"abcd1234\n")));
        assert!(why.ends_with("too short: 8 hex characters, a key needs at least 32"), "{why}");
        let why = key_file_error(Key::load(&temp_file("short-raw", b"\xff\xfe secret")));
        assert!(why.ends_with("too short: 9 bytes, a key needs at least 16 bytes (or 32 hex characters)"), "{why}");
        let why = key_file_error(Key::load(&temp_file("odd-hex", &[b'a'; 33])));
        assert!(why.ends_with("an odd number (33) of hex characters"), "{why}");
        let why = key_file_error(Key::load(&temp_file("empty", b" \n")));
        assert!(why.ends_with("it is empty"), "{why}");
        let why = key_file_error(Key::load(&temp_file("huge", &vec![b'x'; 100_000])));
        assert!(why.ends_with("is larger than 64 KiB: not a key file"), "{why}");
        let missing = std::env::temp_dir().join("ftvm-secure-test-no-such-key");
        let why = key_file_error(Key::load(&missing));
        assert!(why.starts_with(&format!("key file {}: ", missing.display())), "{why}");
        assert!(why.contains("No such file"), "{why}");
        let why = key_file_error(Key::from_bytes(b"short"));
        assert_eq!(why, "a key of 5 bytes is too short: at least 16 are needed");
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let k = Key::from_bytes(b"super-secret-key-material").unwrap();
        let shown = format!("{k:?} {:?}", Key::unauthenticated());
        assert_eq!(shown, "Key { authenticated: true, .. } Key { authenticated: false, .. }");
        let ((w, r, d), _) = ok_pair();
        let shown = format!("{w:?} {r:?} {d:?} {:?} {:?}", d.sealer(), d.opener());
        assert!(!shown.contains("super") && !shown.contains("mac"), "{shown}");
    }
}
