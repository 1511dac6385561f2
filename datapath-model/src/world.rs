//! The map contents the programs and the model are run against: one entry of every kind the
//! daemon installs (kernel and userspace bindings in both framings and RAW, both families,
//! host-level and listen bindings, a binding of the wrong family, the resolver's allow-list
//! entry, control listeners, received groups with and without a source list, the outbound
//! direction of each kernel binding, RAW client sockets), and the addresses and ports frames
//! are made of.

use gateway_common::{Addr16, framing, ipv4_mapped};

/// An address and port, the address IPv4-mapped for IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    pub addr: Addr16,
    pub port: u16,
}

const fn v6(last: u8, net: u8) -> Addr16 {
    [
        0x20, 0x01, 0x0d, 0xb8, 0, net, 0, 0, 0, 0, 0, 0, 0, 0, 0, last,
    ]
}

/// Remotes on the outside (TEST-NET-3, `2001:db8:2::/48`).
pub const REMOTE4: Addr16 = ipv4_mapped([203, 0, 113, 2]);
pub const OTHER_REMOTE4: Addr16 = ipv4_mapped([203, 0, 113, 3]);
pub const REMOTE6: Addr16 = v6(2, 2);
/// The gateway's external addresses.
pub const EXTERNAL4: Addr16 = ipv4_mapped([203, 0, 113, 1]);
pub const EXTERNAL6: Addr16 = v6(1, 2);
/// The gateway's internal addresses (TEST-NET-2, `2001:db8:1::/48`), and a client's.
pub const INTERNAL4: Addr16 = ipv4_mapped([198, 51, 100, 1]);
pub const INTERNAL6: Addr16 = v6(1, 1);
pub const CLIENT4: Addr16 = ipv4_mapped([198, 51, 100, 10]);
pub const CLIENT6: Addr16 = v6(0x10, 1);
/// Received multicast groups (MCAST-TEST-NET).
pub const GROUP: Addr16 = ipv4_mapped([233, 252, 0, 1]);
pub const SOURCE_LISTED_GROUP: Addr16 = ipv4_mapped([233, 252, 0, 2]);
pub const GROUP_PORT: u16 = 5000;
/// The AID of every enhanced binding here.
pub const AID: u32 = 0x0102_0304;

/// An exact or wildcard binding: datagrams from `remote` to `relay` on the external interface.
#[derive(Clone, Copy, Debug)]
pub struct Binding {
    /// Port 0: any port of the remote (a host-level binding); address 0 too: any remote (Listen).
    pub remote: End,
    pub relay: End,
    pub kernel: bool,
    pub framing: u32,
    pub client: End,
    pub internal_relay: End,
    pub aid: u32,
}

/// The client's direction of a kernel binding: datagrams from `client` to `to` (the internal
/// relay, or with RAW the remote itself) on the internal interface.
#[derive(Clone, Copy, Debug)]
pub struct Outbound {
    pub client: End,
    pub to: End,
    pub framing: u32,
    /// The remote (enhanced and RAW: fixed by the binding; SOCKS5: named per datagram).
    pub remote: End,
    pub external_relay: End,
    pub aid: u32,
}

/// A received group and, when it has one, its source list.
#[derive(Clone, Debug)]
pub struct Group {
    pub group: End,
    pub sources: Option<Vec<Addr16>>,
}

/// Everything the programs look up.
#[derive(Clone, Debug)]
pub struct World {
    pub bindings: Vec<Binding>,
    pub outbound: Vec<Outbound>,
    /// Exact flows (remote, local) the host itself receives (the resolver's replies).
    pub host_allow: Vec<(End, End)>,
    /// SOCKS control listeners (address 0: a wildcard listener on the port).
    pub control_ports: Vec<End>,
    pub external_addrs: Vec<Addr16>,
    /// RAW client sockets and the internal relay address each may still send to.
    pub raw_clients: Vec<(End, Addr16)>,
    pub groups: Vec<Group>,
    /// Whether the daemon's heartbeat is fresh.
    pub daemon_alive: bool,
}

fn end(addr: Addr16, port: u16) -> End {
    End { addr, port }
}

impl World {
    /// One entry of every kind (see the module's documentation).
    #[expect(
        clippy::too_many_lines,
        reason = "one table of entries, read top to bottom"
    )]
    pub fn standard() -> Self {
        let kernel = |remote: End, relay: End, framing: u32, client: End, internal: End| Binding {
            remote,
            relay,
            kernel: true,
            framing,
            client,
            internal_relay: internal,
            aid: AID,
        };
        let bindings = vec![
            kernel(
                end(REMOTE4, 5004),
                end(EXTERNAL4, 30000),
                framing::ENHANCED,
                end(CLIENT4, 40000),
                end(INTERNAL4, 30000),
            ),
            kernel(
                end(REMOTE4, 5005),
                end(EXTERNAL4, 30001),
                framing::SOCKS5,
                end(CLIENT4, 40001),
                end(INTERNAL4, 30001),
            ),
            kernel(
                end(REMOTE6, 5004),
                end(EXTERNAL6, 30002),
                framing::ENHANCED,
                end(CLIENT6, 40002),
                end(INTERNAL6, 30002),
            ),
            kernel(
                end(REMOTE6, 5005),
                end(EXTERNAL6, 30003),
                framing::SOCKS5,
                end(CLIENT6, 40003),
                end(INTERNAL6, 30003),
            ),
            kernel(
                end(REMOTE4, 5006),
                end(EXTERNAL4, 30004),
                framing::RAW,
                end(CLIENT4, 40004),
                end(INTERNAL4, 30004),
            ),
            kernel(
                end(REMOTE6, 5006),
                end(EXTERNAL6, 30005),
                framing::RAW,
                end(CLIENT6, 40005),
                end(INTERNAL6, 30005),
            ),
            // Userspace relay.
            Binding {
                kernel: false,
                ..kernel(
                    end(REMOTE4, 5007),
                    end(EXTERNAL4, 30006),
                    framing::ENHANCED,
                    end(CLIENT4, 40006),
                    end(INTERNAL4, 30006),
                )
            },
            // Host-level (any port of the remote), kernel mode: the gate admits, the kernel
            // relay (exact entries only) leaves it to the stack.
            kernel(
                end(REMOTE4, 0),
                end(EXTERNAL4, 30007),
                framing::ENHANCED,
                end(CLIENT4, 40007),
                end(INTERNAL4, 30007),
            ),
            // Listen: any remote.
            Binding {
                kernel: false,
                ..kernel(
                    end([0; 16], 0),
                    end(EXTERNAL4, 30008),
                    framing::ENHANCED,
                    end(CLIENT4, 40008),
                    end(INTERNAL4, 30008),
                )
            },
            // A client of the other family: no translation in the kernel.
            kernel(
                end(REMOTE4, 5008),
                end(EXTERNAL4, 30009),
                framing::ENHANCED,
                end(CLIENT6, 40009),
                end(INTERNAL6, 30009),
            ),
            // The SOCKS5 association's second admitted remote.
            kernel(
                end(OTHER_REMOTE4, 5005),
                end(EXTERNAL4, 30001),
                framing::SOCKS5,
                end(CLIENT4, 40001),
                end(INTERNAL4, 30001),
            ),
        ];
        let outbound_of = |b: &Binding| Outbound {
            client: b.client,
            to: if b.framing == framing::RAW {
                b.remote
            } else {
                b.internal_relay
            },
            framing: b.framing,
            remote: b.remote,
            external_relay: b.relay,
            aid: b.aid,
        };
        let mut outbound: Vec<Outbound> = bindings
            .iter()
            // Every exact kernel binding has its outbound entry (the association's second remote
            // shares its first's); the one of the other family too.
            .filter(|b| b.kernel && b.remote.port != 0 && b.remote.addr != OTHER_REMOTE4)
            .map(outbound_of)
            .collect();
        // A RAW entry whose external relay is of the other family (the daemon never installs
        // one): the kernel must not relay it.
        outbound.push(Outbound {
            client: end(CLIENT4, 40010),
            to: end(REMOTE4, 5010),
            framing: framing::RAW,
            remote: end(REMOTE4, 5010),
            external_relay: end(EXTERNAL6, 30010),
            aid: AID,
        });
        let raw_clients = vec![
            (end(CLIENT4, 40004), INTERNAL4),
            (end(CLIENT6, 40005), INTERNAL6),
        ];
        Self {
            bindings,
            outbound,
            host_allow: vec![(end(REMOTE4, 53), end(EXTERNAL4, 40053))],
            control_ports: vec![
                end(INTERNAL4, 1080),
                end(INTERNAL6, 1080),
                end([0; 16], 1081),
            ],
            external_addrs: vec![EXTERNAL4, EXTERNAL6],
            raw_clients,
            groups: vec![
                Group {
                    group: end(GROUP, GROUP_PORT),
                    sources: None,
                },
                Group {
                    group: end(SOURCE_LISTED_GROUP, GROUP_PORT),
                    sources: Some(vec![REMOTE4]),
                },
            ],
            daemon_alive: true,
        }
    }

    /// The binding keyed exactly by this remote and relay end.
    pub fn binding(&self, remote: End, relay: End) -> Option<&Binding> {
        self.bindings
            .iter()
            .find(|b| b.remote == remote && b.relay == relay)
    }

    pub fn outbound(&self, client: End, to: End) -> Option<&Outbound> {
        self.outbound
            .iter()
            .find(|o| o.client == client && o.to == to)
    }

    pub fn host_allowed(&self, remote: End, local: End) -> bool {
        self.host_allow.contains(&(remote, local))
    }

    pub fn control_port(&self, at: End) -> bool {
        self.control_ports.contains(&at)
    }

    pub fn is_external(&self, addr: &Addr16) -> bool {
        self.external_addrs.contains(addr)
    }

    pub fn raw_client(&self, socket: End) -> Option<Addr16> {
        self.raw_clients
            .iter()
            .find(|(s, _)| *s == socket)
            .map(|(_, relay)| *relay)
    }

    pub fn group(&self, group: End) -> Option<&Group> {
        self.groups.iter().find(|g| g.group == group)
    }

    /// Every address the world names, for frames that hit its entries.
    pub fn addresses(&self) -> Vec<Addr16> {
        let mut all = vec![
            REMOTE4,
            OTHER_REMOTE4,
            REMOTE6,
            EXTERNAL4,
            EXTERNAL6,
            INTERNAL4,
            INTERNAL6,
            CLIENT4,
            CLIENT6,
            GROUP,
            SOURCE_LISTED_GROUP,
        ];
        all.dedup();
        all
    }

    /// Every port the world names.
    pub fn ports(&self) -> Vec<u16> {
        let mut all: Vec<u16> = self
            .bindings
            .iter()
            .flat_map(|b| {
                [
                    b.remote.port,
                    b.relay.port,
                    b.client.port,
                    b.internal_relay.port,
                ]
            })
            .chain(
                self.outbound
                    .iter()
                    .flat_map(|o| [o.to.port, o.remote.port]),
            )
            .chain(self.control_ports.iter().map(|c| c.port))
            .chain([53, 40053, GROUP_PORT])
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}
