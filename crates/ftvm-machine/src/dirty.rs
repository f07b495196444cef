//! Which guest pages changed: one tracker for every consumer (docs/snapshots.md).
//!
//! The dirty set is KVM's dirty log (pages the guest wrote) united with vm-memory's bitmap of
//! the VMM's own writes to guest memory (received frames, block reads, rng bytes, used rings).
//! `KVM_GET_DIRTY_LOG` clears as it reads, so one reader must serve everyone: the tracker
//! collects both sources into the accumulated set of each consumer (page hashes at
//! checkpoints, sync points, a live snapshot's pre-copy, a backup's state transfer), and each
//! consumer takes its own set when it wants it.

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::memory::{self, GuestMemoryMmap, PAGE_SIZE};

/// One RAM region as the tracker sees it: its KVM slot, first guest address, and page count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    id: u32,
    base: u64,
    pages: u64,
}

impl Slot {
    fn words(&self) -> usize {
        self.pages.div_ceil(64) as usize
    }
}

/// A set of guest pages, one bit per page per RAM region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageSet {
    /// Per region: (first guest address, page bits).
    regions: Vec<(u64, Vec<u64>)>,
}

impl PageSet {
    fn empty(slots: &[Slot]) -> Self {
        PageSet { regions: slots.iter().map(|s| (s.base, vec![0; s.words()])).collect() }
    }

    /// No page of guest memory.
    pub fn none(mem: &GuestMemoryMmap) -> Self {
        PageSet::empty(&slots_of(mem))
    }

    /// Every page of guest memory.
    pub fn all(mem: &GuestMemoryMmap) -> Self {
        let mut set = PageSet::empty(&slots_of(mem));
        for (i, region) in mem.iter().enumerate() {
            let pages = region.len() / PAGE_SIZE;
            let words = &mut set.regions[i].1;
            for (w, word) in words.iter_mut().enumerate() {
                let first = w as u64 * 64;
                let n = pages.saturating_sub(first).min(64);
                *word = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
            }
        }
        set
    }

    /// Every page of guest memory that may hold something other than zeros: the pages the
    /// host has ever given the mapping (present or swapped out, from /proc/self/pagemap).
    /// A page of the anonymous mapping that was never touched, or was discarded, reads as
    /// zeros; reading it would only fault in a zero page. Every page if pagemap cannot be
    /// read.
    pub fn populated(mem: &GuestMemoryMmap) -> Self {
        Self::from_pagemap(mem).unwrap_or_else(|| PageSet::all(mem))
    }

    fn from_pagemap(mem: &GuestMemoryMmap) -> Option<Self> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
        let mut set = PageSet::empty(&slots_of(mem));
        let mut entries = vec![0u8; 8 * 4096];
        for (i, region) in mem.iter().enumerate() {
            let host = region.as_ptr() as u64;
            let pages = region.len() / PAGE_SIZE;
            let mut page = 0u64;
            while page < pages {
                let n = (pages - page).min(4096);
                let bytes = &mut entries[..(n * 8) as usize];
                pagemap.read_exact_at(bytes, (host / PAGE_SIZE + page) * 8).ok()?;
                for (k, e) in bytes.chunks_exact(8).enumerate() {
                    let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                    if e & (PRESENT | SWAPPED) != 0 {
                        let p = page + k as u64;
                        set.regions[i].1[(p / 64) as usize] |= 1 << (p % 64);
                    }
                }
                page += n;
            }
        }
        Some(set)
    }

    /// The number of pages in the set.
    pub fn len(&self) -> u64 {
        self.regions.iter().flat_map(|(_, w)| w.iter()).map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.iter().all(|(_, w)| w.iter().all(|&x| x == 0))
    }

    /// The guest physical addresses of the pages, in address order.
    pub fn addresses(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|(base, words)| {
            words.iter().enumerate().flat_map(move |(w, &word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    Some(base + (w as u64 * 64 + bit) * PAGE_SIZE)
                })
            })
        })
    }

    /// Adds the page holding `gpa`; addresses outside RAM are ignored.
    pub fn insert(&mut self, gpa: u64) {
        for (base, words) in &mut self.regions {
            if gpa >= *base {
                let page = (gpa - *base) / PAGE_SIZE;
                if let Some(word) = words.get_mut((page / 64) as usize) {
                    *word |= 1 << (page % 64);
                    return;
                }
            }
        }
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        self.regions.iter_mut().for_each(|(_, words)| words.fill(0));
    }

    /// Adds every page of `other` (which must describe the same memory).
    pub fn union(&mut self, other: &PageSet) {
        for ((_, ours), (_, theirs)) in self.regions.iter_mut().zip(&other.regions) {
            for (a, b) in ours.iter_mut().zip(theirs) {
                *a |= b;
            }
        }
    }

    /// Whether every page of `self` is also in `other`; if not, the first page that is not.
    pub fn first_outside(&self, other: &PageSet) -> Option<u64> {
        for ((base, ours), (_, theirs)) in self.regions.iter().zip(&other.regions) {
            for (w, (a, b)) in ours.iter().zip(theirs).enumerate() {
                let extra = a & !b;
                if extra != 0 {
                    return Some(base + (w as u64 * 64 + u64::from(extra.trailing_zeros())) * PAGE_SIZE);
                }
            }
        }
        None
    }
}

/// The bitmap vm-memory marks on every VMM write to a region (one bit per host page).
fn vmm_bitmap(
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
) -> &vm_memory::bitmap::AtomicBitmap {
    // The region derefs to its mapping, which owns the bitmap.
    vm_memory::MmapRegion::bitmap(region)
}

fn slots_of(mem: &GuestMemoryMmap) -> Vec<Slot> {
    mem.iter()
        .enumerate()
        .map(|(i, r)| Slot { id: i as u32, base: r.start_addr().raw_value(), pages: r.len() / PAGE_SIZE })
        .collect()
}

/// A consumer of the tracker; each sees every page dirtied since its previous `take`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumer(usize);

struct Inner {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    slots: Vec<Slot>,
    /// Whether KVM logs dirty pages now (on while any consumer exists).
    logging: bool,
    consumers: Vec<Option<PageSet>>,
    /// Per consumer: something was added to its set since it was last emptied (`forget`,
    /// called at every counted exit, then costs nothing when there is nothing to forget).
    gathered: Vec<bool>,
}

/// The one reader of KVM's dirty log and of the VMM's write bitmap. Cheap to clone (shared).
#[derive(Clone)]
pub struct DirtyTracker {
    inner: Arc<Mutex<Inner>>,
}

impl DirtyTracker {
    /// A tracker for `mem`; KVM's dirty logging starts with the first consumer.
    pub fn new(vm: Arc<VmFd>, mem: GuestMemoryMmap) -> Self {
        let slots = slots_of(&mem);
        DirtyTracker {
            inner: Arc::new(Mutex::new(Inner {
                vm,
                mem,
                slots,
                logging: false,
                consumers: Vec::new(),
                gathered: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        ftvm_sync::lock(&self.inner)
    }

    /// A new consumer; its first `take` returns the pages dirtied from now on.
    pub fn subscribe(&self) -> Result<Consumer> {
        let mut inner = self.lock();
        if inner.logging {
            // What is logged so far belongs to the consumers that exist already.
            inner.collect()?;
        } else {
            memory::register(&inner.vm, &inner.mem, true)?;
            inner.logging = true;
            // The VMM's writes before now (the kernel image, boot structures) are not news.
            for region in inner.mem.iter() {
                vmm_bitmap(region).reset();
            }
        }
        let set = PageSet::empty(&inner.slots);
        let id = match inner.consumers.iter().position(Option::is_none) {
            Some(free) => {
                inner.consumers[free] = Some(set);
                free
            }
            None => {
                inner.consumers.push(Some(set));
                inner.gathered.push(false);
                inner.consumers.len() - 1
            }
        };
        Ok(Consumer(id))
    }

    /// Ends a consumer; with the last one gone, KVM stops logging (guest writes cost less).
    pub fn unsubscribe(&self, consumer: Consumer) {
        let mut inner = self.lock();
        if let Some(slot) = inner.consumers.get_mut(consumer.0) {
            *slot = None;
        }
        if inner.logging && inner.consumers.iter().all(Option::is_none) {
            match memory::register(&inner.vm, &inner.mem, false) {
                Ok(()) => inner.logging = false,
                Err(e) => tracing::warn!("cannot turn KVM's dirty logging off: {e}"),
            }
        }
    }

    /// The pages dirtied since this consumer's previous take (or its subscription).
    pub fn take(&self, consumer: Consumer) -> Result<PageSet> {
        let mut inner = self.lock();
        inner.collect()?;
        let empty = PageSet::empty(&inner.slots);
        match inner.consumers.get_mut(consumer.0) {
            Some(Some(set)) => Ok(std::mem::replace(set, empty)),
            _ => Err(Error::ConsumerEnded),
        }
    }

    /// Drops what this consumer has gathered so far without reading KVM's dirty log (which
    /// would write-protect the pages again): pages KVM has not handed out yet still reach it
    /// with the next `take`.
    pub fn forget(&self, consumer: Consumer) {
        let mut inner = self.lock();
        if !inner.gathered.get_mut(consumer.0).is_some_and(std::mem::take) {
            return;
        }
        if let Some(Some(set)) = inner.consumers.get_mut(consumer.0) {
            set.clear();
        }
    }

    /// Marks pages dirty for every consumer but `except` (pages a sync point rewrote, for
    /// instance, count as written for the others).
    pub fn mark(&self, pages: &PageSet, except: Option<Consumer>) {
        let mut inner = self.lock();
        let Inner { consumers, gathered, .. } = &mut *inner;
        for (i, (set, gathered)) in consumers.iter_mut().zip(gathered.iter_mut()).enumerate() {
            if let (Some(set), false) = (set, except == Some(Consumer(i))) {
                set.union(pages);
                *gathered = true;
            }
        }
    }

    pub fn memory(&self) -> GuestMemoryMmap {
        self.lock().mem.clone()
    }
}

impl Inner {
    /// Reads (and so clears) KVM's dirty log and the VMM's write bitmap, and adds both to
    /// every consumer's set.
    fn collect(&mut self) -> Result<()> {
        let mut news = PageSet::empty(&self.slots);
        for (i, slot) in self.slots.iter().enumerate() {
            let kvm = self
                .vm
                .get_dirty_log(slot.id, (slot.pages * PAGE_SIZE) as usize)
                .map_err(Error::kvm("KVM_GET_DIRTY_LOG"))?;
            let words = &mut news.regions[i].1;
            for (w, bits) in words.iter_mut().zip(&kvm) {
                *w |= bits;
            }
            if let Some(region) = self.mem.find_region(GuestAddress(slot.base)) {
                for (w, bits) in words.iter_mut().zip(vmm_bitmap(region).get_and_reset()) {
                    *w |= bits;
                }
            }
        }
        for (set, gathered) in self.consumers.iter_mut().zip(self.gathered.iter_mut()) {
            if let Some(set) = set {
                set.union(&news);
                *gathered = true;
            }
        }
        Ok(())
    }
}

/// What a page read from the dirty log (by a checkpoint's page hashes, a sync point) costs
/// the guest afterwards: the page is write-protected again and the guest's next write to it faults into KVM. Measured here on
/// PVM: compute (2048 pages rewritten between sync points) lost about 50 ms to each sync
/// point, 8 ms of it the recorder's own work, so about 20 µs a page. Hardware KVM takes
/// such faults on its fast path, an order of magnitude cheaper (an estimate, not measured).
pub(crate) fn refault_cost(backend: crate::kvm::Backend) -> std::time::Duration {
    match backend {
        crate::kvm::Backend::Pvm => std::time::Duration::from_micros(20),
        crate::kvm::Backend::Hardware => std::time::Duration::from_micros(2),
    }
}

/// (guest frame number, hash) of each page of `pages`, in address order: what checkpoints
/// log so that a divergence that stays in memory is caught there.
pub fn page_hashes(mem: &GuestMemoryMmap, pages: &PageSet) -> Vec<(u64, u64)> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    pages
        .addresses()
        .filter_map(|gpa| {
            vm_memory::Bytes::read_slice(mem, &mut page, GuestAddress(gpa)).ok()?;
            Some((gpa / PAGE_SIZE, ftvm_log::hash64(&page)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_handed_out_costs_less_on_hardware_kvm() {
        assert!(refault_cost(crate::kvm::Backend::Pvm) > refault_cost(crate::kvm::Backend::Hardware));
    }

    #[test]
    fn page_sets_list_insert_and_compare() {
        let mem = memory::allocate(4 * memory::MIB).unwrap();
        let mut a = PageSet::empty(&slots_of(&mem));
        assert!(a.is_empty());
        a.insert(0x1000);
        a.insert(0x1fff); // the same page
        a.insert(0x3f_f000);
        a.insert(0x40_0000); // outside RAM: ignored
        assert_eq!(a.addresses().collect::<Vec<_>>(), vec![0x1000, 0x3f_f000]);
        assert_eq!(a.len(), 2);
        let all = PageSet::all(&mem);
        assert_eq!(all.len(), 1024);
        // Only what was touched is populated (fresh anonymous memory is not).
        vm_memory::Bytes::write_slice(&mem, &[1; 8], GuestAddress(0x2000)).unwrap();
        let populated = PageSet::populated(&mem);
        assert!(populated.addresses().any(|a| a == 0x2000), "a written page is populated");
        assert!(populated.len() < 1024, "untouched pages are not: {}", populated.len());
        assert_eq!(a.first_outside(&all), None);
        assert_eq!(all.first_outside(&a), Some(0));
        let mut b = PageSet::empty(&slots_of(&mem));
        b.insert(0x2000);
        b.union(&a);
        assert_eq!(b.addresses().collect::<Vec<_>>(), vec![0x1000, 0x2000, 0x3f_f000]);
    }

    #[test]
    fn vmm_writes_reach_every_consumer_once() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            assert!(std::env::var("FTVM_ALLOW_NO_KVM").is_ok(), "/dev/kvm is needed (FTVM_ALLOW_NO_KVM=1 skips)");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mem = memory::allocate(8 * memory::MIB).unwrap();
        memory::register(&vm, &mem, false).unwrap();
        let tracker = DirtyTracker::new(vm, mem.clone());
        vm_memory::Bytes::write_slice(&mem, &[1; 8], GuestAddress(0x5000)).unwrap();
        let a = tracker.subscribe().unwrap();
        assert!(tracker.take(a).unwrap().is_empty(), "writes before the subscription are not news");
        vm_memory::Bytes::write_slice(&mem, &[2; 8], GuestAddress(0x7000)).unwrap();
        let b = tracker.subscribe().unwrap();
        vm_memory::Bytes::write_slice(&mem, &[3; 8], GuestAddress(0x9000)).unwrap();
        assert_eq!(tracker.take(a).unwrap().addresses().collect::<Vec<_>>(), vec![0x7000, 0x9000]);
        assert_eq!(tracker.take(b).unwrap().addresses().collect::<Vec<_>>(), vec![0x9000]);
        assert!(tracker.take(a).unwrap().is_empty());
        let mut marked = PageSet::empty(&slots_of(&mem));
        marked.insert(0xb000);
        tracker.mark(&marked, Some(a));
        assert!(tracker.take(a).unwrap().is_empty());
        assert_eq!(tracker.take(b).unwrap().addresses().collect::<Vec<_>>(), vec![0xb000]);
        // Forgetting drops what a consumer gathered, not what KVM has yet to hand out.
        tracker.mark(&marked, None);
        tracker.forget(a);
        assert!(tracker.take(a).unwrap().is_empty());
        assert_eq!(tracker.take(b).unwrap().addresses().collect::<Vec<_>>(), vec![0xb000]);
        vm_memory::Bytes::write_slice(&mem, &[4; 8], GuestAddress(0xd000)).unwrap();
        tracker.forget(a);
        assert_eq!(tracker.take(a).unwrap().addresses().collect::<Vec<_>>(), vec![0xd000]);
        tracker.unsubscribe(a);
        assert!(tracker.take(a).is_err());
        tracker.unsubscribe(b);
        let hashes = page_hashes(&mem, &marked);
        assert_eq!(hashes.len(), 1);
        assert_eq!(hashes[0].0, 0xb);
    }
}
