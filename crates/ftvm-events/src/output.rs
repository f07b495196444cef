//! Outputs: what the guest sends to the outside world (console bytes, transmitted frames), and
//! the rule that decides when they are performed. The vCPU loop hands every output to an
//! [`OutputGate`]; the fault-tolerant pair's gates (ftvm-replication) hold them until the
//! backup has the log up to them, a plain run has none and performs them at once.

/// What the event source knows of an output it was handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputTicket {
    /// The output's ordinal (its id in the log; outputs are numbered from 0 in log order).
    pub ordinal: u64,
    /// The LSN of its OUTPUT record (record mode, when the log took it).
    pub lsn: Option<u64>,
}

/// Where an output goes when it is performed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputTarget {
    Console,
    Net(usize),
}

/// Performs outputs: the console and the network devices' TAPs.
pub trait OutputSinks: Send {
    fn perform(&mut self, target: OutputTarget, bytes: &[u8]);
}

/// Takes the outputs the guest produces. `submit` returns the bytes if the caller is to
/// perform them now (an unprotected VM), or keeps them (held until acknowledged, or held by
/// a backup for a failover).
pub trait OutputGate: Send {
    fn submit(&mut self, ticket: OutputTicket, target: OutputTarget, bytes: Vec<u8>) -> Option<Vec<u8>>;
    /// Outputs waiting (held by a primary, or replayed and not yet covered on a backup).
    fn held(&self) -> usize;
    /// A backup going live: the replayed outputs OUTPUT_DONE did not cover, in order, to be
    /// performed now (the failover rule, docs/replication.md); from now on `submit` returns every
    /// output for immediate performance.
    fn go_live(&mut self) -> Vec<(OutputTarget, Vec<u8>)> {
        Vec::new()
    }
    /// Called before an output is logged (crash window 1 of the test switches).
    fn before_output(&mut self) {}
    /// The VM is about to log its END: the peer leaving from now on is expected.
    fn finish(&mut self) {}
    /// Switchover: wait until every output was acknowledged and performed, then tell the
    /// backup to take over (the caller exits, releasing the arbiter).
    fn handover(&mut self) {}
    /// Between exits, with the log's next LSN: a primary whose backup lags by more than
    /// its bound slows the vCPU down here.
    fn pace(&mut self, _next_lsn: Option<u64>) {}
    /// Waits (briefly) until every output handed over so far was performed: a link that is
    /// being replaced lets its outputs go first.
    fn drain(&mut self) {}
}
