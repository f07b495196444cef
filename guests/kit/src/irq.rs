//! Device interrupts, ring-3 side.
//!
//! Ring 0 does the least it can for a device IRQ (ring-0 code is emulated on our KVM): the
//! stub in `interrupts` sets bit `irq` in [`kit_irq_pending`](PENDING) and acknowledges the
//! 8259. Drivers take their bit here, then read and acknowledge the device's own interrupt
//! status and drain its rings, all in ring 3. `idle` returns at once while a pending bit is
//! also in the wanted mask, so an IRQ that fires between a driver's last look at its rings
//! and the `hlt` is not slept through.
//!
//! Drivers never depend on the IRQ arriving: they look at their rings after every wake-up
//! whatever the IRQ state, and the 100 Hz timer wakes the guest anyway, so a lost or
//! misrouted interrupt costs latency, not correctness.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::pic::{MASTER_DATA, SLAVE_DATA};
use crate::port::{inb, outb};

/// Bit n: IRQ n fired since a driver last took it. Set by ring 0, cleared by ring 3.
#[export_name = "kit_irq_pending"]
static PENDING: AtomicU32 = AtomicU32::new(0);
/// Bit n: a driver waits for IRQ n, so `idle` must not sleep while it is pending.
#[export_name = "kit_irq_wanted"]
static WANTED: AtomicU32 = AtomicU32::new(0);

/// The 8259 cascade line on the master.
const CASCADE: u8 = 2;

/// Whether `irq` can be delivered through the 8259 pair (ISA IRQs 1-15 except the
/// cascade; IRQ 0 is the timer's).
pub fn routable(irq: u32) -> bool {
    (1..16).contains(&irq) && irq != u32::from(CASCADE)
}

/// Unmasks `irq` on the 8259. Returns false (and does nothing) if the line cannot be
/// delivered through the 8259: the driver then relies on polling alone.
pub fn enable(irq: u32) -> bool {
    if !routable(irq) {
        return false;
    }
    // Ring 0 never touches the masks after boot, so read-modify-write from ring 3 is safe.
    if irq < 8 {
        outb(MASTER_DATA, inb(MASTER_DATA) & !(1 << irq));
    } else {
        outb(SLAVE_DATA, inb(SLAVE_DATA) & !(1 << (irq - 8)));
        outb(MASTER_DATA, inb(MASTER_DATA) & !(1 << CASCADE));
    }
    true
}

/// Marks `irq` wanted (`idle` does not sleep while it is pending) or not. A driver wants
/// its IRQ while it waits for the device; one that is not waiting leaves a late IRQ
/// pending for its next look instead of keeping the guest awake.
pub fn set_wanted(irq: u32, wanted: bool) {
    if irq >= 32 {
        return;
    }
    if wanted {
        WANTED.fetch_or(1 << irq, Ordering::Relaxed);
    } else {
        WANTED.fetch_and(!(1 << irq), Ordering::Relaxed);
    }
}

/// Takes (clears) the pending bit of `irq`; true if it was set.
#[inline]
pub fn take(irq: u32) -> bool {
    if irq >= 32 {
        return false;
    }
    let bit = 1 << irq;
    // Cheap plain read first: the locked read-modify-write only when there is work.
    PENDING.load(Ordering::Relaxed) & bit != 0 && PENDING.fetch_and(!bit, Ordering::Acquire) & bit != 0
}
