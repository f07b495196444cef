//! Processes for the personality's `fork`: the child's bookkeeping (zombies reaped by
//! `wait4`, the status word it fills in) and the plan of what memory a fork copies aside.
//!
//! The personality runs a forked child to completion before the parent resumes (one
//! identity-mapped address space: the child runs in the parent's memory, which is copied
//! aside first and put back after). So by the time the parent can call `wait4`, each of its
//! children is a zombie: `wait4` never has to wait.

use alloc::vec::Vec;

pub const ECHILD: i64 = 10;
pub const EINVAL: i64 = 22;

pub const WNOHANG: u64 = 1;
const WAIT_OPTIONS: u64 = WNOHANG | 2 | 8 | 0x2000_0000 | 0x4000_0000 | 0x8000_0000;

/// How a process ended, as `wait4` reports it in its status word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `exit`/`exit_group(code)`: WIFEXITED, WEXITSTATUS = code & 0xff.
    Code(u64),
    /// Ended by a signal (WIFSIGNALED, WTERMSIG).
    Signal(u64),
}

impl Exit {
    /// The status word: `code << 8` or the signal number.
    pub fn wstatus(self) -> u32 {
        match self {
            Exit::Code(code) => ((code & 0xff) as u32) << 8,
            Exit::Signal(sig) => (sig & 0x7f) as u32,
        }
    }
}

/// The parent's children that have ended and not been reaped yet, oldest first.
#[derive(Default, Debug)]
pub struct Children {
    zombies: Vec<(u32, Exit)>,
}

impl Children {
    pub const fn new() -> Children {
        Children { zombies: Vec::new() }
    }

    pub fn exited(&mut self, pid: u32, how: Exit) {
        self.zombies.push((pid, how));
    }

    pub fn is_zombie(&self, pid: u32) -> bool {
        self.zombies.iter().any(|&(p, _)| p == pid)
    }

    pub fn len(&self) -> usize {
        self.zombies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.zombies.is_empty()
    }

    /// `wait4(pid, .., options)`: reaps the oldest matching zombie and returns its pid and
    /// status word. `pid` -1 (any child), > 0 (that one), 0 or < -1 (a process group: there
    /// is one, so any child). No matching child: ECHILD (with WNOHANG too: no child runs
    /// while its parent does, so there is none to wait for). Unknown options: EINVAL.
    pub fn wait(&mut self, pid: i64, options: u64) -> Result<(u32, u32), i64> {
        if options & !WAIT_OPTIONS != 0 {
            return Err(EINVAL);
        }
        let at = self.zombies.iter().position(|&(p, _)| pid <= 0 || i64::from(p) == pid).ok_or(ECHILD)?;
        let (p, how) = self.zombies.remove(at);
        Ok((p, how.wstatus()))
    }
}

pub const PAGE: u64 = 4096;

/// The ranges a fork copies aside: `ranges` (start, end), widened to whole pages, sorted,
/// overlapping and touching ones merged, empty ones dropped.
pub fn plan(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut pages: Vec<(u64, u64)> =
        ranges.iter().map(|&(s, e)| (s & !(PAGE - 1), e.div_ceil(PAGE) * PAGE)).filter(|&(s, e)| e > s).collect();
    pages.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(pages.len());
    for (s, e) in pages {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Bytes in a plan.
pub fn bytes(plan: &[(u64, u64)]) -> u64 {
    plan.iter().map(|(s, e)| e - s).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_words_are_linux_s() {
        assert_eq!(Exit::Code(7).wstatus(), 0x700);
        assert_eq!(Exit::Code(0x1ff).wstatus(), 0xff00);
        assert_eq!(Exit::Signal(9).wstatus(), 9);
    }

    #[test]
    fn wait_reaps_oldest_matching_then_echild() {
        let mut c = Children::default();
        assert_eq!(c.wait(-1, WNOHANG), Err(ECHILD));
        c.exited(5, Exit::Code(0));
        c.exited(7, Exit::Code(1));
        c.exited(9, Exit::Signal(9));
        assert!(c.is_zombie(7));
        assert_eq!(c.wait(7, 0), Ok((7, 0x100)));
        assert!(!c.is_zombie(7));
        assert_eq!(c.wait(7, WNOHANG), Err(ECHILD));
        assert_eq!(c.wait(-1, WNOHANG), Ok((5, 0)));
        assert_eq!(c.wait(0, 0), Ok((9, 9)));
        assert!(c.is_empty());
        assert_eq!(c.wait(-1, 0), Err(ECHILD));
    }

    #[test]
    fn wait_refuses_unknown_options() {
        let mut c = Children::default();
        c.exited(3, Exit::Code(0));
        assert_eq!(c.wait(-1, 0x100), Err(EINVAL));
        assert_eq!(c.len(), 1);
        assert_eq!(c.wait(-1, WNOHANG | 0x4000_0000), Ok((3, 0)));
    }

    #[test]
    fn plan_widens_sorts_and_merges() {
        let p = plan(&[(0x5000, 0x5001), (0x1000, 0x3000), (0x2fff, 0x4000), (0x8000, 0x8000), (0x4000, 0x4800)]);
        assert_eq!(p, [(0x1000, 0x6000)]);
        assert_eq!(bytes(&p), 0x5000);
        assert_eq!(
            plan(&[(0x10_1234, 0x10_2001), (0x40_0000, 0x40_1000)]),
            [(0x10_1000, 0x10_3000), (0x40_0000, 0x40_1000)]
        );
        assert!(plan(&[]).is_empty());
    }
}
