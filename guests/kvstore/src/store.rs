//! The key space and the commands: each command updates the map, appends its change to
//! the log's open batch (if there is a log) and writes its reply. The caller sends the
//! replies only after the batch is durable (`Log::commit`).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use ftvm_guest_kit::virtio::net::Stats as NetStats;

use crate::log::{Change, Log, KIND_DEL, KIND_FLUSHALL, KIND_SET};
use crate::resp;

/// What the connection does after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Send the replies, then close (QUIT).
    Close,
}

/// Command counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub commands: u64,
    pub writes: u64,
}

/// The data: binary-safe keys and values.
#[derive(Default)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    pub stats: Stats,
    /// The network driver's counters, refreshed by the server for INFO.
    pub net: NetStats,
    scratch: Vec<u8>,
    /// `kvstore.rdtsc=1` (the `rdtsc` build, kvstore-rdtsc.elf): every PING reads the TSC in
    /// ring 3 and keeps it here. This breaks the determinism contract on purpose (RDTSC does
    /// not exit, so no monitor can log it): a replay computes another value, and the pair's
    /// tests see the divergence.
    pub rdtsc: bool,
    /// Written, never read: the value only has to land in guest memory, where a replay's
    /// checkpoint hashes see it differ.
    #[allow(dead_code)]
    pub last_tsc: u64,
}

/// Where writes are recorded.
pub enum Journal {
    /// No disk: in memory only.
    Memory,
    /// The log on the virtio disk.
    Disk(Box<Log>),
}

impl Journal {
    /// Checks that a write with a `payload`-byte log record can be accepted; else writes
    /// the error reply.
    fn admit(&self, payload: usize, out: &mut Vec<u8>) -> bool {
        match self {
            Journal::Memory => true,
            Journal::Disk(log) if log.read_only() => {
                resp::error(out, "READONLY the kvstore disk is read-only");
                false
            }
            Journal::Disk(log) if !log.has_room(payload) => {
                resp::error(out, "ERR kvstore log is full (disk exhausted)");
                false
            }
            Journal::Disk(_) => true,
        }
    }

    fn log(&mut self) -> Option<&mut Log> {
        match self {
            Journal::Memory => None,
            Journal::Disk(log) => Some(log),
        }
    }
}

fn eq_ignore_case(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

fn wrong_arity(out: &mut Vec<u8>, name: &[u8]) {
    out.extend_from_slice(b"-ERR wrong number of arguments for '");
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    out.extend_from_slice(b"' command\r\n");
}

fn unknown_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    // Redis's wording; arguments are shown up to a sane length.
    out.extend_from_slice(b"-ERR unknown command '");
    out.extend(args[0].iter().take(128).map(|&b| if b < b' ' { b' ' } else { b }));
    out.extend_from_slice(b"', with args beginning with: ");
    for arg in args[1..].iter().take(8) {
        out.push(b'\'');
        out.extend(arg.iter().take(64).map(|&b| if b < b' ' { b' ' } else { b }));
        out.extend_from_slice(b"' ");
    }
    out.extend_from_slice(b"\r\n");
}

/// Log payload size of a SET record with these pairs.
fn set_payload<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> usize {
    4 + pairs.map(|(key, value)| 8 + key.len() + value.len()).sum::<usize>()
}

fn parse_i64(bytes: &[u8]) -> Option<i64> {
    // Redis accepts only the canonical form: no '+', no spaces, no leading zeros.
    let text = core::str::from_utf8(bytes).ok()?;
    let odd =
        text.is_empty() || text.starts_with('+') || text.starts_with("-0") || (text.len() > 1 && text.starts_with('0'));
    if odd {
        return None;
    }
    text.parse().ok()
}

impl Store {
    /// Applies a change read back from the log.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Set(key, value) => {
                self.map.insert(key.to_vec(), value.to_vec());
            }
            Change::Del(key) => {
                self.map.remove(key);
            }
            Change::FlushAll => self.map.clear(),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Runs one command, appending its reply to `out`.
    pub fn execute(&mut self, args: &[&[u8]], journal: &mut Journal, out: &mut Vec<u8>) -> Flow {
        self.stats.commands += 1;
        let name = args[0];
        let argc = args.len();
        // (name, arity: exact if positive, minimum if negative), as in Redis's command table.
        const TABLE: &[(&str, isize)] = &[
            ("GET", 2),
            ("SET", -3),
            ("PING", -1),
            ("ECHO", 2),
            ("DEL", -2),
            ("EXISTS", -2),
            ("INCR", 2),
            ("MSET", -3),
            ("MGET", -2),
            ("DBSIZE", 1),
            ("FLUSHALL", -1),
            ("FLUSHDB", -1),
            ("CONFIG", -2),
            ("COMMAND", -1),
            ("SELECT", 2),
            ("QUIT", -1),
            ("INFO", -1),
        ];
        let Some(&(command, arity)) = TABLE.iter().find(|(command, _)| eq_ignore_case(name, command)) else {
            unknown_command(out, args);
            return Flow::Continue;
        };
        let arity_ok = if arity > 0 { argc == arity as usize } else { argc >= arity.unsigned_abs() };
        if !arity_ok {
            wrong_arity(out, name);
            return Flow::Continue;
        }
        match command {
            "GET" => match self.map.get(args[1]) {
                Some(value) => resp::bulk(out, value),
                None => resp::null(out),
            },
            "SET" => self.set(args, journal, out),
            #[cfg(feature = "rdtsc")]
            "PING" if self.rdtsc => {
                self.last_tsc = read_tsc();
                match argc {
                    1 => resp::simple(out, "PONG"),
                    _ => resp::bulk(out, args[1]),
                }
            }
            "PING" => match argc {
                1 => resp::simple(out, "PONG"),
                2 => resp::bulk(out, args[1]),
                _ => wrong_arity(out, name),
            },
            "ECHO" => resp::bulk(out, args[1]),
            "DEL" => self.del(&args[1..], journal, out),
            "EXISTS" => {
                let count = args[1..].iter().filter(|key| self.map.contains_key(**key)).count();
                resp::integer(out, count as i64);
            }
            "INCR" => self.incr(args[1], journal, out),
            "MSET" => {
                if argc % 2 != 1 {
                    wrong_arity(out, name);
                } else {
                    let pairs = args[1..].chunks_exact(2).map(|pair| (pair[0], pair[1]));
                    if self.set_pairs(pairs, journal, out) {
                        resp::simple(out, "OK");
                    }
                }
            }
            "MGET" => {
                resp::array(out, argc - 1);
                for key in &args[1..] {
                    match self.map.get(*key) {
                        Some(value) => resp::bulk(out, value),
                        None => resp::null(out),
                    }
                }
            }
            "DBSIZE" => resp::integer(out, self.map.len() as i64),
            "FLUSHALL" | "FLUSHDB" => {
                // Optional ASYNC/SYNC: both flush at once here.
                if argc > 2 || (argc == 2 && !eq_ignore_case(args[1], "ASYNC") && !eq_ignore_case(args[1], "SYNC")) {
                    resp::error(out, "ERR syntax error");
                } else if journal.admit(0, out) {
                    if let Some(log) = journal.log() {
                        let at = log.begin_record(KIND_FLUSHALL);
                        log.end_record(at);
                    }
                    self.map.clear();
                    self.stats.writes += 1;
                    resp::simple(out, "OK");
                }
            }
            "CONFIG" => self.config(args, out),
            // redis-cli asks for command docs when interactive; an empty answer is fine.
            "COMMAND" => resp::array(out, 0),
            "SELECT" => match args[1] {
                b"0" => resp::simple(out, "OK"),
                _ => resp::error(out, "ERR DB index is out of range"),
            },
            "QUIT" => {
                resp::simple(out, "OK");
                return Flow::Close;
            }
            "INFO" => self.info(journal, out),
            _ => unreachable!("every table entry has an arm"),
        }
        Flow::Continue
    }

    /// SET key value [NX|XX]
    fn set(&mut self, args: &[&[u8]], journal: &mut Journal, out: &mut Vec<u8>) {
        let (key, value) = (args[1], args[2]);
        let mut nx = false;
        let mut xx = false;
        for option in &args[3..] {
            if eq_ignore_case(option, "NX") {
                nx = true;
            } else if eq_ignore_case(option, "XX") {
                xx = true;
            } else {
                resp::error(out, "ERR syntax error");
                return;
            }
        }
        if nx && xx {
            resp::error(out, "ERR syntax error");
            return;
        }
        let exists = self.map.contains_key(key);
        if (nx && exists) || (xx && !exists) {
            resp::null(out);
            return;
        }
        if self.set_pairs(core::iter::once((key, value)), journal, out) {
            resp::simple(out, "OK");
        }
    }

    /// Sets every pair (SET, MSET, INCR) as one log record. False (with the error reply
    /// written) if the journal cannot take it; the caller writes the success reply.
    fn set_pairs<'a>(
        &mut self,
        pairs: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
        journal: &mut Journal,
        out: &mut Vec<u8>,
    ) -> bool {
        if !journal.admit(set_payload(pairs.clone()), out) {
            return false;
        }
        if let Some(log) = journal.log() {
            let at = log.begin_record(KIND_SET);
            log.push_u32(pairs.clone().count() as u32);
            for (key, value) in pairs.clone() {
                log.push_bytes(key);
                log.push_bytes(value);
            }
            log.end_record(at);
        }
        for (key, value) in pairs {
            match self.map.get_mut(key) {
                // Reuse the allocation when the key exists (the common benchmark case).
                Some(slot) => {
                    slot.clear();
                    slot.extend_from_slice(value);
                }
                None => {
                    self.map.insert(key.to_vec(), value.to_vec());
                }
            }
        }
        self.stats.writes += 1;
        true
    }

    fn del(&mut self, keys: &[&[u8]], journal: &mut Journal, out: &mut Vec<u8>) {
        // Only keys that exist change anything; count duplicates once, as Redis does.
        let mut present: Vec<&[u8]> = Vec::new();
        for key in keys {
            if self.map.contains_key(*key) && !present.contains(key) {
                present.push(key);
            }
        }
        if !present.is_empty() {
            let payload = 4 + present.iter().map(|key| 4 + key.len()).sum::<usize>();
            if !journal.admit(payload, out) {
                return;
            }
            if let Some(log) = journal.log() {
                let at = log.begin_record(KIND_DEL);
                log.push_u32(present.len() as u32);
                for key in &present {
                    log.push_bytes(key);
                }
                log.end_record(at);
            }
            for key in &present {
                self.map.remove(*key);
            }
            self.stats.writes += 1;
        }
        resp::integer(out, present.len() as i64);
    }

    fn incr(&mut self, key: &[u8], journal: &mut Journal, out: &mut Vec<u8>) {
        let current = match self.map.get(key) {
            None => 0,
            Some(value) => match parse_i64(value) {
                Some(number) => number,
                None => {
                    resp::error(out, "ERR value is not an integer or out of range");
                    return;
                }
            },
        };
        let Some(next) = current.checked_add(1) else {
            resp::error(out, "ERR increment or decrement would overflow");
            return;
        };
        let mut text = core::mem::take(&mut self.scratch);
        resp::format_i64(next, &mut text);
        // Logged as the SET it amounts to, so replay needs no arithmetic.
        if self.set_pairs(core::iter::once((key, &text[..])), journal, out) {
            resp::integer(out, next);
        }
        self.scratch = text;
    }

    /// CONFIG GET: the answers redis-benchmark asks for, like a real Redis would give them.
    fn config(&mut self, args: &[&[u8]], out: &mut Vec<u8>) {
        if !eq_ignore_case(args[1], "GET") {
            resp::error(out, "ERR CONFIG subcommand not supported by kvstore (only CONFIG GET)");
            return;
        }
        if args.len() != 3 {
            wrong_arity(out, b"config|get");
            return;
        }
        const PARAMS: &[(&str, &str)] = &[("save", ""), ("appendonly", "yes"), ("appendfsync", "always")];
        match PARAMS.iter().find(|(name, _)| eq_ignore_case(args[2], name)) {
            Some((name, value)) => {
                resp::array(out, 2);
                resp::bulk(out, name.as_bytes());
                resp::bulk(out, value.as_bytes());
            }
            None => resp::array(out, 0),
        }
    }

    fn info(&self, journal: &Journal, out: &mut Vec<u8>) {
        use core::fmt::Write;
        let mut text = alloc::string::String::new();
        let _ = write!(
            text,
            "# kvstore\r\nkeys:{}\r\ncommands:{}\r\nwrites:{}\r\nticks:{}\r\n",
            self.map.len(),
            self.stats.commands,
            self.stats.writes,
            ftvm_guest_kit::time::ticks()
        );
        if let Journal::Disk(log) = journal {
            let (stats, blk, (used, size)) = (log.stats(), log.blk_stats(), log.usage());
            let _ = write!(
                text,
                "log_commits:{}\r\nlog_records:{}\r\nlog_bytes_used:{used}\r\nlog_bytes_size:{size}\r\n\
                 blk_requests:{}\r\nblk_notifies:{}\r\nblk_flushes:{}\r\n",
                stats.commits, stats.records, blk.requests, blk.notifies, blk.flushes
            );
        } else {
            text.push_str("log:none (in memory)\r\n");
        }
        let net = self.net;
        let _ = write!(
            text,
            "net_rx_frames:{}\r\nnet_tx_frames:{}\r\nnet_tx_dropped:{}\r\nnet_rx_notifies:{}\r\n\
             net_tx_notifies:{}\r\nnet_irqs:{}\r\n",
            net.rx_frames, net.tx_frames, net.tx_dropped, net.rx_notifies, net.tx_notifies, net.irqs
        );
        resp::bulk(out, text.as_bytes());
    }
}

/// The time-stamp counter, read in ring 3 (not through any device: non-deterministic).
#[cfg(feature = "rdtsc")]
fn read_tsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC reads a counter into EDX:EAX; it touches no memory.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}
