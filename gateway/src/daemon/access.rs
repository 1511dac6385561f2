//! Building the [`Access`] settings (users, anonymous access, destination policy, client
//! networks) from the command line, the configuration file and the interfaces. The same code
//! runs at start and on SIGHUP, so a reload means exactly what a restart would.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use gateway::{
    binding,
    netif::{self, InterfaceAddress},
    server::{access::Access, auth::Users, policy::Policy},
    settings::{self, Layer, Settings},
};
use ipnet::IpNet;

/// Where the reloadable settings come from: the command line's values (they win) and the
/// configuration file, read again on every load.
#[derive(Debug, Clone, Default)]
pub struct AccessSource {
    pub config: Option<PathBuf>,
    pub flags: Layer,
}

impl AccessSource {
    /// The effective settings now: the flags over the configuration file as it reads now.
    pub fn settings(&self) -> Result<Settings> {
        let file = match &self.config {
            Some(path) => settings::load(path)?,
            None => Layer::default(),
        };
        let settings = self.flags.clone().over(file).resolve();
        settings.check()?;
        Ok(settings)
    }

    /// Reads the configuration file, the users file and both interfaces' addresses.
    pub fn load(&self) -> Result<Access> {
        let settings = self.settings()?;
        let users = settings
            .users_file()
            .map(Users::load)
            .transpose()
            .context("--users")?;
        if users.is_none() && !settings.allow_anonymous {
            bail!(
                "no way to authenticate: give --users FILE (see `gateway passwd`) or \
                 --allow-anonymous"
            );
        }
        let external = netif::addresses(&settings.external)
            .with_context(|| format!("read the addresses of --external {}", settings.external))?;
        let internal = netif::addresses(&settings.internal)
            .with_context(|| format!("read the addresses of --internal {}", settings.internal))?;
        let internal_networks: Vec<IpNet> = internal.iter().map(|a| a.network).collect();
        let mut deny = settings.deny;
        // Clients may not reach the protected networks through the proxy.
        deny.extend(internal_networks.iter().copied());
        let clients = if settings.allow_clients.is_empty() {
            internal_networks.clone()
        } else {
            settings.allow_clients
        };
        Ok(Access {
            allow_anonymous: settings.allow_anonymous,
            users,
            policy: Policy {
                own_addresses: own_addresses(&external, &internal),
                deny,
                allow_loopback: false,
            },
            clients,
            direct_networks: internal_networks,
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

/// The networks an enhanced-mode REMOTE may not name under `policy`: its denied networks, the
/// gateway's own addresses and link-local, besides the binding machine's defaults.
pub fn forbidden_remotes(policy: &Policy) -> Vec<IpNet> {
    let mut forbidden = binding::default_forbidden_remotes();
    forbidden.extend(policy.deny.iter().copied());
    forbidden.extend(policy.own_addresses.iter().map(|ip| IpNet::from(*ip)));
    forbidden.extend(
        ["169.254.0.0/16", "fe80::/10"]
            .iter()
            .filter_map(|net| net.parse::<IpNet>().ok()),
    );
    forbidden
}
