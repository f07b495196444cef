//! Joins the guest's consecutive TCP segments of one connection into one large segment for
//! the host to carry whole (generic segmentation offload: a `virtio_net_hdr` with
//! `GSO_TCPV4` in front of it, on a TAP opened with `IFF_VNET_HDR`).
//!
//! The guest's TCP (smoltcp) sends segments of the path's MSS, and each `write` into a TAP
//! carries one frame through the host's bridge, its netfilter hooks and the veth to the
//! receiving socket: a 100 KiB Redis reply was ~70 writes. Joined, the host's stack carries
//! one large segment per run, and splits it only if a link on its way needs that (a local
//! veth does not). Only what Linux's GSO would split back into exactly these segments is
//! joined: the same addresses, ports, acknowledgement, window and options, contiguous
//! sequence numbers, every segment but the last of the first one's size, no SYN, RST or
//! URG, and PSH or FIN on the last one only. Everything else goes out as it came. The
//! guest's TCP sends its connections' segments in turn (one each per round), so runs are
//! gathered per connection, as GRO does: a connection's frames keep their order, and a
//! run goes out at the place of its first segment.
//!
//! The segments are the guest's outputs, each logged, held and released one by one; this
//! joins only what is written to the host at once, after all of that.

use std::borrow::Cow;

use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4};

/// The `virtio_net_hdr` a TAP with `IFF_VNET_HDR` reads and writes before each frame.
pub const VNET_HDR_LEN: usize = 10;

/// A header for a frame that needs nothing from the host.
pub const PLAIN_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// The largest IPv4 packet.
const MAX_IP_LEN: usize = 65_535;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;

/// One write into the TAP: its header and its frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Write<'a> {
    pub hdr: [u8; VNET_HDR_LEN],
    /// The guest's frame as it is, or the joined one.
    pub frame: Cow<'a, [u8]>,
    /// How many of the guest's frames it carries.
    pub frames: usize,
}

/// What a frame is, if it is a TCP segment that may be joined to others.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// TCP header length.
    tcp_len: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

impl Segment {
    fn parse(f: &[u8]) -> Option<Segment> {
        // Ethernet II, IPv4 without options, not a fragment, TCP.
        if f.len() < ETH_LEN + IP_LEN + 20 || f[12..14] != [0x08, 0x00] {
            return None;
        }
        let ip = &f[ETH_LEN..];
        if ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 || ip[9] != 6 {
            return None;
        }
        let ip_total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ip_total != f.len() - ETH_LEN {
            return None;
        }
        let tcp = &ip[IP_LEN..];
        let tcp_len = usize::from(tcp[12] >> 4) * 4;
        if tcp_len < 20 || IP_LEN + tcp_len > ip_total {
            return None;
        }
        let flags = tcp[13];
        if flags & (TCP_SYN | TCP_RST | TCP_URG) != 0 || flags & TCP_ACK == 0 {
            return None;
        }
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        Some(Segment { tcp_len, seq, flags, payload: ip_total - IP_LEN - tcp_len })
    }
}

/// The bytes two segments of one run must share: the Ethernet addresses, the IP header but
/// its length, identification and checksum, and the TCP header but its sequence number,
/// flags and checksum.
fn same_connection(a: &[u8], b: &[u8], tcp_len: usize) -> bool {
    let ip = ETH_LEN;
    let tcp = ETH_LEN + IP_LEN;
    a[..ip + 2] == b[..ip + 2]
        && a[ip + 6..ip + 10] == b[ip + 6..ip + 10]
        && a[ip + 12..tcp] == b[ip + 12..tcp]
        && a[tcp..tcp + 4] == b[tcp..tcp + 4]
        && a[tcp + 8..tcp + 13] == b[tcp + 8..tcp + 13]
        && a[tcp + 14..tcp + 16] == b[tcp + 14..tcp + 16]
        && a[tcp + 18..tcp + tcp_len] == b[tcp + 18..tcp + tcp_len]
}

/// A TCP connection as a frame names it: source and destination address and port.
type Flow = [u8; 12];

/// The connection of any IPv4 TCP segment (joinable or not).
fn flow(f: &[u8]) -> Option<Flow> {
    if f.len() < ETH_LEN + IP_LEN || f[12..14] != [0x08, 0x00] || f[ETH_LEN] >> 4 != 4 || f[ETH_LEN + 9] != 6 {
        return None;
    }
    let tcp = ETH_LEN + usize::from(f[ETH_LEN] & 0xf) * 4;
    let ports = f.get(tcp..tcp + 4)?;
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&f[ETH_LEN + 12..ETH_LEN + 20]);
    key[8..].copy_from_slice(ports);
    Some(key)
}

/// A write being put together: one frame as it is, or a run of one connection's segments.
enum Pending<'a> {
    Plain(&'a [u8]),
    Run { frames: Vec<&'a [u8]>, head: Segment, last: Segment, total: usize },
}

/// The writes that carry `frames`: each connection's runs of joinable segments as one
/// write each, at the place of the run's first segment. Each connection's frames keep their
/// order; a run may pass other connections' frames (the guest's TCP sends its connections'
/// segments in turn, so theirs interleave).
pub fn coalesce(frames: &[Vec<u8>]) -> Vec<Write<'_>> {
    let mut pending: Vec<Pending<'_>> = Vec::with_capacity(frames.len());
    // Each connection's run that may still grow: its place in `pending`.
    let mut open: Vec<(Flow, usize)> = Vec::new();
    for f in frames {
        let key = flow(f);
        let slot = key.and_then(|k| open.iter().position(|(o, _)| *o == k));
        let seg = Segment::parse(f).filter(|s| s.payload > 0);
        if let (Some(seg), Some(slot)) = (seg, slot) {
            if let Pending::Run { frames: run, head, last, total } = &mut pending[open[slot].1] {
                if continues(run[0], *head, *last, *total, f, seg) {
                    run.push(f);
                    *last = seg;
                    *total += seg.payload;
                    continue;
                }
            }
        }
        // Not joined: the connection's open run ends here, and this frame follows it.
        if let Some(slot) = slot {
            open.swap_remove(slot);
        }
        match (seg, key) {
            (Some(seg), Some(key)) => {
                if seg.flags & (TCP_PSH | TCP_FIN) == 0 {
                    open.push((key, pending.len()));
                }
                pending.push(Pending::Run { frames: vec![f], head: seg, last: seg, total: seg.payload });
            }
            _ => pending.push(Pending::Plain(f)),
        }
    }
    pending
        .into_iter()
        .map(|p| match p {
            Pending::Plain(f) => Write { hdr: PLAIN_HDR, frame: Cow::Borrowed(f), frames: 1 },
            Pending::Run { frames, .. } if frames.len() == 1 => {
                Write { hdr: PLAIN_HDR, frame: Cow::Borrowed(frames[0]), frames: 1 }
            }
            Pending::Run { frames, head, last, total } => join(&frames, head, last.flags, total),
        })
        .collect()
}

/// Whether `next` continues the run that starts with `first` exactly as Linux's GSO would
/// cut it: the same connection and fields, contiguous, of the first one's size (the last
/// may be shorter), after no PSH or FIN, within the largest IP packet.
fn continues(first: &[u8], head: Segment, last: Segment, total: usize, next: &[u8], seg: Segment) -> bool {
    last.flags & (TCP_PSH | TCP_FIN) == 0
        && last.payload == head.payload
        && seg.tcp_len == head.tcp_len
        && seg.payload <= head.payload
        && seg.seq == last.seq.wrapping_add(last.payload as u32)
        && IP_LEN + head.tcp_len + total + seg.payload <= MAX_IP_LEN
        && same_connection(first, next, head.tcp_len)
}

/// One large segment of the run `run`, for the host to split at `head.payload` bytes.
fn join(run: &[&[u8]], head: Segment, last_flags: u8, total: usize) -> Write<'static> {
    let headers = ETH_LEN + IP_LEN + head.tcp_len;
    let mut frame = Vec::with_capacity(headers + total);
    frame.extend_from_slice(&run[0][..headers]);
    for f in run {
        frame.extend_from_slice(&f[headers..]);
    }
    let ip_total = IP_LEN + head.tcp_len + total;
    frame[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&(ip_total as u16).to_be_bytes());
    frame[ETH_LEN + 10..ETH_LEN + 12].fill(0);
    let ip_sum = !fold(sum(&frame[ETH_LEN..ETH_LEN + IP_LEN]));
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp = ETH_LEN + IP_LEN;
    // Linux's GSO puts PSH and FIN on the last segment it makes.
    frame[tcp + 13] |= last_flags & (TCP_PSH | TCP_FIN);
    // With NEEDS_CSUM the checksum field holds the pseudo-header's sum, uncomplemented.
    let tcp_total = (head.tcp_len + total) as u32;
    let pseudo = sum(&frame[ETH_LEN + 12..ETH_LEN + 20]) + 6 + tcp_total;
    frame[tcp + 16..tcp + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    hdr[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    hdr[2..4].copy_from_slice(&(headers as u16).to_le_bytes());
    hdr[4..6].copy_from_slice(&(head.payload as u16).to_le_bytes());
    hdr[6..8].copy_from_slice(&(tcp as u16).to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    Write { hdr, frame: Cow::Owned(frame), frames: run.len() }
}

/// The ones' complement sum of big-endian 16-bit words, unfolded.
fn sum(bytes: &[u8]) -> u32 {
    let mut s = 0u32;
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        s += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = words.remainder() {
        s += u32::from(*b) << 8;
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP segment from 10.0.0.2:6379 to 10.0.0.100:40000 with `payload`, checksums set.
    fn segment(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH_LEN + IP_LEN + 20];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = ETH_LEN;
        f[ip] = 0x45;
        f[ip + 2..ip + 4].copy_from_slice(&((IP_LEN + 20 + payload.len()) as u16).to_be_bytes());
        f[ip + 4..ip + 6].copy_from_slice(&(seq as u16).to_be_bytes());
        f[ip + 8] = 64;
        f[ip + 9] = 6;
        f[ip + 12..ip + 16].copy_from_slice(&[10, 0, 0, 2]);
        f[ip + 16..ip + 20].copy_from_slice(&[10, 0, 0, 100]);
        let tcp = ip + IP_LEN;
        f[tcp..tcp + 2].copy_from_slice(&6379u16.to_be_bytes());
        f[tcp + 2..tcp + 4].copy_from_slice(&40000u16.to_be_bytes());
        f[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
        f[tcp + 8..tcp + 12].copy_from_slice(&777u32.to_be_bytes());
        f[tcp + 12] = 5 << 4;
        f[tcp + 13] = flags;
        f[tcp + 14..tcp + 16].copy_from_slice(&64240u16.to_be_bytes());
        f.extend_from_slice(payload);
        let ip_sum = !fold(sum(&f[ip..ip + IP_LEN]));
        f[ip + 10..ip + 12].copy_from_slice(&ip_sum.to_be_bytes());
        let tcp_sum = !fold(sum(&f[ip + 12..ip + 20]) + 6 + (f.len() - tcp) as u32 + sum(&f[tcp..]));
        f[tcp + 16..tcp + 18].copy_from_slice(&tcp_sum.to_be_bytes());
        f
    }

    const ACK: u8 = TCP_ACK;

    #[test]
    fn a_run_of_full_segments_becomes_one_write_the_host_splits_back() {
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let frames = vec![
            segment(1000, ACK, &data[..1448]),
            segment(2448, ACK, &data[1448..2896]),
            segment(3896, ACK | TCP_PSH, &data[2896..]),
        ];
        let writes = coalesce(&frames);
        assert_eq!(writes.len(), 1);
        let w = &writes[0];
        assert_eq!(w.frames, 3);
        assert_eq!(w.frame.len(), ETH_LEN + IP_LEN + 20 + 3000);
        assert_eq!(&w.frame[ETH_LEN + IP_LEN + 20..], &data[..]);
        // The IP header: the whole length, a valid checksum.
        assert_eq!(u16::from_be_bytes([w.frame[16], w.frame[17]]) as usize, IP_LEN + 20 + 3000);
        assert_eq!(fold(sum(&w.frame[ETH_LEN..ETH_LEN + IP_LEN])), 0xffff);
        // TCP: the first segment's sequence number, PSH from the last, the pseudo-header's
        // sum in the checksum field: with the segment's own sum added it is complete.
        let tcp = ETH_LEN + IP_LEN;
        assert_eq!(&w.frame[tcp + 4..tcp + 8], &1000u32.to_be_bytes());
        assert_eq!(w.frame[tcp + 13], ACK | TCP_PSH);
        let mut check = w.frame.to_vec();
        let partial = u16::from_be_bytes([check[tcp + 16], check[tcp + 17]]);
        check[tcp + 16..tcp + 18].fill(0);
        let full = !fold(u32::from(partial) + sum(&check[tcp..]));
        let expected =
            !fold(sum(&check[ETH_LEN + 12..ETH_LEN + 20]) + 6 + (check.len() - tcp) as u32 + sum(&check[tcp..]));
        assert_eq!(full, expected);
        // The header: checksum needed, TCPv4 GSO at the first one's size.
        assert_eq!(w.hdr[0], VIRTIO_NET_HDR_F_NEEDS_CSUM as u8);
        assert_eq!(w.hdr[1], VIRTIO_NET_HDR_GSO_TCPV4 as u8);
        assert_eq!(u16::from_le_bytes([w.hdr[2], w.hdr[3]]), 54);
        assert_eq!(u16::from_le_bytes([w.hdr[4], w.hdr[5]]), 1448);
        assert_eq!(u16::from_le_bytes([w.hdr[6], w.hdr[7]]), 34);
        assert_eq!(u16::from_le_bytes([w.hdr[8], w.hdr[9]]), 16);
    }

    #[test]
    fn what_the_host_could_not_split_back_exactly_goes_out_as_it_came() {
        let p = [7u8; 100];
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("a gap in the sequence", vec![segment(1, ACK, &p), segment(500, ACK, &p)]),
            ("PSH before the end", vec![segment(1, ACK | TCP_PSH, &p), segment(101, ACK, &p)]),
            ("FIN before the end", vec![segment(1, ACK | TCP_FIN, &p), segment(101, ACK, &p)]),
            ("a SYN", vec![segment(1, ACK | TCP_SYN, &p), segment(101, ACK, &p)]),
            ("a longer one after", vec![segment(1, ACK, &p[..50]), segment(51, ACK, &p)]),
            ("a pure acknowledgement", vec![segment(1, ACK, &[]), segment(1, ACK, &[])]),
            ("no ACK", vec![segment(1, 0, &p), segment(101, 0, &p)]),
        ];
        for (what, frames) in cases {
            let writes = coalesce(&frames);
            assert_eq!(writes.len(), 2, "{what}");
            for (w, f) in writes.iter().zip(&frames) {
                assert_eq!((&w.hdr, &*w.frame, w.frames), (&PLAIN_HDR, &f[..], 1), "{what}");
            }
        }
        // A shorter one ends a run: the one after it starts another.
        let frames = vec![segment(1, ACK, &p), segment(101, ACK, &p[..50]), segment(151, ACK, &p)];
        assert_eq!(coalesce(&frames).iter().map(|w| w.frames).collect::<Vec<_>>(), [2, 1]);
        // Another connection (port) or acknowledgement number, and a frame that is not TCP.
        let mut other_port = segment(101, ACK, &p);
        other_port[ETH_LEN + IP_LEN + 3] ^= 1;
        let mut other_ack = segment(101, ACK, &p);
        other_ack[ETH_LEN + IP_LEN + 11] ^= 1;
        let arp = vec![0xffu8; 42];
        for second in [other_port, other_ack, arp] {
            let frames = vec![segment(1, ACK, &p), second];
            assert_eq!(coalesce(&frames).len(), 2);
        }
    }

    #[test]
    fn interleaved_connections_are_joined_each_and_keep_their_own_order() {
        let p = [3u8; 1000];
        let other = |seq: u32, flags: u8, payload: &[u8]| {
            let mut f = segment(seq, flags, payload);
            f[ETH_LEN + IP_LEN + 3] ^= 1; // another client port
            let tcp = ETH_LEN + IP_LEN;
            f[tcp + 16..tcp + 18].fill(0);
            f
        };
        let frames = vec![
            segment(1, ACK, &p),
            other(1, ACK, &p),
            segment(1001, ACK, &p),
            other(1001, ACK, &p),
            vec![0xffu8; 42],
            segment(2001, ACK | TCP_FIN, &p[..10]),
            other(2001, ACK, &[]), // a pure acknowledgement ends the other's run
            other(2001, ACK, &p),
        ];
        let writes = coalesce(&frames);
        let shape: Vec<(usize, usize)> = writes.iter().map(|w| (w.frames, w.frame.len())).collect();
        let h = ETH_LEN + IP_LEN + 20;
        assert_eq!(shape, [(3, h + 2010), (2, h + 2000), (1, 42), (1, h), (1, h + 1000)]);
        assert_eq!(writes[0].frame[ETH_LEN + IP_LEN + 13], ACK | TCP_FIN);
    }

    #[test]
    fn runs_stop_at_the_largest_ip_packet_and_keep_their_order() {
        let p = [1u8; 1448];
        let mut frames: Vec<Vec<u8>> = (0..60u32).map(|i| segment(1 + i * 1448, ACK, &p)).collect();
        frames.push(vec![0xffu8; 42]);
        frames.push(segment(1 + 60 * 1448, ACK, &p));
        let writes = coalesce(&frames);
        // 45 segments of 1448 fit in 65,535 - 40 bytes: 45, then the other 16 (the one
        // after the ARP joins them: the ARP is no part of the connection), then the ARP.
        let counts: Vec<usize> = writes.iter().map(|w| w.frames).collect();
        assert_eq!(counts, [45, 16, 1]);
        assert!(writes.iter().all(|w| w.frame.len() <= ETH_LEN + MAX_IP_LEN));
        let seqs: Vec<u32> = writes
            .iter()
            .filter(|w| w.frame.len() > 42)
            .map(|w| u32::from_be_bytes(w.frame[38..42].try_into().unwrap()))
            .collect();
        assert_eq!(seqs, [1, 1 + 45 * 1448]);
    }
}
