//! The relay port ranges cannot collide with what else the host binds: with the default ranges,
//! 2,000 RFC 1928 UDP ASSOCIATEs (each holding two sockets on ephemeral ports) and resolver
//! queries (each on a random source port) run while enhanced-mode bindings are made, and every
//! relay bind succeeds. Root only.

use std::{net::SocketAddr, sync::Arc};

use gateway_client::{Client, Family};
use gateway_proto::Address;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use testbed::{
    Testbed, addr,
    gateway::start_in_fw,
    peers::{Dnsmasq, HttpServer},
};

const PROXY: &str = "198.51.100.1:1080";
const ASSOCIATIONS: usize = 2000;
const LOOKUPS: usize = 200;
const SESSIONS: usize = 20;
const BINDINGS_PER_SESSION: usize = 50;

/// One enhanced-mode session making [`BINDINGS_PER_SESSION`] two-step bindings and holding
/// them: how many were confirmed, and the errors of the rest.
async fn make_bindings(proxy: SocketAddr, remote: SocketAddr) -> (usize, Vec<String>) {
    let session = Arc::new(
        Client::connect(proxy, None)
            .await
            .unwrap()
            .enhanced()
            .await
            .unwrap(),
    );
    let mut failed = Vec::new();
    let mut held = Vec::new();
    for _ in 0..BINDINGS_PER_SESSION {
        let result = async {
            let binding = session.udp_socket(Family::V4).await?;
            binding.bind().await?;
            binding.connect(remote).await?;
            Ok::<_, gateway_client::ClientError>(binding)
        }
        .await;
        match result {
            Ok(binding) => held.push(binding),
            Err(error) => failed.push(error.to_string()),
        }
    }
    (held.len(), failed)
}

#[test]
fn associations_and_queries_never_take_a_relay_port() {
    // This process holds every association's control connection and socket.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(65_536), hard).unwrap();

    let bed = Testbed::new().unwrap();
    let _dns = Dnsmasq::start(&bed.server, &["test"]).unwrap();
    let _http = HttpServer::start(&bed.server, "hello").unwrap();
    let (gateway, _cleanup) = start_in_fw(
        &bed,
        &[
            "--resolver",
            &addr::SERVER_DNS_V4.to_string(),
            "--max-connections-per-client",
            "4000",
        ],
    )
    .unwrap();
    let remote = SocketAddr::new(addr::SERVER_V4.into(), 9);
    let outcome = bed
        .client
        .run(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let proxy: SocketAddr = PROXY.parse().unwrap();
                    // The associations, each with its outside socket opened by a datagram.
                    let mut associations = Vec::new();
                    for _ in 0..ASSOCIATIONS {
                        let association = Client::connect(proxy, None)
                            .await
                            .unwrap()
                            .udp_associate()
                            .await
                            .unwrap();
                        association.send_to(remote, b"x").await.unwrap();
                        associations.push(association);
                    }
                    // Lookups and bindings at the same time.
                    let lookups = tokio::spawn(async move {
                        let mut failed = Vec::new();
                        for i in 0..LOOKUPS {
                            let target = Address::Domain(format!("n{i}.test"), 80);
                            let result = match Client::connect(proxy, None).await {
                                Ok(client) => client.tcp_connect(target).await.map(drop),
                                Err(error) => Err(error),
                            };
                            if let Err(error) = result {
                                failed.push(format!("n{i}.test: {error}"));
                            }
                        }
                        failed
                    });
                    let sessions: Vec<_> = (0..SESSIONS)
                        .map(|_| tokio::spawn(make_bindings(proxy, remote)))
                        .collect();
                    let mut confirmed = 0;
                    let mut failed = Vec::new();
                    for session in sessions {
                        let (held, errors) = session.await.unwrap();
                        confirmed += held;
                        failed.extend(errors);
                    }
                    let lookups_failed = lookups.await.unwrap();
                    drop(associations);
                    (confirmed, failed, lookups_failed)
                })
        })
        .unwrap();
    let (confirmed, failed, lookups_failed) = outcome;
    assert!(failed.is_empty(), "bindings failed: {failed:?}");
    assert_eq!(confirmed, SESSIONS * BINDINGS_PER_SESSION);
    assert!(
        lookups_failed.is_empty(),
        "lookups failed: {lookups_failed:?}"
    );
    let log = gateway.log_text();
    for sign in ["in use", "cannot bind", "Address already"] {
        assert!(!log.contains(sign), "the gateway logged {sign:?}:\n{log}");
    }
}
