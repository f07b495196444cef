//! Helpers shared by the integration tests: the ftvm binary, guest images, KVM checks, and
//! tiny hand-assembled PVH guests for the error paths.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Waits for `child` at most `limit`, killing it past that: its output, and whether it ended
/// in time.
pub fn finish_within(mut child: std::process::Child, limit: std::time::Duration) -> (Output, bool) {
    let start = std::time::Instant::now();
    let mut in_time = true;
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            in_time = false;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (child.wait_with_output().unwrap(), in_time)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap().to_path_buf()
}

/// A fresh scratch directory for one test, removed when the test passes (a failed test's
/// stays behind, to be looked at: target/test-scratch/NAME-PID).
pub fn scratch(name: &str) -> Scratch {
    let dir = repo_root().join("target").join("test-scratch").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// A scratch directory shared by the tests of one binary (a snapshot taken once, say): removed
/// when the test process exits, whatever the tests' outcome.
pub fn shared_scratch(name: &str) -> PathBuf {
    static DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    extern "C" fn remove_all() {
        for dir in ftvm_sync::lock(&DIRS).drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let dir = repo_root().join("target").join("test-scratch").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut dirs = ftvm_sync::lock(&DIRS);
    if dirs.is_empty() {
        // SAFETY: remove_all is an extern "C" fn with no arguments, as atexit wants; it only
        // takes a lock no other exit path holds and removes files.
        unsafe { libc::atexit(remove_all) };
    }
    dirs.push(dir.clone());
    dir
}

/// A test's scratch directory (see [`scratch`]); derefs to its path.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Whether the KVM-backed tests may run. Without /dev/kvm they fail loudly, unless
/// FTVM_ALLOW_NO_KVM=1 says to skip them.
pub fn kvm_available() -> bool {
    let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if usable {
        return true;
    }
    if std::env::var("FTVM_ALLOW_NO_KVM").as_deref() == Ok("1") {
        eprintln!("SKIPPED: /dev/kvm is not usable and FTVM_ALLOW_NO_KVM=1");
        return false;
    }
    panic!("/dev/kvm is missing or not accessible: these tests need KVM (set FTVM_ALLOW_NO_KVM=1 to skip them)");
}

/// A guest-kit image built by `cargo xtask guests`.
pub fn guest(name: &str) -> PathBuf {
    let path = repo_root().join("target").join("guests").join(format!("{name}.elf"));
    assert!(path.exists(), "{} is missing: build the guests first with `cargo xtask guests`", path.display());
    path
}

pub fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

/// Runs `ftvm run` with the console in a file; returns (output, console text).
pub fn run_guest(kernel: &Path, extra: &[&str], dir: &Path) -> (Output, String) {
    let console = dir.join("console.txt");
    let out = ftvm()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .args(extra)
        .output()
        .expect("spawn ftvm");
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    (out, text)
}

/// The `digest:` lines of a console transcript.
pub fn digest_lines(console: &str) -> Vec<String> {
    console.lines().filter(|l| l.starts_with("digest:")).map(str::to_string).collect()
}

/// The first number after `key` on a line that starts with it.
pub fn number_after(console: &str, key: &str) -> Option<u64> {
    let line = console.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty())?.parse().ok()
}

pub const LOAD_ADDR: u64 = 0x10_0000;

/// Builds a minimal PVH ELF kernel: `code` is loaded at 1 MiB and entered there in 32-bit
/// protected mode. Lets tests exercise exits and failure paths without a toolchain.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    let code_off = (note_off + note.len()).next_multiple_of(16);

    let mut f = vec![0u8; code_off];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little-endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    f[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    let mut phdr = |i: usize, p_type: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
        let b = EHDR + i * PHDR;
        f[b..b + 4].copy_from_slice(&p_type.to_le_bytes());
        f[b + 4..b + 8].copy_from_slice(&flags.to_le_bytes());
        f[b + 8..b + 16].copy_from_slice(&off.to_le_bytes());
        f[b + 16..b + 24].copy_from_slice(&addr.to_le_bytes());
        f[b + 24..b + 32].copy_from_slice(&addr.to_le_bytes());
        f[b + 32..b + 40].copy_from_slice(&size.to_le_bytes());
        f[b + 40..b + 48].copy_from_slice(&size.to_le_bytes());
        f[b + 48..b + 56].copy_from_slice(&align.to_le_bytes());
    };
    phdr(0, 1, 5, code_off as u64, LOAD_ADDR, code.len() as u64, 0x1000); // PT_LOAD r-x
    phdr(1, 4, 4, note_off as u64, 0, note.len() as u64, 4); // PT_NOTE
    f[note_off..note_off + note.len()].copy_from_slice(&note);
    f.extend_from_slice(code);
    f
}

/// 32-bit machine code snippets for the tiny guests.
pub mod asm {
    /// `mov dx, port; mov al, byte; out dx, al` for each byte.
    pub fn out_bytes(port: u16, bytes: &[u8]) -> Vec<u8> {
        let mut c = vec![0x66, 0xba];
        c.extend_from_slice(&port.to_le_bytes());
        for &b in bytes {
            c.extend_from_slice(&[0xb0, b, 0xee]);
        }
        c
    }
    /// Power off through ftvm's power port: `mov ax, 0x2000; mov dx, 0x604; out dx, ax`.
    pub const POWER_OFF: &[u8] = &[0x66, 0xb8, 0x00, 0x20, 0x66, 0xba, 0x04, 0x06, 0x66, 0xef];
    /// `cli; hlt`
    pub const CLI_HLT: &[u8] = &[0xfa, 0xf4];
    /// `ud2` (with the boot IDT of limit 0 this triple-faults)
    pub const UD2: &[u8] = &[0x0f, 0x0b];
    /// i8042 reset: `mov al, 0xfe; out 0x64, al; hlt`
    pub const I8042_RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4];
}

/// A test network from scripts/topology.sh, torn down on drop.
pub struct Topology(pub String);

impl Topology {
    pub fn up(tag: &str, hosts: u32) -> Topology {
        let prefix = format!("{tag}{}", std::process::id() % 10000);
        let out = Command::new(repo_root().join("scripts/topology.sh"))
            .args(["up", &prefix, &hosts.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "topology: {}", String::from_utf8_lossy(&out.stderr));
        Topology(prefix)
    }

    /// A command in namespace `ns` ("c" for the client, "h1", "h2" for hosts).
    pub fn cmd(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("{}-{ns}", self.0), program]);
        c
    }

    /// `ftvm <sub>` of the kvstore guest on host 1, on `disk`, its console in `console`: the
    /// command, not started (the caller chooses what becomes of its output).
    pub fn kvstore_vm(&self, sub: &[&str], disk: &Path, console: &Path) -> Command {
        let mut c = self.cmd("h1", env!("CARGO_BIN_EXE_ftvm"));
        c.args(sub)
            .arg("--kernel")
            .arg(guest("kvstore"))
            .args(["--cmdline", "ip=10.0.0.2/24", "--net", "tap=tap0", "--rng", "--disk"])
            .arg(disk)
            .arg("--console")
            .arg(format!("file:{}", console.display()));
        c
    }

    /// redis-cli from the client namespace against the guest at 10.0.0.2.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cmd("c", "redis-cli").args(["-h", "10.0.0.2"]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    /// Waits until the guest answers PING.
    pub fn wait_ping(&self, what: &str) {
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(30) {
            if self.cli(&["PING"]) == "PONG" {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{what} never answered PING");
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/topology.sh")).args(["down", &self.0]).output();
    }
}

/// `ftvm replay` of `log` into `out_dir`: it says it replayed exactly, and its console is
/// the recording's. Returns what it printed.
pub fn replays_exactly(log: &Path, out_dir: &Path, recorded: &str) -> String {
    let out = ftvm().arg("replay").arg(log).arg("--output-dir").arg(out_dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("replayed exactly"), "{err}");
    assert_eq!(std::fs::read_to_string(out_dir.join("console.txt")).unwrap(), recorded);
    err
}

/// SIGTERM to `vm` (ftvm asks the guest to shut down): it must end within 40 s with status
/// 0. Returns its console (`console`) afterwards.
pub fn stop_with_sigterm(vm: std::process::Child, console: &Path) -> String {
    let _ = Command::new("kill").args(["-TERM", &vm.id().to_string()]).status();
    let (out, in_time) = finish_within(vm, std::time::Duration::from_secs(40));
    let err = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(console).unwrap_or_default();
    assert!(in_time, "no end within 40 s of SIGTERM: {err}\n{text}");
    assert_eq!(out.status.code(), Some(0), "a guest power-off within the grace period: {err}\n{text}");
    text
}

// ---- C programs for the Linux personality ----

/// An initramfs holding `binary` alone, as `/NAME`.
pub fn program_cpio(binary: &Path, name: &str, archive: &Path) {
    std::fs::write(archive, cpio(&[(name, 0o100755, &std::fs::read(binary).unwrap())])).unwrap();
}

/// A static C program `name` built from `source` in `dir` with Debian's musl, in an
/// initramfs of its own as `/NAME`: the archive's path.
pub fn c_program(dir: &Path, name: &str, source: &str) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, source).unwrap();
    let binary = dir.join(name);
    build_c(&c, &binary, false);
    let archive = dir.join(format!("{name}.cpio"));
    program_cpio(&binary, name, &archive);
    archive
}

/// Builds `source` with Debian's musl (musl-tools): `musl-gcc -static`, or, for a static-PIE
/// (Debian's musl-gcc.specs has no -static-pie), compiled with `musl-gcc -fPIE` and linked by
/// gcc with musl's rcrt1.o (the self-relocating start code) and libc.a.
pub fn build_c(source: &Path, binary: &Path, pie: bool) {
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("musl-gcc is missing: install Debian's musl-tools (scripts/deps.sh does)");
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    if !pie {
        run(Command::new("musl-gcc").args(["-static", "-O2", "-pthread", "-o"]).arg(binary).arg(source));
        return;
    }
    let musl = Path::new("/usr/lib/x86_64-linux-musl");
    let object = binary.with_extension("o");
    run(Command::new("musl-gcc").args(["-fPIE", "-O2", "-c", "-o"]).arg(&object).arg(source));
    let gcc_file = |name: &str| {
        let out = Command::new("x86_64-linux-gnu-gcc").arg(format!("-print-file-name={name}")).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let libgcc = Command::new("x86_64-linux-gnu-gcc").arg("-print-libgcc-file-name").output().unwrap();
    run(Command::new("x86_64-linux-gnu-gcc")
        .args(["-static-pie", "-nostdlib", "-o"])
        .arg(binary)
        .arg(musl.join("rcrt1.o"))
        .arg(musl.join("crti.o"))
        .arg(gcc_file("crtbeginS.o"))
        .arg(&object)
        .arg(format!("-L{}", musl.display()))
        .arg("-lc")
        .arg(String::from_utf8_lossy(&libgcc.stdout).trim())
        .arg(gcc_file("crtendS.o"))
        .arg(musl.join("crtn.o")));
}

/// A cpio newc archive holding `files` (name, mode, bytes).
pub fn cpio(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |ino: u32, name: &str, mode: u32, data: &[u8]| {
        let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        out.extend_from_slice(b"070701");
        for value in fields {
            out.extend_from_slice(format!("{value:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(i as u32 + 1, name, *mode, data);
    }
    entry(0, "TRAILER!!!", 0, &[]);
    out
}
