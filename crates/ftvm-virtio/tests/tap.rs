//! The TAP backend against a real TAP interface, inside a private network namespace (the test
//! thread unshares one, so the host's network is never touched and the namespace, with its
//! interfaces, disappears when the thread ends). Needs root and /dev/net/tun: without them the
//! test fails, unless FTVM_ALLOW_NO_KVM=1 says to skip it.

// The test waits on the host clock for the host's network stack; no device code is involved.
#![allow(clippy::disallowed_methods)]

use std::cell::Cell;
use std::net::UdpSocket;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_virtio::net::FrameSink;
use ftvm_virtio::tap::{FrameWaker, Tap};
use ftvm_virtio::Error;

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && std::path::Path::new("/dev/net/tun").exists() {
        return true;
    }
    if std::env::var("FTVM_ALLOW_NO_KVM").as_deref() == Ok("1") {
        eprintln!("SKIPPED: TAP tests need root and /dev/net/tun (FTVM_ALLOW_NO_KVM=1)");
        return false;
    }
    panic!("TAP tests need root and /dev/net/tun (set FTVM_ALLOW_NO_KVM=1 to skip them)");
}

/// Runs `f` on a thread in a fresh network namespace.
fn in_private_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare affects only the calling thread here (CLONE_NEWNET alone).
            let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("test thread")
    })
}

/// Runs `ip ARGS` in the calling thread's namespace (children inherit it).
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Counts batches, and asks to be called back 2 ms after each first one.
struct Counting {
    arrivals: Arc<AtomicUsize>,
    dues: Arc<AtomicUsize>,
    due_at: Cell<Option<Instant>>,
}

impl FrameWaker for Counting {
    fn arrived(&self) {
        self.arrivals.fetch_add(1, Ordering::SeqCst);
        if self.due_at.get().is_none() {
            self.due_at.set(Some(Instant::now() + Duration::from_millis(2)));
        }
    }

    fn wait_for(&self) -> Option<Duration> {
        self.due_at.get().map(|at| at.saturating_duration_since(Instant::now()))
    }

    fn due(&self) {
        if self.due_at.get().is_some_and(|at| Instant::now() >= at) {
            self.due_at.set(None);
            self.dues.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[test]
fn tap_attach_errors_receive_and_transmit() {
    if !privileged() {
        return;
    }
    in_private_netns(|| {
        assert!(matches!(Tap::open("ftvmt0"), Err(Error::TapAbsent { .. })));
        ip(&["link", "set", "lo", "up"]);
        ip(&["tuntap", "add", "dev", "ftvmt0", "mode", "tap"]);
        ip(&["tuntap", "add", "dev", "ftvmtun0", "mode", "tun"]);
        ip(&["addr", "add", "10.9.0.1/24", "dev", "ftvmt0"]);
        ip(&["link", "set", "ftvmt0", "up"]);

        // Interfaces of the wrong kind.
        for name in ["ftvmtun0", "lo"] {
            let err = Tap::open(name).unwrap_err();
            assert!(matches!(err, Error::NotATap { .. }), "{name}: {err}");
        }
        let mut tap = Tap::open("ftvmt0").expect("attach to the TAP");
        let err = Tap::open("ftvmt0").unwrap_err();
        assert!(matches!(err, Error::TapBusy { .. }), "{err}");
        assert!(err.to_string().contains("in use"), "{err}");

        // Receive: the host resolves 10.9.0.2, so an ARP request goes out on the TAP.
        let (tx, rx) = sync_channel(16);
        let wakes = Arc::new(AtomicUsize::new(0));
        let dues = Arc::new(AtomicUsize::new(0));
        let waker = Counting { arrivals: wakes.clone(), dues: dues.clone(), due_at: Cell::new(None) };
        let reader = tap.spawn_reader(tx, Box::new(waker)).unwrap();
        let sock = UdpSocket::bind("10.9.0.1:0").unwrap();
        sock.send_to(b"hello", "10.9.0.2:9").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let arp = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = rx.recv_timeout(left).expect("an ARP request from the host within 10 s");
            if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[38..42] == [10, 9, 0, 2] {
                break frame;
            }
        };
        assert_eq!(&arp[..6], &[0xff; 6], "broadcast");
        // The reader queues a frame, then wakes the loop: the wake may come a moment after
        // the frame was taken.
        let woken_by = Instant::now() + Duration::from_secs(1);
        while wakes.load(Ordering::SeqCst) == 0 && Instant::now() < woken_by {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(wakes.load(Ordering::SeqCst) >= 1, "the reader woke the vCPU loop");
        // The moment the waker asked for comes without more frames: the reader's wait ends
        // there and it says so.
        while dues.load(Ordering::SeqCst) == 0 && Instant::now() < woken_by {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(dues.load(Ordering::SeqCst) >= 1, "the reader called back when its wait was over");
        let host_mac: [u8; 6] = arp[6..12].try_into().unwrap();

        // Transmit: answer the ARP request as the guest would; the host learns the address.
        let guest_mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let mut reply = Vec::new();
        reply.extend_from_slice(&host_mac);
        reply.extend_from_slice(&guest_mac);
        reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        reply.extend_from_slice(&guest_mac);
        reply.extend_from_slice(&[10, 9, 0, 2]);
        reply.extend_from_slice(&host_mac);
        reply.extend_from_slice(&[10, 9, 0, 1]);
        reply.resize(60, 0);
        tap.send(&reply).expect("write a frame to the TAP");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let neigh = ip(&["neigh", "show", "10.9.0.2", "dev", "ftvmt0"]);
            if neigh.contains("52:54:00:12:34:56") {
                break;
            }
            assert!(Instant::now() < deadline, "the host never learnt the guest's MAC: {neigh}");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(reader.dropped(), 0);
        // Stopping the reader does not hang; the TAP can then be attached again.
        drop(reader);
        drop(tap);
        Tap::open("ftvmt0").expect("attach again after release");
    });
}
