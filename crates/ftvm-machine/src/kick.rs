//! Kicking the vCPU out of KVM_RUN, and the timer that does it when a deadline passes.
//!
//! A kick is a real-time signal sent to the vCPU thread. Its handler sets `immediate_exit` in
//! the thread's `kvm_run`, so the kick is never lost: if the signal lands while the thread is
//! inside KVM_RUN, KVM returns EINTR; if it lands just before, the next KVM_RUN returns at
//! once. Kicks are not counted exits and carry no events (docs/record-replay.md); only `ftvm run`
//! uses them to deliver interrupts promptly to a guest computing in ring 3.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::error::{Error, Result};

thread_local! {
    /// The `immediate_exit` byte of the `kvm_run` of the vCPU running on this thread.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|p| p.get());
    if !p.is_null() {
        // SAFETY: the pointer is set by `Kicker::attach` to the immediate_exit field of the
        // kvm_run mapping of the vCPU owned by this very thread, and cleared before that
        // vCPU is dropped; a volatile byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Set when the operator asked ftvm to stop (SIGINT, SIGTERM): the vCPU loop ends the run at
/// the next exit, and a recording ends its log with END(operator stop).
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks the running VM to stop; async-signal-safe.
pub fn request_stop() {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::Relaxed)
}

/// The grace period of a graceful stop in milliseconds: how long a guest asked to shut down
/// (SIGTERM, `PUT /shutdown`) has to power off before the VM is stopped as by
/// [`request_stop`]. `u64::MAX`: this session takes no shutdown request (a backup, a replay,
/// `--stop-timeout 0`), so every stop request stops at once.
static STOP_TIMEOUT_MS: AtomicU64 = AtomicU64::new(u64::MAX);
/// Set by the first shutdown request; the vCPU loop delivers it to the guest once.
static SHUTDOWN_REQUESTED: AtomicBool = AtomicBool::new(false);
static SHUTDOWN_DELIVERED: AtomicBool = AtomicBool::new(false);

/// Makes this session's operator stops graceful: a shutdown request goes to the guest, which
/// has `timeout` to power off (`None`, or zero: stop at once, as [`request_stop`]).
pub fn set_stop_timeout(timeout: Option<std::time::Duration>) {
    let ms = match timeout {
        Some(t) if !t.is_zero() => u64::try_from(t.as_millis()).unwrap_or(u64::MAX - 1).min(u64::MAX - 1),
        _ => u64::MAX,
    };
    STOP_TIMEOUT_MS.store(ms, Ordering::SeqCst);
}

/// The grace period, if this session takes shutdown requests.
pub fn stop_timeout() -> Option<std::time::Duration> {
    match STOP_TIMEOUT_MS.load(Ordering::SeqCst) {
        u64::MAX => None,
        ms => Some(std::time::Duration::from_millis(ms)),
    }
}

/// An operator asks the guest to shut down: the first request goes to the guest (a graceful
/// stop, if this session takes them); a second one, or any in a session that takes none,
/// stops at once. Returns whether this request went to the guest. Async-signal-safe.
pub fn request_shutdown() -> bool {
    if STOP_TIMEOUT_MS.load(Ordering::SeqCst) == u64::MAX || SHUTDOWN_REQUESTED.swap(true, Ordering::SeqCst) {
        request_stop();
        return false;
    }
    true
}

/// Whether a shutdown request was made (delivered or not).
pub fn shutdown_requested() -> bool {
    SHUTDOWN_REQUESTED.load(Ordering::Relaxed)
}

/// Whether a shutdown request waits to be delivered to the guest.
pub fn shutdown_pending() -> bool {
    SHUTDOWN_REQUESTED.load(Ordering::Relaxed) && !SHUTDOWN_DELIVERED.load(Ordering::Relaxed)
}

/// The vCPU loop delivered the request to the guest.
pub fn shutdown_delivered() {
    SHUTDOWN_DELIVERED.store(true, Ordering::SeqCst);
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Delivers kicks to one vCPU thread.
pub struct Kicker {
    target: Mutex<Option<libc::pthread_t>>,
    kicks: AtomicU64,
    /// Whether host input (frames, console bytes) is worth a kick: only while interrupts are
    /// delivered promptly. Recording and replaying, input is admitted at counted exits only,
    /// so a kick for it is a KVM_RUN round trip that admits nothing (on PVM ~4,000 of them a
    /// second under redis-benchmark).
    input_kicks: AtomicBool,
    /// Host input arrived that the loop has not looked at since (it clears this at every
    /// exit where it admits input).
    input_waiting: AtomicBool,
}

impl Kicker {
    /// Installs the kick signal handler (once per process).
    pub fn new() -> Result<Arc<Self>> {
        static INSTALL: Once = Once::new();
        let mut result = Ok(());
        INSTALL.call_once(|| {
            result = register_signal_handler(kick_signal(), on_kick).map_err(Error::KickSignal);
        });
        result?;
        Ok(Arc::new(Kicker {
            target: Mutex::new(None),
            kicks: AtomicU64::new(0),
            input_kicks: AtomicBool::new(true),
            input_waiting: AtomicBool::new(false),
        }))
    }

    /// Makes the calling thread the target of kicks; `immediate_exit` is that thread's
    /// vCPU's `kvm_run.immediate_exit`.
    pub fn attach(&self, immediate_exit: *mut u8) {
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        // SAFETY: pthread_self has no preconditions.
        *ftvm_sync::lock(&self.target) = Some(unsafe { libc::pthread_self() });
    }

    /// Stops kicks to the calling thread (before its vCPU goes away).
    pub fn detach(&self) {
        *ftvm_sync::lock(&self.target) = None;
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Kicks the vCPU thread if one is attached.
    pub fn kick(&self) {
        let target = ftvm_sync::lock(&self.target);
        if let Some(thread) = *target {
            self.kicks.fetch_add(1, Ordering::Relaxed);
            // SAFETY: `thread` is alive: it is detached (under this lock) before it exits.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    pub fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::Relaxed)
    }

    /// Whether [`input_waker`]s kick the vCPU as well as ringing the doorbell (the vCPU
    /// loop says so whenever its delivery changes).
    pub fn set_input_kicks(&self, on: bool) {
        self.input_kicks.store(on, Ordering::SeqCst);
    }

    fn kick_for_input(&self) {
        if self.input_kicks.load(Ordering::SeqCst) {
            self.kick();
        }
    }

    /// The vCPU loop is about to admit host input: what arrives from now on waits again.
    pub fn input_taken(&self) {
        self.input_waiting.store(false, Ordering::SeqCst);
    }
}

/// How long received frames may wait for the guest's next exit before a kick fetches them,
/// while the loop delivers promptly. A kick is an exit of its own (on PVM an exit costs the
/// guest ~25 µs, kvm-probe section 1, and the signal ~11 µs more), and a guest under load
/// exits every few hundred microseconds anyway (a transmit, a halt), which admits what waits;
/// a halted guest is woken by the doorbell at once. Kicking at once, the real Redis under
/// redis-benchmark took ~0.4-0.8 kicks per request; with 200 µs, 0.01-0.09, and 7-12% more
/// requests a second at 20 and 50 clients, its p99 unchanged (docs/benchmarks.md).
pub const INPUT_KICK_DELAY: Duration = Duration::from_micros(200);

/// A TAP reader's side of the vCPU loop: rings the doorbell at once (a halted loop admits
/// the frames), and kicks a running vCPU only if they still wait [`INPUT_KICK_DELAY`] later
/// (and only while the loop delivers promptly).
pub struct FrameWake {
    kicker: Arc<Kicker>,
    doorbell: Arc<Doorbell>,
    delay: Duration,
    /// When the kick for the frames now waiting is due (the reader thread's own).
    kick_at: Cell<Option<Instant>>,
}

/// What wakes the vCPU loop for a TAP's frames (see [`FrameWake`]).
pub fn frame_waker(kicker: &Arc<Kicker>, doorbell: &Arc<Doorbell>) -> Box<dyn ftvm_virtio::tap::FrameWaker> {
    Box::new(FrameWake::new(kicker, doorbell, INPUT_KICK_DELAY))
}

impl FrameWake {
    fn new(kicker: &Arc<Kicker>, doorbell: &Arc<Doorbell>, delay: Duration) -> Self {
        FrameWake { kicker: kicker.clone(), doorbell: doorbell.clone(), delay, kick_at: Cell::new(None) }
    }
}

impl ftvm_virtio::tap::FrameWaker for FrameWake {
    fn arrived(&self) {
        self.doorbell.ring();
        if !self.kicker.input_kicks.load(Ordering::SeqCst) {
            return;
        }
        self.kicker.input_waiting.store(true, Ordering::SeqCst);
        if self.delay.is_zero() {
            self.kicker.kick();
        } else if self.kick_at.get().is_none() {
            // The first batch's moment stands: later ones do not put the kick off.
            self.kick_at.set(Some(Instant::now() + self.delay));
        }
    }

    fn wait_for(&self) -> Option<Duration> {
        self.kick_at.get().map(|at| at.saturating_duration_since(Instant::now()))
    }

    fn due(&self) {
        let Some(at) = self.kick_at.get() else { return };
        if Instant::now() < at {
            return;
        }
        self.kick_at.set(None);
        if self.kicker.input_waiting.load(Ordering::SeqCst) {
            self.kicker.kick_for_input();
        }
    }
}

/// What gets the vCPU loop's attention from another thread, wherever it is: rings its
/// doorbell (a halted loop wakes) and kicks the vCPU (a running guest exits KVM_RUN).
pub fn waker(kicker: &Arc<Kicker>, doorbell: &Arc<Doorbell>) -> Box<dyn Fn() + Send + Sync> {
    let (k, d) = (kicker.clone(), doorbell.clone());
    Box::new(move || {
        d.ring();
        k.kick();
    })
}

/// What host input (a TAP's frames, console bytes) wakes the vCPU loop with: it rings the
/// doorbell (a halted loop wakes to admit it) and kicks a running vCPU only while the loop
/// delivers promptly ([`Kicker::set_input_kicks`]). A recording's sync points have a timer
/// of their own that kicks when an event has waited for their bound.
pub fn input_waker(kicker: &Arc<Kicker>, doorbell: &Arc<Doorbell>) -> Box<dyn Fn() + Send + Sync> {
    let (k, d) = (kicker.clone(), doorbell.clone());
    Box::new(move || {
        d.ring();
        k.kick_for_input();
    })
}

/// Wakes a halted vCPU loop when something arrives (console input) or a deadline passes.
#[derive(Default)]
pub struct Doorbell {
    rung: Mutex<bool>,
    cv: Condvar,
}

impl Doorbell {
    pub fn ring(&self) {
        *ftvm_sync::lock(&self.rung) = true;
        self.cv.notify_all();
    }

    /// Waits until rung or until `deadline` (forever if `None`). Returns whether it was rung.
    pub fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mut rung = ftvm_sync::lock(&self.rung);
        while !*rung {
            match deadline {
                None => rung = ftvm_sync::unpoisoned(self.cv.wait(rung)),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    rung = ftvm_sync::unpoisoned(self.cv.wait_timeout(rung, d - now)).0;
                }
            }
        }
        std::mem::replace(&mut *rung, false)
    }
}

/// A thread that kicks the vCPU when the next device deadline passes on the host clock.
pub struct DeadlineTimer {
    shared: Arc<TimerShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct TimerShared {
    deadline: Mutex<Option<Instant>>,
    cv: Condvar,
    stop: AtomicBool,
}

impl DeadlineTimer {
    pub fn start(kicker: Arc<Kicker>) -> Result<Self> {
        let shared =
            Arc::new(TimerShared { deadline: Mutex::new(None), cv: Condvar::new(), stop: AtomicBool::new(false) });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ftvm-timer".into())
            .spawn(move || {
                ftvm_seccomp::enter(ftvm_seccomp::Thread::Timer);
                let mut deadline = ftvm_sync::lock(&s.deadline);
                while !s.stop.load(Ordering::Acquire) {
                    match *deadline {
                        None => deadline = ftvm_sync::unpoisoned(s.cv.wait(deadline)),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                *deadline = None;
                                kicker.kick();
                            } else {
                                deadline = ftvm_sync::unpoisoned(s.cv.wait_timeout(deadline, d - now)).0;
                            }
                        }
                    }
                }
            })
            .map_err(|source| Error::Thread { what: "timer", source })?;
        Ok(DeadlineTimer { shared, thread: Some(thread) })
    }

    /// Sets the host instant of the next kick (`None`: no kick needed).
    pub fn arm(&self, at: Option<Instant>) {
        let mut d = ftvm_sync::lock(&self.shared.deadline);
        if *d != at {
            let earlier = match (*d, at) {
                (Some(old), Some(new)) => new < old,
                (None, Some(_)) => true,
                _ => false,
            };
            *d = at;
            if earlier {
                self.shared.cv.notify_all();
            }
        }
    }
}

impl Drop for DeadlineTimer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _d = ftvm_sync::lock(&self.shared.deadline);
            self.shared.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use ftvm_virtio::tap::FrameWaker;

    use super::*;

    /// A kicker aimed at this thread, with the byte its kicks set, and a TAP reader's waker.
    fn setup(delay: Duration) -> (Arc<Kicker>, Arc<Doorbell>, Box<u8>, FrameWake) {
        let kicker = Kicker::new().unwrap();
        let doorbell = Arc::new(Doorbell::default());
        let mut immediate_exit = Box::new(0u8);
        kicker.attach(&mut *immediate_exit);
        let wake = FrameWake::new(&kicker, &doorbell, delay);
        (kicker, doorbell, immediate_exit, wake)
    }

    #[test]
    fn frames_kick_a_running_vcpu_only_once_they_waited_and_only_in_prompt_delivery() {
        let (kicker, doorbell, immediate_exit, wake) = setup(INPUT_KICK_DELAY);
        // Prompt delivery: the doorbell rings at once, the kick waits for the delay.
        wake.arrived();
        assert!(doorbell.wait_until(Some(Instant::now())), "the doorbell rang");
        let wait = wake.wait_for().expect("a kick to come");
        assert!(wait <= INPUT_KICK_DELAY);
        wake.due();
        assert_eq!(kicker.kicks(), 0, "not due yet");
        std::thread::sleep(wait);
        wake.due();
        assert_eq!(kicker.kicks(), 1);
        assert_eq!(wake.wait_for(), None);
        // SAFETY: the handler ran on this thread inside pthread_kill; the byte is ours.
        assert_eq!(unsafe { std::ptr::read_volatile(&*immediate_exit) }, 1);
        // The loop looked at its input before the moment came: no kick.
        wake.arrived();
        kicker.input_taken();
        std::thread::sleep(wake.wait_for().unwrap());
        wake.due();
        assert_eq!(kicker.kicks(), 1);
        // Recording: the doorbell only; nothing to do later.
        kicker.set_input_kicks(false);
        wake.arrived();
        assert_eq!(wake.wait_for(), None);
        assert!(doorbell.wait_until(Some(Instant::now())));
        assert_eq!(kicker.kicks(), 1);
        kicker.detach();
    }

    #[test]
    fn with_no_delay_frames_kick_at_once() {
        let (kicker, _doorbell, _immediate_exit, wake) = setup(Duration::ZERO);
        wake.arrived();
        assert_eq!((kicker.kicks(), wake.wait_for()), (1, None));
        kicker.detach();
    }
}
