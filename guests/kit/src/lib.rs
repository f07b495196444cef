//! ftvm guest kit: everything a freestanding ftvm guest needs besides its application.
//!
//! A guest is a PVH ELF kernel. The kit's boot path (`boot`) enters long mode, sets up the
//! descriptor tables (`arch`), the interrupt controller (`pic`), a 100 Hz timer (`pit`) and,
//! where CPUID reports one, the local APIC, then drops to **ring 3**, where the application
//! runs natively (ring-0 code is emulated on our KVM, see platform.md). Ring 3 reaches
//! ring 0 only through the `syscall` convention (a tagged `ud2`).
//!
//! The application provides `fn main()` and registers it with [`entry!`]; it gets console
//! output ([`print!`], [`println!`]), time ([`time`], [`rtc`]), the command line
//! ([`cmdline`]), memory ([`mem`]: a global allocator, so `alloc` works), virtio devices
//! ([`virtio`]: net, blk, rng over MMIO, with their IRQs in [`irq`]), TCP/IP with the `net`
//! feature ([`net`], smoltcp), the operator's shutdown request ([`shutdown`]) and
//! [`power::power_off`].
//!
//! The guest contract (design.md §1): no RDTSC, RDTSCP, RDPID, RDRAND, RDSEED anywhere and
//! CPUID only in ring-0 code (section `.text.ring0`); `cargo xtask guests` checks the image.

#![no_std]

extern crate alloc;

pub mod apic;
pub mod arch;
pub mod boot;
pub mod cmdline;
pub mod digest;
pub mod interrupts;
pub mod irq;
pub mod mem;
#[cfg(feature = "net")]
pub mod net;
pub mod pic;
pub mod pit;
pub mod pm_timer;
pub mod port;
pub mod power;
pub mod rtc;
pub mod serial;
pub mod shutdown;
pub mod syscall;
pub mod time;
pub mod virtio;

mod memfuncs;
mod runtime;

/// Registers the application's entry point: `ftvm_guest_kit::entry!(main);` with
/// `fn main()`. It runs in ring 3 after the kit is up; when it returns the guest powers off.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[export_name = "ftvm_guest_main"]
        pub extern "Rust" fn __ftvm_guest_main() {
            let main: fn() = $main;
            main()
        }
    };
}
