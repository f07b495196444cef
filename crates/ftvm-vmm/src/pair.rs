//! Running one side of the fault-tolerant pair: `ftvm primary` and `ftvm backup`.

use std::io::Write;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use ftvm_events::{OutputSinks, OutputTarget};
use ftvm_replication::backup::BackupState;
use ftvm_virtio::net::FrameSink;
use ftvm_virtio::tap::Tap;

use ftvm_machine::vcpu::{ConsoleSink, GoLive, TakeoverReport, VcpuLoop};

/// Performs a primary's released outputs: its console and its TAPs.
pub struct HostSinks {
    pub console: ConsoleSink,
    pub taps: Vec<Tap>,
}

impl OutputSinks for HostSinks {
    fn perform(&mut self, target: OutputTarget, bytes: &[u8]) {
        match target {
            OutputTarget::Console => {
                let _ = self.console.write_all(bytes).and_then(|_| self.console.flush());
            }
            OutputTarget::Net(i) => {
                if let Some(tap) = self.taps.get_mut(i) {
                    let _ = tap.send(bytes);
                }
            }
        }
    }
}

/// What a backup needs to go live: its TAPs (opened only then), the guest's MAC and IP for
/// the gratuitous ARP, and the pair's state for the report.
pub struct Takeover {
    pub taps: Vec<String>,
    pub macs: Vec<[u8; 6]>,
    pub guest_ip: Option<Ipv4Addr>,
    pub state: Arc<BackupState>,
}

impl GoLive for Takeover {
    /// Opens the TAPs, reconnects the frame streams, announces the guest's new port.
    fn activate(self: Box<Self>, vloop: &mut VcpuLoop) -> ftvm_machine::Result<TakeoverReport> {
        for (i, name) in self.taps.iter().enumerate() {
            let tap = Tap::open(name)?;
            let (tx, rx) = mpsc::sync_channel(1024);
            let reader = tap.spawn_reader(tx, vloop.frame_waker())?;
            vloop.attach_live_net(i, tap.clone(), reader, rx);
            if let (Some(ip), Some(mac)) = (self.guest_ip, self.macs.get(i)) {
                announce(tap.clone(), name.clone(), gratuitous_arp(*mac, ip));
            }
        }
        Ok(TakeoverReport {
            position: format!("log LSN {}", self.state.received_lsn.load(Ordering::SeqCst)),
            outputs_done: self.state.outputs_done.load(Ordering::SeqCst),
            silence_ms: self.state.silence_ms.load(Ordering::SeqCst),
            catch_up_ms: self.state.decided_at.get().map_or(0, |t| t.elapsed().as_millis() as u64),
        })
    }
}

/// When the gratuitous ARPs go out after going live, in ms. A TAP that was just opened may
/// not forward yet (its bridge port comes up a moment after the carrier): the first frames can
/// be lost, and a LAN that missed the announcement keeps sending the guest's traffic to the
/// dead host until the guest happens to transmit. Repeated, as QEMU's self-announce does.
const ANNOUNCE_MS: [u64; 6] = [0, 10, 30, 70, 150, 300];

/// Sends the gratuitous ARP on `tap` on the [`ANNOUNCE_MS`] schedule, from a thread of its own.
fn announce(mut tap: Tap, name: String, frame: Vec<u8>) {
    let spawned = std::thread::Builder::new().name("ftvm-announce".into()).spawn(move || {
        ftvm_seccomp::enter(ftvm_seccomp::Thread::Link);
        let start = std::time::Instant::now();
        for at in ANNOUNCE_MS {
            let at = std::time::Duration::from_millis(at);
            std::thread::sleep(at.saturating_sub(start.elapsed()));
            if let Err(e) = tap.send(&frame) {
                tracing::warn!("gratuitous ARP on {name} failed: {e}");
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the gratuitous-ARP thread: {e}");
    }
}

/// An ARP request for the guest's own address from its own MAC: switches learn the new port,
/// neighbours refresh their caches.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f.resize(60, 0);
    f
}

/// The guest's IPv4 address from an `ip=A.B.C.D[/N]` command-line parameter.
pub fn guest_ip(cmdline: &str) -> Option<Ipv4Addr> {
    cmdline.split_whitespace().find_map(|p| p.strip_prefix("ip="))?.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_arp_and_guest_ip() {
        let f = gratuitous_arp([0x52, 0x54, 0, 0x12, 0x34, 0x56], Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[28..32], &[10, 0, 0, 2]);
        assert_eq!(&f[38..42], &[10, 0, 0, 2]);
        assert_eq!(guest_ip("console=x ip=10.0.0.2/24 gw=10.0.0.1"), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(guest_ip("nothing"), None);
    }
}
