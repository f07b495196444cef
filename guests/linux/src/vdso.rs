//! A vDSO: the small ELF image Linux maps into every process (AT_SYSINFO_EHDR) so that
//! `clock_gettime`, `gettimeofday` and `time` need no system call. musl (and glibc) look
//! their functions up in it by name; with one, the program reads the guest clock with a
//! plain call, as the kit's own code does (`time::ticks()`: the PIT tick count the ring-0
//! timer handler increments, plus the RTC time at boot). Never the TSC.
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

use core::sync::atomic::{AtomicU64, Ordering};

use ftvm_guest_kit::time;

/// The tick count at boot, where the monotonic clocks start.
static BOOT_TICKS: AtomicU64 = AtomicU64::new(0);
/// The wall clock at `BOOT_TICKS`, ns since 1970: the RTC's reading at boot, moved once
/// when [`align`] sees its second turn.
static BOOT_WALL_NS: AtomicU64 = AtomicU64::new(0);
/// Until the clock is aligned to a turn of the RTC's second: 1 + the seconds last read
/// (0 before the first look); `ALIGNED` after.
static RTC_SECOND: AtomicU64 = AtomicU64::new(ALIGNED);
const ALIGNED: u64 = u64::MAX;
/// Gives up aligning after this many looks (an RTC that does not count: keep the boot
/// reading), a little over two seconds of ticks.
const ALIGN_LOOKS: u64 = 2 * time::TICK_HZ as u64 + 20;

/// The wall clock starts at `boot_epoch` (the RTC's seconds) at tick `boot_ticks`. The RTC
/// has no finer field, so that start may lie up to a second behind the truth (ftvm's RTC
/// turns its seconds on the host's); [`align`] corrects it at the first tick after the
/// RTC's seconds turn, within the program's first second or so.
pub fn set_clock(boot_epoch: u64, boot_ticks: u64) {
    BOOT_TICKS.store(boot_ticks, Ordering::Relaxed);
    BOOT_WALL_NS.store(boot_epoch * 1_000_000_000, Ordering::Relaxed);
    RTC_SECOND.store(0, Ordering::Relaxed);
}

/// Called at system-call entry and before idling: once per tick until the RTC's seconds
/// turn, reads them (four port accesses); at the turn, the wall clock restarts at that
/// second and tick (to within one tick). One load and a compare once aligned.
#[inline]
pub fn align() {
    if RTC_SECOND.load(Ordering::Relaxed) != ALIGNED {
        align_slow();
    }
}

#[cold]
fn align_slow() {
    static LAST_TICK: AtomicU64 = AtomicU64::new(u64::MAX);
    static LOOKS: AtomicU64 = AtomicU64::new(0);
    let now = time::ticks();
    if LAST_TICK.swap(now, Ordering::Relaxed) == now {
        return;
    }
    if LOOKS.fetch_add(1, Ordering::Relaxed) > ALIGN_LOOKS {
        RTC_SECOND.store(ALIGNED, Ordering::Relaxed);
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
    // one, the first such second at or after the estimate (which can only be behind).
    // Reads then give the tick's start, up to a tick behind the truth, so the clock is
    // set two ticks on: it reads up to 20 ms ahead and never behind (a client that sets
    // an absolute expiry from its own clock sees no more than the time it asked for).
    let since_boot = ticks_ns(now - BOOT_TICKS.load(Ordering::Relaxed));
    let estimate = (BOOT_WALL_NS.load(Ordering::Relaxed) + since_boot) / 1_000_000_000;
    let turned_to = estimate + (second + 60 - estimate % 60) % 60;
    let wall_now = turned_to * 1_000_000_000 + 2 * ticks_ns(1);
    BOOT_WALL_NS.fetch_max(wall_now.saturating_sub(since_boot), Ordering::Relaxed);
    RTC_SECOND.store(ALIGNED, Ordering::Relaxed);
}

fn ticks_ns(ticks: u64) -> u64 {
    time::ticks_to_ms(ticks) * 1_000_000
}

/// The clocks: REALTIME (0, 5 coarse, 8 alarm, 11 TAI) from the RTC at boot plus ticks;
/// every other clock counts ticks since boot, from one second (some programs take 0 for
/// "unset"). Resolution: one tick (10 ms).
#[inline(always)]
pub fn now_ns(clock: u64) -> u64 {
    let ns = ticks_ns(time::ticks() - BOOT_TICKS.load(Ordering::Relaxed));
    if matches!(clock, 0 | 5 | 8 | 11) {
        BOOT_WALL_NS.load(Ordering::Relaxed) + ns
    } else {
        1_000_000_000 + ns
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
