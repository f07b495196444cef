//! The process's memory: the window 0x400000 - 0x10000000 of the identity-mapped RAM
//! (`link.ld` keeps the kit's heap above it). The executable's segments go where it is
//! linked (a static-PIE one at 0x400000), then brk (up to 64 MiB), then the mmap area, and
//! the main thread's stack (8 MiB) at the top. A second mmap area, the **high area**, is
//! carved out of the personality's heap above the window at start (`linux.program_share`,
//! default half of that heap), so that the program can use more than the window in a
//! bigger VM; mmap takes from it first. There is no paging of our own: every address in
//! both is always readable and writable, and `mprotect` enforces nothing. Memory handed out
//! by `mmap` or `brk` reads as zero, as Linux's fresh pages do, but only once the program
//! may read it: a `PROT_NONE` mapping (a reservation: Go's runtime reserves hundreds of
//! MiB at start and maps parts of it later) is zeroed when `mprotect` or a `MAP_FIXED`
//! mapping makes it accessible. Zeroing writes only pages that are not zero already: under
//! `ftvm record` every page written between sync points is a write fault and a page of the
//! next sync point, and a fresh VM's RAM is zero.

use alloc::collections::BTreeMap;

pub const WINDOW_START: u64 = 0x40_0000;
pub const WINDOW_END: u64 = 0x1000_0000;
pub const STACK_SIZE: u64 = 8 << 20;
pub const STACK_TOP: u64 = WINDOW_END;
const BRK_MAX: u64 = 64 << 20;
pub const PAGE: u64 = 4096;

pub fn page_up(n: u64) -> u64 {
    (n + PAGE - 1) & !(PAGE - 1)
}

/// Where `mmap` puts a mapping.
#[derive(Clone, Copy, Debug)]
pub enum Place {
    /// Where there is room (highest first).
    Anywhere,
    /// At this address if it is free (a hint), else where there is room.
    Near(u64),
    /// At this address, replacing what is there (MAP_FIXED).
    Fixed(u64),
}

/// The brk area and the mmap regions.
#[derive(Clone)]
pub struct ProcMem {
    brk_start: u64,
    brk: u64,
    brk_limit: u64,
    mmap_start: u64,
    mmap_end: u64,
    /// The high area [start, end), empty when there is none.
    high: (u64, u64),
    /// Mapped regions: start -> end.
    regions: BTreeMap<u64, u64>,
    /// The parts of the regions mapped `PROT_NONE` and not zeroed since: start -> end.
    unzeroed: BTreeMap<u64, u64>,
}

/// Makes [start, end) read as zero, writing only the pages that do not already.
fn zero(start: u64, end: u64) {
    let mut page = start;
    while page < end {
        let next = ((page & !(PAGE - 1)) + PAGE).min(end);
        // SAFETY: callers pass ranges inside the process's areas (RAM nothing else owns),
        // and [page, next) lies in one page of them; u8 reads need no alignment.
        let bytes = unsafe { core::slice::from_raw_parts(page as *const u8, (next - page) as usize) };
        if !is_zero(bytes) {
            // SAFETY: as above.
            unsafe { core::ptr::write_bytes(page as *mut u8, 0, (next - page) as usize) }
        }
        page = next;
    }
}

/// Whether every byte is zero (one OR over the words: no early exit to keep it branch-free).
fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to puts only aligned words in the middle.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().chain(tail).all(|&b| b == 0) && words.iter().fold(0, |acc, &w| acc | w) == 0
}

/// Removes [start, end) from `ranges` (splitting where needed).
fn cut(ranges: &mut BTreeMap<u64, u64>, start: u64, end: u64) -> alloc::vec::Vec<(u64, u64)> {
    let hit: alloc::vec::Vec<(u64, u64)> =
        ranges.range(..end).filter(|(_, &e)| e > start).map(|(&s, &e)| (s, e)).collect();
    for &(s, e) in &hit {
        ranges.remove(&s);
        if s < start {
            ranges.insert(s, start);
        }
        if e > end {
            ranges.insert(end, e);
        }
    }
    hit
}

impl ProcMem {
    /// `image_end`: the end of the highest loaded segment.
    pub fn new(image_end: u64) -> ProcMem {
        let brk_start = page_up(image_end);
        let brk_limit = brk_start + BRK_MAX;
        ProcMem {
            brk_start,
            brk: brk_start,
            brk_limit,
            mmap_start: brk_limit,
            mmap_end: STACK_TOP - STACK_SIZE,
            high: (0, 0),
            regions: BTreeMap::new(),
            unzeroed: BTreeMap::new(),
        }
    }

    /// Adds the high area: [start, end), memory nothing else uses for the rest of the
    /// guest's life (taken from the personality's heap), page-aligned, above the window.
    pub fn add_high_area(&mut self, start: u64, end: u64) {
        debug_assert!(start >= WINDOW_END && start.is_multiple_of(PAGE) && end.is_multiple_of(PAGE));
        self.high = (start, end.max(start));
    }

    /// The high area's size in bytes.
    pub fn high_bytes(&self) -> u64 {
        self.high.1 - self.high.0
    }

    /// Whether [start, start + len) lies in one area mmap hands out.
    fn mappable(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else { return false };
        (start >= WINDOW_START && end <= WINDOW_END) || (start >= self.high.0 && end <= self.high.1)
    }

    /// The end of the area that holds `addr`.
    fn area_end(&self, addr: u64) -> u64 {
        if addr >= self.high.0 && addr < self.high.1 {
            self.high.1
        } else {
            self.mmap_end
        }
    }

    pub fn brk(&mut self, want: u64) -> u64 {
        if want < self.brk_start || want > self.brk_limit {
            return self.brk;
        }
        if want > self.brk {
            zero(self.brk, want);
        }
        self.brk = want;
        self.brk
    }

    /// Whether [start, start + len) lies in one of the areas `mmap` picks from (not the
    /// executable's segments, brk or the main stack) and nothing is mapped there: where a
    /// hint is taken.
    fn is_free(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else { return false };
        let in_area =
            (start >= self.mmap_start && end <= self.mmap_end) || (start >= self.high.0 && end <= self.high.1);
        in_area && !self.overlaps(start, end)
    }

    /// Whether something is mapped in [start, start + len): a region, or the executable's
    /// segments, brk or the main stack (MAP_FIXED_NOREPLACE's EEXIST).
    pub fn is_taken(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else { return false };
        let program = start < self.mmap_start && end > WINDOW_START;
        let stack = start < STACK_TOP && end > self.mmap_end;
        program || stack || self.overlaps(start, end)
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.regions.range(..end).next_back().is_some_and(|(_, &e)| e > start)
    }

    /// Removes [start, end) from the regions (splitting where needed).
    pub fn unmap(&mut self, start: u64, end: u64) {
        cut(&mut self.regions, start, end);
        cut(&mut self.unzeroed, start, end);
    }

    /// mprotect to anything but `PROT_NONE`: the range reads as zero where it was mapped
    /// `PROT_NONE` and not zeroed since. Protections are not enforced otherwise.
    pub fn make_accessible(&mut self, start: u64, end: u64) {
        for (s, e) in cut(&mut self.unzeroed, start, end) {
            zero(s.max(start), e.min(end));
        }
    }

    /// A free range of `len` bytes, highest first (as Linux's top-down mmap layout): in the
    /// high area, then in the window.
    fn find(&self, len: u64) -> Option<u64> {
        self.find_in(self.high.0, self.high.1, len).or_else(|| self.find_in(self.mmap_start, self.mmap_end, len))
    }

    fn find_in(&self, low: u64, high: u64, len: u64) -> Option<u64> {
        if high.saturating_sub(low) < len {
            return None;
        }
        let mut top = high;
        for (&s, &e) in self.regions.range(low..high).rev() {
            if e <= top && top - e >= len {
                return Some(top - len);
            }
            top = top.min(s);
        }
        (top >= low + len).then(|| top - len)
    }

    /// Maps `len` zeroed bytes: at `fixed` if given (anything there is replaced), else
    /// where there is room. `None` when it does not fit. A mapping that is not `accessible`
    /// (`PROT_NONE`) is zeroed only when [`ProcMem::make_accessible`] makes it so.
    pub fn map(&mut self, place: Place, len: u64, accessible: bool) -> Option<u64> {
        let len = page_up(len.max(1));
        let start = match place {
            Place::Fixed(addr) => {
                if addr % PAGE != 0 || !self.mappable(addr, len) {
                    return None;
                }
                self.unmap(addr, addr + len);
                addr
            }
            // A hint is taken where it is free, as Linux takes it.
            Place::Near(addr) if addr % PAGE == 0 && self.is_free(addr, len) => addr,
            Place::Near(_) | Place::Anywhere => self.find(len)?,
        };
        if accessible {
            zero(start, start + len);
        } else {
            self.unzeroed.insert(start, start + len);
        }
        self.regions.insert(start, start + len);
        Some(start)
    }

    /// Grows or shrinks the mapping at `old` (`old_len` bytes) to `new_len`, moving it if
    /// `may_move` and it cannot grow in place.
    pub fn remap(&mut self, old: u64, old_len: u64, new_len: u64, may_move: bool) -> Option<u64> {
        let old_len = page_up(old_len);
        let new_len = page_up(new_len);
        // A moved or grown reservation is treated as accessible (rare; keeps one rule).
        self.make_accessible(old, old + old_len);
        if new_len <= old_len {
            self.unmap(old + new_len, old + old_len);
            return Some(old);
        }
        let end = old + old_len;
        self.unmap(old, end);
        if !self.overlaps(end, old + new_len) && old + new_len <= self.area_end(old) {
            zero(end, old + new_len);
            self.regions.insert(old, old + new_len);
            return Some(old);
        }
        if !may_move {
            self.regions.insert(old, end);
            return None;
        }
        let Some(new) = self.find(new_len) else {
            self.regions.insert(old, end);
            return None;
        };
        // SAFETY: both ranges are in the areas mmap hands out and do not overlap (`find` skips `old`'s
        // neighbours only if free; the old range was removed, so check).
        unsafe { core::ptr::copy(old as *const u8, new as *mut u8, old_len as usize) };
        zero(new + old_len, new + new_len);
        self.regions.insert(new, new + new_len);
        Some(new)
    }

    /// MADV_DONTNEED: anonymous private pages read back as zero afterwards.
    pub fn discard(&mut self, start: u64, end: u64) {
        if start < end && self.mappable(start, end - start) {
            // All of it is zeroed here, reservations included.
            cut(&mut self.unzeroed, start, end);
            zero(start, end);
        }
    }

    pub fn in_window(start: u64, len: u64) -> bool {
        start >= WINDOW_START && start.checked_add(len).is_some_and(|e| e <= WINDOW_END)
    }

    /// What the program uses of the window, less the main thread's stack: the executable's
    /// segments and brk (one range from the window's start), then each mmap region. A fork
    /// copies these aside (`fork`).
    pub fn used(&self) -> alloc::vec::Vec<(u64, u64)> {
        let mut out = alloc::vec![(WINDOW_START, self.brk)];
        out.extend(self.regions.iter().map(|(&s, &e)| (s, e)));
        out
    }

    /// Bytes the program may map in all (the window and the high area), for sysinfo.
    pub fn total(&self) -> u64 {
        (WINDOW_END - WINDOW_START) + self.high_bytes()
    }

    /// Bytes mapped (brk and mmap), for sysinfo-style reports.
    pub fn mapped(&self) -> u64 {
        (self.brk - self.brk_start) + self.regions.iter().map(|(s, e)| e - s).sum::<u64>()
    }
}
