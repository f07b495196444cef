//! The real Redis 7.0.15 (Debian's source, built static with musl by scripts/fetch-redis.sh)
//! under the guest kit's Linux personality (guests/linux): `target/guests/redis.elf` with the
//! initramfs `target/guests/redis.cpio` (`cargo xtask guests`). Real clients on the namespaced
//! test network: redis-cli round trips and redis-benchmark under `ftvm run`, a recording under
//! load that replays exactly, the bad-input paths, fork (a C program; Redis's BGSAVE,
//! BGREWRITEAOF and `save` lines, and a recorded BGSAVE that replays exactly), and the same
//! image under QEMU microvm (KVM, and TCG, where `syscall` enters ring 0 and takes the
//! personality's ring-0 path).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The personality image and its initramfs; missing ones are a loud failure with the fix.
fn redis_image() -> (PathBuf, PathBuf) {
    let dir = repo_root().join("target").join("guests");
    let (elf, cpio) = (dir.join("redis.elf"), dir.join("redis.cpio"));
    assert!(
        elf.exists() && cpio.exists(),
        "{} or {} is missing: build the real Redis with scripts/fetch-redis.sh, then `cargo xtask guests`",
        elf.display(),
        cpio.display()
    );
    (elf, cpio)
}

/// `ftvm <sub> --kernel redis.elf --initrd redis.cpio ...` on host 1 of a one-host network.
fn redis_vm(net: &Topology, sub: &[&str], console: &Path) -> Child {
    redis_vm_with(net, sub, &[], console)
}

/// A blank data disk `name` of `bytes` in `dir`; its path as an argument.
fn blank_disk(dir: &Path, name: &str, bytes: u64) -> String {
    let disk = dir.join(name);
    std::fs::File::create(&disk).unwrap().set_len(bytes).unwrap();
    disk.display().to_string()
}

/// `ftvm run` of Redis on the data disk `disk`, once it serves: its console says it is ready
/// and it answers PING (`what` and `ping_what` name it in a failure).
fn redis_serving_on(net: &Topology, disk: &str, console: &Path, what: &str, ping_what: &str) -> Child {
    let vm = redis_vm_with(net, &["run"], &["--disk", disk], console);
    wait_for(console, "Ready to accept connections", what);
    net.wait_ping(ping_what);
    vm
}

fn redis_vm_with(net: &Topology, sub: &[&str], extra: &[&str], console: &Path) -> Child {
    redis_vm_cmdline(net, sub, extra, "ip=10.0.0.2/24", console)
}

fn redis_vm_cmdline(net: &Topology, sub: &[&str], extra: &[&str], cmdline: &str, console: &Path) -> Child {
    redis_command(net, sub, extra, cmdline, console).stderr(Stdio::null()).spawn().unwrap()
}

/// The command line of `ftvm <sub>` of the Redis image on host 1, not started.
fn redis_command(net: &Topology, sub: &[&str], extra: &[&str], cmdline: &str, console: &Path) -> Command {
    let (elf, cpio) = redis_image();
    let mut cmd = net.cmd("h1", env!("CARGO_BIN_EXE_ftvm"));
    cmd.args(sub)
        .args(extra)
        .arg("--kernel")
        .arg(elf)
        .arg("--initrd")
        .arg(cpio)
        .args(["--mem", "1G", "--cmdline", cmdline, "--net", "tap=tap0", "--rng"])
        .arg("--console")
        .arg(format!("file:{}", console.display()));
    cmd
}

fn wait_for(console: &Path, text: &str, what: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if std::fs::read_to_string(console).unwrap_or_default().contains(text) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: no {text:?} on the console:\n{}", std::fs::read_to_string(console).unwrap_or_default());
}

fn client(net: &Topology, args: &[&str]) -> Output {
    net.cmd("c", args[0]).args(&args[1..]).output().unwrap()
}

/// `ftvm record` of the program in `archive` (`cmdline` names it) to its end, in `dir`, with
/// virtio-rng: the log and the console, the recording having ended with status 0.
fn record_program(elf: &Path, archive: &Path, cmdline: &str, dir: &Path) -> (PathBuf, String) {
    let log = dir.join("program.log");
    let recorded_console = dir.join("record.txt");
    let out = ftvm()
        .args(["record", "--log"])
        .arg(&log)
        .arg("--kernel")
        .arg(elf)
        .args(["--mem", "1G", "--rng", "--initrd", &archive.display().to_string(), &format!("--cmdline={cmdline}")])
        .arg("--console")
        .arg(format!("file:{}", recorded_console.display()))
        .output()
        .unwrap();
    let recorded = std::fs::read_to_string(&recorded_console).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}\n{recorded}", String::from_utf8_lossy(&out.stderr));
    (log, recorded)
}

fn stop(mut vm: Child) {
    let _ = vm.kill();
    let _ = vm.wait();
}

/// redis-benchmark's `-q` summary lines ("SET: 6377.55 requests per second, ...").
fn benchmark(net: &Topology, args: &[&str]) -> String {
    let mut all = vec!["redis-benchmark", "-h", "10.0.0.2", "-q"];
    all.extend_from_slice(args);
    let out = client(net, &all);
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(out.status.success(), "redis-benchmark {args:?}: {text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("requests per second")).collect();
    lines.join("\n")
}

#[test]
fn real_redis_serves_redis_cli_and_redis_benchmark() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-run");
    let net = Topology::up("rd", 1);
    let console = dir.join("console.txt");
    let vm = redis_vm(&net, &["run"], &console);
    wait_for(&console, "Ready to accept connections", "redis-server under ftvm run");
    net.wait_ping("redis-server");
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("Redis version=7.0.15"), "{text}");
    // The load-time rewrite of its syscall sites into jumps (docs/linux-personality.md).
    let rewrote = text.lines().find(|l| l.starts_with("linux: rewrote ")).unwrap_or_else(|| panic!("{text}"));
    eprintln!("{rewrote}");
    assert!(!rewrote.starts_with("linux: rewrote 0 "), "{rewrote}");

    // Strings, counters, lists, hashes, sets, sorted sets.
    assert_eq!(net.cli(&["SET", "greeting", "hello"]), "OK");
    assert_eq!(net.cli(&["GET", "greeting"]), "hello");
    assert_eq!(net.cli(&["INCR", "counter"]), "1");
    assert_eq!(net.cli(&["INCRBY", "counter", "41"]), "42");
    assert_eq!(net.cli(&["RPUSH", "list", "a", "b", "c"]), "3");
    assert_eq!(net.cli(&["LRANGE", "list", "0", "-1"]), "a\nb\nc");
    assert_eq!(net.cli(&["HSET", "hash", "f1", "v1", "f2", "v2"]), "2");
    assert_eq!(net.cli(&["HGET", "hash", "f2"]), "v2");
    assert_eq!(net.cli(&["SADD", "set", "x", "y", "x"]), "2");
    assert_eq!(net.cli(&["SCARD", "set"]), "2");
    assert_eq!(net.cli(&["ZADD", "z", "2", "two", "1", "one"]), "2");
    assert_eq!(net.cli(&["ZRANGE", "z", "0", "-1"]), "one\ntwo");
    // MULTI/EXEC on one connection, and a Lua script.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("printf 'MULTI\\nINCR tx\\nINCR tx\\nEXEC\\n' | ip netns exec {}-c redis-cli -h 10.0.0.2", net.0))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK\nQUEUED\nQUEUED\n1\n2");
    assert_eq!(net.cli(&["EVAL", "return redis.call('incr', KEYS[1]) + 100", "1", "counter"]), "143");
    // EXPIRE: time passes in guest time (the PIT), and the key goes.
    assert_eq!(net.cli(&["SET", "brief", "x", "PX", "300"]), "OK");
    assert_eq!(net.cli(&["EXISTS", "brief"]), "1");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(net.cli(&["EXISTS", "brief"]), "0");
    // A binary value and a 100 KiB value, through redis-cli -x (stdin).
    let big: Vec<u8> = (0..100u32 << 10).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let bin = b"a\x00b\r\nc\xffd".to_vec();
    for (key, value) in [("bin", &bin), ("big", &big)] {
        let file = dir.join(key);
        std::fs::write(&file, value).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("ip netns exec {}-c redis-cli -h 10.0.0.2 -x SET {key} < {}", net.0, file.display()))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
        let out = client(&net, &["redis-cli", "-h", "10.0.0.2", "--raw", "GET", key]);
        assert_eq!(out.stdout.len(), value.len() + 1, "{key}");
        assert_eq!(&out.stdout[..value.len()], &value[..], "{key} comes back byte for byte");
    }
    assert_eq!(net.cli(&["STRLEN", "big"]), (100 << 10).to_string());

    // redis-benchmark: 1, 20 and 50 clients, and 50 pipelining 16 requests each.
    for (clients, pipeline) in [("1", "1"), ("20", "1"), ("50", "1"), ("50", "16")] {
        let summary =
            benchmark(&net, &["-t", "set,get,incr,lpush,lrange_100", "-n", "2000", "-c", clients, "-P", pipeline]);
        eprintln!("ftvm run, redis-benchmark -c {clients} -P {pipeline}:\n{summary}");
        for test in ["SET", "GET", "INCR", "LPUSH", "LRANGE_100"] {
            let named = |l: &&str| l.starts_with(&format!("{test}: ")) || l.starts_with(&format!("{test} ("));
            assert!(summary.lines().any(|l| named(&l)), "-c {clients} -P {pipeline}: {summary}");
        }
    }
    assert_eq!(net.cli(&["GET", "greeting"]), "hello");
    stop(vm);
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(!text.contains("linux: error"), "{text}");
}

#[test]
fn real_redis_keeps_acknowledged_writes_across_a_restart_on_its_disk() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-disk");
    let net = Topology::up("rk", 1);
    let disk_arg = blank_disk(&dir, "data.img", 64 << 20);
    let console = dir.join("console.txt");
    let vm = redis_serving_on(&net, &disk_arg, &console, "redis-server with a blank disk", "redis-server");
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("linux: formatted a blank data disk"), "{text}");
    assert_eq!(net.cli(&["SET", "greeting", "hello"]), "OK");
    assert_eq!(net.cli(&["INCR", "counter"]), "1");
    assert_eq!(net.cli(&["INCR", "counter"]), "2");
    assert_eq!(net.cli(&["RPUSH", "list", "a", "b"]), "2");
    assert_eq!(net.cli(&["SET", "gone", "x"]), "OK");
    assert_eq!(net.cli(&["DEL", "gone"]), "1");
    // 6 MiB: one journal batch larger than the 4 MiB the personality reads at a time at boot.
    let big: Vec<u8> = (0..6u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    let file = dir.join("big");
    std::fs::write(&file, &big).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ip netns exec {}-c redis-cli -h 10.0.0.2 -x SET big < {}", net.0, file.display()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    // A foreground RDB save too (dump.rdb: written, fsynced, renamed into place).
    assert_eq!(net.cli(&["SAVE"]), "OK");
    assert_eq!(net.cli(&["SET", "after-save", "yes"]), "OK");
    // appendfsync always: every acknowledged write is on the disk; SIGKILL the VM.
    stop(vm);

    let console2 = dir.join("console2.txt");
    let vm = redis_serving_on(
        &net,
        &disk_arg,
        &console2,
        "redis-server restarted on its disk",
        "redis-server after the restart",
    );
    let text = std::fs::read_to_string(&console2).unwrap();
    assert!(text.contains("linux: /data on the virtio disk:"), "{text}");
    assert!(text.contains("DB loaded from append only file"), "{text}");
    assert_eq!(net.cli(&["GET", "greeting"]), "hello");
    assert_eq!(net.cli(&["GET", "counter"]), "2");
    assert_eq!(net.cli(&["LRANGE", "list", "0", "-1"]), "a\nb");
    assert_eq!(net.cli(&["EXISTS", "gone"]), "0");
    assert_eq!(net.cli(&["GET", "after-save"]), "yes");
    let out = client(&net, &["redis-cli", "-h", "10.0.0.2", "--raw", "GET", "big"]);
    assert_eq!(&out.stdout[..big.len()], &big[..], "the 6 MiB value survives byte for byte");
    stop(vm);
}

/// The value of `field` in `INFO persistence`.
fn persistence(net: &Topology, field: &str) -> String {
    let info = net.cli(&["INFO", "persistence"]);
    let prefix = format!("{field}:");
    info.lines().find_map(|l| l.trim().strip_prefix(&prefix).map(str::to_string)).unwrap_or_default()
}

/// Waits until `INFO persistence` shows `field:value`.
fn wait_persistence(net: &Topology, field: &str, value: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if persistence(net, field) == value {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no {field}:{value} in INFO persistence:\n{}", net.cli(&["INFO", "persistence"]));
}

/// Fills the database with `n` keys `key:I` = `value:I` in one Lua script.
fn populate(net: &Topology, n: u32) {
    let script = "for i = 1, tonumber(ARGV[1]) do redis.call('set', 'key:' .. i, 'value:' .. i) end return 1";
    assert_eq!(net.cli(&["EVAL", script, "0", &n.to_string()]), "1");
}

#[test]
fn real_redis_saves_and_rewrites_in_the_background_with_fork() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-fork");
    let net = Topology::up("rb", 1);
    let disk_arg = blank_disk(&dir, "data.img", 128 << 20);
    let console = dir.join("console.txt");
    let vm = redis_serving_on(&net, &disk_arg, &console, "redis-server with a blank disk", "redis-server");
    // A BGSAVE of the empty database first: what a fork copies of Redis itself.
    assert_eq!(net.cli(&["BGSAVE"]), "Background saving started");
    wait_persistence(&net, "rdb_saves", "1");
    wait_persistence(&net, "rdb_bgsave_in_progress", "0");
    const KEYS: u32 = 100_000;
    populate(&net, KEYS);
    assert_eq!(net.cli(&["DBSIZE"]), KEYS.to_string());
    // BGSAVE: the child writes temp-PID.rdb, fsyncs it and renames it to dump.rdb.
    let before = net.cli(&["LASTSAVE"]);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(net.cli(&["BGSAVE"]), "Background saving started");
    wait_persistence(&net, "rdb_bgsave_in_progress", "0");
    wait_persistence(&net, "rdb_last_bgsave_status", "ok");
    wait_persistence(&net, "rdb_saves", "2");
    assert_ne!(net.cli(&["LASTSAVE"]), before, "LASTSAVE after BGSAVE");
    let stats = net.cli(&["INFO", "stats"]);
    let fork_usec = stats.lines().find(|l| l.starts_with("latest_fork_usec:")).unwrap_or_default().trim().to_string();
    assert_eq!(net.cli(&["GET", "key:77777"]), "value:77777", "the parent's data after its child ran");
    // BGREWRITEAOF: the child writes the new base file; the parent installs it.
    assert_eq!(net.cli(&["BGREWRITEAOF"]), "Background append only file rewriting started");
    wait_persistence(&net, "aof_rewrite_in_progress", "0");
    wait_persistence(&net, "aof_rewrites", "1");
    assert_eq!(persistence(&net, "aof_last_bgrewrite_status"), "ok");
    assert_eq!(net.cli(&["SET", "after-rewrite", "yes"]), "OK");
    // A `save` line: the automatic BGSAVE of serverCron.
    assert_eq!(net.cli(&["SET", "saved-automatically", "yes"]), "OK");
    assert_eq!(net.cli(&["CONFIG", "SET", "save", "1 1"]), "OK");
    wait_persistence(&net, "rdb_saves", "3");
    wait_persistence(&net, "rdb_bgsave_in_progress", "0");
    assert_eq!(persistence(&net, "rdb_last_bgsave_status"), "ok");
    assert_eq!(net.cli(&["CONFIG", "SET", "save", ""]), "OK");
    assert_eq!(net.cli(&["SET", "after-last-save", "aof only"]), "OK");
    stop(vm);
    let text = std::fs::read_to_string(&console).unwrap();
    for expected in [
        "Background saving started by pid",
        "DB saved on disk",
        "Background saving terminated with success",
        "Background AOF rewrite terminated with success",
        "Background AOF rewrite finished successfully",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    let forks: Vec<&str> = text.lines().filter(|l| l.starts_with("linux: fork: child ")).collect();
    assert_eq!(forks.len(), 4, "{text}");
    assert!(forks.iter().all(|l| l.contains(" exited with status 0 after ")), "{text}");
    eprintln!("BGSAVE of 0 keys, then of {KEYS} ({fork_usec}), BGREWRITEAOF, a save line's:\n{}", forks.join("\n"));

    // Restarted with the append-only file (the image's configuration): the rewritten base
    // file and the increments after it load.
    let console2 = dir.join("console2.txt");
    let vm = redis_serving_on(
        &net,
        &disk_arg,
        &console2,
        "redis-server restarted with its AOF",
        "redis-server after the restart",
    );
    let text = std::fs::read_to_string(&console2).unwrap();
    assert!(text.contains("DB loaded from append only file"), "{text}");
    assert_eq!(net.cli(&["DBSIZE"]), (KEYS + 3).to_string());
    assert_eq!(net.cli(&["GET", "after-rewrite"]), "yes");
    assert_eq!(net.cli(&["GET", "after-last-save"]), "aof only");
    stop(vm);

    // Restarted without it: dump.rdb, the last background save, loads.
    let console3 = dir.join("console3.txt");
    let cmdline = "ip=10.0.0.2/24 -- /redis.conf --appendonly no";
    let vm = redis_vm_cmdline(&net, &["run"], &["--disk", &disk_arg], cmdline, &console3);
    wait_for(&console3, "Ready to accept connections", "redis-server restarted from dump.rdb");
    net.wait_ping("redis-server from dump.rdb");
    let text = std::fs::read_to_string(&console3).unwrap();
    assert!(text.contains("DB loaded from disk"), "{text}");
    assert_eq!(net.cli(&["DBSIZE"]), (KEYS + 2).to_string());
    assert_eq!(net.cli(&["GET", "key:12345"]), "value:12345");
    assert_eq!(net.cli(&["GET", "saved-automatically"]), "yes");
    assert_eq!(net.cli(&["EXISTS", "after-last-save"]), "0");
    stop(vm);
}

/// `ftvm <sub>` of Redis on `disk`, its standard error piped (to read ftvm's lines).
fn redis_vm_piped(net: &Topology, sub: &[&str], disk: &str, console: &Path) -> Child {
    redis_command(net, sub, &["--disk", disk], "ip=10.0.0.2/24", console)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn sigterm_shuts_real_redis_down_cleanly_and_the_recording_replays_it() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-sigterm");
    let net = Topology::up("rt", 1);
    let disk_arg = blank_disk(&dir, "data.img", 64 << 20);

    // ftvm run: SIGTERM reaches Redis as SIGTERM; Redis saves and exits 0; ftvm: a power-off.
    let console = dir.join("run.txt");
    let vm = redis_vm_piped(&net, &["run"], &disk_arg, &console);
    wait_for(&console, "Ready to accept connections", "redis-server with a blank disk");
    net.wait_ping("redis-server");
    for i in 0..50 {
        assert_eq!(net.cli(&["SET", &format!("k{i}"), &format!("v{i}")]), "OK");
    }
    assert_eq!(net.cli(&["INCR", "counter"]), "1");
    let start = Instant::now();
    let text = stop_with_sigterm(vm, &console);
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    assert!(text.contains("linux: shutdown requested by the operator: SIGTERM to the program"), "{text}");
    assert!(text.contains("Received SIGTERM scheduling shutdown"), "{text}");
    assert!(text.contains("Redis is now ready to exit, bye bye"), "{text}");
    assert!(text.contains("linux: exit status 0"), "{text}");

    // Restarted on the disk: every write is there. Then a recording stopped by SIGTERM...
    let console = dir.join("record.txt");
    let log = dir.join("redis.log");
    let log_arg = log.display().to_string();
    let vm = redis_vm_piped(&net, &["record", "--log", &log_arg], &disk_arg, &console);
    wait_for(&console, "Ready to accept connections", "redis-server restarted on its disk");
    net.wait_ping("redis-server after the restart");
    for i in 0..50 {
        assert_eq!(net.cli(&["GET", &format!("k{i}")]), format!("v{i}"));
    }
    assert_eq!(net.cli(&["INCR", "counter"]), "2");
    let recorded = stop_with_sigterm(vm, &console);
    assert!(recorded.contains("Redis is now ready to exit, bye bye"), "{recorded}");
    drop(net);
    // ... replays exactly: the request at the same exit, the same shutdown on the console.
    replays_exactly(&log, &dir.join("replay"), &recorded);
}

#[test]
fn a_full_data_disk_stops_the_guest_and_keeps_what_was_fsynced() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-full");
    let net = Topology::up("rf", 1);
    let disk_arg = blank_disk(&dir, "small.img", 64 << 10);
    let console = dir.join("console.txt");
    let mut vm = redis_serving_on(&net, &disk_arg, &console, "redis-server on a 64 KiB disk", "redis-server");
    assert_eq!(net.cli(&["SET", "small", "kept"]), "OK");
    // 100 KiB cannot fit: the guest stops before acknowledging it.
    let file = dir.join("value");
    std::fs::write(&file, vec![b'v'; 100 << 10]).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ip netns exec {}-c redis-cli -h 10.0.0.2 -x SET big < {}", net.0, file.display()))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&out.stdout).trim(), "OK", "a write that did not fit was acknowledged");
    let status = vm.wait().unwrap();
    let text = std::fs::read_to_string(&console).unwrap();
    assert_eq!(status.code(), Some(3), "{text}");
    assert!(text.contains("linux: error: the data disk is full"), "{text}");
    // Restarted on the same disk: what was acknowledged is there.
    let console2 = dir.join("console2.txt");
    let vm = redis_serving_on(
        &net,
        &disk_arg,
        &console2,
        "redis-server restarted on the full disk",
        "redis-server after the restart",
    );
    assert_eq!(net.cli(&["GET", "small"]), "kept");
    assert_eq!(net.cli(&["EXISTS", "big"]), "0");
    stop(vm);
}

#[test]
fn the_journal_is_compacted_when_it_fills_its_half_of_the_disk() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-compact");
    let net = Topology::up("rc", 1);
    // 2 MiB: each fsynced INCR is a sector of journal, so 6000 fill a 1 MiB half several
    // times over, while the append-only file itself stays under 250 KiB.
    let disk_arg = blank_disk(&dir, "data.img", 2 << 20);
    let console = dir.join("console.txt");
    let vm = redis_serving_on(&net, &disk_arg, &console, "redis-server on a 2 MiB disk", "redis-server");
    assert_eq!(net.cli(&["SET", "before", "kept"]), "OK");
    let incrs = 6000;
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "yes 'INCR counter' | head -n {incrs} | ip netns exec {}-c redis-cli -h 10.0.0.2 > /dev/null",
            net.0
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(net.cli(&["GET", "counter"]), incrs.to_string());
    let text = std::fs::read_to_string(&console).unwrap();
    let compactions = text.lines().filter(|l| l.starts_with("linux: compacted the journal of /data")).count();
    assert!(compactions >= 2, "the journal was compacted {compactions} times:\n{text}");
    assert!(!text.contains("linux: error"), "{text}");
    // SIGKILL, no shutdown: restarted on the same disk, every acknowledged INCR is there.
    stop(vm);
    let console2 = dir.join("console2.txt");
    let vm = redis_serving_on(&net, &disk_arg, &console2, "redis-server restarted", "redis-server after the restart");
    assert_eq!(net.cli(&["GET", "counter"]), incrs.to_string());
    assert_eq!(net.cli(&["GET", "before"]), "kept");
    assert_eq!(net.cli(&["INCR", "counter"]), (incrs + 1).to_string());
    stop(vm);
}

#[test]
fn real_redis_uses_memory_beyond_the_process_window() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-bigmem");
    let net = Topology::up("rb", 1);
    let console = dir.join("console.txt");
    let cmdline = "ip=10.0.0.2/24 -- /redis.conf --enable-debug-command yes --appendonly no";
    let vm = redis_vm_cmdline(&net, &["run"], &[], cmdline, &console);
    wait_for(&console, "Ready to accept connections", "redis-server in a 1 GiB VM");
    net.wait_ping("redis-server");
    let text = std::fs::read_to_string(&console).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("MiB for the program's mmap above its window"))
        .unwrap_or_else(|| panic!("{text}"));
    eprintln!("{line}");
    // 1.6 million keys of 100-byte values: about 300 MiB, more than the 256 MiB window.
    let out = client(&net, &["redis-cli", "-h", "10.0.0.2", "DEBUG", "POPULATE", "1600000", "key", "100"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK", "{}", String::from_utf8_lossy(&out.stderr));
    let info = net.cli(&["INFO", "memory"]);
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{info}"));
    assert!(used > 280 << 20, "Redis uses {} MiB", used >> 20);
    assert_eq!(net.cli(&["DBSIZE"]), "1600000");
    assert_eq!(net.cli(&["STRLEN", "key:1599999"]), "100");
    stop(vm);
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(!text.contains("Out Of Memory") && !text.contains("linux: error"), "{text}");
}

#[test]
fn real_redis_recorded_under_load_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-rr");
    let net = Topology::up("rr", 1);
    let console = dir.join("console.txt");
    let log = dir.join("redis.log");
    let log_arg = log.display().to_string();
    // With a data disk: the append-only file fsynced at every write goes to the (copied) disk.
    let disk_arg = blank_disk(&dir, "data.img", 64 << 20);
    let stderr_path = dir.join("ftvm.stderr");
    let vm = redis_command(&net, &["record", "--log", &log_arg], &["--disk", &disk_arg], "ip=10.0.0.2/24", &console)
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    wait_for(&console, "Ready to accept connections", "redis-server under ftvm record");
    net.wait_ping("redis-server");
    for i in 0..10 {
        assert_eq!(net.cli(&["SET", &format!("k{i}"), &format!("v{i}")]), "OK");
    }
    let summary = benchmark(&net, &["-t", "set,get,lpush", "-n", "2000", "-c", "10"]);
    assert!(summary.contains("SET: "), "{summary}");
    assert_eq!(net.cli(&["GET", "k7"]), "v7");
    // A BGSAVE (fork: the child runs to completion, the parent resumes) in the recording.
    assert_eq!(net.cli(&["BGSAVE"]), "Background saving started");
    wait_persistence(&net, "rdb_bgsave_in_progress", "0");
    assert_eq!(persistence(&net, "rdb_last_bgsave_status"), "ok");
    assert_eq!(net.cli(&["GET", "k3"]), "v3");
    // SIGINT: the recording ends with END(operator stop).
    let _ = Command::new("kill").args(["-INT", &vm.id().to_string()]).status();
    let mut vm = vm;
    let status = vm.wait().unwrap();
    assert_eq!(status.code(), Some(130), "ftvm record stopped by SIGINT");
    drop(net);
    // Received frames wait for a counted exit while recording, so the TAP's reader does not
    // kick the vCPU for them (a kick would admit nothing): the kicks left are the sync
    // points' own, a few, not one per batch of frames (thousands for these 6,000 requests).
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    let kicks = summary_count(&stderr, " kicks");
    eprintln!("{kicks} kicks while recording");
    assert!(kicks < 100, "{kicks} kicks while recording: {stderr}");
    let recorded = std::fs::read_to_string(&console).unwrap();
    let err = replays_exactly(&log, &dir.join("replay"), &recorded);
    assert!(err.contains("the replayed disk equals the recording's"), "{err}");
    assert!(recorded.contains("Ready to accept connections"), "{recorded}");
    assert!(recorded.contains("Background saving terminated with success"), "{recorded}");
    assert!(recorded.contains("linux: fork: child "), "{recorded}");
}

/// More clients connecting at once than the listen backlog holds (the personality keeps
/// at most 128 sockets listening per port; Redis asks for 511): the connection attempts
/// beyond it are dropped, as Linux drops those that find its accept queue full, and their
/// clients send them again. Before, smoltcp reset them and redis-benchmark waited for ever
/// on the clients it had lost. Recorded: the drops are the guest's and replay exactly.
#[test]
fn a_storm_of_1000_connections_beyond_the_listen_backlog_is_served_and_replays() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-storm");
    let net = Topology::up("rs", 1);
    let console = dir.join("console.txt");
    let log = dir.join("redis.log");
    let log_arg = log.display().to_string();
    let vm = redis_vm_cmdline(
        &net,
        &["record", "--log", &log_arg],
        &[],
        "ip=10.0.0.2/24 -- /redis.conf --appendonly no",
        &console,
    );
    wait_for(&console, "Ready to accept connections", "redis-server under ftvm record");
    net.wait_ping("redis-server");
    let out = client(
        &net,
        &["timeout", "120", "redis-benchmark", "-h", "10.0.0.2", "-q", "-c", "1000", "-n", "5000", "-t", "ping_mbulk"],
    );
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(out.status.success(), "redis-benchmark -c 1000 ({:?}): {text}", out.status);
    assert!(text.contains("PING_MBULK: "), "{text}");
    assert_eq!(
        net.cli(&["INFO", "stats"]).lines().find(|l| l.starts_with("rejected_connections:")),
        Some("rejected_connections:0")
    );
    let _ = Command::new("kill").args(["-INT", &vm.id().to_string()]).status();
    let mut vm = vm;
    assert_eq!(vm.wait().unwrap().code(), Some(130), "ftvm record stopped by SIGINT");
    drop(net);
    let recorded = std::fs::read_to_string(&console).unwrap();
    assert!(recorded.contains("linux: a listen backlog is full"), "{recorded}");
    replays_exactly(&log, &dir.join("replay"), &recorded);
}

/// The number before `what` in ftvm's end-of-run line ("..., 9453 interrupts, 3 kicks; ...").
fn summary_count(stderr: &str, what: &str) -> u64 {
    let line =
        stderr.lines().find(|l| l.starts_with("ftvm: recorded")).unwrap_or_else(|| panic!("no summary: {stderr}"));
    let before = &line[..line.find(what).unwrap_or_else(|| panic!("no{what} in {line}"))];
    before.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no count before{what}: {line}"))
}

/// One `ftvm run` of the personality with `initrd` and `cmdline`; (exit status, console).
fn run_bad(dir: &Path, initrd: Option<&Path>, cmdline: &str) -> (Option<i32>, String) {
    let (elf, _) = redis_image();
    // `--cmdline=...`: a value that starts with `--` is not taken for an option.
    let mut extra: Vec<String> = vec!["--mem".into(), "1G".into(), format!("--cmdline={cmdline}")];
    if let Some(initrd) = initrd {
        extra.push("--initrd".into());
        extra.push(initrd.display().to_string());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (out, console) = run_guest(&elf, &extra, dir);
    (out.status.code(), console)
}

#[test]
fn bad_input_ends_with_one_line_and_a_reset() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-bad");
    let (_, cpio) = redis_image();
    // ftvm's exit status 3 is "guest requested a reset": the personality's bad-input exit,
    // distinct from a program's end (power-off, status 0).
    let (code, console) = run_bad(&dir, None, "");
    assert_eq!(code, Some(3), "{console}");
    assert!(console.contains("linux: error: no initramfs"), "{console}");

    let junk = dir.join("junk.cpio");
    std::fs::write(&junk, b"this is not a cpio archive at all").unwrap();
    let (code, console) = run_bad(&dir, Some(&junk), "");
    assert_eq!(code, Some(3), "{console}");
    assert!(console.contains("linux: error: initramfs") && console.contains("not a cpio newc archive"), "{console}");

    let (code, console) = run_bad(&dir, Some(&cpio), "init=/nowhere");
    assert_eq!(code, Some(3), "{console}");
    assert!(console.contains("linux: error: /nowhere: no such file in the initramfs"), "{console}");

    let (code, console) = run_bad(&dir, Some(&cpio), "init=/redis.conf");
    assert_eq!(code, Some(3), "{console}");
    assert!(console.contains("linux: error: /redis.conf: not an ELF executable"), "{console}");

    // A program that ends on its own: its status is printed, and the VM powers off (0).
    let (code, console) = run_bad(&dir, Some(&cpio), "-- --version");
    assert_eq!(code, Some(0), "{console}");
    assert!(console.contains("Redis server v=7.0.15"), "{console}");
    assert!(console.contains("linux: exit status 0"), "{console}");
}

/// The same image under QEMU microvm with user networking (a forwarded host port): `kvm`
/// (on PVM a ring-3 `syscall` stays in ring 3) and `tcg` (it enters ring 0, as on hardware).
fn qemu_serves(accel: &str, port: u16, dir: &Path) {
    let (elf, cpio) = redis_image();
    let console = dir.join(format!("qemu-{accel}.txt"));
    let console_file = std::fs::File::create(&console).unwrap();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,rtc=on,acpi=off", "-accel", accel, "-m", "1G", "-nographic", "-no-reboot"])
        .args(["-global", "virtio-mmio.force-legacy=false", "-kernel"])
        .arg(&elf)
        .arg("-initrd")
        .arg(&cpio)
        .args(["-append", "ip=10.0.2.15/24 gw=10.0.2.2"])
        .args(["-netdev", &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:6379")])
        .args(["-device", "virtio-net-device,netdev=n0"])
        .args(["-object", "rng-random,id=r0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=r0"])
        .stdin(Stdio::null())
        .stdout(console_file)
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 is missing: install Debian's qemu-system-x86 (scripts/deps.sh does)");
    wait_for(&console, "Ready to accept connections", &format!("redis-server under QEMU microvm ({accel})"));
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    };
    let start = Instant::now();
    while cli(&["PING"]) != "PONG" {
        assert!(start.elapsed() < Duration::from_secs(30), "QEMU ({accel}): no PONG");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cli(&["SET", "where", accel]), "OK");
    assert_eq!(cli(&["GET", "where"]), accel);
    assert_eq!(cli(&["RPUSH", "l", "1", "2"]), "2");
    assert_eq!(cli(&["EVAL", "return #redis.call('lrange', KEYS[1], 0, -1)", "1", "l"]), "2");
    // A BGSAVE: fork where `syscall` may enter ring 0 (TCG).
    assert_eq!(cli(&["BGSAVE"]), "Background saving started");
    let field = |name: &str| {
        let info = cli(&["INFO", "persistence"]);
        info.lines().find_map(|l| l.trim().strip_prefix(name).map(str::to_string)).unwrap_or_default()
    };
    let start = Instant::now();
    while field("rdb_saves:") != "1" || field("rdb_bgsave_in_progress:") != "0" {
        assert!(start.elapsed() < Duration::from_secs(30), "QEMU ({accel}): BGSAVE did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(field("rdb_last_bgsave_status:"), "ok", "QEMU ({accel})");
    assert_eq!(cli(&["GET", "where"]), accel);
    let _ = qemu.kill();
    let _ = qemu.wait();
}

#[test]
fn the_same_image_serves_under_qemu_microvm_kvm_and_tcg() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-qemu");
    let port = 20000 + (std::process::id() % 20000) as u16;
    qemu_serves("kvm", port, &dir);
    qemu_serves("tcg", port + 1, &dir);
}

/// A C program for the personality's own checks, built with Debian's musl-gcc (musl-tools,
/// scripts/deps.sh): arguments and environment, memory, threads with a mutex and a condition
/// variable (futex), a pipe, files in /data, the guest clock advancing while the program
/// computes (timer interrupts stay on after `syscall`), and its 128-byte red zone intact
/// across system calls and interrupts.
const PROGRAM: &str = r#"
#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t turn = PTHREAD_COND_INITIALIZER;
static long counter, next;

static void *worker(void *arg) {
    long me = (long)arg;
    for (int i = 0; i < 100; i++) {
        pthread_mutex_lock(&lock);
        while (next != me) pthread_cond_wait(&turn, &lock);
        counter++;
        next = (next + 1) % 4;
        pthread_cond_broadcast(&turn);
        pthread_mutex_unlock(&lock);
    }
    return (void *)(me * 10);
}

static long ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* 16 words below RSP hold a pattern while the loop spins and makes system calls. */
static long red_zone_round(long spin, long calls) {
    long bad;
    __asm__ volatile(
        "lea -128(%%rsp), %%rdi\n mov $16, %%r8\n movabs $0x5a5a5a5a5a5a5a5a, %%r9\n"
        "1: mov %%r9, -8(%%rdi,%%r8,8)\n dec %%r8\n jnz 1b\n"
        "mov %[calls], %%r10\n"
        "2: mov %[spin], %%rdx\n 3: dec %%rdx\n jnz 3b\n"
        "mov $110, %%eax\n syscall\n dec %%r10\n jnz 2b\n"
        "xor %%eax, %%eax\n mov $16, %%r8\n lea -128(%%rsp), %%rdi\n"
        "4: cmp %%r9, -8(%%rdi,%%r8,8)\n je 5f\n inc %%rax\n 5: dec %%r8\n jnz 4b\n"
        : "=&a"(bad) : [spin] "r"(spin), [calls] "r"(calls)
        : "rcx", "r11", "rdx", "rdi", "r8", "r9", "r10", "memory", "cc");
    return bad;
}

int main(int argc, char **argv) {
    printf("args:");
    for (int i = 0; i < argc; i++) printf(" %s", argv[i]);
    printf("\nhome: %s\n", getenv("HOME"));
    char *big = malloc(8 << 20);
    memset(big, 7, 8 << 20);
    char *map = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("memory: %d %d\n", big[12345], map[4321]);
    munmap(map, 1 << 20);
    free(big);

    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], 0, worker, (void *)i);
    long sum = 0;
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(t[i], &r);
        sum += (long)r;
    }
    printf("threads: counter %ld joined %ld\n", counter, sum);

    int p[2];
    pipe(p);
    write(p[1], "through a pipe", 14);
    char buf[64] = {0};
    read(p[0], buf, sizeof buf - 1);
    printf("pipe: %s\n", buf);

    FILE *f = fopen("/data/a.txt", "w");
    fprintf(f, "persisted line\n");
    fclose(f);
    rename("/data/a.txt", "/data/b.txt");
    f = fopen("/data/b.txt", "r");
    memset(buf, 0, sizeof buf);
    fgets(buf, sizeof buf, f);
    fclose(f);
    DIR *d = opendir("/data");
    struct dirent *e;
    int names = 0;
    while ((e = readdir(d))) names += e->d_name[0] != '.';
    closedir(d);
    printf("file: %s", buf);
    printf("dir: %d entries\n", names);

    long start = ms(), rounds = 0, bad = 0;
    while (ms() - start < 500) {
        bad += red_zone_round(100000, 4);
        rounds++;
    }
    printf("red zone: %ld rounds over %ld ms of guest time, %ld words clobbered\n", rounds, ms() - start, bad);
    return 7;
}
"#;

#[test]
fn a_c_program_static_and_static_pie_threads_files_time_and_red_zone() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("linux-c");
    let source = dir.join("probe.c");
    std::fs::write(&source, PROGRAM).unwrap();
    let (elf, _) = redis_image();
    // Each flavour with the syscall sites rewritten into jumps, and the static one also with
    // `linux.rewrite=off` (every call a real `syscall`): the red zone survives both paths.
    for (flavour, rewrite) in [("static", true), ("static-pie", true), ("static", false)] {
        let binary = dir.join(format!("probe-{flavour}"));
        build_c(&source, &binary, flavour == "static-pie");
        // e_type: ET_EXEC (2) or ET_DYN (3, a static-PIE: no PT_INTERP, relocates itself).
        let e_type = std::fs::read(&binary).unwrap()[16];
        assert_eq!(e_type, if flavour == "static" { 2 } else { 3 }, "{flavour}");
        let archive = dir.join(format!("probe-{flavour}.cpio"));
        program_cpio(&binary, "probe", &archive);
        let (out, console) = run_guest(
            &elf,
            &[
                "--mem",
                "1G",
                "--rng",
                "--initrd",
                &archive.display().to_string(),
                if rewrite {
                    "--cmdline=init=/probe -- one two"
                } else {
                    "--cmdline=init=/probe linux.rewrite=off -- one two"
                },
            ],
            &dir,
        );
        let flavour = if rewrite { flavour.to_string() } else { format!("{flavour}, linux.rewrite=off") };
        assert_eq!(out.status.code(), Some(0), "{flavour}: {console}");
        if rewrite {
            // Every site of this small program fits a window (its red-zone loop's included).
            let line = console.lines().find(|l| l.starts_with("linux: rewrote ")).unwrap_or_default();
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(words.len() > 4 && words[2] != "0" && words[2] == words[4], "{flavour}: {line}\n{console}");
        } else {
            assert!(console.contains("linux: syscall sites left as they are (linux.rewrite=off)"), "{console}");
        }
        for expected in [
            "args: /probe one two\n",
            "home: /\n",
            "memory: 7 0\n",
            "threads: counter 400 joined 60\n",
            "pipe: through a pipe\n",
            "file: persisted line\n",
            "dir: 1 entries\n",
            " words clobbered\n",
            "linux: exit status 7\n",
        ] {
            assert!(console.contains(expected), "{flavour}: no {expected:?} in:\n{console}");
        }
        assert!(console.contains(", 0 words clobbered"), "{flavour}: the red zone was touched:\n{console}");
        assert!(!console.contains("unsupported system call"), "{flavour}:\n{console}");
    }
}

/// fork under the personality (guests/linux/src/fork.rs): the child runs to completion in the
/// parent's memory, which is put back after; its fd table is a copy; waitpid reaps it.
const FORK_PROGRAM: &str = r#"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static int global = 1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int go;

static void *waiter(void *arg) {
    pthread_mutex_lock(&lock);
    while (!go) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    return arg;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "big")) {
        /* 150 MiB mapped: more than a 512 MiB VM's heap holds twice. */
        char *big = mmap(0, 150 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(big, 1, 150 << 20);
        errno = 0;
        pid_t pid = fork();
        if (pid == 0) _exit(0);
        int e = errno;
        printf("big fork: %d errno %d, memory %d\n", (int)pid, e, big[12345]);
        return 0;
    }
    pthread_t t;
    pthread_create(&t, 0, waiter, (void *)42);
    usleep(20000);
    char *heap = malloc(1 << 20);
    memset(heap, 'p', 1 << 20);
    char stack[256];
    memset(stack, 's', sizeof stack);
    int p[2], q[2];
    pipe(p);
    pipe(q);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        global = 2;
        memset(heap, 'c', 1 << 20);
        memset(stack, 'k', sizeof stack);
        close(p[0]);
        char line[128];
        int n = snprintf(line, sizeof line, "child: ppid %d is parent %d, pid %d\n", (int)getppid(),
                         getppid() == parent, getpid() != parent);
        write(p[1], line, n);
        static char lots[100 << 10];
        memset(lots, 'L', sizeof lots);
        ssize_t w = write(p[1], lots, sizeof lots);
        char c;
        ssize_t r = read(q[0], &c, 1);
        FILE *f = fopen("/data/temp-child.txt", "w");
        fprintf(f, "written by the child (wrote %zd, read %zd)\n", w, r);
        fflush(f);
        fsync(fileno(f));
        fclose(f);
        rename("/data/temp-child.txt", "/data/child.txt");
        _exit(7);
    }
    printf("fork: returned %d (> 1: %d)\n", (int)pid, pid > 1);
    printf("kill zombie: %d %d\n", kill(pid, 0), kill(pid, SIGTERM));
    int st = 0;
    /* The child waited on q, whose write end the parent holds: as on Linux, its end is
     * seen only once the parent closes it. */
    printf("waitpid before the close: %d\n", (int)waitpid(-1, &st, WNOHANG));
    close(q[1]);
    pid_t got = waitpid(-1, &st, WNOHANG);
    printf("waitpid: same pid %d, exited %d status %d\n", got == pid, WIFEXITED(st), WEXITSTATUS(st));
    errno = 0;
    got = waitpid(-1, &st, WNOHANG);
    printf("waitpid again: %d errno %d\n", (int)got, errno);
    printf("memory: global %d heap %c%c stack %c%c\n", global, heap[0], heap[(1 << 20) - 1], stack[0], stack[255]);
    char buf[256] = {0};
    int n = read(p[0], buf, 64);
    int nl = (int)(strchr(buf, '\n') - buf) + 1;
    printf("%.*s", nl, buf);
    long total = n - nl;
    while (total < (100 << 10)) {
        n = read(p[0], buf, sizeof buf);
        if (n <= 0) break;
        total += n;
    }
    printf("pipe: %ld bytes after the line\n", total);
    FILE *f = fopen("/data/child.txt", "r");
    memset(buf, 0, sizeof buf);
    if (f) fgets(buf, sizeof buf, f);
    printf("file: %s", buf);
    /* The thread frozen during the child still waits; wake it now. */
    pthread_mutex_lock(&lock);
    go = 1;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    void *r;
    pthread_join(t, &r);
    printf("thread: joined %ld\n", (long)r);
    /* A child that waits for what only its parent could do: ended, not hung. */
    pthread_mutex_lock(&lock);
    pid = fork();
    if (pid == 0) {
        pthread_mutex_lock(&lock);
        _exit(1);
    }
    pthread_mutex_unlock(&lock);
    waitpid(pid, &st, 0);
    printf("stuck child: signaled %d signal %d\n", WIFSIGNALED(st), WTERMSIG(st));
    /* posix_spawn (clone with CLONE_VM|CLONE_VFORK): its child's execve is refused. */
    extern char **environ;
    char *args[] = {"/fork", "big", 0};
    printf("posix_spawn: %d\n", posix_spawn(&pid, "/fork", 0, 0, args, environ));
    return 0;
}
"#;

/// A program that waits for SIGTERM: with `handler`, an SA_SIGINFO handler that checks what
/// it got; without, the default action.
const SIGNAL_PROGRAM: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static volatile sig_atomic_t got, code, from;
static void on_term(int sig, siginfo_t *info, void *uc) { got = sig; code = info->si_code; from = info->si_pid; (void)uc; }
int main(int argc, char **argv) {
    volatile double x = 1.5;
    if (argc > 1 && strcmp(argv[1], "handler") == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_term;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGTERM, &sa, 0);
        printf("waiting with a handler\n");
        fflush(stdout);
        while (!got) usleep(10000);
        printf("handled %d code %d from %d, x %.2f\n", (int)got, (int)code, (int)from, x * 2);
        return 5;
    }
    printf("waiting without a handler\n");
    fflush(stdout);
    sleep(1000);
    printf("not reached\n");
    return 1;
}
"#;

#[test]
fn a_c_program_forks_and_waits_for_its_child() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("linux-fork");
    let archive = c_program(&dir, "fork", FORK_PROGRAM);
    let (elf, _) = redis_image();
    let (out, console) = run_guest(
        &elf,
        &["--mem", "1G", "--rng", "--initrd", &archive.display().to_string(), "--cmdline=init=/fork"],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{console}");
    for expected in [
        "fork: returned ",
        " (> 1: 1)\n",
        "kill zombie: 0 0\n",
        "waitpid before the close: 0\n",
        "waitpid: same pid 1, exited 1 status 7\n",
        "waitpid again: -1 errno 10\n",
        "memory: global 1 heap pp stack ss\n",
        "child: ppid 1 is parent 1, pid 1\n",
        "pipe: 102400 bytes after the line\n",
        "file: written by the child (wrote 102400, read 0)\n",
        "thread: joined 42\n",
        "stuck child: signaled 1 signal 9\n",
        "posix_spawn: 1\n",
        "linux: fork: child ",
        " exited with status 7 (seen by the parent when it closes the pipe the child waited on) after ",
        " KiB copied aside in ",
        "linux: exit status 0\n",
    ] {
        assert!(console.contains(expected), "no {expected:?} in:\n{console}");
    }
    assert!(!console.contains("unsupported system call"), "{console}");
    // A fork whose copy the heap cannot hold: ENOMEM, and the program goes on.
    let (out, console) = run_guest(
        &elf,
        &["--mem", "512M", "--rng", "--initrd", &archive.display().to_string(), "--cmdline=init=/fork -- big"],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{console}");
    assert!(console.contains("linux: fork: the heap cannot hold the "), "{console}");
    assert!(console.contains("big fork: -1 errno 12, memory 1\n"), "{console}");
}

#[test]
fn sigterm_runs_a_c_program_s_handler_or_its_default_action() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("linux-signal");
    let archive = c_program(&dir, "sig", SIGNAL_PROGRAM);
    let (elf, _) = redis_image();
    for (arg, waiting, expected) in [
        ("handler", "waiting with a handler", "handled 15 code 0 from 1, x 3.00\nlinux: exit status 5\n"),
        (
            "default",
            "waiting without a handler",
            "linux: the program was killed by signal 15 (SIGTERM), exit status 143 (128 + 15)\nlinux: exit status 143\n",
        ),
    ] {
        let console = dir.join(format!("{arg}.txt"));
        let vm = ftvm()
            .arg("run")
            .arg("--kernel")
            .arg(&elf)
            .args(["--mem", "1G", "--rng", "--initrd", &archive.display().to_string()])
            .arg(format!("--cmdline=init=/sig -- {arg}"))
            .arg("--console")
            .arg(format!("file:{}", console.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(&console, waiting, arg);
        let _ = Command::new("kill").args(["-TERM", &vm.id().to_string()]).status();
        let (out, in_time) = finish_within(vm, Duration::from_secs(20));
        let text = std::fs::read_to_string(&console).unwrap();
        assert!(in_time, "{arg}: {text}");
        assert_eq!(out.status.code(), Some(0), "{arg}: the guest powered off: {text}");
        assert!(text.contains(expected), "{arg}: no {expected:?} in:\n{text}");
        assert!(!text.contains("not reached"), "{text}");
    }
}

/// Signals as Linux's (guests/linux/src/signal.rs): EINTR and SA_RESTART for waits a signal
/// interrupts, nanosleep's time left, per-thread masks and thread-directed signals,
/// sigsuspend, interval timers, alarm, the alternate stack, SIGCHLD, POSIX timers and
/// sigtimedwait.
const SIGNALS_PROGRAM: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t alarms, usr1, usr2, winch;
static volatile long usr1_tid, usr2_tid, alt_ok;
static char altstack[16384];

static long ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}
static long tid(void) { return syscall(SYS_gettid); }
static void on_alarm(int sig) { (void)sig; alarms++; }
static void on_usr1(int sig) { (void)sig; usr1++; usr1_tid = tid(); }
static void on_usr2(int sig) { (void)sig; usr2++; usr2_tid = tid(); }
static volatile sig_atomic_t chld, thread_timer;
static volatile long thread_timer_tid;
static void on_timer_thread(union sigval v) {
    thread_timer_tid = syscall(SYS_gettid);
    thread_timer = v.sival_int;
}
static void on_chld(int sig) { (void)sig; chld++; }
static void on_alt(int sig) {
    char here;
    stack_t ss;
    (void)sig;
    sigaltstack(0, &ss);
    alt_ok = &here > altstack && &here < altstack + sizeof altstack && ss.ss_flags == SS_ONSTACK;
}
static void handle(int sig, void (*fn)(int), int flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = flags;
    sigaction(sig, &sa, 0);
}
static void arm(long first_ms, long every_ms) {
    struct itimerval it = {{every_ms / 1000, every_ms % 1000 * 1000}, {first_ms / 1000, first_ms % 1000 * 1000}};
    setitimer(ITIMER_REAL, &it, 0);
}

static int pipefd[2];
static void *late_writer(void *arg) {
    usleep((long)arg * 1000);
    write(pipefd[1], "hello", 5);
    return 0;
}
static void *late_winch(void *arg) {
    (void)arg;
    usleep(50000);
    kill(getpid(), SIGWINCH);
    kill(getpid(), SIGCHLD);
    return 0;
}
static volatile long waiter_tid;
static void *waiter(void *arg) {
    (void)arg;
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, 0);
    waiter_tid = tid();
    while (!usr1 || !usr2) pause();
    return 0;
}

int main(void) {
    char buf[16] = {0};
    int r, e;
    pipe(pipefd);

    /* 1. A read on an empty pipe, interrupted by SIGALRM whose handler has no SA_RESTART. */
    handle(SIGALRM, on_alarm, 0);
    arm(100, 0);
    errno = 0;
    r = read(pipefd[0], buf, sizeof buf);
    e = errno;
    printf("read: %d %s, handled %d\n", r, e == EINTR ? "EINTR" : strerror(e), (int)alarms);

    /* 2. The same with SA_RESTART: the read restarts and gets what a thread writes later. */
    alarms = 0;
    handle(SIGALRM, on_alarm, SA_RESTART);
    pthread_t t;
    pthread_create(&t, 0, late_writer, (void *)300L);
    arm(100, 0);
    long t0 = ms();
    r = read(pipefd[0], buf, sizeof buf);
    long took = ms() - t0;
    printf("restart: read %d '%.*s', handled %d, after the write %d\n", r, r > 0 ? r : 0, buf, (int)alarms, took >= 290);
    pthread_join(t, 0);

    /* 3. nanosleep: EINTR, the time left in rem (SA_RESTART or not). */
    alarms = 0;
    arm(100, 0);
    struct timespec req = {1, 0}, rem = {0, 0};
    errno = 0;
    r = nanosleep(&req, &rem);
    e = errno;
    long left = rem.tv_sec * 1000 + rem.tv_nsec / 1000000;
    printf("nanosleep: %d %s, handled %d, rem about 900 ms %d\n", r, e == EINTR ? "EINTR" : strerror(e), (int)alarms,
           left > 850 && left < 950);
    printf("nanosleep rem: %ld ms\n", left);

    /* 4. epoll_wait: EINTR even with SA_RESTART. */
    alarms = 0;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    epoll_ctl(ep, EPOLL_CTL_ADD, pipefd[0], &ev);
    arm(50, 0);
    errno = 0;
    r = epoll_wait(ep, &ev, 1, 5000);
    e = errno;
    printf("epoll_wait: %d %s, handled %d\n", r, e == EINTR ? "EINTR" : strerror(e), (int)alarms);

    /* 5. Default-ignored signals interrupt nothing. */
    pthread_create(&t, 0, late_winch, 0);
    req.tv_sec = 0;
    req.tv_nsec = 200000000;
    r = nanosleep(&req, 0);
    pthread_join(t, 0);
    printf("ignored: nanosleep %d\n", r);

    /* 6. A process signal the main thread blocks goes to the thread that does not block it;
       a thread-directed one to that thread; one blocked stays pending for its thread. */
    handle(SIGUSR1, on_usr1, 0);
    handle(SIGUSR2, on_usr2, 0);
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    pthread_create(&t, 0, waiter, 0);
    while (!waiter_tid) usleep(1000);
    usleep(20000);
    kill(getpid(), SIGUSR1);
    usleep(20000);
    pthread_kill(t, SIGUSR2);
    pthread_join(t, 0);
    printf("threads: usr1 %d in the other thread %d, usr2 %d in it %d\n", (int)usr1, usr1_tid == waiter_tid, (int)usr2,
           usr2_tid == waiter_tid);
    usr1 = 0;
    pthread_kill(pthread_self(), SIGUSR1);
    sigset_t pending;
    sigpending(&pending);
    printf("pending: usr1 %d usr2 %d, handled %d\n", sigismember(&pending, SIGUSR1), sigismember(&pending, SIGUSR2),
           (int)usr1);
    /* sigsuspend with SIGUSR1 let through: it runs, then -1 EINTR and the mask is back. */
    sigset_t none;
    sigemptyset(&none);
    errno = 0;
    r = sigsuspend(&none);
    e = errno;
    sigset_t now;
    pthread_sigmask(SIG_BLOCK, 0, &now);
    printf("sigsuspend: %d %s, handled %d in main %d, still blocked %d\n", r, e == EINTR ? "EINTR" : strerror(e),
           (int)usr1, usr1_tid == tid(), sigismember(&now, SIGUSR1));
    pthread_sigmask(SIG_SETMASK, &old, 0);

    /* 7. A periodic ITIMER_REAL: every 50 ms. */
    alarms = 0;
    handle(SIGALRM, on_alarm, 0);
    arm(50, 50);
    t0 = ms();
    while (alarms < 5) pause();
    took = ms() - t0;
    struct itimerval cur;
    getitimer(ITIMER_REAL, &cur);
    arm(0, 0);
    struct itimerval off;
    getitimer(ITIMER_REAL, &off);
    printf("itimer: %d signals in about 250 ms %d, interval %ld us, armed %d, disarmed %d\n", (int)alarms,
           took >= 240 && took <= 300, (long)cur.it_interval.tv_usec, cur.it_value.tv_usec > 0 || cur.it_value.tv_sec > 0,
           off.it_value.tv_sec == 0 && off.it_value.tv_usec == 0);

    /* 8. alarm(): the seconds left, then SIGALRM ends a pause. */
    unsigned a0 = alarm(5);
    unsigned a1 = alarm(2);
    unsigned a2 = alarm(0);
    alarms = 0;
    alarm(1);
    t0 = ms();
    errno = 0;
    r = pause();
    e = errno;
    took = ms() - t0;
    printf("alarm: %u %u %u, pause %d %s, handled %d after about 1 s %d\n", a0, a1, a2, r,
           e == EINTR ? "EINTR" : strerror(e), (int)alarms, took >= 990 && took <= 1100);

    /* 9. An SA_ONSTACK handler runs on the alternate stack. */
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
    sigaltstack(&ss, 0);
    handle(SIGUSR2, on_alt, SA_ONSTACK);
    raise(SIGUSR2);
    printf("altstack: handler on it %d\n", (int)alt_ok);

    /* 10. A child's end sends SIGCHLD to its parent. */
    handle(SIGCHLD, on_chld, 0);
    pid_t child = fork();
    if (child == 0) _exit(4);
    int st = 0;
    waitpid(child, &st, 0);
    printf("sigchld: handled %d, status %d\n", (int)chld, WEXITSTATUS(st));

    /* 11. A periodic POSIX timer's SIGUSR2, blocked, taken with sigtimedwait. */
    sigset_t s2;
    sigemptyset(&s2);
    sigaddset(&s2, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &s2, 0);
    timer_t tm;
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_SIGNAL;
    sev.sigev_signo = SIGUSR2;
    sev.sigev_value.sival_int = 42;
    int created = timer_create(CLOCK_MONOTONIC, &sev, &tm);
    struct itimerspec its = {{0, 30000000}, {0, 30000000}};
    timer_settime(tm, 0, &its, 0);
    int got = 0, timer_info = 1;
    for (int i = 0; i < 3; i++) {
        siginfo_t si;
        struct timespec wait = {1, 0};
        got += sigtimedwait(&s2, &si, &wait) == SIGUSR2;
        timer_info &= si.si_code == SI_TIMER && si.si_value.sival_int == 42;
    }
    struct itimerspec cur2;
    timer_gettime(tm, &cur2);
    timer_delete(tm);
    struct timespec brief = {0, 50000000};
    errno = 0;
    r = sigtimedwait(&s2, 0, &brief);
    e = errno;
    printf("posix timer: created %d, %d signals, SI_TIMER with its value %d, interval %ld ms, then %d %s\n", created,
           got, timer_info, cur2.it_interval.tv_nsec / 1000000, r, e == EAGAIN ? "EAGAIN" : strerror(e));

    /* 12. epoll_pwait's mask: a blocked SIGUSR1 it lets through ends a wait, not a poll. */
    sigset_t u1;
    sigemptyset(&u1);
    sigaddset(&u1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &u1, 0);
    usr1 = 0;
    pthread_kill(pthread_self(), SIGUSR1);
    int polled = epoll_pwait(ep, &ev, 1, 0, &none);
    sigpending(&pending);
    int still = sigismember(&pending, SIGUSR1);
    errno = 0;
    r = epoll_pwait(ep, &ev, 1, 1000, &none);
    e = errno;
    pthread_sigmask(SIG_BLOCK, 0, &now);
    printf("epoll_pwait: polled %d, still pending %d; waited %d %s, handled %d, blocked again %d\n", polled, still, r,
           e == EINTR ? "EINTR" : strerror(e), (int)usr1, sigismember(&now, SIGUSR1));

    /* 13. sigqueue: a realtime signal is queued, each instance with its value, in order; a
       standard one is pending once. */
    int rt = SIGRTMIN + 2;
    sigset_t q;
    sigemptyset(&q);
    sigaddset(&q, rt);
    sigaddset(&q, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &q, 0);
    for (int v = 1; v <= 3; v++) sigqueue(getpid(), rt, (union sigval){.sival_int = v});
    sigqueue(getpid(), SIGUSR1, (union sigval){.sival_int = 7});
    sigqueue(getpid(), SIGUSR1, (union sigval){.sival_int = 8});
    /* The lowest number first: SIGUSR1 (10), then the realtime one's three. */
    siginfo_t si1;
    int first = sigwaitinfo(&q, &si1) == SIGUSR1 ? si1.si_value.sival_int : -1;
    int values = 0, queued_code = si1.si_code == SI_QUEUE;
    for (int i = 0; i < 3; i++) {
        siginfo_t si;
        if (sigwaitinfo(&q, &si) == rt) values = values * 10 + si.si_value.sival_int;
        queued_code &= si.si_code == SI_QUEUE && si.si_pid == getpid();
    }
    sigpending(&pending);
    printf("sigqueue: values %d in order, SI_QUEUE from us %d; SIGUSR1 once, value %d, more %d\n", values, queued_code,
           first, sigismember(&pending, SIGUSR1));

    /* 14. A SIGEV_THREAD timer (musl: a thread of its own, SIGEV_THREAD_ID underneath). */
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD;
    sev.sigev_notify_function = on_timer_thread;
    sev.sigev_value.sival_int = 5;
    created = timer_create(CLOCK_MONOTONIC, &sev, &tm);
    struct itimerspec once = {{0, 0}, {0, 20000000}};
    timer_settime(tm, 0, &once, 0);
    for (int i = 0; i < 100 && !thread_timer; i++) usleep(10000);
    timer_delete(tm);
    printf("sigev_thread: created %d, callback ran with %d in another thread %d\n", created, (int)thread_timer,
           thread_timer_tid != tid());
    return 3;
}
"#;

/// What SIGNALS_PROGRAM prints when every check holds.
const SIGNALS_EXPECTED: [&str; 18] = [
    "read: -1 EINTR, handled 1\n",
    "restart: read 5 'hello', handled 1, after the write 1\n",
    "nanosleep: -1 EINTR, handled 1, rem about 900 ms 1\n",
    "epoll_wait: -1 EINTR, handled 1\n",
    "ignored: nanosleep 0\n",
    "threads: usr1 1 in the other thread 1, usr2 1 in it 1\n",
    "pending: usr1 1 usr2 0, handled 0\n",
    "sigsuspend: -1 EINTR, handled 1 in main 1, still blocked 1\n",
    "itimer: 5 signals in about 250 ms 1, interval 50000 us, armed 1, disarmed 1\n",
    "alarm: 0 5 2, pause -1 EINTR, handled 1 after about 1 s 1\n",
    "altstack: handler on it 1\n",
    "sigchld: handled 1, status 4\n",
    "posix timer: created 0, 3 signals, SI_TIMER with its value 1, interval 30 ms, then -1 EAGAIN\n",
    "epoll_pwait: polled 0, still pending 1; waited -1 EINTR, handled 1, blocked again 1\n",
    "sigqueue: values 123 in order, SI_QUEUE from us 1; SIGUSR1 once, value 7, more 0\n",
    "sigev_thread: created 0, callback ran with 5 in another thread 1\n",
    "linux: exit status 3\n",
    "nanosleep rem: ",
];

#[test]
fn signals_interrupt_waits_restart_them_reach_the_right_thread_and_timers_fire() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("linux-signals");
    let archive = c_program(&dir, "sigs", SIGNALS_PROGRAM);
    let (elf, _) = redis_image();
    // Its system calls rewritten into jumps (a restart after a handler: at rt_sigreturn), and
    // every one a real `syscall` (rewound onto it, as Linux does).
    for cmdline in ["--cmdline=init=/sigs", "--cmdline=init=/sigs linux.rewrite=off"] {
        let (out, console) =
            run_guest(&elf, &["--mem", "1G", "--initrd", &archive.display().to_string(), cmdline], &dir);
        assert_eq!(out.status.code(), Some(0), "{cmdline}: {console}");
        for expected in SIGNALS_EXPECTED {
            assert!(console.contains(expected), "{cmdline}: no {expected:?} in:\n{console}");
        }
        assert!(!console.contains("unsupported system call"), "{cmdline}: {console}");
    }

    // Recorded, it replays exactly: every delivery point is a function of the logged inputs.
    let (log, recorded) = record_program(&elf, &archive, "init=/sigs", &dir);
    for expected in SIGNALS_EXPECTED {
        assert!(recorded.contains(expected), "recording: no {expected:?} in:\n{recorded}");
    }
    replays_exactly(&log, &dir.join("replay"), &recorded);
}

#[test]
fn redis_s_watchdog_gets_its_sigalrm_and_redis_keeps_serving() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-watchdog");
    let net = Topology::up("rw", 1);
    let console = dir.join("console.txt");
    let cmdline = "ip=10.0.0.2/24 -- /redis.conf --enable-debug-command yes";
    let vm = redis_vm_cmdline(&net, &["run"], &[], cmdline, &console);
    wait_for(&console, "Ready to accept connections", "redis-server under ftvm run");
    net.wait_ping("redis-server");
    // serverCron re-arms ITIMER_REAL (setitimer) every 100 ms; DEBUG SLEEP's nanosleep keeps
    // it from running, so the timer expires: SIGALRM to the main thread (the bio threads block
    // it), whose handler logs the report; the sleep ends early with EINTR, as on Linux.
    assert_eq!(net.cli(&["CONFIG", "SET", "watchdog-period", "200"]), "OK");
    let start = Instant::now();
    assert_eq!(net.cli(&["DEBUG", "SLEEP", "1"]), "OK");
    let slept = start.elapsed();
    assert!(slept < Duration::from_millis(900), "DEBUG SLEEP's nanosleep was not cut short: {slept:?}");
    wait_for(&console, "--- WATCHDOG TIMER EXPIRED ---", "the watchdog's report");
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("Sorry: no support for backtrace()"), "{text}");
    assert_eq!(net.cli(&["SET", "after", "the watchdog"]), "OK");
    assert_eq!(net.cli(&["GET", "after"]), "the watchdog");
    assert_eq!(net.cli(&["CONFIG", "SET", "watchdog-period", "0"]), "OK");
    assert_eq!(net.cli(&["PING"]), "PONG");
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(!text.contains("killed by signal"), "{text}");
    stop(vm);
}

/// CPUID, RDTSC and RDTSCP in a program: rewritten into the personality's emulations.
const TSC_PROGRAM: &str = r#"#include <stdio.h>
#include <string.h>
#include <cpuid.h>
#include <x86intrin.h>
int main(void) {
    unsigned a, b, c, d;
    char vendor[13] = {0};
    __cpuid(0x40000000, a, b, c, d);
    memcpy(vendor, &b, 4); memcpy(vendor + 4, &c, 4); memcpy(vendor + 8, &d, 4);
    printf("hypervisor leaf %s\n", vendor);
    unsigned long long t0 = __rdtsc(), t1 = __rdtsc();
    unsigned aux = 99;
    unsigned long long t2 = __rdtscp(&aux);
    printf("tsc monotonic %d aux %u\n", t0 < t1 && t1 < t2, aux);
    printf("tsc %llu %llu %llu\n", t0, t1, t2);
    return 0;
}
"#;

/// RDRAND and RDSEED at each width, the flags they set read by the next instruction.
const RAND_PROGRAM: &str = r#"#include <stdio.h>
int main(void) {
    unsigned long long a = 0x1122334455667788ULL, b = ~0ULL, c, d, r, s;
    unsigned char cf, zf;
    /* xor leaves ZF = 1: a successful rdrand clears it. */
    __asm__ volatile("xor %%ecx, %%ecx\n\trdrand %w0\n\tsetc %1\n\tsetz %2" : "+r"(a), "=qm"(cf), "=qm"(zf) :: "rcx", "cc");
    printf("rdrand16 cf %d zf %d upper kept %d\n", cf, zf, (a >> 16) == 0x112233445566ULL);
    __asm__ volatile("xor %%ecx, %%ecx\n\trdrand %k0\n\tsetc %1\n\tsetz %2" : "+r"(b), "=qm"(cf), "=qm"(zf) :: "rcx", "cc");
    printf("rdrand32 cf %d zf %d zero-extended %d\n", cf, zf, (b >> 32) == 0);
    __asm__ volatile("xor %%ecx, %%ecx\n\trdrand %0\n\tsetc %1\n\tsetz %2" : "=r"(c), "=qm"(cf), "=qm"(zf) :: "rcx", "cc");
    printf("rdrand64 cf %d zf %d\n", cf, zf);
    __asm__ volatile("rdrand %%rax\n\tsetc %1" : "=a"(r), "=qm"(cf) :: "cc");
    printf("rdrand rax cf %d\n", cf);
    __asm__ volatile("xor %%ecx, %%ecx\n\trdseed %0\n\tsetc %1\n\tsetz %2" : "=r"(d), "=qm"(cf), "=qm"(zf) :: "rcx", "cc");
    printf("rdseed64 cf %d zf %d\n", cf, zf);
    __asm__ volatile("1: rdrand %0\n\tjnc 1b" : "=r"(s) :: "cc");
    printf("words differ %d\n", c != d && d != r && r != s);
    printf("words %llx %llx %llx %llx %llx %llx\n", a, b, c, r, d, s);
    return 0;
}
"#;

#[test]
fn cpuid_and_rdtsc_are_emulated_and_replay_and_the_rest_of_the_contract_holds() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("linux-contract");
    let archive = c_program(&dir, "tsc", TSC_PROGRAM);
    // Rewritten: CPUID answers from the VMM's table (ftvm's neutral hypervisor leaf), the TSC
    // strictly increases and RDTSCP's TSC_AUX is 0.
    let (code, console) = run_bad(&dir, Some(&archive), "init=/tsc");
    assert_eq!(code, Some(0), "{console}");
    assert!(console.contains("cpuid/rdtsc/rdtscp/rdrand/rdseed sites into emulations"), "{console}");
    assert!(console.contains("cpuid/rdtsc/rdtscp/rdrand/rdseed emulated)"), "{console}");
    assert!(console.contains("hypervisor leaf ftvmFTVMftvm\n"), "{console}");
    assert!(console.contains("tsc monotonic 1 aux 0\n"), "{console}");
    // Not rewritten, the same program breaks the contract and is refused, each site named.
    let (code, console) = run_bad(&dir, Some(&archive), "init=/tsc linux.rewrite=off");
    assert_eq!(code, Some(3), "{console}");
    assert!(console.contains("linux: guest contract: rdtsc [0f 31] at 0x"), "{console}");
    assert!(console.contains("linux: guest contract: cpuid [0f a2] at 0x"), "{console}");
    assert!(console.contains("linux: error: /tsc: breaks the guest contract (4 forbidden instruction"), "{console}");
    assert!(!console.contains("tsc monotonic"), "{console}");
    // Told to run it anyway: it runs (and would diverge under record/replay).
    let (code, console) = run_bad(&dir, Some(&archive), "init=/tsc linux.rewrite=off linux.contract=off");
    assert_eq!(code, Some(0), "{console}");
    assert!(console.contains("4 forbidden, run anyway (linux.contract=off)"), "{console}");
    assert!(console.contains("tsc monotonic 1") && console.contains("linux: exit status 0"), "{console}");
    // RDRAND and RDSEED: emulated with words from virtio-rng, into each register width as
    // the instructions write it, with CF = 1 and ZF = 0 as a successful one leaves them.
    let archive = c_program(&dir, "rand", RAND_PROGRAM);
    let (code, console) = run_bad(&dir, Some(&archive), "init=/rand");
    assert_eq!(code, Some(0), "{console}");
    assert!(console.contains("none forbidden ("), "{console}");
    for line in [
        "rdrand16 cf 1 zf 0 upper kept 1\n",
        "rdrand32 cf 1 zf 0 zero-extended 1\n",
        "rdrand64 cf 1 zf 0\n",
        "rdrand rax cf 1\n",
        "rdseed64 cf 1 zf 0\n",
        "words differ 1\n",
    ] {
        assert!(console.contains(line), "{line:?}: {console}");
    }
    // Not rewritten, RDRAND and RDSEED break the contract: refused, each site named.
    let (code, console) = run_bad(&dir, Some(&archive), "init=/rand linux.rewrite=off");
    assert_eq!(code, Some(3), "{console}");
    assert!(console.contains("linux: guest contract: rdrand ["), "{console}");
    assert!(console.contains("linux: guest contract: rdseed ["), "{console}");
    assert!(!console.contains("rdrand16"), "{console}");
    // Recorded, its random words replay exactly (they are virtio-rng's, logged).
    let (elf, _) = redis_image();
    let (log, recorded) = record_program(&elf, &archive, "init=/rand", &dir);
    assert!(recorded.contains("words differ 1\n"), "{recorded}");
    replays_exactly(&log, &dir.join("replay-rand"), &recorded);

    // Recorded, the emulated program replays exactly (the TSC values included).
    let archive = dir.join("tsc.cpio");
    let (log, recorded) = record_program(&elf, &archive, "init=/tsc", &dir);
    assert!(recorded.contains("tsc monotonic 1 aux 0\n"), "{recorded}");
    replays_exactly(&log, &dir.join("replay"), &recorded);
}

/// `ftvm ctl SOCKET ARGS...`: exit status and output.
fn ctl(socket: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = ftvm().arg("ctl").arg(socket).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[test]
fn the_pair_protects_real_redis_through_a_failover_a_reprotection_and_a_second_failover() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-pair");
    let net = Topology::up("rp", 2);
    let (elf, cpio) = redis_image();
    let key = dir.join("pair.key");
    std::fs::write(&key, "5ec2e7005ec2e7005ec2e7005ec2e7005ec2e7005ec2e7005ec2e7005ec2e700\n").unwrap();
    // One side: `role` in namespace `ns`, its disk NS.img (created once), API socket NAME.sock.
    let side = |ns: &str, role: &str, peer: &[&str], name: &str| -> Child {
        let disk = dir.join(format!("{ns}.img"));
        if !disk.exists() {
            std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
        }
        net.cmd(ns, env!("CARGO_BIN_EXE_ftvm"))
            .arg(role)
            .args(peer)
            .args(["--timeout", "1200", "--arbiter"])
            .arg(dir.join("arbiter.lock"))
            .arg("--shared-lock") // both "hosts" are namespaces of this machine
            .arg("--key-file")
            .arg(&key)
            .arg("--api-socket")
            .arg(dir.join(format!("{name}.sock")))
            .arg("--kernel")
            .arg(&elf)
            .arg("--initrd")
            .arg(&cpio)
            .args(["--mem", "1G", "--cmdline", "ip=10.0.0.2/24", "--net", "tap=tap0", "--rng", "--disk"])
            .arg(&disk)
            .arg("--console")
            .arg(format!("file:{}", dir.join(format!("{name}.txt")).display()))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let backup = side("h2", "backup", &["--listen", "10.99.0.2:7000"], "h2-backup");
    std::thread::sleep(Duration::from_millis(400));
    let mut primary = side("h1", "primary", &["--backup", "10.99.0.2:7000"], "h1-primary");
    net.wait_ping("the protected redis-server");
    assert_eq!(net.cli(&["SET", "before", "the failover"]), "OK");
    // One connection that must survive both failovers (scripts/kv-checker.py), load beside it.
    let check = net
        .cmd("c", "python3")
        .arg(repo_root().join("scripts/kv-checker.py"))
        .args(["10.0.0.2", "6379", "22"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let bench = net
        .cmd("c", "redis-benchmark")
        .args(["-h", "10.0.0.2", "-t", "set,get", "-n", "20000", "-c", "10", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    primary.kill().unwrap(); // SIGKILL: h2's backup goes live
    let _ = primary.wait();
    let live = dir.join("h2-backup.sock");
    let start = Instant::now();
    loop {
        let (code, out) = ctl(&live, &["status", "--json"]);
        let status: Option<serde_json::Value> = serde_json::from_str(&out).ok().filter(|_| code == Some(0));
        if status.is_some_and(|v| v["pair"]["failovers"] == 1) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the backup did not take over: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(net.cli(&["GET", "before"]), "the failover");
    // Re-protection: a new backup on h1 (its disk is the dead primary's: the transfer replaces it).
    let new_backup = side("h1", "backup", &["--listen", "10.99.0.1:7001"], "h1-backup");
    std::thread::sleep(Duration::from_millis(500));
    let (code, out) = ctl(&live, &["protect", "10.99.0.1:7001", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let progress: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!(progress["phase"], "protected", "{out}");
    eprintln!("re-protection: {out}");
    std::thread::sleep(Duration::from_secs(2));
    // The second failover: SIGKILL of the live side; h1's new backup goes live.
    let mut backup = backup;
    backup.kill().unwrap();
    let out = backup.wait_with_output().unwrap();
    let old_live_err = String::from_utf8_lossy(&out.stderr).into_owned();
    let out = check.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("checker: {report}");
    assert_eq!(out.status.code(), Some(0), "invariants broken: {report} {}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("\"reset\": false"), "{report}");
    let out = bench.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(text.lines().any(|l| l.starts_with("GET: ")), "redis-benchmark finished: {text}");
    assert_eq!(net.cli(&["GET", "before"]), "the failover");
    let mut new_backup = new_backup;
    let _ = new_backup.kill();
    let out = new_backup.wait_with_output().unwrap();
    let new_err = String::from_utf8_lossy(&out.stderr);
    assert!(new_err.contains("TAKEOVER"), "{new_err}");
    assert!(old_live_err.contains("TAKEOVER") && old_live_err.contains("PROTECTED"), "{old_live_err}");
}

/// Units of Redis's own test suite that run here in about two minutes; the whole
/// suite (about an hour) is `scripts/redis-suite.sh`, outside the test command.
const UPSTREAM_UNITS: &[&str] = &[
    "unit/printver",
    "unit/auth",
    "unit/protocol",
    "unit/keyspace",
    "unit/info-command",
    "unit/dump",
    "unit/type/string",
    "unit/type/incr",
    "unit/type/list",
    "unit/type/stream-cgroups",
    "unit/pubsub",
    "integration/redis-cli",
    "unit/multi",
    "unit/expire",
];

#[test]
fn redis_s_own_tests_pass_against_the_guest() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("redis-upstream");
    let mut cmd = Command::new(repo_root().join("scripts").join("redis-suite.sh"));
    cmd.env("FTVM", env!("CARGO_BIN_EXE_ftvm")).args(["--prefix", "rup", "--work"]).arg(&*dir).arg("--");
    for unit in UPSTREAM_UNITS {
        cmd.args(["--single", unit]);
    }
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let console = std::fs::read_to_string(dir.join("console.txt")).unwrap_or_default();
    assert!(out.status.success(), "Redis's tests against the guest:\n{text}\nconsole:\n{console}");
    assert!(text.contains("All tests passed"), "{text}");
}

/// Debian's own redis-server (glibc, PIE, 16 shared libraries) and its interpreter:
/// `scripts/fetch-debian-redis.sh`, then `cargo xtask guests` (target/guests/redis-glibc.cpio).
#[test]
fn debian_s_glibc_redis_server_serves_redis_cli_and_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let (elf, _) = redis_image();
    let cpio = repo_root().join("target/guests/redis-glibc.cpio");
    assert!(
        cpio.exists(),
        "{} is missing (Debian's redis-server package: scripts/fetch-debian-redis.sh, then cargo xtask guests)",
        cpio.display()
    );
    let dir = scratch("redis-glibc");
    let net = Topology::up("rg", 1);
    let console = dir.join("record.txt");
    let log = dir.join("redis-glibc.log");
    // The guest contract holds: the CPUID, RDTSC, RDRAND and RDSEED sites of ld.so, libc,
    // libcrypto, libgcrypt and libstdc++ are rewritten into emulations as they are mapped.
    let vm = net
        .cmd("h1", env!("CARGO_BIN_EXE_ftvm"))
        .args(["record", "--log"])
        .arg(&log)
        .arg("--kernel")
        .arg(&elf)
        .arg("--initrd")
        .arg(&cpio)
        .args(["--mem", "1G", "--cmdline", "ip=10.0.0.2/24", "--net", "tap=tap0", "--rng"])
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&console, "Ready to accept connections", "Debian's redis-server under ftvm record");
    net.wait_ping("Debian's redis-server");
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("linux: interpreter /lib64/ld-linux-x86-64.so.2 at 0x"), "{text}");
    assert!(text.contains("/lib/x86_64-linux-gnu/libc.so.6 mapped executable at 0x"), "{text}");
    assert!(text.contains("cpuid/rdtsc/rdtscp/rdrand/rdseed emulated)"), "{text}");
    assert!(!text.contains("forbidden, run anyway"), "every mapping obeys the contract once rewritten: {text}");
    // glibc's pthread_create tries clone3 first and falls back to clone on ENOSYS.
    let unsupported: Vec<&str> =
        text.lines().filter(|l| l.contains("unsupported system call") && !l.contains("(clone3)")).collect();
    assert!(unsupported.is_empty(), "{unsupported:?}\n{text}");
    assert_eq!(net.cli(&["SET", "glibc", "works"]), "OK");
    assert_eq!(net.cli(&["GET", "glibc"]), "works");
    assert_eq!(net.cli(&["INCR", "n"]), "1");
    assert_eq!(net.cli(&["PING"]), "PONG");
    let recorded = stop_with_sigterm(vm, &console);
    assert!(recorded.contains("Redis is now ready to exit, bye bye"), "{recorded}");
    drop(net);
    replays_exactly(&log, &dir.join("replay"), &recorded);
}
