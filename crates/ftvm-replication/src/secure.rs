//! An encrypted, authenticated replication channel: a Noise handshake under a pre-shared key
//! (PSK), then every stream frame and every datagram sealed with AES-256-GCM under this
//! session's keys, with sequence numbers, so that a frame that is not from the peer, that was
//! altered, or that is replayed, duplicated, reordered or dropped is rejected and reported as
//! such, and so that nothing that crosses the link can be read by a host that watches it.
//!
//! # Why this design
//!
//! The two halves of a pair are set up by the same operator, so a key file copied to both
//! hosts is the simplest credential there is: no certificates, no expiry, no clock. What
//! crosses the link is secret: a state transfer carries the guest's memory and disks, and the
//! log carries the frames the guest received, its console input and its entropy. So the
//! channel runs the Noise protocol framework (the `snow` crate) with the pattern
//! [`NOISE_PARAMS`], `Noise_NNpsk0_25519_AESGCM_SHA256`:
//!
//! - `NN`: neither side has a static key pair; both send an ephemeral X25519 key, and their
//!   Diffie-Hellman gives every session fresh keys (forward secrecy: a key file stolen later
//!   does not decrypt a recorded session; a frame recorded in an earlier session does not
//!   open in a later one).
//! - `psk0`: the PSK is mixed in before the first message, so the responder learns from the
//!   first message whether the initiator holds the key, and the initiator from the answer.
//!   (rustls, the alternative, has no external-PSK support; Noise needs no certificates.)
//! - `AESGCM`: every host this VMM runs on (x86-64 KVM) has AES-NI and carry-less multiply;
//!   with ring's implementation, sealing and opening a 64 KiB frame costs a fraction of the
//!   HMAC-SHA256 it replaces (ChaCha20-Poly1305 was measured too: see the `#[ignore]` test
//!   `seal_and_open_throughput`).
//!
//! The transport uses snow's `StatelessTransportState`, whose nonces are explicit: each
//! message carries its 64-bit nonce in the clear, the AEAD authenticates it, and the reader
//! checks the number it carries against the one it expects. That tells an altered message
//! (it does not open) from a replayed, dropped or reordered one (it opens, under another
//! number), and it is what datagrams need, which may be lost or arrive out of order.
//!
//! Without a key ([`Key::unauthenticated`], for an explicit `--insecure` flag) the channel
//! runs the same protocol under a fixed, public key: still encrypted against a host that only
//! watches the link (the ephemeral Diffie-Hellman), but anyone can speak for either side (a
//! man in the middle); [`Key::is_authenticated`] is false so that callers can warn.
//!
//! # Handshake (protocol version 2)
//!
//! All integers are little-endian. `I` is the initiator (the side that connected: the
//! primary), `R` the responder (the backup). The Noise PSK is `HMAC-SHA256(key, "ftvm-noise-psk")`
//! and the Noise prologue is `"FTVMAUTH" || version`, so that both sides agree on it.
//!
//! ```text
//! I -> R  "FTVMAUTH" (8 bytes), version u32 (2), noise1 (48 bytes: -> psk, e)
//! R -> I  "FTVMAUTH", version u32 (2), then either
//!           0x01, noise2 (48 bytes: <- e, ee)               R opened noise1 under its key
//!           0x02, refusal = HMAC-SHA256(key, "ftvm-refusal" || noise1), then R closes
//! I -> R  0x01, confirm (16 bytes: an empty message sealed under nonce CONFIRM)
//!         or 0x02 (noise2 did not open), then I closes
//! R -> I  0x01 (accepted) or 0x02 (refused, then R closes)
//! ```
//!
//! - A responder that receives anything but the magic closes the connection ("not an ftvm
//!   replication peer"); one that receives another version answers with its own magic and
//!   version before closing, so that both sides can say which versions met.
//! - A responder that cannot open noise1 (another key) tries the public key of a channel
//!   without one, to tell "the peer has no key" from "the keys differ", and sends the
//!   refusal tag, which the initiator checks against its own key and the public one: so
//!   *both* sides learn from a MAC check which key is wrong, not from a closed connection.
//! - The confirmation proves that the initiator holds this session's keys (its ephemeral
//!   key), so a recorded noise1 replayed by someone else is refused in the handshake.
//!
//! The handshake's split gives one AEAD key per direction; stream frames and datagrams of a
//! direction share it and are kept apart by the top two bits of the 64-bit nonce:
//!
//! ```text
//! nonce = kind << 62 | n        n < 2^62, counting from 0
//! kind  0: a stream chunk that ends its frame     1: a stream chunk whose frame goes on
//!       2: a datagram                             3: the handshake's confirmation (n = 0)
//! ```
//!
//! A message of one kind spliced in where another is expected opens, but is refused for its
//! kind.
//!
//! # Stream frames (TCP, both directions)
//!
//! A frame is what one `flush()` of [`SecureWriter`] (or one [`SecureWriter::seal`]) sends.
//! A Noise message holds at most 65,535 bytes, so a frame goes as one or more chunks of at
//! most [`MAX_CHUNK`] payload bytes each:
//!
//! ```text
//! [len u32][nonce u64][AEAD(key of this direction, nonce, payload: len bytes): len + 16 bytes]
//! ```
//!
//! Chunk numbers start at 0 in each direction and [`SecureReader`] accepts exactly the next
//! one (TCP delivers in order), so any replayed, duplicated, reordered or dropped chunk is an
//! error. Every chunk but a frame's last has kind 1, authenticated with it, so the reader
//! knows where a frame ends (the backup acknowledges there) and a connection that ends in the
//! middle of one is an unexpected end, not a clean one. A chunk longer than [`MAX_CHUNK`] is
//! refused before anything is read for it, and the reader never holds more than two chunks:
//! a frame of any size (a state transfer is one frame of a whole memory) streams through it.
//! The first bad chunk fails the reader for good.
//!
//! # Datagrams (UDP heartbeats)
//!
//! ```text
//! [nonce u64 (kind 2)][AEAD(key of this direction, nonce, payload): payload + 16 bytes]
//! ```
//!
//! Datagrams may be lost or reordered, so [`DatagramOpener`] accepts any number above the
//! highest it accepted so far: a replayed or duplicated datagram is refused, and a late one
//! is dropped like a lost one, which is harmless for heartbeats.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use snow::StatelessTransportState;

type HmacSha256 = Hmac<Sha256>;

/// The first bytes of each side's handshake message.
pub const MAGIC: [u8; 8] = *b"FTVMAUTH";
/// The version of this protocol (handshake and framing). 1 was HMAC-SHA256 frames in the
/// clear; 2 is Noise and AES-256-GCM.
pub const PROTOCOL_VERSION: u32 = 2;
/// The Noise protocol of the handshake and the transport.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// The length of an AEAD tag, on chunks and datagrams alike.
pub const TAG_LEN: usize = 16;
/// The longest Noise message.
pub const MAX_NOISE_MESSAGE: usize = 65_535;
/// The most payload bytes one chunk carries (a Noise message less its tag).
pub const MAX_CHUNK: usize = MAX_NOISE_MESSAGE - TAG_LEN;
/// A stream chunk's header: `len` (u32) and `nonce` (u64).
pub const FRAME_HEADER_LEN: usize = 12;
/// [`SecureWriter`] sends a chunk whenever this many bytes are pending.
pub const MAX_WRITE_FRAME: usize = MAX_CHUNK;
/// What sealing adds to a datagram: the nonce and the tag.
pub const DATAGRAM_OVERHEAD: usize = 8 + TAG_LEN;

/// The length of the handshake's Noise messages: an X25519 key and the tag of an empty
/// payload.
const NOISE_HANDSHAKE_LEN: usize = 32 + TAG_LEN;
const HELLO_START_LEN: usize = MAGIC.len() + 4;
const HELLO_LEN: usize = HELLO_START_LEN + NOISE_HANDSHAKE_LEN;
const REFUSAL_LEN: usize = 32;
/// The verdicts in the handshake.
const ACCEPTED: u8 = 0x01;
const REFUSED: u8 = 0x02;
/// A key file larger than this is not a key file.
const MAX_KEY_FILE: u64 = 64 * 1024;
/// The key of a channel without one: public, so it gives no authentication (and secrecy only
/// against a host that watches, not one that intervenes).
const UNAUTHENTICATED_KEY: &[u8] = b"ftvm replication: no key given, integrity only (this key is public)";

const LABEL_PSK: &[u8] = b"ftvm-noise-psk";
const LABEL_REFUSAL: &[u8] = b"ftvm-refusal";

/// The nonce's kinds (its top two bits) and number (the rest).
const KIND_SHIFT: u32 = 62;
const NUMBER_MASK: u64 = (1 << KIND_SHIFT) - 1;
const KIND_LAST: u64 = 0;
const KIND_MORE: u64 = 1;
const KIND_DATAGRAM: u64 = 2;
const KIND_CONFIRM: u64 = 3;

fn nonce(kind: u64, n: u64) -> u64 {
    (kind << KIND_SHIFT) | (n & NUMBER_MASK)
}

fn kind_name(kind: u64) -> &'static str {
    match kind {
        KIND_LAST | KIND_MORE => "a stream chunk",
        KIND_DATAGRAM => "a datagram",
        _ => "the handshake's confirmation",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer does not know our key.
    #[error("authentication failed: {0}")]
    WrongKey(String),
    /// A frame or datagram that does not open (its tag does not match).
    #[error("message {seq} failed its integrity check: altered in transit, forged, or from another session")]
    Altered { seq: u64 },
    /// A frame or datagram that opens but is not the next in sequence.
    #[error("message {seq} is out of sequence (expected {expected}): replayed, duplicated, reordered or dropped")]
    Replayed { seq: u64, expected: u64 },
    /// Not an ftvm peer, another protocol version, an oversize chunk, a message of the wrong
    /// kind.
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    KeyFile(String),
    /// The Noise library refused an operation that cannot fail with this protocol's sizes.
    #[error("noise ({what}): {source}")]
    Noise {
        what: &'static str,
        #[source]
        source: snow::Error,
    },
}

impl SecureError {
    /// The `SecureError` inside an `io::Error` from [`SecureReader`] or [`SecureWriter`], if
    /// it is one of theirs (and not a plain I/O failure).
    pub fn in_io_error(e: &io::Error) -> Option<&SecureError> {
        e.get_ref()?.downcast_ref()
    }

    /// An equal error, for the reader that reports its failure again on each read (a Noise
    /// error, which the reader never keeps, comes back as its text).
    fn duplicate(&self) -> SecureError {
        match self {
            SecureError::Io(e) => SecureError::Io(io::Error::new(e.kind(), e.to_string())),
            SecureError::WrongKey(s) => SecureError::WrongKey(s.clone()),
            SecureError::Altered { seq } => SecureError::Altered { seq: *seq },
            SecureError::Replayed { seq, expected } => SecureError::Replayed { seq: *seq, expected: *expected },
            SecureError::Protocol(s) => SecureError::Protocol(s.clone()),
            SecureError::KeyFile(s) => SecureError::KeyFile(s.clone()),
            e @ SecureError::Noise { .. } => SecureError::Protocol(e.to_string()),
        }
    }

    fn into_io(self) -> io::Error {
        match self {
            SecureError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }

    fn noise(what: &'static str) -> impl FnOnce(snow::Error) -> SecureError {
        move |source| SecureError::Noise { what, source }
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
    /// newline included). A file that other users (its group, or all) can read is accepted with
    /// a warning.
    pub fn load(path: &Path) -> Result<Key, SecureError> {
        let shown = path.display();
        let failed = |e: io::Error| SecureError::KeyFile(format!("key file {shown}: {e}"));
        let file = File::open(path).map_err(failed)?;
        #[cfg(unix)]
        if let Ok(meta) = file.metadata() {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode();
            if mode & 0o044 != 0 {
                let who = if mode & 0o004 != 0 { "every user" } else { "its group" };
                tracing::warn!("key file {shown} can be read by {who} (mode {:o}): chmod 600 it", mode & 0o7777);
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

    /// No key: for an explicit `--insecure` flag only. The channel runs the same protocol
    /// under a fixed, public key: still encrypted against a host that only watches the link,
    /// with sequence numbers and integrity, but anyone can speak for either side;
    /// [`is_authenticated`](Key::is_authenticated) is false so that callers can say so.
    pub fn unauthenticated() -> Key {
        Key { bytes: UNAUTHENTICATED_KEY.to_vec(), authenticated: false }
    }

    /// The key of a pair's command line: the key file when one is given; no key file is
    /// refused unless `insecure` (an explicit flag) asks for [`Key::unauthenticated`]; both
    /// at once are a contradiction.
    pub fn for_pair(key_file: Option<&Path>, insecure: bool) -> Result<Key, SecureError> {
        match (key_file, insecure) {
            (Some(path), false) => Key::load(path),
            (None, true) => Ok(Key::unauthenticated()),
            (Some(path), true) => Err(SecureError::KeyFile(format!(
                "--key-file {} and --insecure contradict each other: give one",
                path.display()
            ))),
            (None, false) => Err(SecureError::KeyFile(
                "the replication channel needs a key: --key-file FILE, the same file on both sides (make one with \
                 `openssl rand -hex 32 > FILE; chmod 600 FILE`), or --insecure to run a pair that anyone on the \
                 network can impersonate"
                    .into(),
            )),
        }
    }

    /// The Noise PSK of this key: 32 bytes derived from a key of any length.
    fn psk(&self) -> Result<[u8; 32], SecureError> {
        let mut mac = keyed(&self.bytes)?;
        mac.update(LABEL_PSK);
        Ok(mac.finalize().into_bytes().into())
    }

    /// The tag a responder with this key sends when it cannot open `noise1`.
    fn refusal(&self, noise1: &[u8]) -> Result<[u8; REFUSAL_LEN], SecureError> {
        let mut mac = keyed(&self.bytes)?;
        mac.update(LABEL_REFUSAL);
        mac.update(noise1);
        Ok(mac.finalize().into_bytes().into())
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

fn hello_start() -> [u8; HELLO_START_LEN] {
    let mut m = [0u8; HELLO_START_LEN];
    m[..MAGIC.len()].copy_from_slice(&MAGIC);
    m[MAGIC.len()..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    m
}

/// A Noise handshake state for `key`, as initiator or responder.
fn noise_state(key: &Key, initiator: bool) -> Result<snow::HandshakeState, SecureError> {
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse().map_err(SecureError::noise("protocol name"))?;
    let psk = key.psk()?;
    let prologue = hello_start();
    let builder = snow::Builder::new(params)
        .psk(0, &psk)
        .and_then(|b| b.prologue(&prologue))
        .map_err(SecureError::noise("handshake setup"))?;
    if initiator { builder.build_initiator() } else { builder.build_responder() }
        .map_err(SecureError::noise("handshake setup"))
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

/// Why a responder with `ours` could not open `noise1`: a `WrongKey` that says, where it can,
/// which side lacks a key.
fn why_unopened(ours: &Key, noise1: &[u8]) -> Result<SecureError, SecureError> {
    let why = if !ours.authenticated {
        "the peer uses a key (--key-file) and we have none"
    } else {
        let mut public = noise_state(&Key::unauthenticated(), false)?;
        if public.read_message(noise1, &mut [0u8; NOISE_HANDSHAKE_LEN]).is_ok() {
            "the peer has no key (it runs without --key-file) and ours is set"
        } else {
            "the peer's key differs from ours (--key-file)"
        }
    };
    Ok(SecureError::WrongKey(why.into()))
}

/// What an initiator with `ours` makes of the responder's refusal tag over `noise1`.
fn why_refused(ours: &Key, noise1: &[u8], tag: &[u8]) -> Result<SecureError, SecureError> {
    // A MAC check, in constant time.
    let matches = |k: &Key| -> Result<bool, SecureError> {
        let mut mac = keyed(&k.bytes)?;
        mac.update(LABEL_REFUSAL);
        mac.update(noise1);
        Ok(mac.verify_slice(tag).is_ok())
    };
    if matches(ours)? {
        return Ok(SecureError::Protocol(
            "the peer could not open our handshake message although it holds our key: altered in transit".into(),
        ));
    }
    let why = if !ours.authenticated {
        "the peer uses a key (--key-file) and we have none"
    } else if matches(&Key::unauthenticated())? {
        "the peer has no key (it runs without --key-file) and ours is set"
    } else {
        "the peer's key differs from ours (--key-file)"
    };
    Ok(SecureError::WrongKey(why.into()))
}

fn initiate(x: &Exchange<'_>, key: &Key) -> Result<StatelessTransportState, SecureError> {
    let mut noise = noise_state(key, true)?;
    let mut hello = [0u8; HELLO_LEN];
    hello[..HELLO_START_LEN].copy_from_slice(&hello_start());
    let n = noise.write_message(&[], &mut hello[HELLO_START_LEN..]).map_err(SecureError::noise("first message"))?;
    if n != NOISE_HANDSHAKE_LEN {
        return Err(SecureError::Protocol(format!("the first handshake message has {n} bytes")));
    }
    x.send(&hello, "sending our hello")?;
    let version = recv_hello_start(
        x,
        "the peer closed the connection without answering: not an ftvm replication peer, or an ftvm without \
         authentication",
    )?;
    if version != PROTOCOL_VERSION {
        return Err(other_version(version));
    }
    let mut verdict = [0u8; 1];
    x.recv(&mut verdict, "waiting for the peer's verdict on our key", closed_during_handshake)?;
    match verdict[0] {
        ACCEPTED => {}
        REFUSED => {
            let mut tag = [0u8; REFUSAL_LEN];
            x.recv(&mut tag, "waiting for the peer's refusal", closed_during_handshake)?;
            return Err(why_refused(key, &hello[HELLO_START_LEN..], &tag)?);
        }
        other => return Err(SecureError::Protocol(format!("unexpected handshake verdict {other:#04x}"))),
    }
    let mut noise2 = [0u8; NOISE_HANDSHAKE_LEN];
    x.recv(&mut noise2, "waiting for the peer's handshake answer", closed_during_handshake)?;
    if noise.read_message(&noise2, &mut [0u8; NOISE_HANDSHAKE_LEN]).is_err() {
        let _ = x.send(&[REFUSED], "refusing the peer's answer");
        return Err(SecureError::WrongKey(
            "the peer's handshake answer failed its check: it does not hold our key (--key-file), or the answer was \
             altered in transit"
                .into(),
        ));
    }
    let transport = noise.into_stateless_transport_mode().map_err(SecureError::noise("transport"))?;
    let mut confirm = [0u8; 1 + TAG_LEN];
    confirm[0] = ACCEPTED;
    transport
        .write_message(nonce(KIND_CONFIRM, 0), &[], &mut confirm[1..])
        .map_err(SecureError::noise("confirmation"))?;
    x.send(&confirm, "sending our confirmation")?;
    let refused =
        || SecureError::Protocol("the peer refused our confirmation of the session: altered in transit".into());
    x.recv(&mut verdict, "waiting for the peer to accept our confirmation", |_| refused())?;
    if verdict[0] != ACCEPTED {
        return Err(refused());
    }
    Ok(transport)
}

fn respond(x: &Exchange<'_>, key: &Key) -> Result<StatelessTransportState, SecureError> {
    let version = recv_hello_start(x, "the peer closed the connection without a handshake")?;
    if version != PROTOCOL_VERSION {
        // Our magic and version, so that the peer can say which versions met.
        let _ = x.send(&hello_start(), "answering another version");
        return Err(other_version(version));
    }
    let mut noise1 = [0u8; NOISE_HANDSHAKE_LEN];
    x.recv(&mut noise1, "waiting for the peer's first handshake message", closed_during_handshake)?;
    let mut noise = noise_state(key, false)?;
    let mut answer = [0u8; HELLO_START_LEN + 1 + NOISE_HANDSHAKE_LEN];
    answer[..HELLO_START_LEN].copy_from_slice(&hello_start());
    if noise.read_message(&noise1, &mut [0u8; NOISE_HANDSHAKE_LEN]).is_err() {
        let why = why_unopened(key, &noise1)?;
        answer[HELLO_START_LEN] = REFUSED;
        answer[HELLO_START_LEN + 1..HELLO_START_LEN + 1 + REFUSAL_LEN].copy_from_slice(&key.refusal(&noise1)?);
        let _ = x.send(&answer[..HELLO_START_LEN + 1 + REFUSAL_LEN], "refusing the peer's key");
        return Err(why);
    }
    answer[HELLO_START_LEN] = ACCEPTED;
    let n =
        noise.write_message(&[], &mut answer[HELLO_START_LEN + 1..]).map_err(SecureError::noise("second message"))?;
    if n != NOISE_HANDSHAKE_LEN {
        return Err(SecureError::Protocol(format!("the second handshake message has {n} bytes")));
    }
    x.send(&answer, "sending our hello and handshake answer")?;
    let transport = noise.into_stateless_transport_mode().map_err(SecureError::noise("transport"))?;
    let mut confirm = [0u8; 1 + TAG_LEN];
    x.recv(&mut confirm[..1], "waiting for the peer's confirmation", |_| {
        SecureError::Protocol("the peer closed the connection instead of confirming the session".into())
    })?;
    if confirm[0] != ACCEPTED {
        return Err(SecureError::Protocol(
            "the peer refused our handshake answer: altered in transit, or the peer's hello was replayed by someone \
             else"
                .into(),
        ));
    }
    x.recv(&mut confirm[1..], "waiting for the peer's confirmation", closed_during_handshake)?;
    if transport.read_message(nonce(KIND_CONFIRM, 0), &confirm[1..], &mut [0u8; TAG_LEN]).is_err() {
        let _ = x.send(&[REFUSED], "refusing the peer's confirmation");
        return Err(SecureError::Protocol(
            "the peer's confirmation failed its check: its hello was replayed by someone without the session's keys, \
             or the confirmation was altered in transit"
                .into(),
        ));
    }
    x.send(&[ACCEPTED], "accepting the peer's confirmation")?;
    Ok(transport)
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
    let transport = if initiator { initiate(&x, key)? } else { respond(&x, key)? };
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    let transport = Arc::new(transport);
    let writer = SecureWriter::new(stream.try_clone()?, transport.clone());
    let reader = SecureReader::new(stream, transport.clone());
    Ok((writer, reader, DatagramKeys { transport, next_seq: Arc::new(AtomicU64::new(0)) }))
}

/// The next number after `n`, below 2^62.
fn next_number(n: u64, what: &str) -> Result<u64, SecureError> {
    match n.checked_add(1) {
        Some(next) if next <= NUMBER_MASK => Ok(next),
        _ => Err(SecureError::Protocol(format!("the {what}'s sequence numbers are exhausted"))),
    }
}

/// Appends one sealed chunk of `payload` (at most [`MAX_CHUNK`] bytes) to `out`.
fn seal_chunk(
    transport: &StatelessTransportState,
    seq: u64,
    more: bool,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), SecureError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|_| payload.len() <= MAX_CHUNK)
        .ok_or_else(|| SecureError::Protocol(format!("a chunk of {} bytes", payload.len())))?;
    let n = nonce(if more { KIND_MORE } else { KIND_LAST }, seq);
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.resize(start + FRAME_HEADER_LEN + payload.len() + TAG_LEN, 0);
    match transport.write_message(n, payload, &mut out[start + FRAME_HEADER_LEN..]) {
        Ok(_) => Ok(()),
        Err(e) => {
            out.truncate(start);
            Err(SecureError::Noise { what: "sealing a chunk", source: e })
        }
    }
}

/// A chunk opened by [`open_chunk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Opened {
    /// Its payload's length (written at the start of the output).
    len: usize,
    /// More chunks of its frame follow.
    more: bool,
}

/// The length a chunk header announces, the whole chunk's length on the wire, and its nonce:
/// refused if longer than [`MAX_CHUNK`], before anything else is read.
fn parse_chunk_header(header: &[u8; FRAME_HEADER_LEN]) -> Result<(usize, usize, u64), SecureError> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let mut n = [0u8; 8];
    n.copy_from_slice(&header[4..]);
    let n = u64::from_le_bytes(n);
    if len > MAX_CHUNK {
        return Err(SecureError::Protocol(format!(
            "chunk {} claims {len} bytes, more than a Noise message holds ({MAX_CHUNK}): corrupt stream or not an \
             ftvm peer",
            n & NUMBER_MASK
        )));
    }
    Ok((len, FRAME_HEADER_LEN + len + TAG_LEN, n))
}

/// Opens the chunk `wire` (header, sealed payload and tag) that must be number `expected`,
/// writing its payload at the start of `out` (at least [`MAX_NOISE_MESSAGE`] bytes).
fn open_chunk(
    transport: &StatelessTransportState,
    expected: u64,
    wire: &[u8],
    out: &mut [u8],
) -> Result<Opened, SecureError> {
    let header: &[u8; FRAME_HEADER_LEN] = wire
        .get(..FRAME_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| SecureError::Protocol(format!("a chunk of {} bytes is too short", wire.len())))?;
    let (len, total, n) = parse_chunk_header(header)?;
    if wire.len() != total {
        return Err(SecureError::Protocol(format!("a chunk of {} bytes announces {total}", wire.len())));
    }
    let (kind, seq) = (n >> KIND_SHIFT, n & NUMBER_MASK);
    if transport.read_message(n, &wire[FRAME_HEADER_LEN..], out).is_err() {
        return Err(SecureError::Altered { seq });
    }
    if kind != KIND_LAST && kind != KIND_MORE {
        return Err(SecureError::Protocol(format!(
            "message {seq} is {}, not a stream chunk: spliced into the stream",
            kind_name(kind)
        )));
    }
    if seq != expected {
        return Err(SecureError::Replayed { seq, expected });
    }
    Ok(Opened { len, more: kind == KIND_MORE })
}

/// The sending half of the channel: what is written is buffered and goes out as one frame on
/// each `flush()` (in chunks of at most [`MAX_WRITE_FRAME`] bytes). Bytes not flushed when it
/// is dropped are discarded (a flush on drop could block on a dead peer). After a failed
/// send, every write fails: the peer cannot tell where the broken chunk ends; after a failed
/// seal too: the numbers it used are never used again.
pub struct SecureWriter {
    stream: TcpStream,
    transport: Arc<StatelessTransportState>,
    next_seq: u64,
    /// The payload not sent yet (at most [`MAX_WRITE_FRAME`] bytes).
    pending: Vec<u8>,
    /// A sealed chunk on its way out.
    wire: Vec<u8>,
    broken: bool,
}

impl fmt::Debug for SecureWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureWriter")
            .field("next_seq", &self.next_seq)
            .field("pending", &self.pending.len())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl SecureWriter {
    fn new(stream: TcpStream, transport: Arc<StatelessTransportState>) -> SecureWriter {
        SecureWriter {
            stream,
            transport,
            next_seq: 0,
            pending: Vec::with_capacity(MAX_WRITE_FRAME),
            wire: Vec::with_capacity(FRAME_HEADER_LEN + MAX_WRITE_FRAME + TAG_LEN),
            broken: false,
        }
    }

    /// Shuts the socket down both ways (which also ends the [`SecureReader`] of this
    /// connection). Errors, such as a connection already gone, are ignored.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn broken_error() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "the encrypted channel failed earlier: a frame was cut short")
    }

    /// Seals `payload` as one frame (in chunks of at most [`MAX_CHUNK`] bytes) and returns its
    /// bytes, for the caller to send in order on [`Self::stream`]; the next frame, sent or
    /// sealed, follows them. Nothing may be pending (`write` without a `flush`). The payload
    /// is copied once, into the returned buffer, where it is encrypted in place.
    pub fn seal(&mut self, payload: &[u8]) -> io::Result<Vec<u8>> {
        if self.broken {
            return Err(Self::broken_error());
        }
        debug_assert!(self.pending.is_empty(), "seal() with bytes written and not flushed");
        let chunks = payload.len().div_ceil(MAX_CHUNK);
        let mut out = Vec::with_capacity(payload.len() + chunks * (FRAME_HEADER_LEN + TAG_LEN));
        let mut seq = self.next_seq;
        for (i, chunk) in payload.chunks(MAX_CHUNK).enumerate() {
            let sealed = seal_chunk(&self.transport, seq, i + 1 < chunks, chunk, &mut out)
                .and_then(|()| next_number(seq, "stream"));
            match sealed {
                Ok(next) => seq = next,
                Err(e) => {
                    // Never seal under these numbers again (a nonce is used once).
                    self.broken = true;
                    return Err(e.into_io());
                }
            }
        }
        self.next_seq = seq;
        Ok(out)
    }

    /// The socket frames from [`Self::seal`] go out on.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends the pending bytes as one chunk (nothing if none are pending); `more`: the frame
    /// goes on after it.
    fn send_chunk(&mut self, more: bool) -> io::Result<()> {
        if self.broken {
            return Err(Self::broken_error());
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        self.wire.clear();
        let sealed = next_number(self.next_seq, "stream").and_then(|next| {
            seal_chunk(&self.transport, self.next_seq, more, &self.pending, &mut self.wire).map(|()| next)
        });
        let next = match sealed {
            Ok(next) => next,
            Err(e) => {
                self.broken = true;
                return Err(e.into_io());
            }
        };
        let sent = self.stream.write_all(&self.wire);
        self.pending.clear();
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
        if self.pending.len() >= MAX_WRITE_FRAME {
            // More of this frame follows: these bytes.
            self.send_chunk(true)?;
        }
        let n = buf.len().min(MAX_WRITE_FRAME - self.pending.len());
        self.pending.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_chunk(false)?;
        self.stream.flush()
    }
}

/// The receiving half of the channel: yields the opened payloads in order. On a chunk that
/// does not open, whose number is not the next one, that is not a stream chunk, or that is
/// longer than [`MAX_CHUNK`], a read fails with `io::ErrorKind::InvalidData` around the
/// [`SecureError`] (see [`SecureError::in_io_error`]); the reader remembers it
/// ([`failure`](Self::failure)) and every later read fails the same way. A read timeout or
/// other I/O error loses nothing: the next read goes on where it stopped. The peer closing
/// the connection between frames is the end of the stream (`Ok(0)`), in the middle of one
/// (inside a chunk, or after a chunk whose frame goes on) an `UnexpectedEof` error.
pub struct SecureReader {
    stream: TcpStream,
    transport: Arc<StatelessTransportState>,
    next_seq: u64,
    /// Received bytes; `buf[lo..hi]` are not opened yet.
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
    /// The last chunk's payload; `plain[unread]` not read yet.
    plain: Vec<u8>,
    unread: Range<usize>,
    /// The last chunk opened said that its frame goes on.
    more: bool,
    failure: Option<SecureError>,
    /// Whether the current frame has payload bytes not yet read, as of the last read: zero
    /// exactly at the end of each frame (one flush of the sender), else at least the bytes
    /// left of the current chunk.
    buffered: Arc<AtomicUsize>,
    /// When the bytes of the current frame's first chunk came off the socket
    /// ([`crate::stages::now_ns`]), and when the last read returned.
    received_at: Arc<AtomicU64>,
    last_read_ns: u64,
    /// Reads do not wait (`recv` with `MSG_DONTWAIT`): a read with nothing to give fails with
    /// `WouldBlock` and loses nothing. Per reader, not per socket (the socket's writers still
    /// block).
    nonblocking: Arc<AtomicBool>,
}

impl fmt::Debug for SecureReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureReader")
            .field("next_seq", &self.next_seq)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

/// Why no chunk came.
enum NoChunk {
    /// A failure of the connection, not of the peer: reported, not remembered.
    Io(io::Error),
    /// A bad chunk: the channel is done for.
    Bad(SecureError),
}

impl SecureReader {
    fn new(stream: TcpStream, transport: Arc<StatelessTransportState>) -> SecureReader {
        SecureReader {
            stream,
            transport,
            next_seq: 0,
            buf: vec![0u8; 2 * (FRAME_HEADER_LEN + MAX_NOISE_MESSAGE)],
            lo: 0,
            hi: 0,
            plain: vec![0u8; MAX_NOISE_MESSAGE],
            unread: 0..0,
            more: false,
            failure: None,
            buffered: Arc::new(AtomicUsize::new(0)),
            received_at: Arc::new(AtomicU64::new(0)),
            last_read_ns: 0,
            nonblocking: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The switch of [`Self`]'s non-blocking reads (off at first).
    pub fn nonblocking_switch(&self) -> Arc<AtomicBool> {
        self.nonblocking.clone()
    }

    /// A gauge of when the current frame's bytes were read from the socket (ns on
    /// [`crate::stages::now_ns`]'s clock; updated as each frame's first chunk is opened): the
    /// backup measures from there the time it takes to verify and acknowledge a frame.
    pub fn received_gauge(&self) -> Arc<AtomicU64> {
        self.received_at.clone()
    }

    /// A gauge of the current frame's payload bytes not yet read (0: at a frame's end; see
    /// the field), updated by every read: a reader above can tell where a frame (one flush
    /// of the sender) ends (the backup acknowledges there).
    pub fn buffered_gauge(&self) -> Arc<AtomicUsize> {
        self.buffered.clone()
    }

    /// The bad chunk that ended this channel, if one did.
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

    /// Opens the next chunk into `plain`. `Ok(false)`: the peer closed the connection at a
    /// frame boundary.
    fn next_chunk(&mut self) -> Result<bool, NoChunk> {
        loop {
            let avail = &self.buf[self.lo..self.hi];
            let need = match avail.first_chunk::<FRAME_HEADER_LEN>() {
                None => FRAME_HEADER_LEN,
                Some(header) => {
                    let (_, total, _) = parse_chunk_header(header).map_err(NoChunk::Bad)?;
                    if avail.len() >= total {
                        if !self.more {
                            self.received_at.store(self.last_read_ns, Ordering::Relaxed);
                        }
                        let opened = open_chunk(&self.transport, self.next_seq, &avail[..total], &mut self.plain)
                            .map_err(NoChunk::Bad)?;
                        self.next_seq = next_number(self.next_seq, "stream").map_err(NoChunk::Bad)?;
                        self.unread = 0..opened.len;
                        self.more = opened.more;
                        self.lo += total;
                        return Ok(true);
                    }
                    total
                }
            };
            // More bytes are needed: move what is left to the front.
            if self.lo > 0 {
                self.buf.copy_within(self.lo..self.hi, 0);
                self.hi -= self.lo;
                self.lo = 0;
            }
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
            let got = if self.nonblocking.load(Ordering::Relaxed) {
                recv_now(&self.stream, &mut self.buf[self.hi..])
            } else {
                self.stream.read(&mut self.buf[self.hi..])
            };
            match got {
                Ok(0) if self.hi == self.lo && !self.more => return Ok(false),
                Ok(0) => {
                    return Err(NoChunk::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the peer closed the connection in the middle of a frame (at chunk {})", self.next_seq),
                    )))
                }
                Ok(n) => {
                    self.hi += n;
                    if crate::stages::enabled() {
                        self.last_read_ns = crate::stages::now_ns();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(NoChunk::Io(e)),
            }
        }
    }
}

/// `recv(2)` without waiting (`WouldBlock` when nothing is there).
fn recv_now(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call; the fd belongs to
    // `stream`, which outlives it.
    let n = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
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
            if !self.unread.is_empty() {
                let n = out.len().min(self.unread.len());
                out[..n].copy_from_slice(&self.plain[self.unread.start..self.unread.start + n]);
                self.unread.start += n;
                self.buffered.store(self.unread.len() + usize::from(self.more), Ordering::Relaxed);
                return Ok(n);
            }
            match self.next_chunk() {
                Ok(true) => {} // possibly an empty payload: on to the next chunk
                Ok(false) => return Ok(0),
                Err(NoChunk::Io(e)) => return Err(e),
                Err(NoChunk::Bad(e)) => {
                    let reported = e.duplicate().into_io();
                    self.failure = Some(e);
                    return Err(reported);
                }
            }
        }
    }
}

/// This session's keys for its UDP datagrams (the heartbeats), one per direction: those of
/// the stream, with nonces of the datagram kind.
#[derive(Clone)]
pub struct DatagramKeys {
    transport: Arc<StatelessTransportState>,
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
        DatagramSealer { transport: self.transport.clone(), next_seq: self.next_seq.clone() }
    }

    /// Opens the datagrams the peer sends. Each opener keeps its own highest sequence number.
    pub fn opener(&self) -> DatagramOpener {
        DatagramOpener { transport: self.transport.clone(), highest: None }
    }
}

/// Seals datagrams: `[nonce u64][sealed payload and tag]`, see the [module documentation](self).
pub struct DatagramSealer {
    transport: Arc<StatelessTransportState>,
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
    /// The datagram to send for `payload` ([`DATAGRAM_OVERHEAD`] bytes longer). Empty (which
    /// the peer refuses as too short) if the payload does not fit a datagram or, after 2^62
    /// datagrams, the numbers are exhausted: a number is never used twice.
    pub fn seal(&mut self, payload: &[u8]) -> Vec<u8> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        if seq > NUMBER_MASK || payload.len() > MAX_CHUNK {
            return Vec::new();
        }
        let n = nonce(KIND_DATAGRAM, seq);
        let mut d = vec![0u8; DATAGRAM_OVERHEAD + payload.len()];
        d[..8].copy_from_slice(&n.to_le_bytes());
        match self.transport.write_message(n, payload, &mut d[8..]) {
            Ok(_) => d,
            Err(_) => Vec::new(),
        }
    }
}

/// Opens datagrams sealed by the peer's [`DatagramSealer`].
pub struct DatagramOpener {
    transport: Arc<StatelessTransportState>,
    highest: Option<u64>,
}

impl fmt::Debug for DatagramOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramOpener").field("highest", &self.highest).finish_non_exhaustive()
    }
}

impl DatagramOpener {
    /// The payload of `datagram`. Refuses a datagram too short or too long to be sealed, or
    /// that is another kind of message (`Protocol`), one that does not open (`Altered`) and
    /// one numbered at or below the highest accepted so far (`Replayed`).
    pub fn open(&mut self, datagram: &[u8]) -> Result<Vec<u8>, SecureError> {
        if datagram.len() < DATAGRAM_OVERHEAD || datagram.len() > 8 + MAX_NOISE_MESSAGE {
            return Err(SecureError::Protocol(format!(
                "a datagram of {} bytes cannot be sealed (at least {DATAGRAM_OVERHEAD}, at most {})",
                datagram.len(),
                8 + MAX_NOISE_MESSAGE
            )));
        }
        let (n, sealed) = datagram.split_at(8);
        let mut b = [0u8; 8];
        b.copy_from_slice(n);
        let n = u64::from_le_bytes(b);
        let (kind, seq) = (n >> KIND_SHIFT, n & NUMBER_MASK);
        let mut payload = vec![0u8; sealed.len()];
        let len = self.transport.read_message(n, sealed, &mut payload).map_err(|_| SecureError::Altered { seq })?;
        payload.truncate(len);
        if kind != KIND_DATAGRAM {
            return Err(SecureError::Protocol(format!("message {seq} is {}, not a datagram", kind_name(kind))));
        }
        if let Some(highest) = self.highest {
            if seq <= highest {
                return Err(SecureError::Replayed { seq, expected: highest.saturating_add(1) });
            }
        }
        self.highest = Some(seq);
        Ok(payload)
    }
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
    /// handshake as it is, then passes each initiator-to-responder chunk through `tamper`
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
            let mut confirm = [0u8; 1 + TAG_LEN];
            if from_i.read_exact(&mut hello).is_err() || to_r.write_all(&hello).is_err() {
                return;
            }
            if from_i.read_exact(&mut confirm).is_err() || to_r.write_all(&confirm).is_err() {
                return;
            }
            for index in 0.. {
                let mut header = [0u8; FRAME_HEADER_LEN];
                if from_i.read_exact(&mut header).is_err() {
                    break;
                }
                let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
                let mut frame = header.to_vec();
                frame.resize(FRAME_HEADER_LEN + len + TAG_LEN, 0);
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

    /// Non-blocking reads: nothing there is `WouldBlock` and loses nothing; frames that
    /// arrive later are read whole; and the gauge of when a frame came off the socket moves.
    #[test]
    fn nonblocking_reads_wait_for_nothing_and_lose_nothing() {
        let ((mut iw, _, _), (_, mut rr, _)) = ok_pair();
        rr.nonblocking_switch().store(true, Ordering::SeqCst);
        let mut b = [0u8; 16];
        assert_eq!(rr.read(&mut b).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        send(&mut iw, &[b"0123456789abcdef", b"second"]);
        std::thread::sleep(Duration::from_millis(50));
        rr.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"0123456789abcdef");
        assert!(rr.received_gauge().load(Ordering::SeqCst) > 0 || !crate::stages::enabled());
        let mut c = [0u8; 6];
        rr.read_exact(&mut c).unwrap();
        assert_eq!(&c, b"second");
        assert_eq!(rr.read(&mut b).unwrap_err().kind(), io::ErrorKind::WouldBlock);
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
                // 1 MiB goes out in chunks of at most MAX_WRITE_FRAME.
                assert_eq!(w.next_seq - before, big.len().div_ceil(MAX_WRITE_FRAME) as u64);
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
        hello.extend_from_slice(&3u32.to_le_bytes());
        hello.extend_from_slice(&[0u8; NOISE_HANDSHAKE_LEN]);
        c.write_all(&hello).unwrap();
        assert_eq!(protocol_text(r.join().unwrap()), "the peer speaks protocol version 3, this ftvm speaks 2");
        // It is told our version.
        let mut answer = [0u8; 12];
        c.read_exact(&mut answer).unwrap();
        assert_eq!(&answer[..8], &MAGIC);
        assert_eq!(u32::from_le_bytes(answer[8..].try_into().unwrap()), 2);

        // An ftvm of protocol version 1 (HMAC frames in the clear), as initiator: it hears
        // our version.
        let (addr, r) = responder(&key(1));
        let mut c = TcpStream::connect(addr).unwrap();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&[0u8; 32]);
        c.write_all(&hello).unwrap();
        assert_eq!(protocol_text(r.join().unwrap()), "the peer speaks protocol version 1, this ftvm speaks 2");
        c.read_exact(&mut answer).unwrap();
        assert_eq!(u32::from_le_bytes(answer[8..].try_into().unwrap()), 2);

        // A responder from the future.
        let (l, addr) = listener();
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut request = [0u8; HELLO_LEN];
            s.read_exact(&mut request).unwrap();
            let mut answer = MAGIC.to_vec();
            answer.extend_from_slice(&7u32.to_le_bytes());
            answer.extend_from_slice(&[0u8; 1 + NOISE_HANDSHAKE_LEN]);
            s.write_all(&answer).unwrap();
        });
        let why = protocol_text(handshake(TcpStream::connect(addr).unwrap(), &key(1), true, T));
        assert_eq!(why, "the peer speaks protocol version 7, this ftvm speaks 2");
        server.join().unwrap();
    }

    /// A responder on a fresh listener that reads the initiator's hello and answers with what
    /// `answer` makes of it; it returns what the initiator's handshake said.
    fn fake_responder(answer: impl FnOnce(&[u8]) -> Vec<u8> + Send + 'static) -> Result<Session, SecureError> {
        let (l, addr) = listener();
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut hello = [0u8; HELLO_LEN];
            s.read_exact(&mut hello).unwrap();
            s.write_all(&answer(&hello[HELLO_START_LEN..])).unwrap();
            // Whatever the initiator says next, until it closes.
            let _ = io::copy(&mut s, &mut io::sink());
        });
        let r = handshake(TcpStream::connect(addr).unwrap(), &key(1), true, T);
        server.join().unwrap();
        r
    }

    fn refusal_answer(tag: [u8; REFUSAL_LEN]) -> Vec<u8> {
        let mut a = hello_start().to_vec();
        a.push(REFUSED);
        a.extend_from_slice(&tag);
        a
    }

    #[test]
    fn an_initiator_checks_the_refusal_it_gets() {
        // A refusal under another key: the keys differ.
        let why = wrong_key_text(fake_responder(|n1| refusal_answer(key(2).refusal(n1).unwrap())));
        assert_eq!(why, "the peer's key differs from ours (--key-file)");
        // Under the public key: the peer has none.
        let why = wrong_key_text(fake_responder(|n1| refusal_answer(Key::unauthenticated().refusal(n1).unwrap())));
        assert_eq!(why, "the peer has no key (it runs without --key-file) and ours is set");
        // Under our own key: the peer holds it, so our message did not reach it intact.
        let why = protocol_text(fake_responder(|n1| refusal_answer(key(1).refusal(n1).unwrap())));
        assert_eq!(why, "the peer could not open our handshake message although it holds our key: altered in transit");
        // Garbage instead of an answer.
        let why = wrong_key_text(fake_responder(|_| {
            let mut a = hello_start().to_vec();
            a.push(ACCEPTED);
            a.extend_from_slice(&[0x55; NOISE_HANDSHAKE_LEN]);
            a
        }));
        assert!(why.starts_with("the peer's handshake answer failed its check"), "{why}");
        let why = protocol_text(fake_responder(|_| {
            let mut a = hello_start().to_vec();
            a.push(0x7f);
            a
        }));
        assert_eq!(why, "unexpected handshake verdict 0x7f");
    }

    #[test]
    fn a_responder_refuses_a_replayed_hello_and_an_initiator_that_leaves() {
        // An initiator that leaves instead of confirming the session.
        let (addr, r) = responder(&key(1));
        let mut c = TcpStream::connect(addr).unwrap();
        let mut noise = noise_state(&key(1), true).unwrap();
        let mut hello = hello_start().to_vec();
        hello.resize(HELLO_LEN, 0);
        noise.write_message(&[], &mut hello[HELLO_START_LEN..]).unwrap();
        c.write_all(&hello).unwrap();
        let mut answer = [0u8; HELLO_START_LEN + 1 + NOISE_HANDSHAKE_LEN];
        c.read_exact(&mut answer).unwrap();
        assert_eq!(answer[HELLO_START_LEN], ACCEPTED);
        drop(c);
        assert_eq!(
            protocol_text(r.join().unwrap()),
            "the peer closed the connection instead of confirming the session"
        );

        // The same hello replayed by someone who does not hold its ephemeral key: the
        // responder accepts the hello (it was made with the key) but not the confirmation.
        let (addr, r) = responder(&key(1));
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(&hello).unwrap();
        c.read_exact(&mut answer).unwrap();
        let mut forged = vec![ACCEPTED];
        forged.extend_from_slice(&[0xaa; TAG_LEN]);
        c.write_all(&forged).unwrap();
        let why = protocol_text(r.join().unwrap());
        assert!(why.starts_with("the peer's confirmation failed its check: its hello was replayed"), "{why}");
        let mut verdict = [0u8; 1];
        c.read_exact(&mut verdict).unwrap();
        assert_eq!(verdict[0], REFUSED);

        // An initiator that refuses the answer.
        let (addr, r) = responder(&key(1));
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(&hello).unwrap();
        c.read_exact(&mut answer).unwrap();
        c.write_all(&[REFUSED]).unwrap();
        assert!(protocol_text(r.join().unwrap()).starts_with("the peer refused our handshake answer"));
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
        assert_eq!(
            e.to_string(),
            "message 0 is out of sequence (expected 1): replayed, duplicated, reordered or dropped"
        );
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
        assert!(
            matches!(&e, SecureError::Protocol(why) if why.contains("more than a Noise message holds (65519)")),
            "{e}"
        );
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
    fn garbage_streams_are_errors_not_panics() {
        let mut x = 0x9e37_79b9u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for round in 0..40 {
            let ((w, _, _), (_, mut r, _)) = ok_pair();
            let len = (next() % 3000) as usize;
            let mut g: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Every other round a plausible length, so that the body is read and checked.
            if round % 2 == 0 && g.len() >= 4 {
                g[0..4].copy_from_slice(&(next() % 2000).to_le_bytes());
            }
            w.stream().try_clone().unwrap().write_all(&g).unwrap();
            w.shutdown();
            let mut sink = Vec::new();
            match r.read_to_end(&mut sink) {
                Ok(_) => assert!(g.is_empty(), "garbage was accepted: {} bytes", sink.len()),
                Err(e) => {
                    let ok = matches!(e.kind(), io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof);
                    assert!(ok, "{e}");
                }
            }
        }
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

    #[test]
    fn a_reordered_frame_is_detected() {
        let held = Arc::new(Mutex::new(None));
        let h = held.clone();
        let ((mut w, _, _), (_, mut r, _)) = tampered_pair(move |index, frame| match index {
            0 => {
                *h.lock().unwrap() = Some(frame);
                Vec::new()
            }
            1 => [frame, h.lock().unwrap().take().unwrap()].concat(),
            _ => frame,
        });
        send(&mut w, &[b"first", b"second"]);
        let e = read_failure(&mut r);
        assert!(matches!(e, SecureError::Replayed { seq: 1, expected: 0 }), "{e}");
    }

    #[test]
    fn a_chunk_whose_frame_flag_was_flipped_does_not_open() {
        // The "more of this frame follows" bit is in the nonce, which the AEAD authenticates.
        let ((mut w, _, _), (_, mut r, _)) = tampered_pair(|_, mut frame| {
            frame[4 + 7] ^= 0x40;
            frame
        });
        send(&mut w, &[b"ends here"]);
        assert!(matches!(read_failure(&mut r), SecureError::Altered { seq: 0 }));
    }

    #[test]
    fn a_datagram_spliced_into_the_stream_and_a_chunk_sent_as_a_datagram_are_refused() {
        // Both are sealed under the same direction's key; their nonces' kinds differ.
        let spliced: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let (s, rec) = (spliced.clone(), recorded.clone());
        let ((mut w, _, di), (_, mut r, dr)) = tampered_pair(move |index, frame| {
            rec.lock().unwrap().push(frame.clone());
            match (index, s.lock().unwrap().take()) {
                (1, Some(d)) => d,
                _ => frame,
            }
        });
        send(&mut w, &[b"chunk zero"]);
        let mut b = [0u8; 10];
        r.read_exact(&mut b).unwrap();
        // A datagram (nonce of kind 2, number 1) dressed as chunk 1.
        di.sealer().seal(b"datagram zero");
        let d = di.sealer().seal(b"datagram one");
        let mut chunk = ((d.len() - 8 - TAG_LEN) as u32).to_le_bytes().to_vec();
        chunk.extend_from_slice(&d);
        *spliced.lock().unwrap() = Some(chunk);
        send(&mut w, &[b"chunk one"]);
        let e = read_failure(&mut r);
        assert!(
            matches!(&e, SecureError::Protocol(why) if why == "message 1 is a datagram, not a stream chunk: spliced into the stream"),
            "{e}"
        );

        // Chunk 0 dressed as a datagram.
        let frame = recorded.lock().unwrap()[0].clone();
        let e = dr.opener().open(&frame[4..]).unwrap_err();
        assert!(
            matches!(&e, SecureError::Protocol(why) if why == "message 0 is a stream chunk, not a datagram"),
            "{e}"
        );
    }

    #[test]
    fn frames_larger_than_a_noise_message_go_in_chunks_and_come_back_whole() {
        let ((mut w, _, _), (_, mut r, _)) = ok_pair();
        let gauge = r.buffered_gauge();
        const BIG: usize = 5 << 20;
        let big: Vec<u8> = (0..BIG as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
        let chunks = BIG.div_ceil(MAX_CHUNK) as u64;
        let expected = big.clone();
        let sender = thread::spawn(move || {
            // One frame through seal(), as the primary's vCPU sends the log ...
            let wire = w.seal(&big).unwrap();
            assert_eq!(w.next_seq, chunks);
            assert_eq!(wire.len(), BIG + chunks as usize * (FRAME_HEADER_LEN + TAG_LEN));
            w.stream().try_clone().unwrap().write_all(&wire).unwrap();
            // ... and one through write_all() and one flush(), as a state transfer does.
            w.write_all(&big).unwrap();
            w.flush().unwrap();
            assert_eq!(w.next_seq, 2 * chunks);
            w
        });
        for _ in 0..2 {
            let mut got = vec![0u8; BIG];
            let mut at = 0;
            while at < BIG {
                let n = r.read(&mut got[at..(at + 100_000).min(BIG)]).unwrap();
                assert!(n > 0);
                at += n;
                // The frame goes on until its last byte is read.
                assert_eq!(gauge.load(Ordering::Relaxed) == 0, at == BIG, "at {at}");
            }
            assert!(got == expected, "the frame came back altered");
        }
        let w = sender.join().unwrap();
        w.shutdown();
        assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0);
    }

    #[test]
    fn a_connection_cut_between_the_chunks_of_a_frame_is_an_unexpected_eof() {
        let ((mut w, _, _), (_, mut r, _)) = tampered_pair(|index, frame| if index == 0 { frame } else { Vec::new() });
        w.write_all(&vec![7u8; MAX_CHUNK + 10]).unwrap();
        w.flush().unwrap();
        w.shutdown();
        let mut got = vec![0u8; MAX_CHUNK];
        r.read_exact(&mut got).unwrap();
        let e = r.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(e.to_string().contains("in the middle of a frame"), "{e}");
    }

    #[test]
    fn nothing_crosses_in_the_clear() {
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let rec = recorded.clone();
        let ((mut w, _, d), (_, mut r, _)) = tampered_pair(move |_, frame| {
            rec.lock().unwrap().extend_from_slice(&frame);
            frame
        });
        const MARKER: &[u8] = b"MARKER-7f3a9c-SECRET";
        let payload = MARKER.repeat(5000);
        send(&mut w, &[&payload]);
        let mut got = vec![0u8; payload.len()];
        r.read_exact(&mut got).unwrap();
        assert!(got == payload);
        let seen = recorded.lock().unwrap().clone();
        assert!(seen.len() > payload.len());
        assert!(!seen.windows(MARKER.len()).any(|x| x == MARKER), "the marker crossed in the clear");
        let datagram = d.sealer().seal(MARKER);
        assert!(!datagram.windows(MARKER.len()).any(|x| x == MARKER));
    }

    #[test]
    fn a_pair_key_needs_a_file_or_an_explicit_flag() {
        let why = key_file_error(Key::for_pair(None, false));
        assert!(why.starts_with("the replication channel needs a key: --key-file FILE"), "{why}");
        assert!(why.contains("--insecure"), "{why}");
        assert!(!Key::for_pair(None, true).unwrap().is_authenticated());
        let file = temp_file("pair", Key::generate_hex().as_bytes());
        assert!(Key::for_pair(Some(&file), false).unwrap().is_authenticated());
        let why = key_file_error(Key::for_pair(Some(&file), true));
        assert!(why.ends_with("and --insecure contradict each other: give one"), "{why}");
    }

    /// Seal and open of 64 KiB frames, in memory: the HMAC-SHA256 framing of protocol
    /// version 1 (as it was: a MAC over sequence number, length and payload, appended; checked
    /// in place) against this one, AES-256-GCM (and ChaCha20-Poly1305 for comparison).
    /// `cargo test --release -p ftvm-replication -- --ignored --nocapture seal_and_open_throughput`
    #[test]
    #[ignore = "a measurement; run it with --release --ignored --nocapture"]
    fn seal_and_open_throughput() {
        const FRAME: usize = 64 * 1024;
        let payload: Vec<u8> = (0..FRAME).map(|i| (i * 7) as u8).collect();
        let rounds = 4000usize;
        let rate = |t: Duration| (rounds * FRAME) as f64 / t.as_secs_f64() / 1e9;

        let hmac_v1 = || {
            let key = keyed(&[9u8; 32]).unwrap();
            let start = Instant::now();
            for seq in 0..rounds as u64 {
                let len = FRAME as u32;
                let mut mac = key.clone();
                mac.update(&seq.to_le_bytes());
                mac.update(&len.to_le_bytes());
                mac.update(&payload);
                let mut out = Vec::with_capacity(FRAME_HEADER_LEN + FRAME + 32);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&payload);
                out.extend_from_slice(&mac.finalize().into_bytes());
                let mut mac = key.clone();
                mac.update(&seq.to_le_bytes());
                mac.update(&len.to_le_bytes());
                mac.update(&out[FRAME_HEADER_LEN..FRAME_HEADER_LEN + FRAME]);
                assert!(mac.verify_slice(&out[FRAME_HEADER_LEN + FRAME..]).is_ok());
                std::hint::black_box(&out);
            }
            start.elapsed()
        };
        let aead = |params: &str| {
            let parsed: snow::params::NoiseParams = params.parse().unwrap();
            let psk = [5u8; 32];
            let mut i = snow::Builder::new(parsed.clone()).psk(0, &psk).unwrap().build_initiator().unwrap();
            let mut r = snow::Builder::new(parsed).psk(0, &psk).unwrap().build_responder().unwrap();
            let (mut m, mut p) = ([0u8; 128], [0u8; 128]);
            let n = i.write_message(&[], &mut m).unwrap();
            r.read_message(&m[..n], &mut p).unwrap();
            let n = r.write_message(&[], &mut m).unwrap();
            i.read_message(&m[..n], &mut p).unwrap();
            let (i, r) = (i.into_stateless_transport_mode().unwrap(), r.into_stateless_transport_mode().unwrap());
            let mut plain = vec![0u8; MAX_NOISE_MESSAGE];
            let start = Instant::now();
            let mut seq = 0;
            for _ in 0..rounds {
                // As SecureWriter::seal and SecureReader do it.
                let mut out = Vec::with_capacity(FRAME + 2 * (FRAME_HEADER_LEN + TAG_LEN));
                let chunks = FRAME.div_ceil(MAX_CHUNK);
                for (k, chunk) in payload.chunks(MAX_CHUNK).enumerate() {
                    seal_chunk(&i, seq + k as u64, k + 1 < chunks, chunk, &mut out).unwrap();
                }
                let mut at = 0;
                while at < out.len() {
                    let header: &[u8; FRAME_HEADER_LEN] = out[at..at + FRAME_HEADER_LEN].try_into().unwrap();
                    let (_, total, _) = parse_chunk_header(header).unwrap();
                    open_chunk(&r, seq, &out[at..at + total], &mut plain).unwrap();
                    std::hint::black_box(&plain);
                    at += total;
                    seq += 1;
                }
            }
            start.elapsed()
        };
        // Interleaved, best of three, so that a busy host hurts each alike.
        let (mut h, mut a, mut c) = (Duration::MAX, Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            h = h.min(hmac_v1());
            a = a.min(aead(NOISE_PARAMS));
            c = c.min(aead("Noise_NNpsk0_25519_ChaChaPoly_SHA256"));
        }
        println!(
            "seal+open of 64 KiB frames: HMAC-SHA256 (v1) {:.2} GB/s, AES-256-GCM (v2) {:.2} GB/s ({:.2}x), \
             ChaCha20-Poly1305 {:.2} GB/s ({:.2}x); time per frame: {:.1} us, {:.1} us, {:.1} us",
            rate(h),
            rate(a),
            h.as_secs_f64() / a.as_secs_f64(),
            rate(c),
            h.as_secs_f64() / c.as_secs_f64(),
            h.as_secs_f64() * 1e6 / rounds as f64,
            a.as_secs_f64() * 1e6 / rounds as f64,
            c.as_secs_f64() * 1e6 / rounds as f64,
        );
    }
}
