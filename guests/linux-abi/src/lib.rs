//! The parts of the Linux personality (`guests/linux`) that need no hardware, kept in a
//! plain `no_std` library so that their unit tests run on the host:
//! `cd guests && cargo test -p linux-abi` (`cargo xtask guests` runs them too).
//!
//! - [`epoll`]: epoll's interest and ready lists, in the order Linux reports descriptors.
//! - [`cpio`]: a reader of the initramfs format Linux and QEMU use ("newc", `070701`).
//! - [`stack`]: the initial process stack as Linux's `create_elf_tables` lays it out.
//! - [`path`]: path normalization for the personality's file system.
//! - [`journal`]: the data disk's format (the journal of changes under the data directory).
//! - [`proc`]: `fork`'s bookkeeping (zombies, `wait4`'s status word) and its copy plan.
//! - [`rewrite`]: the load-time rewrite of the program's `syscall` sites into jumps to trampolines.
//! - [`signal`]: the x86-64 signal frame (`rt_sigframe`, `ucontext`, `siginfo`) and `rt_sigreturn`.

#![no_std]

extern crate alloc;

pub mod cpio;
pub mod epoll;
pub mod journal;
pub mod path;
pub mod proc;
pub mod rewrite;
pub mod signal;
pub mod stack;
