//! Who may use the gateway, as one value that SIGHUP replaces whole: the users file, anonymous
//! access, the destination policy and the networks control connections are accepted from.
//! Connections read the current value when they need it and are told when it changes, so a
//! reload reaches live sessions (a removed user's session ends) without touching anything else.

use std::{
    net::IpAddr,
    sync::{Arc, PoisonError, RwLock},
};

use ipnet::IpNet;
use tokio::sync::watch;

use super::{auth::Users, policy::Policy};

/// The settings SIGHUP reloads.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Accept clients without authentication (SOCKS method 00).
    pub allow_anonymous: bool,
    /// Users who may authenticate (RFC 1929); `None` offers no username/password method.
    pub users: Option<Users>,
    /// Where clients may send and connect to.
    pub policy: Policy,
    /// Networks control connections are accepted from; from anywhere else they are closed at
    /// accept. Empty admits nobody.
    pub clients: Vec<IpNet>,
    /// The internal interface's own networks (directly connected): header-less (RAW) delivery
    /// is granted only to clients on them, whose next hop to a remote is the gateway.
    pub direct_networks: Vec<IpNet>,
}

impl Access {
    /// Whether a control connection from `ip` is accepted.
    pub fn admits_client(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.clients.iter().any(|net| net.contains(&ip))
    }

    /// Whether `ip` is on a directly connected internal network (a RAW precondition).
    pub fn is_directly_connected(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.direct_networks.iter().any(|net| net.contains(&ip))
    }

    /// Whether a session authenticated as `user` (`None`: anonymous) may go on.
    pub fn admits_user(&self, user: Option<&str>) -> bool {
        match user {
            Some(name) => self
                .users
                .as_ref()
                .is_some_and(|users| users.contains(name)),
            None => self.allow_anonymous,
        }
    }
}

/// The [`Access`] in force, replaceable while connections run.
#[derive(Debug)]
pub struct LiveAccess {
    current: RwLock<Arc<Access>>,
    /// Bumped on every replacement; sessions wait on it.
    generation: watch::Sender<u64>,
}

impl LiveAccess {
    pub fn new(access: Access) -> Self {
        Self {
            current: RwLock::new(Arc::new(access)),
            generation: watch::Sender::new(0),
        }
    }

    /// The settings in force now.
    pub fn get(&self) -> Arc<Access> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Edits the settings before the server shares them (tests, start-up).
    pub fn get_mut(&mut self) -> &mut Access {
        Arc::make_mut(
            self.current
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Puts `access` in force and tells every session.
    pub fn replace(&self, access: Access) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(access);
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// A receiver that sees every later [`LiveAccess::replace`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Completes when a replacement no longer admits a session from `peer` as `user`.
    pub async fn revoked(&self, peer: IpAddr, user: Option<&str>) {
        // Subscribe before the first look, so no replacement falls between the two.
        let mut changes = self.subscribe();
        loop {
            let access = self.get();
            if !access.admits_client(peer) || !access.admits_user(user) {
                return;
            }
            if changes.changed().await.is_err() {
                // The sender lives as long as `self`; without it nothing can revoke.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access {
            allow_anonymous: false,
            users: Some(Users::parse("alice:$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$1M4bxkqXrNAaXnHGtkOpFZtTMWY3c1qqpGLXpe4PUDE").unwrap()),
            policy: Policy::default(),
            clients: vec!["198.51.100.0/24".parse().unwrap(), "2001:db8:1::/64".parse().unwrap()],
            direct_networks: vec!["198.51.100.0/24".parse().unwrap()],
        }
    }

    #[test]
    fn clients_only_from_the_listed_networks() {
        let access = access();
        for ok in ["198.51.100.2", "::ffff:198.51.100.9", "2001:db8:1::2"] {
            assert!(access.admits_client(ok.parse().unwrap()), "{ok}");
        }
        for refused in ["203.0.113.2", "2001:db8:2::2", "127.0.0.1", "::1"] {
            assert!(!access.admits_client(refused.parse().unwrap()), "{refused}");
        }
        assert!(!Access::default().admits_client("198.51.100.2".parse().unwrap()));
    }

    #[test]
    fn users_and_anonymous() {
        let mut access = access();
        assert!(access.admits_user(Some("alice")));
        assert!(!access.admits_user(Some("bob")));
        assert!(!access.admits_user(None));
        access.allow_anonymous = true;
        assert!(access.admits_user(None));
        access.users = None;
        assert!(!access.admits_user(Some("alice")));
    }

    #[tokio::test]
    async fn a_replacement_that_drops_the_user_revokes_only_that_session() {
        let mut first = access();
        first.allow_anonymous = true;
        let live = Arc::new(LiveAccess::new(first));
        let peer: IpAddr = "198.51.100.2".parse().unwrap();
        let alice = tokio::spawn({
            let live = Arc::clone(&live);
            async move { live.revoked(peer, Some("alice")).await }
        });
        let anonymous = tokio::spawn({
            let live = Arc::clone(&live);
            async move { live.revoked(peer, None).await }
        });
        tokio::task::yield_now().await;
        // A reload that keeps alice and anonymous access revokes nobody.
        let mut kept = access();
        kept.allow_anonymous = true;
        live.replace(kept.clone());
        tokio::task::yield_now().await;
        assert!(!alice.is_finished());
        // One without alice ends her session only.
        kept.users = Some(Users::default());
        live.replace(kept);
        tokio::time::timeout(std::time::Duration::from_secs(5), alice)
            .await
            .expect("alice's session is revoked")
            .unwrap();
        assert!(!anonymous.is_finished());
        anonymous.abort();
    }
}
