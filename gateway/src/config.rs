//! The optional configuration file of `gateway run` (TOML). Every key mirrors a command-line
//! flag of the same name (dashes become underscores); a flag given on the command line wins.
//! Unknown keys and wrong types are errors that name the key and the line; values are checked
//! here, before anything is bound or attached.
//!
//! ```toml
//! external = "eth0"
//! internal = "eth1"
//! listen = ["198.51.100.1:1080"]
//! users = "/etc/gateway/users"
//! allow_anonymous = false
//! resolvers = ["192.0.2.53"]
//! deny = ["10.0.0.0/8"]
//! allow_clients = ["198.51.100.0/24"]
//! allow_host_udp = ["192.0.2.123:123,203.0.113.1:123"]
//! datapath = "xdp"
//! ```

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

use crate::{binding::PortRange, datapath::HostFlow};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Value {
        path: String,
        key: String,
        message: String,
    },
}

/// The file as written; `None`/empty where the key is absent.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub external: Option<String>,
    pub internal: Option<String>,
    pub instance: Option<String>,
    pub max_bindings: Option<u32>,
    pub allow_host_udp: Vec<String>,
    pub listen: Vec<SocketAddr>,
    pub users: Option<PathBuf>,
    pub allow_anonymous: Option<bool>,
    pub resolvers: Vec<String>,
    pub deny: Vec<IpNet>,
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<usize>,
    pub datapath: Option<String>,
    pub allow_listen: Option<bool>,
    pub allow_clients: Vec<IpNet>,
    pub remove_gate_on_exit: Option<bool>,
    pub internal_ports: Option<String>,
    pub external_ports: Option<String>,
    pub max_bindings_per_connection: Option<usize>,
    pub max_bindings_per_user: Option<usize>,
    pub max_remotes_per_association: Option<usize>,
    pub xdp_mode: Option<String>,
    pub tc_attach: Option<String>,
}

/// A file's values, checked.
#[derive(Debug, Default, Clone)]
pub struct Checked {
    pub file: FileConfig,
    pub host_flows: Vec<HostFlow>,
    pub resolvers: Vec<SocketAddr>,
    pub internal_ports: Option<PortRange>,
    pub external_ports: Option<PortRange>,
}

/// `IP` or `IP:PORT` (port 53 when absent).
pub fn parse_resolver(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{text:?} is not an IP or IP:PORT"))
}

/// Reads, parses and checks a configuration file.
pub fn load(path: &Path) -> Result<Checked, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and checks configuration text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Checked, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
        path: origin.to_owned(),
        message: error.to_string().trim().replace('\n', " "),
    })?;
    let value_error = |key: String, message: String| ConfigError::Value {
        path: origin.to_owned(),
        key,
        message,
    };
    let host_flows = file
        .allow_host_udp
        .iter()
        .enumerate()
        .map(|(i, flow)| {
            HostFlow::parse(flow).map_err(|m| value_error(format!("allow_host_udp[{i}]"), m))
        })
        .collect::<Result<_, _>>()?;
    let resolvers = file
        .resolvers
        .iter()
        .enumerate()
        .map(|(i, r)| parse_resolver(r).map_err(|m| value_error(format!("resolvers[{i}]"), m)))
        .collect::<Result<_, _>>()?;
    if let Some(datapath) = &file.datapath
        && !matches!(datapath.as_str(), "xdp" | "userspace")
    {
        return Err(value_error(
            "datapath".into(),
            format!("{datapath:?} is neither \"xdp\" nor \"userspace\""),
        ));
    }
    if file.max_connections == Some(0) {
        return Err(value_error(
            "max_connections".into(),
            "must be at least 1".into(),
        ));
    }
    for (key, value, allowed) in [
        (
            "xdp_mode",
            &file.xdp_mode,
            &["auto", "driver", "generic"][..],
        ),
        (
            "tc_attach",
            &file.tc_attach,
            &["auto", "tcx", "netlink"][..],
        ),
    ] {
        if let Some(value) = value
            && !allowed.contains(&value.as_str())
        {
            return Err(value_error(
                key.into(),
                format!("{value:?} is none of {}", allowed.join(", ")),
            ));
        }
    }
    for (key, value) in [
        (
            "max_connections_per_client",
            file.max_connections_per_client,
        ),
        (
            "max_bindings_per_connection",
            file.max_bindings_per_connection,
        ),
        ("max_bindings_per_user", file.max_bindings_per_user),
        (
            "max_remotes_per_association",
            file.max_remotes_per_association,
        ),
    ] {
        if value == Some(0) {
            return Err(value_error(key.into(), "must be at least 1".into()));
        }
    }
    let port_range = |key: &str, text: &Option<String>| {
        text.as_deref()
            .map(PortRange::parse)
            .transpose()
            .map_err(|m| value_error(key.into(), m))
    };
    let internal_ports = port_range("internal_ports", &file.internal_ports)?;
    let external_ports = port_range("external_ports", &file.external_ports)?;
    if file.max_bindings == Some(0) {
        return Err(value_error(
            "max_bindings".into(),
            "must be at least 1".into(),
        ));
    }
    Ok(Checked {
        file,
        host_flows,
        resolvers,
        internal_ports,
        external_ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let checked = parse(
            r#"
            external = "eth0"
            internal = "eth1"
            listen = ["198.51.100.1:1080", "[2001:db8:1::1]:1080"]
            allow_anonymous = true
            resolvers = ["192.0.2.53", "[2001:db8::53]:5353"]
            deny = ["10.0.0.0/8"]
            allow_clients = ["198.51.100.0/25", "2001:db8:1::/64"]
            allow_host_udp = ["192.0.2.123:123,203.0.113.1:123"]
            datapath = "userspace"
            max_connections = 10
            remove_gate_on_exit = true
            "#,
            "test.toml",
        )
        .unwrap();
        assert_eq!(checked.file.external.as_deref(), Some("eth0"));
        assert_eq!(checked.file.listen.len(), 2);
        assert_eq!(checked.resolvers[0], "192.0.2.53:53".parse().unwrap());
        assert_eq!(checked.resolvers[1].port(), 5353);
        assert_eq!(checked.host_flows.len(), 1);
        assert_eq!(checked.file.datapath.as_deref(), Some("userspace"));
        assert_eq!(checked.file.allow_clients.len(), 2);
        assert_eq!(checked.file.remove_gate_on_exit, Some(true));
    }

    #[test]
    fn errors_name_the_key() {
        let unknown = parse("extrnal = \"eth0\"", "gw.toml")
            .unwrap_err()
            .to_string();
        assert!(
            unknown.contains("gw.toml") && unknown.contains("extrnal"),
            "{unknown}"
        );
        let wrong_type = parse("max_connections = \"many\"", "gw.toml")
            .unwrap_err()
            .to_string();
        assert!(wrong_type.contains("max_connections"), "{wrong_type}");
        let resolver = parse("resolvers = [\"192.0.2.53\", \"nope\"]", "gw.toml")
            .unwrap_err()
            .to_string();
        assert!(resolver.contains("resolvers[1]"), "{resolver}");
        let flow = parse("allow_host_udp = [\"192.0.2.1:53\"]", "gw.toml")
            .unwrap_err()
            .to_string();
        assert!(flow.contains("allow_host_udp[0]"), "{flow}");
        let datapath = parse("datapath = \"dpdk\"", "gw.toml")
            .unwrap_err()
            .to_string();
        assert!(datapath.contains("`datapath`"), "{datapath}");
        assert!(parse("max_connections = 0", "gw.toml").is_err());
        assert!(parse("deny = [\"10.0.0.0/33\"]", "gw.toml").is_err());
        assert!(parse("allow_clients = [\"inside\"]", "gw.toml").is_err());
        let tc = parse("tc_attach = \"ebpf\"", "gw.toml")
            .unwrap_err()
            .to_string();
        assert!(tc.contains("`tc_attach`") && tc.contains("netlink"), "{tc}");
        assert!(parse("xdp_mode = \"generic\"", "gw.toml").is_ok());
        let ports = parse("external_ports = \"40000-30000\"", "gw.toml")
            .unwrap_err()
            .to_string();
        assert!(ports.contains("`external_ports`"), "{ports}");
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        let checked = parse("", "empty.toml").unwrap();
        assert!(checked.file.external.is_none() && checked.host_flows.is_empty());
    }
}
