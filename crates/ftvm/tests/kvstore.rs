//! The kvstore guest on the namespaced test network with real Redis clients: round trips,
//! binary and 1 MiB values, redis-benchmark, durability across a restart on the same disk,
//! and a recording made under client load that replays with no network.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The client and host-1 side of a one-host test network.
trait KvNet {
    fn client(&self, args: &[&str]) -> Output;
    fn vm(&self, sub: &[&str], disk: &Path, console: &Path) -> Child;
    fn wait_ready(&self, console: &Path);
}

impl KvNet for Topology {
    fn client(&self, args: &[&str]) -> Output {
        self.cmd("c", args[0]).args(&args[1..]).output().unwrap()
    }

    fn vm(&self, sub: &[&str], disk: &Path, console: &Path) -> Child {
        self.kvstore_vm(sub, disk, console).stderr(Stdio::null()).spawn().unwrap()
    }

    fn wait_ready(&self, console: &Path) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if std::fs::read_to_string(console).unwrap_or_default().contains("kvstore: listening") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.wait_ping("kvstore");
    }
}

fn blank_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    disk
}

fn stop(mut vm: Child) {
    let _ = vm.kill();
    let _ = vm.wait();
}

#[test]
fn redis_clients_round_trips_benchmark_and_durability() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("kvstore");
    let net = Topology::up("kv", 1);
    let disk = blank_disk(&dir);
    let console = dir.join("console.txt");
    let vm = net.vm(&["run"], &disk, &console);
    net.wait_ready(&console);
    assert_eq!(net.cli(&["SET", "greeting", "hello"]), "OK");
    assert_eq!(net.cli(&["GET", "greeting"]), "hello");
    assert_eq!(net.cli(&["INCR", "counter"]), "1");
    assert_eq!(net.cli(&["INCR", "counter"]), "2");
    assert_eq!(net.cli(&["SET", "gone", "x"]), "OK");
    assert_eq!(net.cli(&["DEL", "gone"]), "1");
    assert_eq!(net.cli(&["EXISTS", "gone"]), "0");
    // A binary value and a 1 MiB value, through redis-cli -x (stdin).
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
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
        let out = net.client(&["redis-cli", "-h", "10.0.0.2", "--raw", "GET", key]);
        // --raw appends a newline.
        assert_eq!(out.stdout.len(), value.len() + 1, "{key}");
        assert_eq!(&out.stdout[..value.len()], &value[..], "{key} comes back byte for byte");
    }
    let out = net.client(&["redis-benchmark", "-h", "10.0.0.2", "-t", "set,get", "-n", "20000", "-c", "20", "-q"]);
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(out.status.success(), "{text}");
    assert!(text.lines().any(|l| l.starts_with("SET: ") && l.contains("requests per second")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("GET: ") && l.contains("requests per second")), "{text}");
    stop(vm);

    // Restart on the same disk: every acknowledged write is there.
    let console2 = dir.join("console2.txt");
    let vm = net.vm(&["run"], &disk, &console2);
    net.wait_ready(&console2);
    assert_eq!(net.cli(&["GET", "greeting"]), "hello");
    assert_eq!(net.cli(&["GET", "counter"]), "2");
    assert_eq!(net.cli(&["EXISTS", "gone"]), "0");
    let out = net.client(&["redis-cli", "-h", "10.0.0.2", "--raw", "GET", "big"]);
    assert_eq!(&out.stdout[..big.len()], &big[..]);
    stop(vm);
}

#[test]
fn kvstore_recorded_under_load_replays_with_no_network() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("kvstore-rr");
    let net = Topology::up("kr", 1);
    let disk = blank_disk(&dir);
    let console = dir.join("console.txt");
    let log = dir.join("kv.log");
    let log_arg = log.display().to_string();
    let vm = net.vm(&["record", "--log", &log_arg], &disk, &console);
    net.wait_ready(&console);
    for i in 0..20 {
        assert_eq!(net.cli(&["SET", &format!("k{i}"), &format!("v{i}")]), "OK");
    }
    let out = net.client(&["redis-benchmark", "-h", "10.0.0.2", "-t", "set,get", "-n", "3000", "-c", "10", "-q"]);
    assert!(out.status.success());
    // SIGINT: the recording ends with END(operator stop).
    let pid = vm.id();
    let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
    let mut vm = vm;
    let _ = vm.wait();
    drop(net);
    let out_dir = dir.join("replay");
    let out = ftvm().arg("replay").arg(&log).arg("--output-dir").arg(&out_dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("the replayed disk equals the recording's"), "{err}");
    let recorded = std::fs::read_to_string(&console).unwrap();
    let replayed = std::fs::read_to_string(out_dir.join("console.txt")).unwrap();
    assert_eq!(replayed, recorded);
    assert!(std::fs::metadata(out_dir.join("net0.pcap")).unwrap().len() > 1000, "transmitted frames in the pcap");
}
