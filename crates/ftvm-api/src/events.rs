//! The pair's events as JSON lines (`GET /events`): whoever turns an event into a line (the
//! CLI's tracing layer, from the `ftvm::event` events the library crates emit) publishes it
//! here; each follower of `/events` gets the recent ones and then every new one.
//!
//! Publishing never blocks (it runs on the vCPU and replication threads): a follower whose
//! queue is full, because it does not read, is dropped and its connection ends.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// How many recent events a new follower gets first.
pub const BACKLOG: usize = 256;
/// How many events may wait for a follower that does not read.
const QUEUE: usize = 1024;

#[derive(Default)]
struct Hub {
    next_seq: u64,
    recent: VecDeque<String>,
    followers: Vec<SyncSender<String>>,
}

fn hub() -> MutexGuard<'static, Hub> {
    static HUB: OnceLock<Mutex<Hub>> = OnceLock::new();
    ftvm_sync::lock(HUB.get_or_init(Mutex::default))
}

/// Publishes one event: `fields` is a JSON object (the event's fields); `seq` (its number in
/// this process, from 0) is added to it. Returns the line sent.
pub fn publish(mut fields: serde_json::Map<String, serde_json::Value>) -> String {
    let mut hub = hub();
    let seq = hub.next_seq;
    hub.next_seq += 1;
    fields.insert("seq".into(), seq.into());
    let line = serde_json::Value::Object(fields).to_string();
    if hub.recent.len() == BACKLOG {
        hub.recent.pop_front();
    }
    hub.recent.push_back(line.clone());
    hub.followers.retain(|f| match f.try_send(line.clone()) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            tracing::warn!("an /events follower does not read; dropping it");
            false
        }
        Err(TrySendError::Disconnected(_)) => false,
    });
    line
}

/// A new follower: the recent events (oldest first) and a receiver of the next ones.
pub fn follow() -> (Vec<String>, Receiver<String>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    let mut hub = hub();
    hub.followers.push(tx);
    (hub.recent.iter().cloned().collect(), rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_gets_the_backlog_then_new_events_in_order() {
        let mut first = serde_json::Map::new();
        first.insert("event".into(), "test-a".into());
        publish(first);
        let (recent, rx) = follow();
        assert!(recent.iter().any(|l| l.contains("\"test-a\"")), "{recent:?}");
        let mut second = serde_json::Map::new();
        second.insert("event".into(), "test-b".into());
        let line = publish(second);
        let got = rx.recv_timeout(std::time::Duration::from_secs(1)).unwrap();
        assert_eq!(got, line);
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["event"], "test-b");
        assert!(v["seq"].as_u64().is_some());
    }
}
