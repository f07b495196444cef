//! `cargo xtask`: repository tasks that are not part of ftvm itself.
//!
//! - `cargo xtask guests`: builds the guest kit's reference guests (the `guests/` workspace,
//!   freestanding PVH kernels) in release mode, copies them to `target/guests/<name>.elf`
//!   and checks each against the guest contract (see `check`).
//!   With `target/test-assets/redis-server` (scripts/fetch-redis.sh) it also builds the Linux
//!   personality with the real Redis: `target/guests/redis.elf` (the personality, guests/linux)
//!   and `target/guests/redis.cpio` (its initramfs: redis-server, redis.conf, init.args).
//! - `cargo xtask man`: builds ftvm and writes its man pages to `target/man/*.1` and its
//!   shell completions to `target/completions/` (bash, zsh, fish), from the clap definitions.
//! - `cargo xtask check-guest PATH...`: only the check.
//! - `cargo xtask check-program PATH...`: the same check for a Linux program the
//!   personality runs (CPUID is forbidden in all of it: it is all ring 3).

mod check;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// The guests `cargo xtask guests` builds: binaries of the `guests/` workspace.
const GUESTS: &[&str] = &["hello", "compute", "iobench", "kvstore"];
/// The guests are built for the host target (the only one installed) as bare-metal kernels.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ftvm repository tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the reference guests into target/guests/*.elf and check the guest contract.
    Guests,
    /// Write ftvm's man pages (target/man/*.1) and shell completions (target/completions/),
    /// generated from its command-line definitions.
    Man,
    /// Check PVH ELF guests against the guest contract (no RDTSC, RDTSCP, RDPID, RDRAND,
    /// RDSEED; CPUID only in ring-0 code).
    CheckGuest {
        /// ELF files to check.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Check static Linux executables for the Linux personality against the guest contract
    /// (no RDTSC, RDTSCP, RDPID, RDRAND, RDSEED, CPUID anywhere).
    CheckProgram {
        /// ELF files to check.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Guests => guests(),
        Task::Man => man(),
        Task::CheckGuest { paths } => check_files(&paths),
        Task::CheckProgram { paths } => check_programs(&paths),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root: xtask lives one level below it.
fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Builds ftvm and has it write what clap_mangen and clap_complete make of its definitions.
fn man() -> Result<()> {
    let root = repo_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo).current_dir(&root).args(["build", "-p", "ftvm"]).status()?;
    if !status.success() {
        bail!("building ftvm failed ({status})");
    }
    let ftvm = root.join("target/debug/ftvm");
    let status = Command::new(&ftvm).arg("manpages").arg(root.join("target/man")).status()?;
    if !status.success() {
        bail!("ftvm manpages failed ({status})");
    }
    let out = root.join("target/completions");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for (shell, file) in [("bash", "ftvm.bash"), ("zsh", "_ftvm"), ("fish", "ftvm.fish")] {
        let script = Command::new(&ftvm).args(["completions", shell]).output()?;
        if !script.status.success() {
            bail!("ftvm completions {shell} failed ({})", script.status);
        }
        std::fs::write(out.join(file), script.stdout).with_context(|| format!("writing {file}"))?;
    }
    println!("completions written to {}", out.display());
    Ok(())
}

fn guests() -> Result<()> {
    let root = repo_root();
    let build_dir = root.join("target/guest-build");
    let out_dir = root.join("target/guests");
    let status = guest_cargo(&root, &build_dir).status().context("running cargo build for guests/")?;
    if !status.success() {
        bail!("building the guests failed ({status})");
    }

    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut failed = Vec::new();
    for name in GUESTS {
        let built = build_dir.join(GUEST_TARGET).join("release").join(name);
        let elf = out_dir.join(format!("{name}.elf"));
        std::fs::copy(&built, &elf).with_context(|| format!("copying {} to {}", built.display(), elf.display()))?;
        if !check_one(&elf)? {
            // A guest that breaks the contract must not be picked up by tests or benchmarks.
            std::fs::remove_file(&elf).with_context(|| format!("removing {}", elf.display()))?;
            failed.push(*name);
        }
    }
    if !failed.is_empty() {
        bail!("guest contract broken by: {}", failed.join(", "));
    }
    build_contract_breaker(&root, &build_dir, &out_dir)?;
    build_redis_image(&root, &build_dir, &out_dir)
}

/// The Linux personality's host-side unit tests (guests/linux-abi) and, when the real Redis
/// has been built (scripts/fetch-redis.sh), `redis.elf` and `redis.cpio`.
fn build_redis_image(root: &Path, build_dir: &Path, out_dir: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root.join("guests"))
        .args(["test", "-q", "-p", "linux-abi", "--target", GUEST_TARGET, "--target-dir"])
        .arg(build_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .context("running the linux-abi unit tests")?;
    if !status.success() {
        bail!("the linux-abi unit tests failed ({status})");
    }
    let program = root.join("target/test-assets/redis-server");
    if !program.exists() {
        println!(
            "skipping redis.elf and redis.cpio: {} is missing (build it with scripts/fetch-redis.sh)",
            program.display()
        );
        return Ok(());
    }
    let built = build_dir.join(GUEST_TARGET).join("release").join("linux");
    let elf = out_dir.join("redis.elf");
    std::fs::copy(&built, &elf).with_context(|| format!("copying {} to {}", built.display(), elf.display()))?;
    if !check_one(&elf)? {
        std::fs::remove_file(&elf).with_context(|| format!("removing {}", elf.display()))?;
        bail!("guest contract broken by: redis.elf");
    }
    if !check_program_one(&program)? {
        bail!("guest contract broken by: {}", program.display());
    }
    let binary = std::fs::read(&program).with_context(|| format!("reading {}", program.display()))?;
    let mut archive = Vec::new();
    cpio::entry(&mut archive, 1, ".", 0o040755, &[]);
    cpio::entry(&mut archive, 2, "redis-server", 0o100755, &binary);
    cpio::entry(&mut archive, 3, "redis.conf", 0o100644, REDIS_CONF.as_bytes());
    cpio::entry(&mut archive, 4, "init.args", 0o100644, b"/redis-server\n/redis.conf\n");
    cpio::entry(&mut archive, 5, "data", 0o040755, &[]);
    cpio::trailer(&mut archive);
    let out = out_dir.join("redis.cpio");
    std::fs::write(&out, &archive).with_context(|| format!("writing {}", out.display()))?;
    println!("{}: {} bytes (redis-server, redis.conf, init.args, data/)", out.display(), archive.len());
    build_glibc_redis_image(root, out_dir);
    build_nginx_image(root, out_dir)
}

/// `nginx.cpio`: nginx (scripts/fetch-nginx.sh) for the same personality (redis.elf), with
/// `NGINX_CONF`, two pages to serve (also written to target/guests/nginx-html, for the tests
/// to compare with), and the passwd and group files nginx looks its user up in. Skipped with
/// a line when nginx has not been built. Its contract is checked by the personality at load
/// (nginx's two CPUID sites are rewritten into emulations there), not here.
fn build_nginx_image(root: &Path, out_dir: &Path) -> Result<()> {
    let program = root.join("target/test-assets/nginx");
    if !program.exists() {
        println!("skipping nginx.cpio: {} is missing (build it with scripts/fetch-nginx.sh)", program.display());
        return Ok(());
    }
    let binary = std::fs::read(&program).with_context(|| format!("reading {}", program.display()))?;
    let index = b"<!doctype html>\n<title>ftvm</title>\n<h1>nginx, unmodified, in ftvm's Linux personality</h1>\n";
    // 1 MiB that no compression or caching could fake: xorshift64 from a fixed seed.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: Vec<u8> = (0..1 << 17)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    let html = out_dir.join("nginx-html");
    std::fs::create_dir_all(&html).with_context(|| format!("creating {}", html.display()))?;
    std::fs::write(html.join("index.html"), index).context("writing nginx-html/index.html")?;
    std::fs::write(html.join("big.bin"), &big).context("writing nginx-html/big.bin")?;
    let mut archive = Vec::new();
    let files: [(&str, u32, &[u8]); 10] = [
        (".", 0o040755, &[]),
        ("nginx", 0o100755, &binary),
        ("nginx.conf", 0o100644, NGINX_CONF.as_bytes()),
        ("init.args", 0o100644, b"/nginx\n-p\n/data/\n-e\nstderr\n-c\n/nginx.conf\n"),
        ("html", 0o040755, &[]),
        ("html/index.html", 0o100644, index),
        ("html/big.bin", 0o100644, &big),
        ("etc", 0o040755, &[]),
        ("etc/passwd", 0o100644, b"root:x:0:0:root:/:/bin/false\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        ("etc/group", 0o100644, b"root:x:0:\nnogroup:x:65534:\n"),
    ];
    for (i, (name, mode, data)) in files.iter().enumerate() {
        cpio::entry(&mut archive, i as u32 + 1, name, *mode, data);
    }
    cpio::entry(&mut archive, files.len() as u32 + 1, "data", 0o040755, &[]);
    cpio::trailer(&mut archive);
    let out = out_dir.join("nginx.cpio");
    std::fs::write(&out, &archive).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{}: {} bytes (nginx, nginx.conf, init.args, html/, etc/passwd, etc/group, data/)",
        out.display(),
        archive.len()
    );
    Ok(())
}

/// The configuration in nginx.cpio: one process in the foreground (the personality runs
/// one program; fork-based workers would run to completion), port 80, the pages in /html,
/// its temporary files and pid in /data (`-p /data/` in init.args).
const NGINX_CONF: &str = "\
# nginx.conf of target/guests/nginx.cpio (cargo xtask guests), for the Linux personality.
daemon off;
master_process off;
worker_processes 1;
error_log stderr notice;
pid /data/nginx.pid;
events { worker_connections 512; use epoll; }
http {
    access_log off;
    sendfile on;
    tcp_nopush off;
    keepalive_timeout 65;
    types { text/html html; application/octet-stream bin; }
    default_type application/octet-stream;
    server {
        listen 80;
        root /html;
    }
}
";

/// `redis-glibc.cpio`: Debian's dynamically linked redis-server (scripts/fetch-debian-redis.sh
/// unpacks it into target/test-assets/debian-redis), its interpreter and every library `ldd`
/// names, from this host, at their paths, with redis.cpio's configuration. Only when the
/// package is there; anything missing is said and skipped, never failing the build.
fn build_glibc_redis_image(root: &Path, out_dir: &Path) {
    let program = root.join("target/test-assets/debian-redis/usr/bin/redis-server");
    let out = out_dir.join("redis-glibc.cpio");
    if !program.exists() {
        println!(
            "skipping redis-glibc.cpio: {} is missing (fetch it with scripts/fetch-debian-redis.sh)",
            program.display()
        );
        return;
    }
    match glibc_redis_archive(&program) {
        Ok((archive, count)) => match std::fs::write(&out, &archive) {
            Ok(()) => println!(
                "{}: {} bytes (Debian's redis-server, its interpreter and {count} libraries)",
                out.display(),
                archive.len()
            ),
            Err(e) => println!("skipping redis-glibc.cpio: writing {}: {e}", out.display()),
        },
        Err(e) => {
            let _ = std::fs::remove_file(&out);
            println!("skipping redis-glibc.cpio: {e:#}");
        }
    }
}

fn glibc_redis_archive(program: &Path) -> Result<(Vec<u8>, usize)> {
    let ldd = Command::new("ldd").arg(program).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&ldd.stdout);
    if !ldd.status.success() || text.contains("not found") {
        bail!("ldd {}: {}{}", program.display(), text.trim(), String::from_utf8_lossy(&ldd.stderr).trim());
    }
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and `/lib64/ld-linux-x86-64.so.2 (0x...)`.
    let mut files: Vec<String> = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(path) = path {
            files.push(path.to_string());
        }
    }
    let mut archive = Vec::new();
    let mut ino = 1;
    let mut dirs = std::collections::BTreeSet::new();
    let mut add = |archive: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        let mut parent = Path::new(name).parent();
        let mut missing = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            if dirs.insert(p.to_path_buf()) {
                missing.push(p.to_path_buf());
            }
            parent = p.parent();
        }
        for dir in missing.iter().rev() {
            cpio::entry(archive, ino, &dir.display().to_string(), 0o040755, &[]);
            ino += 1;
        }
        cpio::entry(archive, ino, name, mode, data);
        ino += 1;
    };
    let binary = std::fs::read(program).with_context(|| format!("reading {}", program.display()))?;
    add(&mut archive, "usr/bin/redis-server", 0o100755, &binary);
    for file in &files {
        let data = std::fs::read(file).with_context(|| format!("reading {file}"))?;
        add(&mut archive, file.trim_start_matches('/'), 0o100755, &data);
    }
    add(&mut archive, "redis.conf", 0o100644, REDIS_CONF.as_bytes());
    add(&mut archive, "init.args", 0o100644, b"/usr/bin/redis-server\n/redis.conf\n");
    add(&mut archive, "data", 0o040755, &[]);
    cpio::trailer(&mut archive);
    Ok((archive, files.len().saturating_sub(1)))
}

/// The configuration in redis.cpio: every address, port 6379, data in /data (on the
/// virtio disk when the VM has one: the personality journals it there), the append-only
/// file fsynced at every write (no acknowledged write lost, like kvstore), no automatic RDB
/// snapshots (`save ""`: BGSAVE and BGREWRITEAOF work, but under the personality a fork's
/// child runs to completion while the server waits, and each snapshot is appended whole to
/// the data disk's journal, which has no compaction yet).
const REDIS_CONF: &str = "\
# redis.conf of target/guests/redis.cpio (cargo xtask guests), for the Linux personality.
bind 0.0.0.0
protected-mode no
port 6379
daemonize no
logfile \"\"
dir /data
save \"\"
appendonly yes
appendfsync always
";

/// A writer of cpio "newc" archives (the initramfs format; guests/linux-abi reads them):
/// a few lines, so no external `cpio` tool is needed.
mod cpio {
    fn pad(out: &mut Vec<u8>) {
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }

    pub fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        out.extend_from_slice(b"070701");
        for value in fields {
            out.extend_from_slice(format!("{value:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad(out);
        out.extend_from_slice(data);
        pad(out);
    }

    pub fn trailer(out: &mut Vec<u8>) {
        entry(out, 0, "TRAILER!!!", 0, &[]);
    }
}

/// `cargo build --release` of the guests workspace into `target_dir`. Run from guests/ so
/// that its .cargo/config.toml (target, rustflags) applies; flags inherited from the outer
/// build that would override or break those settings are dropped.
fn guest_cargo(root: &Path, target_dir: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(root.join("guests"))
        .args(["build", "--release", "--target", GUEST_TARGET, "--target-dir"])
        .arg(target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    c
}

/// `kvstore-rdtsc.elf`: the kvstore built with its `rdtsc` feature, which reads the TSC in
/// ring 3 and so breaks the guest contract on purpose (the pair's divergence and resync
/// tests run it). The checker must find exactly that: RDTSC, and nothing else.
fn build_contract_breaker(root: &Path, build_dir: &Path, out_dir: &Path) -> Result<()> {
    let status = guest_cargo(root, &build_dir.join("rdtsc"))
        .args(["-p", "kvstore", "--features", "rdtsc"])
        .status()
        .context("running cargo build for kvstore --features rdtsc")?;
    if !status.success() {
        bail!("building kvstore-rdtsc failed ({status})");
    }
    let built = build_dir.join("rdtsc").join(GUEST_TARGET).join("release").join("kvstore");
    let elf = out_dir.join("kvstore-rdtsc.elf");
    std::fs::copy(&built, &elf).with_context(|| format!("copying {} to {}", built.display(), elf.display()))?;
    let bytes = std::fs::read(&elf).with_context(|| format!("reading {}", elf.display()))?;
    let report = check::check_elf(&bytes).with_context(|| format!("checking {}", elf.display()))?;
    let rdtsc = report.violations.iter().filter(|v| v.instruction.starts_with("rdtsc")).count();
    if rdtsc == 0 || rdtsc != report.violations.len() {
        bail!("{}: expected RDTSC violations only, found: {:?}", elf.display(), report.violations);
    }
    println!(
        "{}: breaks the guest contract on purpose ({rdtsc} RDTSC in ring 3), for the divergence tests",
        elf.display()
    );
    Ok(())
}

fn check_files(paths: &[PathBuf]) -> Result<()> {
    let mut failed = Vec::new();
    for path in paths {
        if !check_one(path)? {
            failed.push(path.display().to_string());
        }
    }
    if !failed.is_empty() {
        bail!("guest contract broken by: {}", failed.join(", "));
    }
    Ok(())
}

fn check_programs(paths: &[PathBuf]) -> Result<()> {
    let mut failed = Vec::new();
    for path in paths {
        if !check_program_one(path)? {
            failed.push(path.display().to_string());
        }
    }
    if !failed.is_empty() {
        bail!("guest contract broken by: {}", failed.join(", "));
    }
    Ok(())
}

/// Checks one Linux program; prints a summary line and any violations; true if it passes.
fn check_program_one(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let report = check::check_program(&bytes).with_context(|| format!("checking {}", path.display()))?;
    let name = path.display();
    for violation in &report.violations {
        println!("{name}: {violation}");
    }
    let invalid: usize = report.sections.iter().map(|s| s.invalid).sum();
    println!(
        "{name}: Linux program, entry {:#x}; scanned {} executable sections: {} instructions, {invalid} undecodable; {}",
        report.pvh_entry,
        report.sections.len(),
        report.instructions(),
        if report.violations.is_empty() {
            "OK".to_string()
        } else {
            format!("{} VIOLATION(S)", report.violations.len())
        }
    );
    Ok(report.violations.is_empty())
}

/// Checks one ELF, prints its summary line and any violations; true if it passes.
fn check_one(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let report = check::check_elf(&bytes).with_context(|| format!("checking {}", path.display()))?;
    let name = path.display();
    for violation in &report.violations {
        println!("{name}: {violation}");
    }
    let sections: Vec<String> = report
        .sections
        .iter()
        .map(|s| {
            let mode = if s.bitness == 32 { ", 32-bit" } else { "" };
            format!("{} ({} B at {:#x}{mode})", s.name, s.size, s.address)
        })
        .collect();
    let invalid: usize = report.sections.iter().map(|s| s.invalid).sum();
    let invalid = if invalid > 0 { format!(", {invalid} undecodable") } else { String::new() };
    println!(
        "{name}: {} bytes, PVH entry {:#x}; scanned {}: {} instructions{invalid}; {}",
        bytes.len(),
        report.pvh_entry,
        sections.join(", "),
        report.instructions(),
        if report.violations.is_empty() {
            "OK".to_string()
        } else {
            format!("{} VIOLATION(S)", report.violations.len())
        }
    );
    Ok(report.violations.is_empty())
}
