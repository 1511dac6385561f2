//! Keeping the relay port ranges for the gateway: they are added to the kernel's reserved ports
//! (`net.ipv4.ip_local_reserved_ports`, which IPv6 honours too), so no ephemeral bind by the
//! resolver, an association or any other program on the host takes a relay port; what was added
//! is recorded in the instance's run directory, and `gateway detach` takes exactly that back out.
//! A range that overlaps a port already in use is refused before anything is reserved.

use std::{fs, io, ops::RangeInclusive, path::Path};

/// The sysctl, per network namespace.
pub const SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Port ranges, sorted and merged.
pub type Ranges = Vec<RangeInclusive<u16>>;

/// Parses the sysctl's format: `8080,30000-39999` (empty: none).
pub fn parse(text: &str) -> Result<Ranges, String> {
    let mut ranges = Vec::new();
    for part in text
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let port = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| format!("{part:?} is not a port or PORT-PORT"))
        };
        let (first, last) = (port(first)?, port(last)?);
        if first > last {
            return Err(format!("{part:?}: the range is backwards"));
        }
        ranges.push(first..=last);
    }
    Ok(merge(ranges))
}

/// The sysctl's format.
pub fn format(ranges: &[RangeInclusive<u16>]) -> String {
    ranges
        .iter()
        .map(|r| {
            if r.start() == r.end() {
                r.start().to_string()
            } else {
                format!("{}-{}", r.start(), r.end())
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Sorts and merges overlapping or adjacent ranges.
pub fn merge(mut ranges: Ranges) -> Ranges {
    ranges.sort_by_key(|r| *r.start());
    let mut merged: Ranges = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(*range.start()) <= u32::from(*last.end()) + 1 => {
                if range.end() > last.end() {
                    *last = *last.start()..=*range.end();
                }
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// `from` without the ports of `take`.
pub fn subtract(from: &[RangeInclusive<u16>], take: &[RangeInclusive<u16>]) -> Ranges {
    let mut left = Vec::new();
    for range in from {
        let mut pieces = vec![range.clone()];
        for cut in take {
            pieces = pieces
                .into_iter()
                .flat_map(|piece| {
                    let mut kept = Vec::new();
                    if cut.end() < piece.start() || cut.start() > piece.end() {
                        kept.push(piece);
                        return kept;
                    }
                    if cut.start() > piece.start() {
                        kept.push(*piece.start()..=cut.start() - 1);
                    }
                    if cut.end() < piece.end() {
                        kept.push(cut.end() + 1..=*piece.end());
                    }
                    kept
                })
                .collect();
        }
        left.extend(pieces);
    }
    merge(left)
}

/// Ports of `ranges` some socket of this namespace holds now, from `/proc/net/{udp,udp6,tcp,
/// tcp6}`: `(protocol, port)`, at most `limit` of them.
pub fn in_use(ranges: &[RangeInclusive<u16>], limit: usize) -> Vec<(&'static str, u16)> {
    let mut found = Vec::new();
    for (protocol, path) in [
        ("udp", "/proc/net/udp"),
        ("udp", "/proc/net/udp6"),
        ("tcp", "/proc/net/tcp"),
        ("tcp", "/proc/net/tcp6"),
    ] {
        let Ok(table) = fs::read_to_string(path) else {
            continue;
        };
        for port in local_ports(&table) {
            if ranges.iter().any(|r| r.contains(&port)) && !found.contains(&(protocol, port)) {
                found.push((protocol, port));
                if found.len() >= limit {
                    return found;
                }
            }
        }
    }
    found
}

/// The local ports of a `/proc/net/{udp,tcp}[6]` table (`sl local_address:PORT ...`, hex).
fn local_ports(table: &str) -> impl Iterator<Item = u16> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let local = line.split_whitespace().nth(1)?;
        let (_, port) = local.rsplit_once(':')?;
        u16::from_str_radix(port, 16).ok()
    })
}

/// Adds `ranges` to the reserved ports and records in `record` the ports this added (those not
/// reserved before); returns them.
pub fn reserve(ranges: &[RangeInclusive<u16>], record: &Path) -> io::Result<Ranges> {
    let current = read()?;
    let mut added = subtract(&merge(ranges.to_vec()), &current);
    // A previous daemon's record (a takeover) stays ours to release.
    if let Ok(previous) = fs::read_to_string(record) {
        added = merge(
            added
                .into_iter()
                .chain(parse(&previous).unwrap_or_default())
                .collect(),
        );
    }
    write(&merge(
        current.into_iter().chain(added.iter().cloned()).collect(),
    ))?;
    fs::write(record, format(&added))?;
    Ok(added)
}

/// Takes the ports recorded in `record` back out of the reserved ports and removes the record;
/// returns what was released (`None` when there was no record).
pub fn release(record: &Path) -> io::Result<Option<Ranges>> {
    let Ok(text) = fs::read_to_string(record) else {
        return Ok(None);
    };
    let ours = parse(&text).map_err(io::Error::other)?;
    write(&subtract(&read()?, &ours))?;
    fs::remove_file(record)?;
    Ok(Some(ours))
}

fn read() -> io::Result<Ranges> {
    parse(&fs::read_to_string(SYSCTL)?).map_err(io::Error::other)
}

fn write(ranges: &[RangeInclusive<u16>]) -> io::Result<()> {
    // With the newline: a write of zero octets would leave the old list in place.
    fs::write(SYSCTL, format(ranges) + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_format_round_trip() {
        let ranges = parse("8080, 30000-39999,40000-49999,22").unwrap();
        assert_eq!(ranges, vec![22..=22, 8080..=8080, 30000..=49999]);
        assert_eq!(format(&ranges), "22,8080,30000-49999");
        assert_eq!(parse("").unwrap(), Vec::<RangeInclusive<u16>>::new());
        assert!(parse("40000-30000").is_err());
        assert!(parse("70000").is_err());
    }

    #[test]
    fn subtracting_takes_exactly_the_given_ports() {
        let from = parse("22,30000-49999").unwrap();
        assert_eq!(
            subtract(&from, &parse("35000-35009,49999").unwrap()),
            parse("22,30000-34999,35010-49998").unwrap()
        );
        assert_eq!(subtract(&from, &from), Vec::<RangeInclusive<u16>>::new());
        assert_eq!(subtract(&from, &[]), from);
    }

    #[test]
    fn local_ports_of_a_proc_table() {
        let table = "  sl  local_address rem_address   st\n   0: 0100007F:0035 00000000:0000 07\n   1: 00000000:7530 00000000:0000 07\n";
        assert_eq!(local_ports(table).collect::<Vec<_>>(), vec![53, 30000]);
    }
}
