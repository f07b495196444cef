//! The operator's shutdown request: ftvm's keyboard types Ctrl+Alt+Del (docs/operations.md,
//! "Stopping"), as Firecracker's SendCtrlAltDel does, and a guest that sees it shuts down.
//!
//! [`enable`] unmasks the keyboard's IRQ 1; [`requested`] (ring 3, cheap: one atomic test while
//! no key came) reads the keys the i8042 holds once the IRQ fired and says whether Ctrl+Alt+Del
//! was among them. The answer stays true from then on, so any part of a guest can ask. The
//! keys come in scan code set 1 (the controller translates, its state after firmware, which the
//! kit never changes) or set 2 (translation off); both are understood.
//!
//! The request is a logged input: a replay or a backup sees the same keys at the same exit. A
//! guest that never calls [`enable`] leaves IRQ 1 masked and is stopped at the grace period's
//! end, as before.

use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::port::inb;

/// The keyboard's ISA interrupt line.
pub const IRQ: u32 = 1;
const DATA: u16 = 0x60;
const STATUS: u16 = 0x64;
const STATUS_OBF: u8 = 0x01;
const STATUS_AUX: u8 = 0x20;
/// At most this many bytes are taken per look (a controller holds a few).
const MAX_BYTES: usize = 32;

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// Ctrl down, Alt down, an E0 prefix seen, an F0 (set 2 break) prefix seen.
static KEYS: AtomicU8 = AtomicU8::new(0);
const CTRL: u8 = 1;
const ALT: u8 = 2;
const E0: u8 = 4;
const BREAK: u8 = 8;

/// Unmasks IRQ 1 and asks `idle` to wake for it. Returns false where the line cannot be
/// routed (then only polling with [`poll_keyboard`] sees the request).
pub fn enable() -> bool {
    crate::irq::set_wanted(IRQ, true);
    crate::irq::enable(IRQ)
}

/// Whether the operator asked this guest to shut down (Ctrl+Alt+Del on the keyboard).
pub fn requested() -> bool {
    if crate::irq::take(IRQ) {
        poll_keyboard();
    }
    REQUESTED.load(Ordering::Relaxed)
}

/// Reads what the keyboard holds, whether or not its IRQ fired (two port reads when empty).
pub fn poll_keyboard() {
    for _ in 0..MAX_BYTES {
        let status = inb(STATUS);
        if status & STATUS_OBF == 0 {
            break;
        }
        let byte = inb(DATA);
        if status & STATUS_AUX == 0 && key(byte) {
            REQUESTED.store(true, Ordering::Relaxed);
        }
    }
}

/// Feeds one scan code byte to the decoder; true when it completes Ctrl+Alt+Del.
fn key(byte: u8) -> bool {
    let (keys, hit) = decode(KEYS.load(Ordering::Relaxed), byte);
    KEYS.store(keys, Ordering::Relaxed);
    hit
}

/// The decoder's step: (new state, whether Del went down with Ctrl and Alt held).
/// Set 1: Ctrl 1d/9d, Alt 38/b8, Del e0 53. Set 2: Ctrl 14, Alt 11, Del e0 71, f0 before a
/// break. (Right Ctrl and Alt are the same codes behind e0.)
pub(crate) fn decode(mut keys: u8, byte: u8) -> (u8, bool) {
    let e0 = keys & E0 != 0;
    let brk = keys & BREAK != 0;
    keys &= !(E0 | BREAK);
    let set = |keys: u8, bit: u8, down: bool| if down { keys | bit } else { keys & !bit };
    let held = |keys: u8| keys & (CTRL | ALT) == CTRL | ALT;
    match byte {
        0xe0 => return (keys | E0 | if brk { BREAK } else { 0 }, false),
        0xf0 => return (keys | BREAK | if e0 { E0 } else { 0 }, false),
        // Set 1.
        0x1d | 0x9d => keys = set(keys, CTRL, byte == 0x1d),
        0x38 | 0xb8 => keys = set(keys, ALT, byte == 0x38),
        0x53 if e0 => return (keys, held(keys)),
        // Set 2.
        0x14 => keys = set(keys, CTRL, !brk),
        0x11 => keys = set(keys, ALT, !brk),
        0x71 if e0 && !brk => return (keys, held(keys)),
        _ => {}
    }
    (keys, false)
}
