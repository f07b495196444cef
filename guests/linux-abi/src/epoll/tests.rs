use super::*;

/// A clock of stamps and files with activity, as the personality keeps them.
struct World {
    stamp: u64,
    scanned: u64,
    files: BTreeMap<i32, (u32, Activity)>,
}

impl World {
    fn new() -> World {
        World { stamp: 0, scanned: 0, files: BTreeMap::new() }
    }

    fn next(&mut self) -> u64 {
        self.stamp += 1;
        self.stamp
    }

    /// An event on `fd` leaving it with readiness `ready`.
    fn event(&mut self, fd: i32, ready: u32) {
        let stamp = self.next();
        let scanned = self.scanned;
        let file = self.files.entry(fd).or_default();
        file.0 = ready;
        file.1.note(stamp, scanned);
    }

    /// `fd` read dry (no event).
    fn drain(&mut self, fd: i32) {
        self.files.entry(fd).or_default().0 = 0;
    }

    fn wait(&mut self, list: &mut ReadyList, max: usize) -> Vec<u64> {
        let now = self.next();
        self.scanned = now;
        let probes: Vec<Probe> = list
            .watched()
            .into_iter()
            .filter_map(|fd| self.files.get(&fd).map(|&(ready, activity)| Probe { fd, ready, activity }))
            .collect();
        let mut stamp = self.stamp;
        let out = list.scan(now, &probes, max, || {
            stamp += 1;
            stamp
        });
        self.stamp = stamp;
        out.into_iter().map(|(_, data)| data).collect()
    }

    fn add(&mut self, list: &mut ReadyList, fd: i32, events: u32) {
        let stamp = self.next();
        list.add(fd, events, fd as u64, stamp).unwrap();
    }
}

#[test]
fn descriptors_come_back_in_the_order_they_became_ready() {
    let mut w = World::new();
    let mut list = ReadyList::default();
    for fd in [5, 6, 7] {
        w.files.insert(fd, (0, Activity::default()));
        w.add(&mut list, fd, EPOLLIN);
    }
    assert!(w.wait(&mut list, 16).is_empty());
    // The highest descriptor's data arrives first, then the lowest's, then the middle's;
    // and more for the highest after that, which does not move it.
    w.event(7, EPOLLIN);
    w.event(5, EPOLLIN);
    w.event(6, EPOLLIN);
    w.event(7, EPOLLIN);
    assert_eq!(w.wait(&mut list, 16), [7, 5, 6]);
}

#[test]
fn a_descriptor_that_stays_ready_goes_behind_the_others() {
    let mut w = World::new();
    let mut list = ReadyList::default();
    for fd in [3, 4, 5] {
        w.files.insert(fd, (0, Activity::default()));
        w.add(&mut list, fd, EPOLLIN);
    }
    w.wait(&mut list, 16);
    w.event(3, EPOLLIN);
    w.event(4, EPOLLIN);
    w.event(5, EPOLLIN);
    // Two at a time: 3 and 4 go to the tail, behind 5.
    assert_eq!(w.wait(&mut list, 2), [3, 4]);
    assert_eq!(w.wait(&mut list, 2), [5, 3]);
    // 4 read dry; new data for it queues it behind 5 and 3.
    w.drain(4);
    assert_eq!(w.wait(&mut list, 16), [5, 3]);
    w.event(4, EPOLLIN);
    assert_eq!(w.wait(&mut list, 16), [5, 3, 4]);
}

#[test]
fn an_added_descriptor_already_ready_is_reported_and_only_what_was_asked_for() {
    let mut w = World::new();
    let mut list = ReadyList::default();
    w.event(9, EPOLLOUT);
    w.add(&mut list, 9, EPOLLIN);
    assert!(w.wait(&mut list, 16).is_empty(), "writable is not readable");
    list.modify(9, EPOLLIN | EPOLLOUT, 99, w.next()).unwrap();
    let now = w.next();
    let probes = [Probe { fd: 9, ready: EPOLLOUT | EPOLLRDHUP, activity: w.files[&9].1 }];
    assert_eq!(list.scan(now, &probes, 16, || 0), [(EPOLLOUT, 99)]);
    // Errors and hang-ups are reported whatever was asked for.
    let probes = [Probe { fd: 9, ready: EPOLLHUP | EPOLLERR, activity: w.files[&9].1 }];
    assert_eq!(list.scan(now + 1, &probes, 16, || 0), [(EPOLLHUP | EPOLLERR, 99)]);
}

#[test]
fn edge_triggered_reports_once_per_event() {
    let mut w = World::new();
    let mut list = ReadyList::default();
    w.event(4, EPOLLIN);
    w.add(&mut list, 4, EPOLLIN | EPOLLET);
    // Ready when added: reported once, then not again while nothing happens.
    assert_eq!(w.wait(&mut list, 16), [4]);
    assert!(w.wait(&mut list, 16).is_empty());
    w.event(4, EPOLLIN);
    assert_eq!(w.wait(&mut list, 16), [4]);
    assert!(w.wait(&mut list, 16).is_empty());
}

#[test]
fn one_shot_fires_once_until_modified() {
    let mut w = World::new();
    let mut list = ReadyList::default();
    w.event(4, EPOLLIN);
    w.add(&mut list, 4, EPOLLIN | EPOLLONESHOT);
    assert_eq!(w.wait(&mut list, 16), [4]);
    w.event(4, EPOLLIN);
    assert!(w.wait(&mut list, 16).is_empty(), "disabled after it fired");
    list.modify(4, EPOLLIN | EPOLLONESHOT, 4, w.next()).unwrap();
    assert_eq!(w.wait(&mut list, 16), [4]);
}

#[test]
fn ctl_errors_are_those_of_linux() {
    let mut list = ReadyList::default();
    assert_eq!(list.add(1, EPOLLIN, 0, 1), Ok(()));
    assert_eq!(list.add(1, EPOLLIN, 0, 2), Err(CtlError::Exists));
    assert_eq!(list.modify(2, EPOLLIN, 0, 3), Err(CtlError::Missing));
    assert_eq!(list.remove(2), Err(CtlError::Missing));
    assert_eq!(list.remove(1), Ok(()));
    assert!(list.watched().is_empty());
}
