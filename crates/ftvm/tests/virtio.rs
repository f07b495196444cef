//! `ftvm run` with virtio devices: the devices appear at the documented MMIO windows in the
//! documented order, `--net` attaches to a real TAP (in a private network namespace), and bad
//! device options (absent or busy TAP, missing or unwritable disk, too many devices, malformed
//! MAC) get a clear error. Needs KVM; the TAP tests also need root and iproute2 (both fail
//! loudly when missing, unless FTVM_ALLOW_NO_KVM=1).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A network namespace for one test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let ip_ok = Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
        if !root || !ip_ok || !Path::new("/dev/net/tun").exists() {
            if std::env::var("FTVM_ALLOW_NO_KVM").as_deref() == Ok("1") {
                eprintln!("SKIPPED: TAP tests need root, iproute2 and /dev/net/tun (FTVM_ALLOW_NO_KVM=1)");
                return None;
            }
            panic!("TAP tests need root, iproute2 and /dev/net/tun (set FTVM_ALLOW_NO_KVM=1 to skip them)");
        }
        let ns = Netns(format!("ftvm-{tag}-{}", std::process::id()));
        let _ = Command::new("ip").args(["netns", "del", &ns.0]).output();
        ns.ip(&["netns", "add", &ns.0]);
        Some(ns)
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
    }

    /// Creates a persistent TAP in the namespace.
    fn tap(&self, name: &str) {
        self.ip(&["-n", &self.0, "tuntap", "add", "dev", name, "mode", "tap"]);
        self.ip(&["-n", &self.0, "link", "set", name, "up"]);
    }

    /// `ftvm run` inside the namespace.
    fn ftvm(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_ftvm"), "run"]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// 32-bit guest code: `mov eax, [addr]` (a 4-byte MMIO read).
fn load_eax(addr: u32) -> Vec<u8> {
    let mut c = vec![0xa1];
    c.extend_from_slice(&addr.to_le_bytes());
    c
}

/// A guest that prints the first device's MagicValue (4 bytes, "virt"), then the DeviceID of
/// each of `count` devices as a digit, then the last byte of the first device's MAC (a
/// 1-byte config space read) as a character, and powers off.
fn probe_guest(count: u32) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend(load_eax(0xd000_0000));
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for _ in 0..3 {
        c.extend_from_slice(&[0xee, 0xc1, 0xe8, 0x08]); // out dx, al; shr eax, 8
    }
    c.push(0xee);
    for i in 0..count {
        c.extend(load_eax(0xd000_0008 + i * 0x1000));
        c.extend_from_slice(&[0x04, b'0', 0xee]); // add al, '0'; out dx, al
    }
    c.extend_from_slice(&[0xa0, 0x05, 0x01, 0x00, 0xd0, 0xee]); // mov al, [0xd0000105]; out dx, al
    c.extend_from_slice(&[0xb0, b'\n', 0xee]);
    c.extend_from_slice(asm::POWER_OFF);
    c
}

fn write_kernel(dir: &Path, code: &[u8]) -> std::path::PathBuf {
    let kernel = dir.join("probe.elf");
    std::fs::write(&kernel, pvh_elf(code)).unwrap();
    kernel
}

#[test]
fn devices_appear_in_the_documented_order_and_the_tap_is_attached() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::new("vio") else { return };
    ns.tap("vmtap0");
    let dir = scratch("virtio-probe");
    let kernel = write_kernel(&dir, &probe_guest(3));
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let console = dir.join("console.txt");
    let out = ns
        .ftvm()
        .arg("--kernel")
        .arg(&kernel)
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .args(["--net", "tap=vmtap0,mac=52:54:00:12:34:41", "--rng", "--disk"])
        .arg(&disk)
        .env("FTVM_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&console).unwrap();
    // net (1), then the disk (2), then rng (4); the MAC's last byte is 0x41, 'A'.
    assert_eq!(text, "virt124A\n");
    let err = stderr(&out);
    assert!(err.contains("attached to TAP vmtap0"), "{err}");
    assert!(err.contains("virtio-net0 (MAC 52:54:00:12:34:41) at 0xd0000000, IRQ 5"), "{err}");
    assert!(err.contains("at 0xd0001000, IRQ 6") && err.contains("virtio-rng0 at 0xd0002000, IRQ 7"), "{err}");
}

#[test]
fn absent_and_busy_taps_are_clear_errors() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::new("tapbusy") else { return };
    let dir = scratch("virtio-tap-errors");
    let spin = write_kernel(&dir, &[0xeb, 0xfe]); // jmp $
    let run = |kernel: &Path, net: &str| {
        ns.ftvm().arg("--kernel").arg(kernel).args(["--console", "file:/dev/null", "--net", net]).output().unwrap()
    };
    let out = run(&spin, "tap=nosuch0");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("TAP device nosuch0 does not exist"), "{}", stderr(&out));

    ns.tap("vmtap1");
    // A first VM holds the TAP...
    let mut first = ns
        .ftvm()
        .arg("--kernel")
        .arg(&spin)
        .args(["--console", "file:/dev/null", "--net", "tap=vmtap1"])
        .env("FTVM_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stderr.take().unwrap()).lines();
    let attached = lines.by_ref().map_while(Result::ok).any(|l| l.contains("attached to TAP vmtap1"));
    assert!(attached, "the first VM attached");
    // ...so a second one is refused.
    let out = run(&spin, "tap=vmtap1");
    // Stop the first VM (our own child, by its id) before asserting.
    let _ = first.kill();
    let _ = first.wait();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("TAP device vmtap1 is in use by another process"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn disk_and_device_errors_are_clear() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("virtio-disk-errors");
    let kernel = write_kernel(&dir, asm::POWER_OFF);
    let (out, _) = run_guest(&kernel, &["--disk", dir.join("missing.img").to_str().unwrap()], &dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing.img: No such file"), "{}", stderr(&out));

    // An image ftvm may not write: the error says so and suggests ,readonly, which works.
    // SAFETY: geteuid has no preconditions.
    let ro = if unsafe { libc::geteuid() } == 0 {
        // Root may write any regular file, but not a sysfs attribute without a store method.
        "/sys/devices/system/cpu/online".to_string()
    } else {
        let p = dir.join("ro.img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
        p.display().to_string()
    };
    let (out, _) = run_guest(&kernel, &["--disk", &ro], &dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not writable") && stderr(&out).contains(",readonly"), "{}", stderr(&out));
    let (out, _) = run_guest(&kernel, &["--disk", &format!("{ro},readonly")], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let img = dir.join("d.img");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let img = img.display().to_string();
    let mut args = vec!["--rng"];
    for _ in 0..6 {
        args.extend(["--disk", &img]);
    }
    let (out, _) = run_guest(&kernel, &args, &dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("7 virtio devices requested, but at most 6 fit"), "{}", stderr(&out));

    for bad in ["tap=t0,mac=01:02:03:04:05:06", "tap=t0,mac=52:54:00", "t0", "tap=t0,speed=10"] {
        let (out, _) = run_guest(&kernel, &["--net", bad], &dir);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
    }
}

/// A tiny assembler for 32-bit guest code that drives a virtio-mmio device by hand.
struct Asm(Vec<u8>);

const BASE: u32 = 0xd000_0000;

impl Asm {
    /// `mov dword [addr], imm`
    fn store(&mut self, addr: u32, imm: u32) -> &mut Self {
        self.0.extend_from_slice(&[0xc7, 0x05]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&imm.to_le_bytes());
        self
    }
    /// A register of the device at BASE.
    fn reg(&mut self, offset: u32, value: u32) -> &mut Self {
        self.store(BASE + offset, value)
    }
    /// `mov eax, [addr]; add al, '0'; out dx, al` (dx = COM1).
    fn print_digit(&mut self, addr: u32) -> &mut Self {
        self.0.extend(load_eax(addr));
        self.0.extend_from_slice(&[0x04, b'0', 0xee]);
        self
    }
    /// `mov al, [addr]; add al, '0'; out dx, al`
    fn print_byte_digit(&mut self, addr: u32) -> &mut Self {
        self.0.push(0xa0);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&[0x04, b'0', 0xee]);
        self
    }
    /// Negotiates VERSION_1 plus `low` (feature bits 0-31) and reaches FEATURES_OK.
    fn negotiate(&mut self, low: u32) -> &mut Self {
        self.0.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
        self.reg(0x70, 1).reg(0x70, 3).reg(0x24, 0).reg(0x20, low).reg(0x24, 1).reg(0x20, 1).reg(0x70, 11)
    }
    /// Queue `q` of `size` entries with its rings at `rings`, +0x1000, +0x2000.
    fn queue(&mut self, q: u32, size: u32, rings: u32) -> &mut Self {
        self.reg(0x30, q)
            .reg(0x38, size)
            .reg(0x80, rings)
            .reg(0x90, rings + 0x1000)
            .reg(0xa0, rings + 0x2000)
            .reg(0x44, 1)
    }
    /// Descriptor `i` of the table at `rings`.
    fn desc(&mut self, rings: u32, i: u32, addr: u32, len: u32, flags: u16, next: u16) -> &mut Self {
        let d = rings + 16 * i;
        self.store(d, addr).store(d + 4, 0).store(d + 8, len).store(d + 12, u32::from(flags) | u32::from(next) << 16)
    }
    /// Descriptor 0 of the table at `rings` and avail ring {flags 0, idx 1, ring[0] = 0}.
    fn one_buffer(&mut self, rings: u32, addr: u32, len: u32, writable: bool) -> &mut Self {
        self.store(rings, addr).store(rings + 4, 0).store(rings + 8, len).store(rings + 12, u32::from(writable) * 2);
        self.store(rings + 0x1000, 1 << 16)
    }
    /// Waits for the used index at `used` to move, reading InterruptStatus each time round
    /// (an MMIO read: a counted exit, where the VMM admits frames).
    fn wait_used(&mut self, used: u32) -> &mut Self {
        self.0.extend(load_eax(BASE + 0x60));
        self.0.extend(load_eax(used));
        self.0.extend_from_slice(&[0xc1, 0xe8, 0x10, 0x85, 0xc0, 0x74, 0xef]); // shr eax, 16; test eax, eax; jz back
        self
    }
    /// Spins on the used index at `used` in guest memory: no exits at all, so only a kick
    /// (from the TAP reader thread) lets the VMM deliver.
    fn spin_on_used(&mut self, used: u32) -> &mut Self {
        self.0.extend(load_eax(used));
        self.0.extend_from_slice(&[0xc1, 0xe8, 0x10, 0x85, 0xc0, 0x74, 0xf4]); // shr eax, 16; test eax, eax; jz back
        self
    }
    fn finish(&mut self, data_at: usize, data: &[u8]) -> Vec<u8> {
        self.0.extend_from_slice(&[0xb0, b'\n', 0xee]);
        self.0.extend_from_slice(asm::POWER_OFF);
        self.0.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp back
        assert!(self.0.len() <= data_at);
        self.0.resize(data_at, 0);
        self.0.extend_from_slice(data);
        std::mem::take(&mut self.0)
    }
}

#[test]
fn a_hand_driven_block_write_flush_and_read_reach_the_image() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("virtio-blk-e2e");
    let disk = dir.join("disk.img");
    let mut image = vec![0u8; 64 * 512];
    image[..512].fill(b'7');
    std::fs::write(&disk, &image).unwrap();
    // Requests in the kernel image at 0x800 (headers) and 0xa00 (512 bytes to write).
    let mut data = Vec::new();
    for (kind, sector) in [(1u32, 1u64), (4, 0), (0, 0)] {
        data.extend_from_slice(&kind.to_le_bytes());
        data.extend_from_slice(&0u32.to_le_bytes());
        data.extend_from_slice(&sector.to_le_bytes());
    }
    data.resize(0x200, 0);
    data.extend(std::iter::repeat_n(b'w', 512));
    let img = LOAD_ADDR as u32 + 0x800;
    let (q, status, buf) = (0x20_0000, 0x30_0000, 0x31_0000);
    let (next, write) = (1u16, 2u16);
    let code = Asm(Vec::new())
        .negotiate(1 << 9) // VIRTIO_BLK_F_FLUSH
        .queue(0, 8, q)
        .reg(0x70, 15)
        // OUT sector 1: header, data, status.
        .desc(q, 0, img, 16, next, 1)
        .desc(q, 1, img + 0x200, 512, next, 2)
        .desc(q, 2, status, 1, write, 0)
        // FLUSH: header, status.
        .desc(q, 3, img + 16, 16, next, 4)
        .desc(q, 4, status + 1, 1, write, 0)
        // IN sector 0: header, data, status.
        .desc(q, 5, img + 32, 16, next, 6)
        .desc(q, 6, buf, 512, next | write, 7)
        .desc(q, 7, status + 2, 1, write, 0)
        .store(q + 0x1004, 3 << 16) // avail ring: heads 0, 3
        .store(q + 0x1008, 5) // and 5
        .store(q + 0x1000, 3 << 16) // avail idx 3
        .reg(0x50, 0)
        .print_digit(q + 0x2002) // used idx: 3
        .print_byte_digit(status) // statuses: 0 (OK) x 3
        .print_byte_digit(status + 1)
        .print_byte_digit(status + 2)
        .print_byte_digit(buf + 511) // the last byte read, '7', printed plus '0': 'g'
        .finish(0x800, &data);
    let kernel = write_kernel(&dir, &code);
    let (out, console) = run_guest(&kernel, &["--disk", disk.to_str().unwrap()], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(console, format!("3000{}\n", (b'7' + b'0') as char));
    let after = std::fs::read(&disk).unwrap();
    assert!(after[512..1024].iter().all(|&b| b == b'w'), "sector 1 written");
    assert_eq!(after[..512], image[..512], "sector 0 untouched");
    assert_eq!(after[1024..], image[1024..]);
}

fn output_within(mut cmd: Command, secs: u64) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() >= secs {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("ftvm did not finish within {secs} s: {}", stderr(&out));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_hand_driven_rng_request_completes_through_kvm() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("virtio-rng-e2e");
    // Queue of 4 at 0x200000; one 16-byte writable buffer at 0x300000.
    let code = Asm(Vec::new())
        .negotiate(0)
        .queue(0, 4, 0x20_0000)
        .reg(0x70, 15)
        .one_buffer(0x20_0000, 0x30_0000, 16, true)
        .reg(0x50, 0)
        .print_digit(0x20_2002) // used idx: 1
        .print_digit(0x20_2008) // used len: 16, printed as '@'
        .print_digit(BASE + 0x60) // InterruptStatus: 1
        .finish(0x800, &[]);
    let kernel = write_kernel(&dir, &code);
    let (out, console) = run_guest(&kernel, &["--rng"], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(console, "1@1\n");
}

#[test]
fn a_hand_driven_guest_transmits_and_receives_through_a_tap() {
    arp_round_trip("arp", false);
}

#[test]
fn a_guest_spinning_without_exits_gets_its_frame_by_a_kick() {
    arp_round_trip("arpspin", true);
}

fn arp_round_trip(tag: &str, spin: bool) {
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::new(tag) else { return };
    for key in ["all", "default"] {
        let _ = Command::new("ip")
            .args(["netns", "exec", &ns.0, "sysctl", "-q", "-w", &format!("net.ipv6.conf.{key}.disable_ipv6=1")])
            .output();
    }
    ns.tap("vmtap2");
    ns.ip(&["-n", &ns.0, "addr", "add", "10.9.0.1/24", "dev", "vmtap2"]);
    let dir = scratch(&format!("virtio-{tag}"));
    // The guest (52:54:00:12:34:56, 10.9.0.2) asks who has 10.9.0.1; the host answers.
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let mut frame = vec![0u8; 12]; // virtio_net_hdr_v1
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[10, 9, 0, 2, 0, 0, 0, 0, 0, 0, 10, 9, 0, 1]);
    let frame_addr = LOAD_ADDR as u32 + 0x800;
    let mut asm = Asm(Vec::new());
    asm.negotiate(1 << 5) // VIRTIO_NET_F_MAC
        .queue(0, 4, 0x20_0000)
        .queue(1, 4, 0x21_0000)
        .reg(0x70, 15)
        .one_buffer(0x20_0000, 0x30_0000, 2048, true)
        .reg(0x50, 0)
        .one_buffer(0x21_0000, frame_addr, frame.len() as u32, false)
        .reg(0x50, 1)
        .print_digit(0x21_2008) // the transmit buffer came back at once, length 0
        // InterruptStatus: 1 (the transmit completion, perhaps the receive too, which is why
        // the wait below watches the used ring: the ACK may clear both).
        .print_digit(BASE + 0x60)
        .reg(0x64, 1); // InterruptACK
    if spin {
        asm.spin_on_used(0x20_2000);
    } else {
        asm.wait_used(0x20_2000);
    }
    let code = asm
        .print_byte_digit(0x30_0000 + 12 + 21) // the ARP opcode of what arrived: 2, a reply
        .print_byte_digit(0x30_0000 + 10) // num_buffers: 1
        .finish(0x800, &frame);
    let kernel = write_kernel(&dir, &code);
    let console = dir.join("console.txt");
    let mut cmd = ns.ftvm();
    cmd.arg("--kernel").arg(&kernel).arg("--console").arg(format!("file:{}", console.display()));
    cmd.args(["--net", "tap=vmtap2"]).env("FTVM_LOG", "info");
    let out = output_within(cmd, 30);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The host answered the request: the transmit path reached it and the reply came back.
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "0121\n");
    let err = stderr(&out);
    assert!(err.contains("virtio-net0: tx 1 frames 42 bytes (0 dropped, 0 refused by the TAP), rx 1 frames"), "{err}");
}
