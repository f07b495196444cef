//! TCP/IP for guests: smoltcp over the virtio-net driver (feature `net`).
//!
//! [`VirtioNet`] is a smoltcp `phy::Device`: received frames are handed to smoltcp in place
//! from the receive buffers; transmitted frames are written straight into transmit buffers
//! and queued, and [`VirtioNet::flush`] tells the device about them once per round. Time
//! for smoltcp comes from the PIT tick counter ([`now`], 10 ms resolution): never the TSC.
//!
//! The address comes from the command line: `ip=10.0.0.2/24` (prefix optional, default
//! /24) and optionally `gw=10.0.0.1` for a default route.

use core::fmt;

use smoltcp::iface::{Config, Interface};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use crate::virtio::net::{RxRing, Stats, TxRing, VirtioNet, MAX_FRAME};

/// smoltcp's clock: milliseconds since boot, from the 100 Hz PIT.
pub fn now() -> Instant {
    Instant::from_millis(crate::time::ticks_to_ms(crate::time::ticks()) as i64)
}

/// The guest's IPv4 configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Ipv4Cidr,
    pub gateway: Option<Ipv4Address>,
}

/// A bad `ip=`/`gw=` parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// No `ip=` on the command line.
    Missing,
    /// `key=value` could not be parsed.
    Malformed(&'static str, &'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Missing => write!(f, "no ip=ADDRESS[/PREFIX] on the command line"),
            ConfigError::Malformed(key, value) => write!(f, "malformed {key}={value}"),
        }
    }
}

fn parse_ipv4(text: &str) -> Option<Ipv4Address> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        *octet = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Address::from_octets(octets))
}

impl IpConfig {
    /// Reads `ip=` and `gw=` from the command line.
    pub fn from_cmdline() -> Result<IpConfig, ConfigError> {
        let ip = crate::cmdline::param("ip").ok_or(ConfigError::Missing)?;
        let (addr, prefix) = match ip.split_once('/') {
            Some((addr, prefix)) => (addr, prefix.parse::<u8>().ok().filter(|p| *p <= 32)),
            None => (ip, Some(24)),
        };
        let address = parse_ipv4(addr)
            .zip(prefix)
            .map(|(addr, prefix)| Ipv4Cidr::new(addr, prefix))
            .ok_or(ConfigError::Malformed("ip", ip))?;
        let gateway = match crate::cmdline::param("gw") {
            None => None,
            Some(gw) => Some(parse_ipv4(gw).ok_or(ConfigError::Malformed("gw", gw))?),
        };
        Ok(IpConfig { address, gateway })
    }
}

/// Builds the smoltcp interface on `net` with `config`. `random_seed` seeds smoltcp's
/// generator (TCP initial sequence numbers, ephemeral ports): take it from virtio-rng.
pub fn interface(net: &mut VirtioNet, config: IpConfig, random_seed: u64) -> Interface {
    let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(net.mac())));
    iface_config.random_seed = random_seed;
    let mut iface = Interface::new(iface_config, net, now());
    iface.update_ip_addrs(|addrs| {
        // A fresh interface has room for its first address.
        let _ = addrs.push(IpCidr::Ipv4(config.address));
    });
    if let Some(gateway) = config.gateway {
        // Only fails when the route table is full; it is empty here.
        let _ = iface.routes_mut().add_default_ipv4_route(gateway);
    }
    iface
}

/// A received frame, lent to smoltcp.
pub struct RxToken<'a> {
    rx: &'a mut RxRing,
    head: u16,
    len: usize,
    consumed: bool,
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        // A token dropped unread still gives its buffer back.
        if !self.consumed {
            self.rx.consume(self.head, self.len, |_| ());
        }
    }
}

/// Room for one frame to transmit.
pub struct TxToken<'a> {
    tx: &'a mut TxRing,
    stats: &'a mut Stats,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(mut self, f: F) -> R {
        self.consumed = true;
        self.rx.consume(self.head, self.len, f)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.tx.send(len, self.stats, f)
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let (head, len) = self.rx.pop()?;
        self.stats.rx_frames += 1;
        Some((
            RxToken { rx: &mut self.rx, head, len, consumed: false },
            TxToken { tx: &mut self.tx, stats: &mut self.stats },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        if !self.tx.ready(&mut self.stats) {
            return None;
        }
        Some(TxToken { tx: &mut self.tx, stats: &mut self.stats })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}
