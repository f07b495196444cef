//! Wire formats of the pair's small messages (the log itself is the ftvm-log format).

/// "FTHB": a heartbeat datagram.
pub const HEARTBEAT_MAGIC: u32 = 0x4654_4842;
/// Handshake reply byte: the backup accepts the primary's header.
pub const HANDSHAKE_OK: u8 = 0x01;
/// Handshake reply byte: refused; a u32 length and a UTF-8 reason follow.
pub const HANDSHAKE_REFUSED: u8 = 0x02;

/// The first byte a primary sends on a new connection: the log from the VM's boot follows.
pub const MODE_BOOT: u8 = b'B';
/// The first byte of a re-protection or a resync: a live state transfer, then the log from
/// the point where the state was taken.
pub const MODE_TRANSFER: u8 = b'T';
/// The first byte of a preflight (`ftvm doctor primary`): a log header follows, the backup
/// answers whether its VM agrees, and the connection ends; the backup goes on waiting.
pub const MODE_PROBE: u8 = b'P';

/// State-transfer records (after `MODE_TRANSFER` and the accepted transfer header): a file
/// of the staged snapshot begins (u16 name length, name, u64 size).
pub const XFER_FILE: u8 = 1;
/// Data of the current file: u64 offset, u32 length, bytes (only non-zero extents are sent).
pub const XFER_DATA: u8 = 2;
/// The snapshot manifest (u32 length, JSON); the transfer is complete, the log follows.
pub const XFER_MANIFEST: u8 = 3;
/// Largest data record of a transfer.
pub const XFER_CHUNK: usize = 1 << 20;

/// An acknowledgement (16 bytes, little-endian): the log is received and verified up to
/// `lsn`; and the backup's own time on the frame that ended there, measured on its clock:
/// from reading the frame off the socket to verifying it, and from there to writing this
/// (both 0 when it does not measure). The primary splits an output's hold by them without
/// comparing the two hosts' clocks (see `stages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub lsn: u64,
    pub verify_ns: u64,
    pub ack_ns: u64,
}

impl Ack {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.lsn.to_le_bytes());
        b[8..12].copy_from_slice(&(self.verify_ns.min(u32::MAX as u64) as u32).to_le_bytes());
        b[12..16].copy_from_slice(&(self.ack_ns.min(u32::MAX as u64) as u32).to_le_bytes());
        b
    }

    /// The fields after the LSN (the first 8 bytes, read first: they may be [`ACK_RESYNC`]).
    pub fn decode(lsn: u64, rest: &[u8; 8]) -> Ack {
        let u = |o: usize| u32::from_le_bytes(rest[o..o + 4].try_into().unwrap()) as u64;
        Ack { lsn, verify_ns: u(0), ack_ns: u(4) }
    }
}

/// In place of an acknowledgement: the backup diverged and asks for a resync; a u32 length
/// and a UTF-8 description of the divergence follow, then the backup closes the connection.
pub const ACK_RESYNC: u64 = u64::MAX;

/// Heartbeat flag (primary): every output performed so far was acknowledged first, and every
/// later one will be: the backup may go live if this primary dies. Set from the start of a
/// pair formed at boot; after a state transfer, once the backup has caught up.
pub const FLAG_PROTECTED: u8 = 0x01;
/// Heartbeat flag (primary): switchover, the backup is to take over now.
pub const FLAG_HANDOVER: u8 = 0x02;
/// Heartbeat flag (backup): diverged, waiting for a resync (never goes live like this).
pub const FLAG_DIVERGED: u8 = 0x04;

/// Who sent a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary = 1,
    Backup = 2,
}

/// A heartbeat: 38 bytes, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub role: Role,
    pub flags: u8,
    pub seq: u64,
    /// Primary: outputs performed so far (OUTPUT_DONE, cumulative). Backup: 0.
    pub outputs_done: u64,
    /// Backup: the last LSN acknowledged. Primary: the last LSN sent.
    pub lsn: u64,
    /// Backup: the last LSN its replay consumed (the primary measures the lag by it).
    pub replayed: u64,
}

impl Heartbeat {
    pub const LEN: usize = 38;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&HEARTBEAT_MAGIC.to_le_bytes());
        b[4] = self.role as u8;
        b[5..13].copy_from_slice(&self.seq.to_le_bytes());
        b[13..21].copy_from_slice(&self.outputs_done.to_le_bytes());
        b[21..29].copy_from_slice(&self.lsn.to_le_bytes());
        b[29] = self.flags;
        b[30..38].copy_from_slice(&self.replayed.to_le_bytes());
        b
    }

    /// Decodes a datagram; anything that is not a well-formed heartbeat is `None`.
    pub fn decode(b: &[u8]) -> Option<Heartbeat> {
        if b.len() != Self::LEN || u32::from_le_bytes(b[0..4].try_into().ok()?) != HEARTBEAT_MAGIC {
            return None;
        }
        let role = match b[4] {
            1 => Role::Primary,
            2 => Role::Backup,
            _ => return None,
        };
        let u = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        Some(Heartbeat { role, flags: b[29], seq: u(5), outputs_done: u(13), lsn: u(21), replayed: u(30) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_round_trip_and_garbage_is_ignored() {
        let h = Heartbeat {
            role: Role::Primary,
            flags: FLAG_PROTECTED,
            seq: 7,
            outputs_done: 42,
            lsn: 1000,
            replayed: 990,
        };
        assert_eq!(Heartbeat::decode(&h.encode()), Some(h));
        assert_eq!(Heartbeat::decode(b"nonsense"), None);
        let mut bad = h.encode();
        bad[4] = 9;
        assert_eq!(Heartbeat::decode(&bad), None);
    }

    #[test]
    fn acknowledgements_round_trip() {
        let a = Ack { lsn: 77, verify_ns: 12_345, ack_ns: 678 };
        let b = a.encode();
        assert_eq!(Ack::decode(u64::from_le_bytes(b[..8].try_into().unwrap()), b[8..].try_into().unwrap()), a);
    }
}
