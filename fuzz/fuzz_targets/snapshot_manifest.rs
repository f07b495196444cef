//! Opening a snapshot must never panic and never act on a manifest's word before checking it
//! (crates/ftvm-machine/src/snapshot.rs: `Snapshot::open`, the manifest's parse and
//! `check_manifest`, and the VM state's decode), whatever `snapshot.json` and `state.bin` hold.
//!
//! Each input writes a snapshot directory (in /dev/shm when there is one) and opens it. The
//! first byte picks what the rest is:
//! - 0: `snapshot.json` itself, raw;
//! - 1: edits of a valid manifest, so that the fuzzer reaches the checks without discovering
//!   its JSON: `[field][kind][8 bytes]...` sets field `field % FIELDS` (see [`FIELDS`]) to a
//!   number, a negative number, a float, a string, a list of copies of a valid entry, or null;
//! - 2: `state.bin`, under a valid manifest that names its true size and checksum (so the
//!   bytes reach the VM state's decoder and the guest-time check).
//!
//! Properties: every refusal is a typed error (`ftvm_vmm::Error`) with a message; a snapshot
//! that opens has values within the bounds `check_manifest` enforces.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ftvm_vmm::snapshot::{Snapshot, FORMAT, VERSION};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn scratch() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("ftvm-fuzz-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("snap")).expect("a scratch directory");
        // No snapshot key of this user is read, nor made.
        std::env::set_var("FTVM_STATE_DIR", dir.join("state"));
        std::fs::write(dir.join("snap/memory.bin"), b"").expect("memory.bin");
        std::fs::write(dir.join("snap/disk0.img"), b"").expect("disk0.img");
        dir
    })
}

/// A manifest that passes every check but the state file's checksum.
fn template(state: &[u8]) -> Value {
    let vm = ftvm_log::LogHeader {
        memory_size: 4 * MIB,
        memory_layout: vec![ftvm_log::MemRegion { start: 0, size: 4 * MIB }],
        ..Default::default()
    };
    json!({
        "format": FORMAT,
        "version": VERSION,
        "ftvm_version": "fuzz",
        "device_state_version": ftvm_devices::DEVICE_STATE_VERSION,
        "vm": serde_json::to_value(&vm).expect("a header"),
        "created_unix": 0,
        "guest_time_ns": 0,
        "state": { "file": "state.bin", "size": state.len(), "xxh3": format!("{:016x}", ftvm_log::hash64(state)) },
        "memory": { "file": "memory.bin", "size": 4 * MIB, "xxh3": "0000000000000000" },
        "disks": [{ "source": "/nonexistent/disk.img", "readonly": false,
                    "copy": { "file": "disk0.img", "size": 0, "xxh3": "0000000000000000" } }],
        "rounds": [{ "pages": 1, "disk_bytes": 0, "ms": 0.5 }],
        "pause_ms": 1.0,
    })
}

/// The fields mode 1 edits, as JSON pointers.
const FIELDS: &[&str] = &[
    "/format",
    "/version",
    "/device_state_version",
    "/guest_time_ns",
    "/pause_ms",
    "/rounds",
    "/rounds/0/ms",
    "/memory/size",
    "/memory/file",
    "/state/size",
    "/state/file",
    "/state/xxh3",
    "/vm/memory_size",
    "/vm/memory_layout",
    "/vm/memory_layout/0/size",
    "/vm/memory_layout/0/start",
    "/disks",
    "/disks/0/readonly",
    "/disks/0/copy",
    "/disks/0/copy/size",
    "/disks/0/copy/file",
    "/disks/0/source",
    "/vm/disks",
    "/vm/cpuid",
    "/vm",
];

fn edit(manifest: &mut Value, mut ops: &[u8]) {
    while let [field, kind, rest @ ..] = ops {
        let mut raw = [0u8; 8];
        let n = rest.len().min(8);
        raw[..n].copy_from_slice(&rest[..n]);
        ops = &rest[n..];
        let v = u64::from_le_bytes(raw);
        let pointer = FIELDS[usize::from(*field) % FIELDS.len()];
        let Some(slot) = manifest.pointer_mut(pointer) else { continue };
        let copy = slot.clone();
        *slot = match kind % 8 {
            0 => json!(v),
            1 => json!(v as i64),
            2 => json!(f64::from_bits(v)),
            3 => json!(String::from_utf8_lossy(&raw)),
            4 => json!(v % (1 << 32)),
            // A list of n copies of what was there (or of its first element).
            5 => {
                let item = copy.as_array().and_then(|a| a.first().cloned()).unwrap_or(copy);
                Value::Array(vec![item; (v % 100) as usize])
            }
            6 => Value::Null,
            _ => json!(v.trailing_zeros() as u64 * MIB),
        };
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let dir = scratch().join("snap");
    let (manifest, state): (Vec<u8>, &[u8]) = match mode % 3 {
        0 => (rest.to_vec(), b"state"),
        1 => {
            let mut m = template(b"state");
            edit(&mut m, rest);
            (serde_json::to_vec(&m).expect("JSON"), b"state")
        }
        _ => (serde_json::to_vec(&template(rest)).expect("JSON"), rest),
    };
    std::fs::write(dir.join("snapshot.json"), &manifest).expect("snapshot.json");
    std::fs::write(dir.join("state.bin"), state).expect("state.bin");
    match Snapshot::open(&dir) {
        Ok(snap) => {
            let m = &snap.manifest;
            assert!(m.guest_time_ns <= ftvm_vmm::snapshot::MAX_GUEST_TIME_NS);
            assert!(m.disks.len() <= 16 && m.rounds.len() <= 64 && m.vm.memory_layout.len() <= 8);
            assert!(m.pause_ms.is_finite() && m.pause_ms >= 0.0);
            assert_eq!(m.vm.memory_size, m.memory.size);
            assert_eq!(snap.state.clock.guest_now, m.guest_time_ns);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
