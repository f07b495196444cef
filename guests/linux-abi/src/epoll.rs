//! epoll's interest list and ready list, ordered as Linux orders them.
//!
//! Linux keeps a ready list per epoll instance: a file's wake-up appends its item at the
//! tail unless the item is already queued; `epoll_wait` takes items from the head, drops
//! those no longer ready, and puts a level-triggered item it reported back at the tail. So
//! descriptors come back in the order they **became ready**, and a descriptor that stays
//! ready takes its turn behind the others. Programs depend on it: Redis runs the commands
//! of clients in the order their descriptors come back, and its test suite sends one
//! client's command, then another's, and expects them to run in that order.
//!
//! Here the personality evaluates readiness when `epoll_wait` looks (it has no wake-up
//! callbacks), so each file keeps its [`Activity`]: the stamp of its first event since the
//! last scan and of its latest. Stamps come from one counter for all files, so they order
//! events across files. A scan then gives each newly ready item the stamp of the event that
//! made it ready as its place in the queue ([`ReadyList::scan`]), which is the order Linux's
//! wake-ups would have appended them in. With several epoll instances the "first event
//! since the last scan" is since the last scan of any of them, so such an item may sort by a
//! later event of its file than Linux would.
//!
//! Edge-triggered items (`EPOLLET`) are queued only by an event since they were last
//! reported (or by `EPOLL_CTL_ADD`/`MOD` while ready, as on Linux); one-shot items
//! (`EPOLLONESHOT`) are disabled once reported until `EPOLL_CTL_MOD` arms them again.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

pub const EPOLLIN: u32 = 0x1;
pub const EPOLLPRI: u32 = 0x2;
pub const EPOLLOUT: u32 = 0x4;
pub const EPOLLERR: u32 = 0x8;
pub const EPOLLHUP: u32 = 0x10;
pub const EPOLLRDHUP: u32 = 0x2000;
pub const EPOLLEXCLUSIVE: u32 = 1 << 28;
pub const EPOLLWAKEUP: u32 = 1 << 29;
pub const EPOLLONESHOT: u32 = 1 << 30;
pub const EPOLLET: u32 = 1 << 31;

/// The flags that say how to report, not what to wait for.
const MODES: u32 = EPOLLEXCLUSIVE | EPOLLWAKEUP | EPOLLONESHOT | EPOLLET;

/// When a file's events happened, in stamps of the one counter. Stamps start at 1; 0 is
/// "never".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    first: u64,
    last: u64,
}

impl Activity {
    /// An event at `stamp`; `scanned` is the stamp of the latest scan of any epoll
    /// instance, which starts a new "first event since".
    pub fn note(&mut self, stamp: u64, scanned: u64) {
        if self.last <= scanned {
            self.first = stamp;
        }
        self.last = stamp;
    }

    /// The first event after `seen` (as far as this record can tell), if any.
    fn since(&self, seen: u64) -> Option<u64> {
        (self.last > seen).then_some(if self.first > seen { self.first } else { self.last })
    }

    /// The later of two records (a listening socket's pool of connections).
    pub fn latest(self, other: Activity) -> Activity {
        if other.last > self.last {
            other
        } else {
            self
        }
    }
}

/// A file's state at a scan: its readiness (any `EPOLL*` bits) and its activity.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub fd: i32,
    pub ready: u32,
    pub activity: Activity,
}

#[derive(Clone, Copy, Debug)]
struct Item {
    events: u32,
    data: u64,
    /// Its place in the ready list (a stamp), when queued.
    queued: Option<u64>,
    /// The stamp of the scan that last looked at it (or of its `ctl`).
    seen: u64,
    /// False once a one-shot item fired, until `EPOLL_CTL_MOD`.
    armed: bool,
}

/// `EPOLL_CTL_ADD` of a descriptor already there, or `MOD`/`DEL` of one that is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtlError {
    Exists,
    Missing,
}

/// One epoll instance: its interest list (by descriptor) and the ready list's order.
#[derive(Default, Debug)]
pub struct ReadyList {
    items: BTreeMap<i32, Item>,
}

impl ReadyList {
    /// `EPOLL_CTL_ADD` at `stamp`: queued for the next scan, which keeps it if it is ready.
    pub fn add(&mut self, fd: i32, events: u32, data: u64, stamp: u64) -> Result<(), CtlError> {
        if self.items.contains_key(&fd) {
            return Err(CtlError::Exists);
        }
        self.items.insert(fd, Item { events, data, queued: Some(stamp), seen: stamp, armed: true });
        Ok(())
    }

    /// `EPOLL_CTL_MOD` at `stamp`: new events and data, armed again, and queued like an add.
    pub fn modify(&mut self, fd: i32, events: u32, data: u64, stamp: u64) -> Result<(), CtlError> {
        let item = self.items.get_mut(&fd).ok_or(CtlError::Missing)?;
        *item = Item { events, data, queued: Some(item.queued.unwrap_or(stamp)), seen: stamp, armed: true };
        Ok(())
    }

    /// `EPOLL_CTL_DEL`, or the descriptor was closed.
    pub fn remove(&mut self, fd: i32) -> Result<(), CtlError> {
        self.items.remove(&fd).map(|_| ()).ok_or(CtlError::Missing)
    }

    /// The descriptors to probe for a scan (the armed ones).
    pub fn watched(&self) -> Vec<i32> {
        self.items.iter().filter(|(_, item)| item.armed).map(|(&fd, _)| fd).collect()
    }

    /// One scan at stamp `now`, with each watched descriptor's probe (a descriptor without
    /// one is not open any more and is skipped). Returns up to `max` (events, data) pairs in
    /// ready-list order; a level-triggered item reported goes back to the tail, at a stamp
    /// from `next` (called once per such item, in report order).
    pub fn scan(&mut self, now: u64, probes: &[Probe], max: usize, mut next: impl FnMut() -> u64) -> Vec<(u32, u64)> {
        let mut queue: Vec<(u64, i32, u32)> = Vec::new();
        for probe in probes {
            let Some(item) = self.items.get_mut(&probe.fd) else { continue };
            if !item.armed {
                continue;
            }
            let ready = probe.ready & ((item.events & !MODES) | EPOLLERR | EPOLLHUP);
            let event = probe.activity.since(item.seen);
            item.seen = now;
            if ready == 0 {
                // Linux drops an item from the ready list when it finds it not ready.
                item.queued = None;
                continue;
            }
            if item.queued.is_none() && (event.is_some() || item.events & EPOLLET == 0) {
                item.queued = Some(event.unwrap_or(now));
            }
            if let Some(place) = item.queued {
                queue.push((place, probe.fd, ready));
            }
        }
        queue.sort_unstable();
        queue.truncate(max);
        let mut out = Vec::with_capacity(queue.len());
        for (_, fd, ready) in queue {
            let item = self.items.get_mut(&fd).expect("queued from the list");
            out.push((ready, item.data));
            if item.events & EPOLLONESHOT != 0 {
                item.armed = false;
                item.queued = None;
            } else if item.events & EPOLLET != 0 {
                item.queued = None;
            } else {
                item.queued = Some(next());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
