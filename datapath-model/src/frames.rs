//! Hostile frames, made from any bytes (a fuzzer's input or a seeded generator's): mostly aimed
//! at the world's entries (so that hits, near misses and rewrites are common), with VLAN tags,
//! IPv4 options and fragments, IPv6 extension chains and fragments, every UDP length, right and
//! wrong checksums (also the partial ones a container host sends), Ethernet padding, and then
//! cut short or with octets flipped.

use arbitrary::{Result, Unstructured};
use gateway_common::{Addr16, framing};

use crate::{
    checksum,
    world::{AID, End, World},
};

/// The shortest frame a test run takes (an Ethernet header).
pub const MIN_FRAME: usize = 14;
/// The longest frame made: a full Ethernet frame with two VLAN tags.
pub const MAX_FRAME: usize = 1522;

/// IPv6 extension header numbers, the walked ones and the others.
const EXTENSIONS: [u8; 10] = [0, 43, 44, 51, 60, 135, 139, 140, 253, 254];

fn is_v4(addr: &Addr16) -> bool {
    addr[..10] == [0; 10] && addr[10..12] == [0xff, 0xff]
}

/// Where a frame is aimed.
struct Aim {
    src: End,
    dst: End,
    /// The framing header a client would put in front of its payload, if any.
    framing: Vec<u8>,
}

fn any_addr(u: &mut Unstructured, world: &World, v6: bool) -> Result<Addr16> {
    let known: Vec<Addr16> = world
        .addresses()
        .into_iter()
        .filter(|a| is_v4(a) != v6)
        .collect();
    if u.ratio(7, 8)? {
        return Ok(*u.choose(&known)?);
    }
    let mut addr: Addr16 = u.arbitrary()?;
    if !v6 {
        addr[..10].fill(0);
        addr[10] = 0xff;
        addr[11] = 0xff;
    }
    Ok(addr)
}

fn any_port(u: &mut Unstructured, world: &World) -> Result<u16> {
    if u.ratio(7, 8)? {
        Ok(*u.choose(&world.ports())?)
    } else {
        u.arbitrary()
    }
}

/// A client's framing header to `remote`: SOCKS5 naming it (IPv4, IPv6, or a name), or the
/// enhanced mode's with the AID, each sometimes with a wrong field.
fn client_framing(u: &mut Unstructured, style: u32, remote: End) -> Result<Vec<u8>> {
    let mut header = if style == framing::ENHANCED {
        let mut h = vec![0, 0, 0, 0];
        h.extend_from_slice(&AID.to_be_bytes());
        h
    } else if u.ratio(1, 8)? {
        // A domain name: user space's to resolve.
        let mut h = vec![0, 0, 0, 3, 7];
        h.extend_from_slice(b"example");
        h.extend_from_slice(&remote.port.to_be_bytes());
        h
    } else if is_v4(&remote.addr) {
        let mut h = vec![0, 0, 0, 1];
        h.extend_from_slice(&remote.addr[12..]);
        h.extend_from_slice(&remote.port.to_be_bytes());
        h
    } else {
        let mut h = vec![0, 0, 0, 4];
        h.extend_from_slice(&remote.addr);
        h.extend_from_slice(&remote.port.to_be_bytes());
        h
    };
    if u.ratio(1, 6)? {
        let at = u.choose_index(header.len())?;
        header[at] = u.arbitrary()?;
    }
    Ok(header)
}

fn aim(u: &mut Unstructured, world: &World) -> Result<Aim> {
    let no_framing = Vec::new;
    Ok(match u.int_in_range(0..=5)? {
        // A remote to a relay port (the exact binding, or near it).
        0 | 1 => {
            let b = u.choose(&world.bindings)?;
            let mut src = b.remote;
            if src.port == 0 || u.ratio(1, 8)? {
                src.port = any_port(u, world)?;
            }
            if src.addr == [0; 16] || u.ratio(1, 16)? {
                src.addr = any_addr(u, world, !is_v4(&b.relay.addr))?;
            }
            Aim {
                src,
                dst: b.relay,
                framing: no_framing(),
            }
        }
        // A client to its relay (or with RAW to its remote), framed as its binding frames.
        2 | 3 => {
            let o = u.choose(&world.outbound)?;
            let remote = if o.framing == framing::SOCKS5 && u.ratio(1, 4)? {
                let b = u.choose(&world.bindings)?;
                b.remote
            } else {
                o.remote
            };
            let framing = if o.framing == framing::RAW {
                no_framing()
            } else {
                client_framing(u, o.framing, remote)?
            };
            Aim {
                src: o.client,
                dst: o.to,
                framing,
            }
        }
        // A group, the resolver's flow, a control listener, a RAW client elsewhere.
        4 => {
            let v6 = u.ratio(1, 4)?;
            let src = End {
                addr: any_addr(u, world, v6)?,
                port: any_port(u, world)?,
            };
            let (src, dst) = match u.int_in_range(0..=3)? {
                0 if !v6 => (src, u.choose(&world.groups)?.group),
                1 if !v6 => *u.choose(&world.host_allow)?,
                2 => (src, *u.choose(&world.control_ports)?),
                _ => (
                    src,
                    End {
                        addr: any_addr(u, world, v6)?,
                        port: any_port(u, world)?,
                    },
                ),
            };
            let dst = if dst.addr == [0; 16] {
                End {
                    addr: any_addr(u, world, v6)?,
                    port: dst.port,
                }
            } else {
                dst
            };
            let src = if u.ratio(1, 4)? {
                let (client, _) = *u.choose(&world.raw_clients)?;
                if is_v4(&client.addr) == is_v4(&dst.addr) {
                    client
                } else {
                    src
                }
            } else {
                src
            };
            Aim {
                src,
                dst,
                framing: no_framing(),
            }
        }
        // Anywhere.
        _ => {
            let v6 = u.arbitrary()?;
            Aim {
                src: End {
                    addr: any_addr(u, world, v6)?,
                    port: u.arbitrary()?,
                },
                dst: End {
                    addr: any_addr(u, world, v6)?,
                    port: u.arbitrary()?,
                },
                framing: no_framing(),
            }
        }
    })
}

fn pseudo_header(src: &Addr16, dst: &Addr16, protocol: u8, len: usize) -> Vec<u8> {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    let mut p = Vec::new();
    if is_v4(src) && is_v4(dst) {
        p.extend_from_slice(&src[12..]);
        p.extend_from_slice(&dst[12..]);
        p.extend_from_slice(&[0, protocol, len[2], len[3]]);
    } else {
        p.extend_from_slice(src);
        p.extend_from_slice(dst);
        p.extend_from_slice(&len);
        p.extend_from_slice(&[0, 0, 0, protocol]);
    }
    p
}

/// The transport header and payload: UDP (with any length and checksum), TCP, or other.
fn transport(u: &mut Unstructured, aim: &Aim, protocol: u8) -> Result<Vec<u8>> {
    let mut payload = aim.framing.clone();
    let extra = match u.int_in_range(0..=15)? {
        0 => 0,
        1..=11 => u.int_in_range(0..=96)?,
        _ => u.int_in_range(0..=1400)?,
    };
    for _ in 0..extra {
        payload.push(u.arbitrary()?);
    }
    let (src, dst) = (aim.src.port.to_be_bytes(), aim.dst.port.to_be_bytes());
    match protocol {
        17 => {
            let len = 8 + payload.len();
            let udp_len: u16 = match u.int_in_range(0..=11)? {
                0 => u.arbitrary()?,
                1 => u.int_in_range(0..=8)?,
                2 => u16::try_from(len)
                    .unwrap_or(u16::MAX)
                    .wrapping_add(u.int_in_range(1..=4)?),
                3 => u16::try_from(len)
                    .unwrap_or(u16::MAX)
                    .wrapping_sub(u.int_in_range(1..=4)?),
                _ => u16::try_from(len).unwrap_or(u16::MAX),
            };
            let mut udp = vec![src[0], src[1], dst[0], dst[1]];
            udp.extend_from_slice(&udp_len.to_be_bytes());
            udp.extend_from_slice(&[0, 0]);
            udp.extend_from_slice(&payload);
            let covered = usize::from(udp_len).min(udp.len());
            let pseudo = pseudo_header(&aim.src.addr, &aim.dst.addr, 17, usize::from(udp_len));
            let check = match u.int_in_range(0..=9)? {
                0 => 0,
                1 => checksum::partial(&pseudo),
                2 => u.arbitrary()?,
                _ => checksum::valid(checksum::sum(&pseudo) + checksum::sum(&udp[..covered])),
            };
            udp[6..8].copy_from_slice(&check.to_be_bytes());
            Ok(udp)
        }
        6 => {
            let mut tcp = vec![src[0], src[1], dst[0], dst[1]];
            tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
            tcp.extend_from_slice(&payload);
            Ok(tcp)
        }
        _ => Ok(payload),
    }
}

fn protocol(u: &mut Unstructured) -> Result<u8> {
    Ok(match u.int_in_range(0..=15)? {
        0..=11 => 17,
        12 | 13 => 6,
        14 => 1,
        _ => u.arbitrary()?,
    })
}

fn ipv4(u: &mut Unstructured, aim: &Aim) -> Result<Vec<u8>> {
    let protocol = protocol(u)?;
    let l4 = transport(u, aim, protocol)?;
    let option_words = if u.ratio(1, 8)? {
        u.int_in_range(1..=10)?
    } else {
        0
    };
    let ihl = 5 + option_words;
    let mut header = vec![0x40 | ihl, 0, 0, 0, 0, 1];
    if u.ratio(1, 32)? {
        header[0] = u.arbitrary()?;
    }
    let flags_offset: u16 = match u.int_in_range(0..=15)? {
        0 => 0x2000,                      // MF: a first fragment
        1 => u.int_in_range(1..=0x1fff)?, // a later fragment
        2 => 0x2000 | u.int_in_range(1..=0x1fff)?,
        3 => u.arbitrary()?,
        4..=8 => 0x4000, // DF
        _ => 0,
    };
    header.extend_from_slice(&flags_offset.to_be_bytes());
    header.extend_from_slice(&[64, protocol, 0, 0]);
    header.extend_from_slice(&aim.src.addr[12..]);
    header.extend_from_slice(&aim.dst.addr[12..]);
    for _ in 0..option_words {
        // NOP NOP NOP EOL, or anything.
        if u.ratio(1, 2)? {
            header.extend_from_slice(&[1, 1, 1, 0]);
        } else {
            header.extend_from_slice(&u.arbitrary::<[u8; 4]>()?);
        }
    }
    let total = header.len() + l4.len();
    let total: u16 = match u.int_in_range(0..=11)? {
        0 => u.arbitrary()?,
        1 => u16::try_from(total)
            .unwrap_or(u16::MAX)
            .wrapping_add(u.int_in_range(1..=8)?),
        2 => u16::try_from(total)
            .unwrap_or(u16::MAX)
            .wrapping_sub(u.int_in_range(1..=8)?),
        _ => u16::try_from(total).unwrap_or(u16::MAX),
    };
    header[2..4].copy_from_slice(&total.to_be_bytes());
    let check = if u.ratio(1, 10)? {
        u.arbitrary()?
    } else {
        checksum::valid(checksum::sum(&header))
    };
    header[10..12].copy_from_slice(&check.to_be_bytes());
    header.extend_from_slice(&l4);
    Ok(header)
}

fn ipv6(u: &mut Unstructured, aim: &Aim) -> Result<Vec<u8>> {
    let protocol = protocol(u)?;
    let l4 = transport(u, aim, protocol)?;
    // An extension chain, most often none.
    let chain_len = match u.int_in_range(0..=15)? {
        0..=9 => 0,
        10..=12 => 1,
        13 => 2,
        _ => u.int_in_range(3..=8)?,
    };
    let kinds: Vec<u8> = (0..chain_len)
        .map(|_| u.choose(&EXTENSIONS).copied())
        .collect::<Result<_>>()?;
    let mut chain = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(protocol);
        match kind {
            44 => {
                let offset_flags: u16 = match u.int_in_range(0..=3)? {
                    0 => 1,                                // first fragment, more follow
                    1 => u.int_in_range(1..=0x1fff)? << 3, // a later fragment
                    _ => u.arbitrary()?,
                };
                chain.extend_from_slice(&[next, 0]);
                chain.extend_from_slice(&offset_flags.to_be_bytes());
                chain.extend_from_slice(&u.arbitrary::<[u8; 4]>()?);
            }
            51 => {
                // AH: (len + 2) * 4 octets.
                let len: u8 = u.int_in_range(1..=4)?;
                chain.extend_from_slice(&[next, len]);
                for _ in 2..(usize::from(len) + 2) * 4 {
                    chain.push(u.arbitrary()?);
                }
            }
            _ => {
                let len: u8 = u.int_in_range(0..=2)?;
                chain.extend_from_slice(&[next, len]);
                for _ in 2..(usize::from(len) + 1) * 8 {
                    chain.push(u.arbitrary()?);
                }
            }
        }
    }
    let first_next = kinds.first().copied().unwrap_or(protocol);
    let payload = chain.len() + l4.len();
    let payload_len: u16 = match u.int_in_range(0..=11)? {
        0 => u.arbitrary()?,
        1 => u16::try_from(payload)
            .unwrap_or(u16::MAX)
            .wrapping_add(u.int_in_range(1..=8)?),
        2 => u16::try_from(payload)
            .unwrap_or(u16::MAX)
            .wrapping_sub(u.int_in_range(1..=8)?),
        _ => u16::try_from(payload).unwrap_or(u16::MAX),
    };
    let mut header = vec![0x60, 0, 0, 0];
    if u.ratio(1, 32)? {
        header[0] = u.arbitrary()?;
    }
    header.extend_from_slice(&payload_len.to_be_bytes());
    header.extend_from_slice(&[first_next, 64]);
    header.extend_from_slice(&aim.src.addr);
    header.extend_from_slice(&aim.dst.addr);
    header.extend_from_slice(&chain);
    header.extend_from_slice(&l4);
    Ok(header)
}

/// One frame from `u`'s bytes, at least [`MIN_FRAME`] and at most [`MAX_FRAME`] octets long.
pub fn frame(u: &mut Unstructured, world: &World) -> Result<Vec<u8>> {
    let aim = aim(u, world)?;
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    let tags = match u.int_in_range(0..=15)? {
        0 | 1 => 1,
        2 => 2,
        3 => 3,
        _ => 0,
    };
    for _ in 0..tags {
        let tpid: u16 = if u.arbitrary()? { 0x8100 } else { 0x88a8 };
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&u.arbitrary::<[u8; 2]>()?);
    }
    let v6 = !is_v4(&aim.dst.addr);
    let (ether_type, packet): (u16, Vec<u8>) = match u.int_in_range(0..=31)? {
        0 => (0x0806, u.bytes(28)?.to_vec()),
        1 => (u.arbitrary()?, u.bytes(40)?.to_vec()),
        // The other family's ether type on the same packet.
        2 if v6 => (0x0800, ipv6(u, &aim)?),
        2 => (0x86dd, ipv4(u, &aim)?),
        _ if v6 => (0x86dd, ipv6(u, &aim)?),
        _ => (0x0800, ipv4(u, &aim)?),
    };
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(&packet);
    // Ethernet padding to the minimum frame, zeros or not.
    if frame.len() < 60 && u.ratio(1, 3)? {
        let fill: u8 = if u.arbitrary()? { 0 } else { u.arbitrary()? };
        frame.resize(60, fill);
    }
    // Mutations: cut short, octets flipped or replaced.
    if u.ratio(1, 6)? {
        let len = u.int_in_range(MIN_FRAME..=frame.len().max(MIN_FRAME))?;
        frame.truncate(len);
    }
    if u.ratio(1, 6)? {
        for _ in 0..u.int_in_range(1..=4)? {
            let at = u.choose_index(frame.len())?;
            frame[at] ^= 1 << u.int_in_range(0..=7)?;
        }
    }
    if u.ratio(1, 12)? {
        let at = u.choose_index(frame.len())?;
        frame[at] = u.arbitrary()?;
    }
    frame.resize(frame.len().max(MIN_FRAME), 0);
    frame.truncate(MAX_FRAME);
    Ok(frame)
}

/// A small deterministic generator of bytes (xorshift64*), so a seed names a run of frames.
pub struct Seeded {
    state: u64,
    buffer: Vec<u8>,
}

impl Seeded {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed | 1,
            buffer: vec![0; 4096],
        }
    }

    /// The next frame of this run.
    pub fn frame(&mut self, world: &World) -> Vec<u8> {
        for chunk in self.buffer.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let next_bytes = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&next_bytes[..chunk.len()]);
        }
        let mut u = Unstructured::new(&self.buffer);
        // Running out of bytes is not an error for Unstructured; a short frame still results.
        frame(&mut u, world).unwrap_or_else(|_| vec![0; MIN_FRAME])
    }
}
