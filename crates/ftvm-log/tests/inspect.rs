//! `ftvm log inspect`: the summary, its text and JSON forms, and the event list.

mod common;

use common::*;
use ftvm_log::*;

fn log_with_run() -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    for i in 0..100u64 {
        w.append(&Record::Clock { exit: i * 10, t: 2_000_000_000 + i * 10_000_000 }).unwrap();
        if i % 10 == 0 {
            w.append(&Record::Checkpoint { exit: i * 10, exits_hash: i, regs_hash: i }).unwrap();
        }
        if i % 4 == 0 {
            let line = format!("tick {i}\n").into_bytes();
            let r = Record::Output {
                exit: i * 10 + 1,
                ordinal: i / 4,
                kind: OUTPUT_CONSOLE,
                len: line.len() as u32,
                digest: hash64(&line),
                data: Some(line),
            };
            w.append(&r).unwrap();
        }
    }
    w.append(&Record::End { exit: 999, reason: EndReason::GuestPowerOff }).unwrap();
    w.into_inner().unwrap()
}

#[test]
fn summary_counts_everything() {
    let log = log_with_run();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("inspect-summary.ftvmlog");
    std::fs::write(&path, &log).unwrap();
    let ins = inspect(&path, true).unwrap();
    let s = &ins.summary;
    assert_eq!(s.header, header());
    assert_eq!(s.records, 100 + 10 + 25 + 1);
    assert_eq!((s.first_exit, s.last_exit), (Some(0), Some(999)));
    assert_eq!(s.guest_duration_ns, 990_000_000);
    assert_eq!(s.by_kind["CLOCK"].count, 100);
    assert_eq!(s.outputs, 25);
    assert_eq!(s.output_bytes, (0..100).step_by(4).map(|i| format!("tick {i}\n").len() as u64).sum::<u64>());
    assert_eq!(s.checkpoints, 10);
    assert_eq!(s.end, LogEnd::Complete { exit: 999, reason: EndReason::GuestPowerOff });
    assert_eq!(s.valid_bytes, log.len() as u64);
    let frame_bytes: u64 = s.by_kind.values().map(|k| k.bytes).sum();
    assert_eq!(s.header_bytes + frame_bytes, log.len() as u64);
    assert!(ins.is_complete());

    let events = ins.events.as_ref().unwrap();
    assert_eq!(events.len() as u64, s.records);
    assert_eq!(events[0].offset, s.header_bytes);
    assert!(events.windows(2).all(|w| w[1].lsn == w[0].lsn + 1 && w[1].offset == w[0].offset + w[0].bytes));

    let text = ins.to_string();
    for want in ["kernel", "/img/hello.elf", "guest time 0.990000000s", "CLOCK", "END at exit 999: guest power-off"] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(text.contains(r#"OUTPUT      exit=1 ordinal=0 console len=7 digest="#), "{text}");
    assert!(text.contains(r#""tick 0\n""#), "{text}");

    let json: serde_json::Value = serde_json::from_str(&ins.to_json()).unwrap();
    assert_eq!(json["summary"]["end"]["state"], "complete");
    assert_eq!(json["summary"]["by_kind"]["CHECKPOINT"]["count"], 10);
    assert_eq!(json["events"].as_array().unwrap().len() as u64, s.records);
    assert!(inspect(&path, false).unwrap().events.is_none());
}

#[test]
fn torn_and_corrupt_logs_are_summarized_up_to_the_damage() {
    let log = log_with_run();
    let torn = inspect_reader(&log[..log.len() - 3], false).unwrap();
    let LogEnd::EndsEarly { offset, torn: true } = torn.summary.end else { panic!("{:?}", torn.summary.end) };
    assert_eq!(offset, torn.summary.valid_bytes);
    assert!(torn.to_string().contains(&format!("log ends early at offset {offset}")));
    assert!(!torn.is_complete());

    let b = boundaries(&log);
    let clean_cut = inspect_reader(&log[..b[5] as usize], false).unwrap();
    assert_eq!(clean_cut.summary.end, LogEnd::EndsEarly { offset: b[5], torn: false });
    assert_eq!(clean_cut.summary.records, 5);

    let mut bad = log.clone();
    bad[b[7] as usize + 10] ^= 1;
    let c = inspect_reader(&bad[..], true).unwrap();
    let LogEnd::Corrupt { offset, error } = &c.summary.end else { panic!("{:?}", c.summary.end) };
    assert_eq!(*offset, b[7]);
    assert!(error.contains("CRC mismatch") && error.contains("frame 8"), "{error}");
    assert_eq!(c.summary.records, 7);
    assert!(c.to_string().contains("CORRUPT: corrupt log at byte offset"));

    assert!(matches!(inspect_reader(&b""[..], false), Err(LogError::Empty)));
    let missing = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such.ftvmlog");
    assert!(matches!(inspect(&missing, false), Err(LogError::Io(_))));
}
