//! Wire formats of the pair's small messages (the log itself is the ftvm-log format).

/// "FTHB": a heartbeat datagram.
pub const HEARTBEAT_MAGIC: u32 = 0x4654_4842;
/// Handshake reply byte: the backup accepts the primary's header.
pub const HANDSHAKE_OK: u8 = 0x01;
/// Handshake reply byte: refused; a u32 length and a UTF-8 reason follow.
pub const HANDSHAKE_REFUSED: u8 = 0x02;

/// Who sent a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary = 1,
    Backup = 2,
}

/// A heartbeat: 29 bytes, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub role: Role,
    pub seq: u64,
    /// Primary: outputs performed so far (OUTPUT_DONE, cumulative). Backup: 0.
    pub outputs_done: u64,
    /// Backup: the last LSN acknowledged. Primary: the last LSN sent.
    pub lsn: u64,
}

impl Heartbeat {
    pub const LEN: usize = 29;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&HEARTBEAT_MAGIC.to_le_bytes());
        b[4] = self.role as u8;
        b[5..13].copy_from_slice(&self.seq.to_le_bytes());
        b[13..21].copy_from_slice(&self.outputs_done.to_le_bytes());
        b[21..29].copy_from_slice(&self.lsn.to_le_bytes());
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
        Some(Heartbeat { role, seq: u(5), outputs_done: u(13), lsn: u(21) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_round_trip_and_garbage_is_ignored() {
        let h = Heartbeat { role: Role::Primary, seq: 7, outputs_done: 42, lsn: 1000 };
        assert_eq!(Heartbeat::decode(&h.encode()), Some(h));
        assert_eq!(Heartbeat::decode(b"nonsense"), None);
        let mut bad = h.encode();
        bad[4] = 9;
        assert_eq!(Heartbeat::decode(&bad), None);
    }
}
