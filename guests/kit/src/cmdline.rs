//! The kernel command line (`hvm_start_info.cmdline_paddr`) and its `key=value` parameters.
//!
//! It is copied into the image at start-up (before `main`), so the heap may reuse the
//! memory the loader put it in.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

const MAX_LEN: usize = 4096;

struct Buffer(UnsafeCell<[u8; MAX_LEN]>);
// SAFETY: written once by `capture` before the application starts, read-only afterwards;
// the guest has one CPU and interrupt handlers never touch it.
unsafe impl Sync for Buffer {}

static BUFFER: Buffer = Buffer(UnsafeCell::new([0; MAX_LEN]));
static LEN: AtomicUsize = AtomicUsize::new(0);

/// Copies the NUL-terminated command line at `paddr` (truncated to 4 KiB, and to its
/// longest valid UTF-8 prefix).
pub(crate) fn capture(paddr: u64) {
    if paddr == 0 || paddr >= crate::mem::MAPPED_LIMIT - MAX_LEN as u64 {
        return;
    }
    // SAFETY: `paddr` is below the identity-mapped 3 GiB; `capture` runs once, before
    // anything reads `BUFFER`.
    let buffer = unsafe { &mut *BUFFER.0.get() };
    let mut len = 0;
    while len < MAX_LEN {
        // SAFETY: identity-mapped RAM below 3 GiB (checked above).
        let byte = unsafe { core::ptr::read_volatile((paddr + len as u64) as *const u8) };
        if byte == 0 {
            break;
        }
        buffer[len] = byte;
        len += 1;
    }
    let len = match core::str::from_utf8(&buffer[..len]) {
        Ok(_) => len,
        Err(error) => error.valid_up_to(),
    };
    LEN.store(len, Ordering::Relaxed);
}

/// The whole command line ("" if the loader gave none).
pub fn cmdline() -> &'static str {
    let len = LEN.load(Ordering::Relaxed);
    // SAFETY: `capture` stored `len` valid UTF-8 bytes and nothing writes them again.
    let bytes = unsafe { &(&*BUFFER.0.get())[..len] };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// The whitespace-separated words as `(key, value)`; `value` is `None` for a bare word.
pub fn params() -> impl Iterator<Item = (&'static str, Option<&'static str>)> {
    cmdline().split_ascii_whitespace().map(|word| match word.split_once('=') {
        Some((key, value)) => (key, Some(value)),
        None => (word, None),
    })
}

/// The value of the last `key=value` on the command line.
pub fn param(key: &str) -> Option<&'static str> {
    params().filter(|(k, _)| *k == key).filter_map(|(_, v)| v).last()
}

/// Whether `key` appears, bare or with a value.
pub fn flag(key: &str) -> bool {
    params().any(|(k, _)| k == key)
}

/// Parses a number: decimal or `0x` hexadecimal, `_` separators allowed.
pub fn parse_u64(text: &str) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    let mut value: u64 = 0;
    let mut any = false;
    for c in digits.chars().filter(|&c| c != '_') {
        let digit = c.to_digit(radix)?;
        value = value.checked_mul(radix as u64)?.checked_add(u64::from(digit))?;
        any = true;
    }
    any.then_some(value)
}

/// `param(key)` parsed as a number; `None` if absent, `Some(Err(text))` if malformed.
pub fn param_u64(key: &str) -> Option<Result<u64, &'static str>> {
    param(key).map(|text| parse_u64(text).ok_or(text))
}

/// `param_u64(key)`, or `default` if absent; a malformed value panics (it is a user error
/// worth stopping for).
pub fn param_u64_or(key: &str, default: u64) -> u64 {
    match param_u64(key) {
        None => default,
        Some(Ok(value)) => value,
        Some(Err(text)) => panic!("bad number in {key}={text}"),
    }
}
