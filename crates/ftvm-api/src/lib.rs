//! ftvm's control API: HTTP/1.1 with JSON bodies on a Unix socket, the convention Firecracker
//! and Cloud Hypervisor follow (`ftvm run --api-socket PATH`; `ftvm ctl PATH ...` is the
//! command-line client). Only std, serde and serde_json: the HTTP subset is written by hand
//! ([`http`]); one request per connection.
//!
//! Routes (docs/api.md has the fields and examples):
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /status` | 200, [`Status`] |
//! | `PUT /pause` | 200 `{"state":"paused"}` once the vCPU is parked; 202 `{"state":"pausing"}` if it has not reached a pause point within a second; 409 when the VM has stopped |
//! | `PUT /resume` | 200 `{"state":"running"}`; 400 when the VM is not paused |
//! | `PUT /snapshot` `{"dir": PATH}` | 202 `{"state":"snapshotting"}`: a live snapshot into PATH starts; 400 when PATH cannot take it; 409 while another runs |
//! | `GET /snapshot` | 200, [`SnapshotProgress`] of the latest snapshot; 404 if none was taken |
//! | `PUT /switchover` | 202 `{"state":"handing over"}` on a protected primary; 400 on any other role |
//! | `PUT /shutdown` | 202 `{"state":"shutting down"}`: as SIGTERM, the guest is asked to shut down (`--stop-timeout`); `{"state":"stopping"}` the second time or with `--stop-timeout 0`: stopped at once; 400 on a backup; 409 when the VM has stopped |
//! | `PUT /protect` `{"backup": "HOST:PORT"}` | 202 `{"state":"protecting"}`: a live state transfer to that backup starts; 400 on a VM that is not live or a bad address; 409 while one runs or with a backup already |
//! | `GET /protect` | 200, [`ProtectProgress`] of the latest re-protection or resync; 404 if none was started |
//! | `GET /metrics` | 200, the figures in the Prometheus text format ([`metrics`]) |
//! | `GET /events` | 200, a chunked stream of the pair's events, one JSON object a line ([`events`]) |
//!
//! Errors have a JSON body `{"error": "..."}`: 400 malformed request, 404 unknown path, 405
//! wrong method, 411/413 body length, 501 unsupported transfer coding or route, 503 more than 16 clients at once.
//!
//! The pieces:
//! - [`VmControl`]: what the VMM shares with the server. The vCPU thread publishes its
//!   figures into atomics between exits and parks there while a pause is requested; the
//!   server never waits on the vCPU except for the bounded pause acknowledgement, and the vCPU
//!   never waits on a client.
//! - [`ApiServer`]: the socket and its thread (stale sockets replaced, a live one refused,
//!   the file removed at exit).
//! - [`client`]: the requests `ftvm ctl` makes.

pub mod client;
mod control;
pub mod events;
pub mod http;
pub mod metrics;
mod protect;
mod server;
pub mod size;
mod snapshot;
mod status;

pub use control::{
    HoldHistogram, PairFigures, ProtectStarter, Refused, SnapshotStarter, SyncFigures, VcpuFigures, VmControl,
};
pub use protect::{ProtectPhase, ProtectProgress};
pub use server::{ApiServer, MetricsServer, ServerError};
pub use size::{parse_byte_size, parse_mem_mib, parse_mem_size};
pub use snapshot::{CopyRound, SnapshotPhase, SnapshotProgress};
pub use status::{
    format_bytes, format_rate, ExitCounts, LogStatus, OutputStages, PairStatus, Role, StageFigure, Status, SyncStatus,
    VmState,
};

/// The routes, for error messages and the docs.
pub const ROUTES: &str =
    "GET /status, GET /metrics, GET /events, PUT /pause, PUT /resume, PUT /switchover, PUT /shutdown, PUT /snapshot, GET /snapshot, PUT /protect, GET /protect";
