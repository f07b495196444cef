//! The log header: everything a replay (or a backup) needs to rebuild the VM identically, and a
//! field-by-field comparison so that the FT pair can say exactly what differs.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::FORMAT_VERSION;

/// An image the VM was built from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    /// Where it was on the recording host (informational: another host may keep it elsewhere).
    pub path: String,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    pub size: u64,
}

/// A guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemRegion {
    pub start: u64,
    pub size: u64,
}

/// One entry of the effective CPUID table (as KVM_GET_CPUID2 returns it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// A MAC address; in JSON, "52:54:00:12:34:56".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(|| format!("bad MAC address {s:?}"))?;
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC address {s:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("bad MAC address {s:?}"));
        }
        Ok(MacAddr(m))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A network device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetDevice {
    /// The guest's MAC: the guest sees it, so it must match.
    pub mac: MacAddr,
    /// The host TAP (informational: each host has its own).
    pub tap: String,
}

/// The log header, stored as JSON in frame 0.
///
/// Unknown fields are rejected: a reader that does not understand a field cannot honour it, so
/// any change to this struct bumps [`FORMAT_VERSION`]. Informational additions that a replay may
/// ignore go into `extra` instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogHeader {
    /// Equal to the file's format version.
    pub format_version: u32,
    /// The ftvm build that wrote the log.
    pub ftvm_version: String,
    /// The VMM's device-model version: device behaviour must be identical for equal values.
    pub device_model_version: u32,
    pub kernel: ImageInfo,
    pub initrd: Option<ImageInfo>,
    /// Disk images (for `record`, the base image that the guest's writes are overlaid on).
    pub disks: Vec<ImageInfo>,
    pub memory_size: u64,
    pub memory_layout: Vec<MemRegion>,
    /// The kernel command line as the user gave it.
    pub cmdline: String,
    /// The command line the guest saw (with the VMM's additions, e.g. virtio_mmio.device=...).
    pub effective_cmdline: String,
    pub cpuid: Vec<CpuidEntry>,
    pub xcr0: u64,
    pub xsave_size: u32,
    /// RTC wall time at guest time 0, in seconds since 1970.
    pub rtc_base_unix: u64,
    /// Console mode, as the VMM names it.
    pub console: String,
    pub net: Vec<NetDevice>,
    pub rng: bool,
    /// The exit-delivery mode, as the VMM names it.
    pub exit_delivery: String,
    /// Host wall time when recording started, ns since 1970 (informational).
    pub record_start_unix_ns: u64,
    /// Forward-compatible extras (compared key by key).
    pub extra: BTreeMap<String, String>,
}

impl Default for LogHeader {
    fn default() -> Self {
        LogHeader {
            format_version: FORMAT_VERSION,
            ftvm_version: env!("CARGO_PKG_VERSION").to_string(),
            device_model_version: 0,
            kernel: ImageInfo::default(),
            initrd: None,
            disks: Vec::new(),
            memory_size: 0,
            memory_layout: Vec::new(),
            cmdline: String::new(),
            effective_cmdline: String::new(),
            cpuid: Vec::new(),
            xcr0: 0,
            xsave_size: 0,
            rtc_base_unix: 0,
            console: String::new(),
            net: Vec::new(),
            rng: false,
            exit_delivery: String::new(),
            record_start_unix_ns: 0,
            extra: BTreeMap::new(),
        }
    }
}

/// One header field that differs between two headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderMismatch {
    /// Field path, e.g. `kernel.sha256`, `cpuid[0x7/0]`, `net[0].mac`, `extra.foo`.
    pub field: String,
    pub ours: String,
    pub theirs: String,
    /// False for fields that legitimately differ between hosts or runs (image paths, TAP names,
    /// the record start time, the ftvm build string); replay fidelity does not depend on them.
    pub significant: bool,
}

impl fmt::Display for HeaderMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ours {}, theirs {}", self.field, self.ours, self.theirs)?;
        if !self.significant {
            f.write_str(" (informational)")?;
        }
        Ok(())
    }
}

const ABSENT: &str = "(absent)";

struct Diff(Vec<HeaderMismatch>);

impl Diff {
    fn field<T: PartialEq + ToString>(&mut self, name: &str, ours: &T, theirs: &T, significant: bool) {
        if ours != theirs {
            self.push(name, ours.to_string(), theirs.to_string(), significant);
        }
    }

    fn push(&mut self, field: &str, ours: String, theirs: String, significant: bool) {
        self.0.push(HeaderMismatch { field: field.to_string(), ours, theirs, significant });
    }

    fn image(&mut self, name: &str, ours: Option<&ImageInfo>, theirs: Option<&ImageInfo>) {
        match (ours, theirs) {
            (Some(a), Some(b)) => {
                self.field(&format!("{name}.path"), &a.path, &b.path, false);
                self.field(&format!("{name}.sha256"), &a.sha256, &b.sha256, true);
                self.field(&format!("{name}.size"), &a.size, &b.size, true);
            }
            (None, None) => {}
            (a, b) => self.push(name, show_image(a), show_image(b), true),
        }
    }

    /// Element-wise comparison of two lists, with a missing element shown as absent.
    fn list<T>(&mut self, name: &str, ours: &[T], theirs: &[T], mut each: impl FnMut(&mut Self, &str, &T, &T)) {
        for i in 0..ours.len().max(theirs.len()) {
            let field = format!("{name}[{i}]");
            match (ours.get(i), theirs.get(i)) {
                (Some(a), Some(b)) => each(self, &field, a, b),
                (a, _) => {
                    let (o, t) = if a.is_some() { ("present", ABSENT) } else { (ABSENT, "present") };
                    self.push(&field, o.into(), t.into(), true)
                }
            }
        }
    }
}

fn show_image(i: Option<&ImageInfo>) -> String {
    i.map_or(ABSENT.to_string(), |i| format!("{} (sha256 {}, {} bytes)", i.path, i.sha256, i.size))
}

fn show_cpuid(e: &CpuidEntry) -> String {
    format!("flags={:#x} eax={:#010x} ebx={:#010x} ecx={:#010x} edx={:#010x}", e.flags, e.eax, e.ebx, e.ecx, e.edx)
}

struct Hex(u64);
impl PartialEq for Hex {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}
impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl LogHeader {
    /// Every field that differs between `self` ("ours") and `other` ("theirs"); empty when the
    /// headers are identical. Lists are compared element by element (CPUID by function/index),
    /// so that the report names exactly what differs.
    pub fn compare(&self, other: &LogHeader) -> Vec<HeaderMismatch> {
        let (a, b) = (self, other);
        let mut d = Diff(Vec::new());
        d.field("format_version", &a.format_version, &b.format_version, true);
        d.field("ftvm_version", &a.ftvm_version, &b.ftvm_version, false);
        d.field("device_model_version", &a.device_model_version, &b.device_model_version, true);
        d.image("kernel", Some(&a.kernel), Some(&b.kernel));
        d.image("initrd", a.initrd.as_ref(), b.initrd.as_ref());
        d.list("disks", &a.disks, &b.disks, |d, f, x, y| d.image(f, Some(x), Some(y)));
        d.field("memory_size", &a.memory_size, &b.memory_size, true);
        d.list("memory_layout", &a.memory_layout, &b.memory_layout, |d, f, x, y| {
            let show = |r: &MemRegion| format!("start={:#x} size={:#x}", r.start, r.size);
            if x != y {
                d.push(f, show(x), show(y), true);
            }
        });
        d.field("cmdline", &format!("{:?}", a.cmdline), &format!("{:?}", b.cmdline), true);
        let (ec_a, ec_b) = (format!("{:?}", a.effective_cmdline), format!("{:?}", b.effective_cmdline));
        d.field("effective_cmdline", &ec_a, &ec_b, true);
        let key = |e: &CpuidEntry| (e.function, e.index);
        let ours: BTreeMap<_, _> = a.cpuid.iter().map(|e| (key(e), e)).collect();
        let theirs: BTreeMap<_, _> = b.cpuid.iter().map(|e| (key(e), e)).collect();
        d.field("cpuid.len", &a.cpuid.len(), &b.cpuid.len(), true);
        let keys: std::collections::BTreeSet<_> = ours.keys().chain(theirs.keys()).collect();
        for k in keys {
            let (x, y) = (ours.get(k), theirs.get(k));
            if x != y {
                let show = |e: Option<&&CpuidEntry>| e.map_or(ABSENT.to_string(), |e| show_cpuid(e));
                d.push(&format!("cpuid[{:#x}/{}]", k.0, k.1), show(x), show(y), true);
            }
        }
        d.field("xcr0", &Hex(a.xcr0), &Hex(b.xcr0), true);
        d.field("xsave_size", &a.xsave_size, &b.xsave_size, true);
        d.field("rtc_base_unix", &a.rtc_base_unix, &b.rtc_base_unix, true);
        d.field("console", &a.console, &b.console, true);
        d.list("net", &a.net, &b.net, |d, f, x, y| {
            d.field(&format!("{f}.mac"), &x.mac, &y.mac, true);
            d.field(&format!("{f}.tap"), &x.tap, &y.tap, false);
        });
        d.field("rng", &a.rng, &b.rng, true);
        d.field("exit_delivery", &a.exit_delivery, &b.exit_delivery, true);
        d.field("record_start_unix_ns", &a.record_start_unix_ns, &b.record_start_unix_ns, false);
        let keys: std::collections::BTreeSet<_> = a.extra.keys().chain(b.extra.keys()).collect();
        for k in keys {
            let show = |v: Option<&String>| v.map_or(ABSENT.to_string(), |v| format!("{v:?}"));
            let (x, y) = (a.extra.get(k), b.extra.get(k));
            if x != y {
                d.push(&format!("extra.{k}"), show(x), show(y), true);
            }
        }
        d.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_and_prints() {
        let m: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        for bad in ["", "52:54:00:ab:cd", "52:54:00:ab:cd:ef:00", "5254:00:ab:cd:ef:0", "zz:54:00:ab:cd:ef"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
