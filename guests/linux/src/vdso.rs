//! A vDSO: the small ELF image Linux maps into every process (AT_SYSINFO_EHDR) so that
//! `clock_gettime`, `gettimeofday` and `time` need no system call. musl (and glibc) look
//! their functions up in it by name; with one, the program reads the guest clock with a
//! plain call: ftvm's PM timer, sampled once a tick (the PIT tick count the ring-0 timer
//! handler increments says when), plus the RTC time at boot (`start_clock`); without a PM
//! timer, the tick count itself. Never the TSC.
//!
//! A system call costs ~20 us on our KVM (measured with `linux.syscall_probe`), and Redis
//! asks for the time several times per command: without the vDSO, most of its system calls
//! were `clock_gettime`.
//!
//! The image (one page, built at start-up): ELF header, a PT_LOAD and a PT_DYNAMIC program
//! header, the dynamic section (DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT), a SysV
//! hash table, the symbols and their names. No version definitions: musl then matches names
//! alone. The functions themselves are in the personality's image (ring-3 code, identity
//! mapped), so symbol values are their addresses minus the image's.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ftvm_guest_kit::{pm_timer, time};

const NS: u64 = 1_000_000_000;

/// The clock: the guest-time estimate `BASE_NS`, sampled at tick `BASE_TICKS`. With a PM
/// timer, the first read in a new tick samples it again: the clock is the last sample,
/// never ahead of guest time. Without one, a read adds the ticks since.
static BASE_TICKS: AtomicU64 = AtomicU64::new(0);
static BASE_NS: AtomicU64 = AtomicU64::new(0);
/// The largest estimate handed out: reads never go back, even when a resample finds the
/// ticks ran ahead (late ones delivered in a burst).
static LAST_NS: AtomicU64 = AtomicU64::new(0);
/// The estimate at boot: the monotonic clocks count from it (from one second).
static BOOT_NS: AtomicU64 = AtomicU64::new(0);
/// The wall clock (ns since 1970) less the estimate.
static WALL_OFFSET_NS: AtomicU64 = AtomicU64::new(0);
/// What the once-a-tick hook does.
static HOOK: AtomicU64 = AtomicU64::new(HOOK_NONE);
const HOOK_NONE: u64 = 0;
const HOOK_SAMPLE: u64 = 1;
const HOOK_ALIGN: u64 = 2;
/// Set when frames arrived: the next read resamples (see `input_arrived`).
static INPUT: AtomicBool = AtomicBool::new(false);
/// While aligning: 1 + the RTC's seconds last seen (0 before the first look).
static RTC_SECOND: AtomicU64 = AtomicU64::new(0);
/// Gives up aligning after this many looks (an RTC that does not count: keep the boot
/// reading), a little over two seconds of ticks.
const ALIGN_LOOKS: u64 = 2 * time::TICK_HZ as u64 + 20;

fn ticks_ns(ticks: u64) -> u64 {
    time::ticks_to_ms(ticks) * 1_000_000
}

/// Starts the clocks; `read_rtc` reads the RTC (seconds since 1970).
///
/// With ftvm's PM timer (`ftvm_guest_kit::pm_timer`), the estimate is guest time itself,
/// and ftvm's RTC shows its base at guest time 0 and counts whole seconds of guest time
/// (starting the guest clock where those seconds turn with the host's), so the wall clock
/// is the RTC's reading less the whole seconds of guest time at the reading, plus guest
/// time: exact. It is set a tick on, since a read gives the time at the last sample or
/// tick, up to a tick behind: never behind the host's clock, at most 10 ms ahead.
///
/// Without one (QEMU microvm), the estimate counts ticks and the RTC's reading at boot may
/// be up to a second behind; the hook then looks at the RTC's seconds once a tick until
/// they turn and moves the wall clock there, forward, once, two ticks on (at most 20 ms
/// ahead, never behind).
pub fn start_clock(read_rtc: fn() -> u64) {
    if pm_timer::present() {
        for _ in 0..3 {
            let before = pm_timer::guest_ns();
            let epoch = read_rtc();
            let after = pm_timer::guest_ns();
            if before / NS == after / NS {
                let at = after.max(1);
                let base = epoch.saturating_sub(before / NS);
                set(time::ticks(), at, base * NS + ticks_ns(1));
                HOOK.store(HOOK_SAMPLE, Ordering::Relaxed);
                return;
            }
        }
    }
    let ticks = time::ticks();
    let at = ticks_ns(ticks).max(1);
    set(ticks, at, (read_rtc() * NS).saturating_sub(at));
    RTC_SECOND.store(0, Ordering::Relaxed);
    HOOK.store(HOOK_ALIGN, Ordering::Relaxed);
}

/// The clock starts: the estimate at tick `ticks`, and the wall clock less the estimate.
fn set(ticks: u64, estimate: u64, wall_offset: u64) {
    BASE_TICKS.store(ticks, Ordering::Relaxed);
    BASE_NS.store(estimate, Ordering::Relaxed);
    BOOT_NS.store(estimate, Ordering::Relaxed);
    LAST_NS.store(estimate, Ordering::Relaxed);
    WALL_OFFSET_NS.store(wall_offset, Ordering::Relaxed);
}

/// Called at system-call entry and before idling: without a PM timer, looks for the RTC's
/// turn once a tick until it is seen. One load and a compare otherwise. (With one, the
/// clock samples itself at its first read in a new tick: see `estimate`.)
#[inline]
pub fn tick_hook() {
    if HOOK.load(Ordering::Relaxed) == HOOK_ALIGN {
        once_a_tick();
    }
}

#[cold]
fn once_a_tick() {
    static LAST_TICK: AtomicU64 = AtomicU64::new(u64::MAX);
    static LOOKS: AtomicU64 = AtomicU64::new(0);
    let now = time::ticks();
    if LAST_TICK.swap(now, Ordering::Relaxed) == now {
        return;
    }
    if LOOKS.fetch_add(1, Ordering::Relaxed) > ALIGN_LOOKS {
        HOOK.store(HOOK_NONE, Ordering::Relaxed);
        return;
    }
    let Some(second) = ftvm_guest_kit::rtc::second().map(u64::from) else { return };
    let last = RTC_SECOND.load(Ordering::Relaxed);
    // The first look only notes the second: the boot reading may be long past (a
    // journal to load), so a change from it is no turn.
    if last == 0 || last - 1 == second {
        RTC_SECOND.store(second + 1, Ordering::Relaxed);
        return;
    }
    // It turned: the wall clock is `second` exactly at some point in the tick before this
    // one, the first such second at or after the estimate (which can only be behind). Set
    // two ticks on, as said above.
    let estimate = estimate();
    let wall = (WALL_OFFSET_NS.load(Ordering::Relaxed) + estimate) / NS;
    let turned_to = wall + (second + 60 - wall % 60) % 60;
    let offset = (turned_to * NS + 2 * ticks_ns(1)).saturating_sub(estimate);
    WALL_OFFSET_NS.fetch_max(offset, Ordering::Relaxed);
    HOOK.store(HOOK_NONE, Ordering::Relaxed);
}

/// With a PM timer, reads the clock now (one port read); without, nothing.
pub fn resample() {
    if HOOK.load(Ordering::Relaxed) == HOOK_SAMPLE {
        BASE_NS.store(pm_timer::guest_ns(), Ordering::Relaxed);
        BASE_TICKS.store(time::ticks(), Ordering::Relaxed);
    }
}

/// Input arrived (the network had frames): the next clock read resamples the PM timer,
/// once, so that the time a program reads after a request arrives is exact, not up to a
/// tick old. Between ticks the clock otherwise stands still while the guest is busy (other
/// clients keep it from idling), and a client that sets a key to expire in 1 ms and asks
/// for it 2 ms later must find it expired, as on Linux. One port read per batch of frames
/// that a clock read follows, never one per read.
pub fn input_arrived() {
    INPUT.store(true, Ordering::Relaxed);
}

/// The estimate of guest time now, never less than one handed out before.
#[inline(always)]
fn estimate() -> u64 {
    // With a PM timer, ticks only say when to sample again, never add to the estimate: a
    // tick counts 10 ms even when it came late and its successors catch up in a burst, so
    // the estimate ran ahead of guest time (seen under redis-benchmark: 26 of 2,322
    // samples, by up to 9.7 ms), and reads, which never go back, stood still until guest
    // time caught up; a key set to expire in 1 ms was then not expired 2 ms later.
    let sampled = HOOK.load(Ordering::Relaxed) == HOOK_SAMPLE;
    let ticks = time::ticks();
    if INPUT.load(Ordering::Relaxed) || (sampled && ticks != BASE_TICKS.load(Ordering::Relaxed)) {
        INPUT.store(false, Ordering::Relaxed);
        resample();
    }
    let ns = if sampled {
        BASE_NS.load(Ordering::Relaxed)
    } else {
        BASE_NS.load(Ordering::Relaxed) + ticks_ns(ticks - BASE_TICKS.load(Ordering::Relaxed))
    };
    LAST_NS.fetch_max(ns, Ordering::Relaxed).max(ns)
}

/// The clocks: REALTIME (0, 5 coarse, 8 alarm, 11 TAI) is the wall clock; every other
/// clock counts from one second at boot (some programs take 0 for "unset"). Resolution:
/// one tick (10 ms) between samples (once a tick, at a wake from idle, at the first read
/// after input arrived).
#[inline(always)]
pub fn now_ns(clock: u64) -> u64 {
    let ns = estimate();
    if matches!(clock, 0 | 5 | 8 | 11) {
        WALL_OFFSET_NS.load(Ordering::Relaxed) + ns
    } else {
        NS + ns - BOOT_NS.load(Ordering::Relaxed)
    }
}

#[repr(C)]
pub struct Timespec {
    sec: u64,
    nsec: u64,
}

/// `__vdso_clock_gettime`: called by the program, on its stack.
extern "C" fn vdso_clock_gettime(clock: i32, ts: *mut Timespec) -> i32 {
    let ns = now_ns(clock as u64);
    if !ts.is_null() {
        // SAFETY: the program passes its timespec, as to the system call.
        unsafe { ts.write(Timespec { sec: ns / 1_000_000_000, nsec: ns % 1_000_000_000 }) };
    }
    0
}

/// `__vdso_gettimeofday(tv, tz)`.
extern "C" fn vdso_gettimeofday(tv: *mut [u64; 2], tz: *mut [u32; 2]) -> i32 {
    let ns = now_ns(0);
    if !tv.is_null() {
        // SAFETY: as above.
        unsafe { tv.write([ns / 1_000_000_000, (ns % 1_000_000_000) / 1000]) };
    }
    if !tz.is_null() {
        // SAFETY: as above.
        unsafe { tz.write([0, 0]) };
    }
    0
}

/// `__vdso_time(t)`.
extern "C" fn vdso_time(t: *mut u64) -> u64 {
    let secs = now_ns(0) / 1_000_000_000;
    if !t.is_null() {
        // SAFETY: as above.
        unsafe { t.write(secs) };
    }
    secs
}

#[repr(C, align(4096))]
struct Page([u8; 4096]);

struct Image(core::cell::UnsafeCell<Page>);
// SAFETY: written once by `build` before the program runs, read-only afterwards.
unsafe impl Sync for Image {}

static IMAGE: Image = Image(core::cell::UnsafeCell::new(Page([0; 4096])));

fn put(page: &mut [u8], at: usize, bytes: &[u8]) {
    page[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Builds the image; returns its address (AT_SYSINFO_EHDR).
pub fn build() -> u64 {
    // SAFETY: runs once, before the program (the only other reader) starts.
    let page = unsafe { &mut (*IMAGE.0.get()).0 };
    let base = page.as_ptr() as u64;
    const PHOFF: usize = 64;
    const DYN: usize = PHOFF + 2 * 56;
    const HASH: usize = DYN + 6 * 16;
    let symbols: [(&str, u64); 3] = [
        ("__vdso_clock_gettime", vdso_clock_gettime as *const () as u64),
        ("__vdso_gettimeofday", vdso_gettimeofday as *const () as u64),
        ("__vdso_time", vdso_time as *const () as u64),
    ];
    let nsyms = symbols.len() + 1;
    let symtab = (HASH + 4 * (3 + nsyms)).next_multiple_of(8);
    let strtab = symtab + 24 * nsyms;
    // Names.
    let mut names = alloc::vec![0u8];
    let mut name_at = [0u32; 3];
    for (i, (name, _)) in symbols.iter().enumerate() {
        name_at[i] = names.len() as u32;
        names.extend_from_slice(name.as_bytes());
        names.push(0);
    }
    put(page, strtab, &names);
    // ELF header.
    put(page, 0, &[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    put(page, 16, &3u16.to_le_bytes()); // ET_DYN
    put(page, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(page, 20, &1u32.to_le_bytes());
    put(page, 32, &(PHOFF as u64).to_le_bytes());
    put(page, 52, &64u16.to_le_bytes()); // e_ehsize
    put(page, 54, &56u16.to_le_bytes()); // e_phentsize
    put(page, 56, &2u16.to_le_bytes()); // e_phnum
    put(page, 58, &64u16.to_le_bytes()); // e_shentsize
                                         // PT_LOAD: the whole page at vaddr 0; PT_DYNAMIC.
    let phdr = |page: &mut [u8], at: usize, kind: u32, flags: u32, off: u64, size: u64, align: u64| {
        put(page, at, &kind.to_le_bytes());
        put(page, at + 4, &flags.to_le_bytes());
        for (i, v) in [off, off, off, size, size, align].iter().enumerate() {
            put(page, at + 8 + 8 * i, &v.to_le_bytes());
        }
    };
    phdr(page, PHOFF, 1, 5, 0, 4096, 4096);
    phdr(page, PHOFF + 56, 2, 4, DYN as u64, 6 * 16, 8);
    // Dynamic section.
    let dynamic: [(u64, u64); 6] =
        [(4, HASH as u64), (5, strtab as u64), (6, symtab as u64), (10, names.len() as u64), (11, 24), (0, 0)];
    for (i, (tag, value)) in dynamic.iter().enumerate() {
        put(page, DYN + 16 * i, &tag.to_le_bytes());
        put(page, DYN + 16 * i + 8, &value.to_le_bytes());
    }
    // SysV hash: one bucket holding symbol 1, chained 1 -> 2 -> ... -> 0.
    let mut hash = alloc::vec![1u32, nsyms as u32, 1];
    hash.push(0); // chain[0]
    for i in 1..nsyms {
        hash.push(if i + 1 < nsyms { i as u32 + 1 } else { 0 });
    }
    for (i, word) in hash.iter().enumerate() {
        put(page, HASH + 4 * i, &word.to_le_bytes());
    }
    // Symbols (index 0 stays null): global functions in section 1.
    for (i, (_, addr)) in symbols.iter().enumerate() {
        let at = symtab + 24 * (i + 1);
        put(page, at, &name_at[i].to_le_bytes());
        page[at + 4] = 0x12; // STB_GLOBAL, STT_FUNC
        put(page, at + 6, &1u16.to_le_bytes());
        put(page, at + 8, &addr.wrapping_sub(base).to_le_bytes());
        put(page, at + 16, &64u64.to_le_bytes());
    }
    base
}
