//! The guest kit's Linux personality: runs one unmodified x86-64 Linux executable (static,
//! static-PIE, or dynamically linked with its interpreter from the initramfs) in ring 3 and
//! serves its system calls; see docs/linux-personality.md.
//!
//! Start-up: the kit is up (ring 3); the virtio devices are driven; the initramfs (the PVH
//! module `--initrd` gives, cpio newc) becomes the file system; the program comes from the
//! command line (`init=PATH`, the words after `--` its arguments, less the `virtio_mmio.device=`
//! words VMMs append; by default the first line of the initramfs's `/init.args` and the lines
//! after it); its segments are loaded where it
//! is linked (in the process window, see `mem`), its interpreter's after them; the stack is laid out as Linux does
//! (`linux_abi::stack`); LSTAR points at the entry (`entry`); then the program runs.
//!
//! Bad input (no initramfs, no such program, not an x86-64 ELF, a missing interpreter, a
//! program that breaks the guest contract, too little memory):
//! one `linux: error: ...` line and a reset through the i8042 (ftvm exits with status 3,
//! "guest requested a reset"; QEMU with `-no-reboot` exits), unlike a normal end (`exit_group`:
//! `linux: exit status N` and power-off, ftvm status 0).

#![no_std]
#![no_main]

extern crate alloc;

mod contract;
mod entry;
mod fork;
mod fs;
mod mem;
mod net;
mod persist;
mod rewrite;
mod sched;
mod signal;
mod sys;
mod vdso;

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::UnsafeCell;

use ftvm_guest_kit::net::IpConfig;
use ftvm_guest_kit::virtio::{self, rng::VirtioRng};
use ftvm_guest_kit::{boot, cmdline, entry, mem as kmem, println, rtc, time};
use goblin::elf::program_header::{PT_INTERP, PT_LOAD, PT_PHDR};
use goblin::elf::Elf;

entry!(main);

/// Where a static-PIE executable is loaded.
const PIE_BASE: u64 = mem::WINDOW_START;
/// The process's pid (and its main thread's tid): it is the only process, like init.
pub const PID: u32 = 1;

/// Everything the system calls work on. One CPU, and the personality's code is never
/// interrupted by code that touches it (interrupt handlers only count ticks and set IRQ
/// bits), so one global suffices; see [`kernel`].
pub struct Kernel {
    pub mem: mem::ProcMem,
    pub fs: fs::Fs,
    pub fds: sys::FdTable,
    pub net: Option<net::Net>,
    pub rng: Option<VirtioRng>,
    /// Words for the RDRAND and RDSEED emulations, drawn from `rng` a batch at a time.
    pub random_words: sys::RandomWords,
    /// The data directory's journal on the virtio disk (None: in RAM only).
    pub disk: Option<persist::Disk>,
    pub cwd: String,
    pub umask: u32,
    /// RTC time at boot, seconds since 1970, and the tick count then.
    pub boot_epoch: u64,
    pub boot_ticks: u64,
    pub exe: String,
    pub warned: alloc::collections::BTreeSet<u64>,
    pub sigactions: alloc::collections::BTreeMap<u64, [u64; 4]>,
}

struct Global<T>(UnsafeCell<Option<T>>);
// SAFETY: one CPU; interrupt handlers never touch these (see `Kernel`).
unsafe impl<T> Sync for Global<T> {}

static KERNEL: Global<Kernel> = Global(UnsafeCell::new(None));
static SCHED: Global<sched::Sched> = Global(UnsafeCell::new(None));

/// The kernel state. Callers never hold the reference across a thread switch
/// (`sched::block`), which is where another thread would take its own.
pub fn kernel() -> &'static mut Kernel {
    // SAFETY: set once in `main` before the program runs; see the comment above.
    unsafe { (*KERNEL.0.get()).as_mut().expect("kernel state set before the program runs") }
}

/// The scheduler's state (threads), under the same rule as [`kernel`].
pub fn sched() -> &'static mut sched::Sched {
    // SAFETY: as for `kernel`.
    unsafe { (*SCHED.0.get()).as_mut().expect("scheduler set before the program runs") }
}

/// Polls the network (if any); marks I/O as changed when something happened.
pub fn poll_io() {
    let changed = kernel().net.as_mut().is_some_and(|n| n.poll());
    if changed {
        sched().io_changed();
    }
}

/// The program's end: `exit_group(status)` or the last thread's `exit` (a forked child's: see `fork`).
pub fn exit_all(status: u64) -> ! {
    // A forked child's end: its parent resumes instead (never returns then).
    fork::exited(status);
    if let Some(net) = kernel().net.as_mut() {
        net.poll();
    }
    println!("linux: exit status {status}");
    ftvm_guest_kit::power::power_off()
}

/// The personality needs the 256 MiB process window plus its own heap and the initramfs
/// above it. Printed without the heap, which may be empty.
fn too_little_memory(ram_mib: u64) -> ! {
    println!(
        "linux: error: the VM has {ram_mib} MiB of RAM; the Linux personality needs 512 MiB or more \
         (the program's 256 MiB window, then its own heap and the initramfs): give --mem 1G"
    );
    stop()
}

/// Bad input: one line, then a reset (distinct from a power-off: ftvm exits with status 3).
pub fn fatal(message: &str) -> ! {
    println!("linux: error: {message}");
    stop()
}

/// Ends the VM after a fatal error.
fn stop() -> ! {
    // The i8042 reset line: ring 3 may use every port (the kit's TSS I/O bitmap).
    ftvm_guest_kit::port::outb(0x64, 0xfe);
    // Not reset (no i8042): power off instead.
    ftvm_guest_kit::power::power_off()
}

fn epoch_now() -> u64 {
    let Some(t) = rtc::read() else { return 0 };
    // Days from civil (Howard Hinnant's algorithm), then seconds.
    let (y, m, d) = (i64::from(t.year), i64::from(t.month), i64::from(t.day));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + i64::from(t.seconds_of_day())).max(0) as u64
}

/// The program's path and argv from the command line and `/init.args`.
fn program(fs: &fs::Fs) -> Result<(String, Vec<String>), String> {
    // VMMs append `virtio_mmio.device=` words (ftvm, QEMU microvm): never the program's.
    let words: Vec<&str> =
        cmdline::cmdline().split_ascii_whitespace().filter(|w| !w.starts_with("virtio_mmio.device=")).collect();
    let (kernel_part, args_part) = match words.iter().position(|w| *w == "--") {
        Some(i) => (&words[..i], Some(&words[i + 1..])),
        None => (&words[..], None),
    };
    let init = kernel_part.iter().filter_map(|w| w.strip_prefix("init=")).next_back();
    let defaults: Vec<String> = match fs.get("/init.args") {
        Some(node) => {
            let node = node.borrow();
            String::from_utf8_lossy(node.bytes())
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        }
        None => Vec::new(),
    };
    let path = match init {
        Some(path) => path.to_string(),
        None => {
            defaults.first().cloned().ok_or("no init=PATH on the command line and no /init.args in the initramfs")?
        }
    };
    let mut argv = alloc::vec![path.clone()];
    match args_part {
        Some(args) => argv.extend(args.iter().map(|a| String::from(*a))),
        None if init.is_none() || defaults.first() == Some(&path) => argv.extend(defaults.iter().skip(1).cloned()),
        None => {}
    }
    Ok((path, argv))
}

struct Loaded {
    /// Where the program starts: its entry, or its interpreter's.
    entry: u64,
    /// The program's own entry (AT_ENTRY).
    program_entry: u64,
    /// The interpreter's load address (AT_BASE), 0 without one.
    base: u64,
    phdr: u64,
    phnum: u64,
    phent: u64,
    end: u64,
}

/// Copies an ELF image's PT_LOAD segments to their link addresses plus `bias`; returns the
/// end of the highest and the address of the program headers (PT_PHDR, or the first
/// segment's copy of them).
fn load_segments(elf: &Elf, image: &[u8], bias: u64) -> Result<(u64, Option<u64>), String> {
    let mut end = 0;
    let mut phdr = None;
    for ph in elf.program_headers.iter() {
        if ph.p_type == PT_PHDR {
            phdr = Some(ph.p_vaddr + bias);
        }
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        let start = ph.p_vaddr.wrapping_add(bias);
        if !mem::ProcMem::in_window(start, ph.p_memsz) || ph.p_filesz > ph.p_memsz {
            return Err(alloc::format!(
                "segment at {start:#x} (+{:#x}) is outside the process window {:#x}-{:#x}",
                ph.p_memsz,
                mem::WINDOW_START,
                mem::WINDOW_END - mem::STACK_SIZE
            ));
        }
        let file = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .and_then(|e| image.get(ph.p_offset as usize..e as usize))
            .ok_or("a segment runs past the end of the file")?;
        // SAFETY: inside the process window (checked), RAM nothing else uses.
        unsafe {
            core::ptr::copy_nonoverlapping(file.as_ptr(), start as *mut u8, file.len());
            core::ptr::write_bytes((start + ph.p_filesz) as *mut u8, 0, (ph.p_memsz - ph.p_filesz) as usize);
        }
        if ph.p_offset == 0 && phdr.is_none() {
            phdr = Some(start + elf.header.e_phoff);
        }
        end = end.max(start + ph.p_memsz);
    }
    if end == 0 {
        return Err("no loadable segment".into());
    }
    Ok((end, phdr))
}

/// The rewrite of a loaded image's sites (trampolines right after `end`), then the guest
/// contract's verdict; returns the new end.
fn rewrite_and_check(elf: &Elf, image: &[u8], bias: u64, end: u64) -> Result<u64, String> {
    let checked = contract::scan(elf, image);
    let mut emulated = Vec::new();
    let mut end = end;
    if cmdline::param("linux.rewrite") == Some("off") {
        println!("linux: syscall sites left as they are (linux.rewrite=off)");
    } else {
        let base = mem::page_up(end);
        let t0 = time::ticks();
        let done = rewrite::apply(elf, image, bias, base);
        println!("linux: {}", rewrite::summary(&done, time::ticks() - t0));
        end = mem::page_up(done.end);
        emulated = done.emulated;
    }
    contract::verdict(&checked, bias, &emulated)?;
    Ok(end)
}

fn parse(image: &[u8]) -> Result<Elf<'_>, String> {
    let elf = Elf::parse(image).map_err(|e| alloc::format!("not an ELF executable ({e})"))?;
    if !elf.is_64 || elf.header.e_machine != goblin::elf::header::EM_X86_64 {
        return Err("not an x86-64 ELF executable".into());
    }
    Ok(elf)
}

/// Loads an x86-64 ELF executable into the process window; a dynamically linked one with
/// its interpreter (PT_INTERP, from the initramfs) right after it, as Linux's `load_elf_binary`
/// does (the interpreter then maps the shared libraries itself, with `mmap`).
fn load_elf(fs: &fs::Fs, image: &[u8]) -> Result<Loaded, String> {
    let elf = parse(image)?;
    let bias = match elf.header.e_type {
        goblin::elf::header::ET_EXEC => 0,
        goblin::elf::header::ET_DYN => PIE_BASE,
        other => return Err(alloc::format!("ELF type {other} is not an executable")),
    };
    let (end, phdr) = load_segments(&elf, image, bias)?;
    let mut end = rewrite_and_check(&elf, image, bias, end)?;
    let mut loaded = Loaded {
        entry: elf.entry + bias,
        program_entry: elf.entry + bias,
        base: 0,
        phdr: phdr.unwrap_or(0),
        phnum: elf.program_headers.len() as u64,
        phent: u64::from(elf.header.e_phentsize),
        end,
    };
    if elf.program_headers.iter().any(|p| p.p_type == PT_INTERP) {
        // The interpreter at a fixed place (the page after the program and its trampolines),
        // which depends only on the binaries: a recording and its replay load it alike.
        let path = linux_abi::path::resolve("/", elf.interpreter.unwrap_or(""));
        let node = fs.get(&path).ok_or_else(|| alloc::format!("interpreter {path}: no such file in the initramfs"))?;
        let node = node.borrow();
        let interp = parse(node.bytes()).map_err(|e| alloc::format!("interpreter {path}: {e}"))?;
        if interp.header.e_type != goblin::elf::header::ET_DYN {
            return Err(alloc::format!("interpreter {path}: not a shared object"));
        }
        let base = mem::page_up(end);
        println!("linux: interpreter {path} at {base:#x}");
        let (interp_end, _) =
            load_segments(&interp, node.bytes(), base).map_err(|e| alloc::format!("interpreter {path}: {e}"))?;
        end = rewrite_and_check(&interp, node.bytes(), base, interp_end)
            .map_err(|e| alloc::format!("interpreter {path}: {e}"))?;
        loaded.entry = interp.entry + base;
        loaded.base = base;
        loaded.end = end;
    }
    if loaded.end > mem::WINDOW_END - mem::STACK_SIZE - (64 << 20) {
        return Err("the executable leaves no room for brk and mmap in the process window".into());
    }
    Ok(loaded)
}

/// The high area (mem.rs): `linux.program_share` percent (default 50, at most 90) of the
/// personality's heap, in whole 2 MiB pages, taken from the heap for good. The rest holds
/// the personality's own state: the files written at run time (the data directory's
/// among them), socket buffers, and a fork's copy of the program's memory.
fn high_area() -> Option<(u64, u64)> {
    const ALIGN: u64 = 2 << 20;
    let share = cmdline::param_u64_or("linux.program_share", 50).min(90);
    let bytes = (kmem::heap_bytes() / 100 * share) & !(ALIGN - 1);
    if bytes == 0 {
        return None;
    }
    let layout = core::alloc::Layout::from_size_align(bytes as usize, ALIGN as usize).ok()?;
    // SAFETY: the layout has a non-zero size. Never freed: the program's memory for the
    // rest of the guest's life; not zeroed here (mmap zeroes what it hands out), so the
    // VM's memory is touched only as the program uses it.
    let start = unsafe { alloc::alloc::alloc(layout) } as u64;
    (start != 0).then(|| (start, start + bytes))
}

fn main() {
    // Checked before anything allocates: with too little RAM the heap above the process
    // window is empty, and the first allocation would panic with no hint of the cause.
    let ram_mib = kmem::ram_bytes().unwrap_or(0) >> 20;
    if kmem::heap_bytes() < (32 << 20) {
        too_little_memory(ram_mib);
    }
    let Some(initrd) = boot::modules().first().copied() else {
        fatal("no initramfs: give the program and its files with --initrd (a cpio newc archive)");
    };
    if initrd.paddr < mem::WINDOW_END {
        too_little_memory(ram_mib);
    }
    let devices = virtio::init_devices();
    vdso::start_clock(epoch_now);
    let boot_epoch = vdso::now_ns(0) / 1_000_000_000;
    let mut fs = match fs::Fs::from_cpio(initrd.bytes(), boot_epoch) {
        Ok(fs) => fs,
        Err(error) => fatal(&alloc::format!("initramfs ({} bytes): {error}", initrd.size)),
    };
    let (path, argv) = program(&fs).unwrap_or_else(|e| fatal(&e));
    let path = linux_abi::path::resolve("/", &path);
    let Some(node) = fs.get(&path) else { fatal(&alloc::format!("{path}: no such file in the initramfs")) };
    let loaded = {
        let node = node.borrow();
        if node.is_dir() {
            fatal(&alloc::format!("{path} is a directory"));
        }
        load_elf(&fs, node.bytes()).unwrap_or_else(|e| fatal(&alloc::format!("{path}: {e}")))
    };
    let mut rng = devices.rng;
    let net = match (devices.net, IpConfig::from_cmdline()) {
        (Some(dev), Ok(config)) => {
            let seed = rng.as_mut().map_or(0x6c69_6e75_7821_2121, |r| r.u64());
            println!("linux: network {} (TCP over smoltcp)", config.address);
            Some(net::Net::new(dev, config, seed))
        }
        (Some(_), Err(error)) => {
            println!("linux: virtio-net present but {error}: no network");
            None
        }
        (None, _) => None,
    };
    if rng.is_none() {
        println!("linux: no virtio-rng: AT_RANDOM, getrandom and /dev/urandom give a fixed sequence");
    }
    let data_dir = linux_abi::path::resolve("/", cmdline::param("linux.data").unwrap_or("/data"));
    let disk = match devices.blk {
        Some(blk) => {
            let new_id = rng.as_mut().map_or(boot_epoch ^ 0x6c78_6a31, |r| r.u64());
            if fs.get(&data_dir).is_none() {
                fs.make_parents(&alloc::format!("{data_dir}/x"), boot_epoch);
            }
            match persist::Disk::open(blk, new_id, &mut fs, &data_dir, boot_epoch) {
                Ok(disk) => Some(disk),
                Err(error) => fatal(&alloc::format!("data disk: {error}")),
            }
        }
        None => {
            println!("linux: no virtio-blk disk: {data_dir} is in RAM only (lost at power-off)");
            None
        }
    };
    let mut random = [0u8; 16];
    match rng.as_mut() {
        Some(r) => r.fill(&mut random),
        None => random = *b"ftvm-no-rng-seed",
    }
    let auxv = [
        (linux_abi::stack::AT_PHDR, loaded.phdr),
        (linux_abi::stack::AT_PHENT, loaded.phent),
        (linux_abi::stack::AT_PHNUM, loaded.phnum),
        (linux_abi::stack::AT_PAGESZ, mem::PAGE),
        (linux_abi::stack::AT_BASE, loaded.base),
        (linux_abi::stack::AT_FLAGS, 0),
        (linux_abi::stack::AT_ENTRY, loaded.program_entry),
        (linux_abi::stack::AT_UID, 0),
        (linux_abi::stack::AT_EUID, 0),
        (linux_abi::stack::AT_GID, 0),
        (linux_abi::stack::AT_EGID, 0),
        (linux_abi::stack::AT_SECURE, 0),
        (linux_abi::stack::AT_CLKTCK, u64::from(time::TICK_HZ)),
        (linux_abi::stack::AT_HWCAP, 0),
        (linux_abi::stack::AT_SYSINFO_EHDR, vdso::build()),
    ];
    let envp: [&[u8]; 3] = [b"HOME=/", b"PATH=/:/bin:/usr/bin", b"TERM=dumb"];
    let args: Vec<&[u8]> = argv.iter().map(|a| a.as_bytes()).collect();
    let info = linux_abi::stack::Info { auxv: &auxv, random, execfn: path.as_bytes() };
    let stack = linux_abi::stack::build(mem::STACK_TOP, &args, &envp, &info);
    // SAFETY: the top of the stack area in the process window.
    unsafe { core::ptr::copy_nonoverlapping(stack.bytes.as_ptr(), stack.sp as *mut u8, stack.bytes.len()) };

    let mut proc_mem = mem::ProcMem::new(loaded.end);
    if let Some((start, end)) = high_area() {
        proc_mem.add_high_area(start, end);
    }
    println!(
        "linux: {} ({} args), entry {:#x}, image end {:#x}, {} MiB for the program's mmap above its window, {} MiB heap for the personality",
        path,
        argv.len(),
        loaded.entry,
        loaded.end,
        proc_mem.high_bytes() >> 20,
        kmem::heap_bytes().saturating_sub(proc_mem.high_bytes()) >> 20
    );
    let kernel = Kernel {
        mem: proc_mem,
        fs,
        fds: sys::FdTable::new(),
        net,
        rng,
        random_words: sys::RandomWords::new(),
        disk,
        cwd: String::from("/"),
        umask: 0o022,
        boot_epoch,
        boot_ticks: time::ticks(),
        exe: path,
        warned: Default::default(),
        sigactions: Default::default(),
    };
    // SAFETY: the program has not started: nothing else reads these yet.
    unsafe {
        *KERNEL.0.get() = Some(kernel);
        *SCHED.0.get() = Some(sched::Sched::new(PID));
    }
    if cmdline::flag("linux.syscall_probe") {
        entry::probe();
    }
    // The probe syscall of `install` runs the entry, which needs a kernel stack.
    entry::KSTACK_TOP.store(sched().main_kstack_top(), core::sync::atomic::Ordering::Relaxed);
    let ring0 = entry::install();
    println!(
        "linux: syscall enters {}",
        if ring0 { "ring 0 (interrupts off until the handler is back in ring 3)" } else { "ring 3 (served there)" }
    );
    signal::init();
    let frame = entry::fresh_frame(loaded.entry, stack.sp);
    entry::enter(sched().main_kstack_top(), &frame)
}
