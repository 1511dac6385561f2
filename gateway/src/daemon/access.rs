//! Building the [`Access`] settings (users, anonymous access, destination policy, client
//! networks) from the command line, the configuration file and the interfaces. The same code
//! runs at start and on SIGHUP, so a reload means exactly what a restart would.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use gateway::{
    binding,
    config::FileConfig,
    netif::{self, InterfaceAddress},
    server::{access::Access, auth::Users, policy::Policy},
};
use ipnet::IpNet;

/// Where the reloadable settings come from: the command line's values (they win) and the
/// configuration file, read again on every load.
#[derive(Debug, Clone, Default)]
pub struct AccessSource {
    pub config: Option<PathBuf>,
    pub users: Option<PathBuf>,
    /// The flag, when given (it wins over the file either way).
    pub allow_anonymous: Option<bool>,
    pub deny: Vec<IpNet>,
    pub clients: Vec<IpNet>,
    pub external: String,
    pub internal: String,
}

impl AccessSource {
    /// Reads the configuration file, the users file and both interfaces' addresses.
    pub fn load(&self) -> Result<Access> {
        let file = match &self.config {
            Some(path) => gateway::config::load(path)?.file,
            None => FileConfig::default(),
        };
        let users = self
            .users
            .clone()
            .or(file.users)
            .map(|path| Users::load(&path))
            .transpose()
            .context("--users")?;
        let allow_anonymous = self
            .allow_anonymous
            .or(file.allow_anonymous)
            .unwrap_or(false);
        if users.is_none() && !allow_anonymous {
            bail!(
                "no way to authenticate: give --users FILE (see `gateway passwd`) or \
                 --allow-anonymous"
            );
        }
        let external = netif::addresses(&self.external)
            .with_context(|| format!("read the addresses of --external {}", self.external))?;
        let internal = netif::addresses(&self.internal)
            .with_context(|| format!("read the addresses of --internal {}", self.internal))?;
        let internal_networks: Vec<IpNet> = internal.iter().map(|a| a.network).collect();
        let mut deny = first_given(self.deny.clone(), file.deny);
        // Clients may not reach the protected networks through the proxy.
        deny.extend(internal_networks.iter().copied());
        let clients = first_given(
            first_given(self.clients.clone(), file.allow_clients),
            internal_networks,
        );
        Ok(Access {
            allow_anonymous,
            users,
            policy: Policy {
                own_addresses: own_addresses(&external, &internal),
                deny,
                allow_loopback: false,
            },
            clients,
        })
    }
}

/// Every address of the gateway host: both interfaces' and every other interface's (a
/// management or container interface), so no CONNECT or remote reaches the host itself.
pub fn own_addresses(external: &[InterfaceAddress], internal: &[InterfaceAddress]) -> Vec<IpAddr> {
    let mut own: Vec<IpAddr> = external.iter().chain(internal).map(|a| a.ip).collect();
    match netif::host_addresses() {
        Ok(host) => own.extend(host.iter().map(|a| a.ip)),
        Err(error) => tracing::warn!(%error, "read the host's addresses"),
    }
    own.sort_unstable();
    own.dedup();
    own
}

/// The first list that is not empty (the command line's replaces the file's, which replaces the
/// default).
fn first_given<T>(given: Vec<T>, otherwise: Vec<T>) -> Vec<T> {
    if given.is_empty() { otherwise } else { given }
}

/// The networks an enhanced-mode REMOTE may not name under `policy`: its denied networks, the
/// gateway's own addresses and link-local, besides the binding machine's defaults.
pub fn forbidden_remotes(policy: &Policy) -> Vec<binding::IpNet> {
    let mut forbidden = binding::IpNet::default_forbidden();
    forbidden.extend(
        policy
            .deny
            .iter()
            .filter_map(|net| binding::IpNet::new(net.addr(), net.prefix_len())),
    );
    forbidden.extend(
        policy
            .own_addresses
            .iter()
            .map(|ip| binding::IpNet::host(*ip)),
    );
    forbidden.extend(
        [
            binding::IpNet::new(IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16),
            binding::IpNet::new(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10),
        ]
        .into_iter()
        .flatten(),
    );
    forbidden
}
