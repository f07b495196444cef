//! The host side of virtio-net: an existing TAP interface.
//!
//! ftvm attaches to a TAP that the operator (or a test topology) created and wired up; it
//! never creates one, so a typo in the name is an error rather than a new, unconnected
//! interface. The TAP is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, and no offloads
//! for what it hands us (no TUNSETOFFLOAD): every frame read is a plain Ethernet frame behind
//! an empty `virtio_net_hdr`, which the reader strips. Written frames carry one too: empty,
//! or for the guest's TCP segments joined into one large segment, the host's GSO request
//! (crate::coalesce). The device adds and strips the guest's own virtio_net_hdr.
//!
//! Received frames are read by a thread and handed over by channel; they reach the guest only
//! when the vCPU loop admits them through the event source. Transmitted frames are written by
//! the vCPU thread, non-blocking: a TAP that cannot take a frame drops it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::coalesce::{coalesce, PLAIN_HDR, VNET_HDR_LEN};
use crate::net::{FrameSink, MAX_FRAME};
use crate::Error;

const TUN_PATH: &str = "/dev/net/tun";

/// An open TAP interface.
#[derive(Debug, Clone)]
pub struct Tap {
    file: Arc<File>,
    name: String,
}

fn check_name(name: &str) -> Result<(), Error> {
    let bad = |why| Err(Error::TapName { name: name.into(), why });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() >= libc::IFNAMSIZ {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return bad("not a valid interface name");
    }
    Ok(())
}

impl Tap {
    /// Attaches to the existing TAP interface `name`.
    pub fn open(name: &str) -> Result<Self, Error> {
        check_name(name)?;
        let cname = CString::new(name).map_err(|_| Error::TapName { name: name.into(), why: "contains NUL" })?;
        // TUNSETIFF would create a missing interface; refuse instead (see the module doc).
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(Error::TapAbsent { name: name.into() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| match source.kind() {
                ErrorKind::PermissionDenied => Error::TapPermission { name: name.into(), source },
                _ => Error::Tap { name: name.into(), what: "cannot open /dev/net/tun", source },
            })?;
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifr.ifr_name.iter_mut().zip(cname.as_bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is, on an fd of
        // /dev/net/tun that we own.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
        if ret < 0 {
            let source = std::io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::EBUSY) => Error::TapBusy { name },
                Some(libc::EPERM | libc::EACCES) => Error::TapPermission { name, source },
                Some(libc::EINVAL) => Error::NotATap { name },
                _ => Error::Tap { name, what: "TUNSETIFF failed", source },
            });
        }
        tracing::info!("attached to TAP {name}");
        Ok(Tap { file: Arc::new(file), name: name.into() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the thread that reads received frames and sends them on `frames`; after each
    /// batch it tells `wake` (which rings the vCPU loop's doorbell, and may ask to be told
    /// again later, to kick a vCPU that has not taken them by then). A full channel drops the
    /// frame (counted), as a NIC with a full ring would.
    pub fn spawn_reader(&self, frames: SyncSender<Vec<u8>>, wake: Box<dyn FrameWaker>) -> Result<TapReader, Error> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Thread { what: "TAP reader", source })?;
        let stop_thread = stop.try_clone().map_err(|source| Error::Thread { what: "TAP reader", source })?;
        let dropped = Arc::new(AtomicU64::new(0));
        let (file, name, dropped_thread) = (self.file.clone(), self.name.clone(), dropped.clone());
        let thread = std::thread::Builder::new()
            .name(format!("ftvm-tap-{}", self.name))
            .spawn(move || {
                ftvm_seccomp::enter(ftvm_seccomp::Thread::TapReader);
                read_loop(&file, &name, &stop_thread, &frames, &*wake, &dropped_thread)
            })
            .map_err(|source| Error::Thread { what: "TAP reader", source })?;
        Ok(TapReader { stop, thread: Some(thread), dropped })
    }
}

/// Who hears of received frames (the vCPU loop's side, implemented above this crate: the
/// timing of its kicks is host time, which devices never read).
pub trait FrameWaker: Send {
    /// A batch of frames was handed over.
    fn arrived(&self);
    /// How long the reader may wait for more frames before calling [`FrameWaker::due`]
    /// (`None`: as long as none come).
    fn wait_for(&self) -> Option<Duration>;
    /// Called after every wait: does what has come due (a kick for frames still waiting).
    fn due(&self);
}

fn read_loop(
    mut file: &File,
    name: &str,
    stop: &EventFd,
    frames: &SyncSender<Vec<u8>>,
    wake: &dyn FrameWaker,
    dropped: &AtomicU64,
) {
    let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME + 1];
    loop {
        let mut fds = [
            libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let timeout = wake
            .wait_for()
            .map(|left| libc::timespec { tv_sec: left.as_secs() as libc::time_t, tv_nsec: left.subsec_nanos().into() });
        let timeout_ptr = timeout.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `fds` is a valid array of two pollfd and `timeout_ptr` null or a valid
        // timespec for the duration of the call; no signal mask is passed.
        let ret = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ptr, std::ptr::null()) };
        wake.due();
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("TAP {name}: poll failed: {e}; no more frames will be received");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let mut got = 0;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) if n <= VNET_HDR_LEN || n > VNET_HDR_LEN + MAX_FRAME => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n) => match frames.try_send(buf[VNET_HDR_LEN..n].to_vec()) {
                    Ok(()) => got += 1,
                    Err(TrySendError::Full(_)) => {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Disconnected(_)) => return,
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!("TAP {name}: read failed: {e}; no more frames will be received");
                    if got > 0 {
                        wake.arrived();
                    }
                    return;
                }
            }
        }
        if got > 0 {
            wake.arrived();
        }
    }
}

impl Tap {
    /// Writes one frame behind its `virtio_net_hdr`, without blocking.
    fn write_frame(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> std::io::Result<()> {
        let parts = [std::io::IoSlice::new(hdr), std::io::IoSlice::new(frame)];
        let n = (&*self.file).write_vectored(&parts)?;
        if n != VNET_HDR_LEN + frame.len() {
            return Err(std::io::Error::new(
                ErrorKind::WriteZero,
                format!("short write of {n} of {} bytes", VNET_HDR_LEN + frame.len()),
            ));
        }
        Ok(())
    }
}

impl FrameSink for Tap {
    /// Writes one frame without blocking.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.write_frame(&PLAIN_HDR, frame)
    }

    /// Writes the frames with runs of one connection's TCP segments joined (crate::coalesce).
    fn send_all(&mut self, frames: &[Vec<u8>]) -> (u64, Option<std::io::Error>) {
        let mut failed = 0;
        let mut first = None;
        for w in coalesce(frames) {
            if let Err(e) = self.write_frame(&w.hdr, &w.frame) {
                failed += w.frames as u64;
                first.get_or_insert(e);
            }
        }
        (failed, first)
    }
}

/// The running reader thread of a TAP; dropping it stops the thread.
pub struct TapReader {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
}

impl TapReader {
    /// Frames dropped because the vCPU loop had not taken the earlier ones yet.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for TapReader {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_opened() {
        for bad in ["", "a/b", "with space", "x:1", "sixteen-chars-xx", ".."] {
            assert!(matches!(Tap::open(bad), Err(Error::TapName { .. })), "{bad:?}");
        }
        // No interface of this name exists: a clear error, and no TAP is created.
        let err = Tap::open("ftvmnosuch0").unwrap_err();
        assert!(matches!(err, Error::TapAbsent { .. }), "{err}");
        assert!(err.to_string().contains("ip tuntap add dev ftvmnosuch0 mode tap"), "{err}");
    }
}
