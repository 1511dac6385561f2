//! Multicast bindings of the synchronous core: subscribe, send bindings, SET TTL and release on a
//! [`Session`], and the caller's own socket used with the binding ([`recv_multicast`],
//! [`send_multicast`]). The protocol steps are the async layer's (`multicast`).

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    num::NonZeroU8,
};

use gateway_proto::enhanced::{ControlRequest, DatagramHeader, EnhancedReplyCode};

use super::Session;
use crate::{
    BindingError, ClientError, MulticastBinding, MulticastMode, exchange,
    multicast::{
        after_set_ttl, binding_of, check_group, check_source, mu_payload, receive_request,
        send_request, set_ttl_request, source_request,
    },
};

impl Session {
    /// Subscribes the application socket at `local` to `group` (a receive binding) with the
    /// preferred delivery `mode` (`None`: the gateway picks); [`MulticastBinding::mode`] is the
    /// one it chose. In multicast-to-unicast mode the group's datagrams come to `local` from
    /// [`MulticastBinding::relay`] with the header: read them with [`recv_multicast`].
    pub fn subscribe(
        &mut self,
        local: SocketAddr,
        group: SocketAddr,
        mode: Option<MulticastMode>,
    ) -> Result<MulticastBinding, ClientError> {
        check_group(group)?;
        self.multicast_request("UDP BIND (multicast receive)", |tid| {
            receive_request(tid, local, group, mode)
        })
    }

    /// Makes the multicast-to-unicast receive `binding` source-specific: from now on it gets
    /// only the group's datagrams from `source` (the gateway joins the group for that source
    /// where no other receiver takes every source). Once per binding: another source is
    /// [`BindingError::BadAssociationContext`], a source off the gateway's list for the group
    /// [`BindingError::MulticastReceiveNotAllowed`]; `binding` stays as it was then.
    pub fn receive_only_from(
        &mut self,
        binding: &MulticastBinding,
        source: IpAddr,
    ) -> Result<(), ClientError> {
        check_source(binding, source)?;
        let reply = self.exchange(
            &source_request(binding, source),
            "UDP BIND (multicast source)",
        )?;
        exchange::refusal(&reply)?;
        Ok(())
    }

    /// A send binding from the application socket at `local` to `group` with `ttl`: send with
    /// [`send_multicast`].
    pub fn multicast_send(
        &mut self,
        local: SocketAddr,
        group: SocketAddr,
        ttl: NonZeroU8,
    ) -> Result<MulticastBinding, ClientError> {
        check_group(group)?;
        self.multicast_request("UDP BIND (multicast send)", |tid| {
            send_request(tid, local, group, ttl)
        })
    }

    /// SET TTL on `binding`: the gateway sends its next datagrams with `ttl`. A binding that is
    /// not a send binding is refused ([`BindingError::BadAssociationContext`]), a TTL over the
    /// gateway's maximum too ([`BindingError::TtlNotAllowed`]); `binding` is then unchanged.
    pub fn set_ttl(
        &mut self,
        binding: &mut MulticastBinding,
        ttl: NonZeroU8,
    ) -> Result<(), ClientError> {
        let reply = self.exchange(&set_ttl_request(binding, ttl), "SET TTL")?;
        *binding = after_set_ttl(binding, &reply, ttl)?;
        Ok(())
    }

    /// UDP RELEASE of a multicast binding.
    pub fn release_multicast(&mut self, binding: MulticastBinding) -> Result<(), ClientError> {
        let request = exchange::release_request(binding.tid, binding.aid);
        let reply = self.exchange(&request, "UDP RELEASE")?;
        let result = exchange::refusal(&reply);
        if matches!(result, Ok(()) | Err(BindingError::BadAssociationId)) {
            self.tids.free(binding.tid);
        }
        Ok(result?)
    }

    /// A multicast UDP BIND with a fresh TID. A refusal frees the TID; a timeout retires it
    /// with the connection.
    fn multicast_request(
        &mut self,
        operation: &'static str,
        request: impl FnOnce(u16) -> ControlRequest,
    ) -> Result<MulticastBinding, ClientError> {
        let tid = self.tids.allocate().ok_or(ClientError::TidsExhausted)?;
        let request = request(tid);
        let reply = self.exchange(&request, operation)?;
        let binding = binding_of(&request, &reply, self.proxy.ip());
        if binding.is_err() {
            if reply.code == EnhancedReplyCode::Succeeded && reply.aid != 0 {
                // A success that answers something else (another mode than asked): release
                // what the gateway holds. Its answer does not change the error.
                let _ = self.exchange(
                    &exchange::release_request(tid, reply.aid),
                    "UDP RELEASE (unexpected reply)",
                );
            }
            self.tids.free(tid);
        }
        binding
    }
}

/// Receives the next group datagram of a multicast-to-unicast `binding` on the application's
/// `socket` (bound at its LOCAL): the payload goes to the start of `buf`. Datagrams not from the
/// internal relay, for another AID, malformed or fragmented are skipped. It waits as the socket
/// does (its read timeout ends the wait with [`ClientError::Io`]).
pub fn recv_multicast(
    socket: &UdpSocket,
    binding: &MulticastBinding,
    buf: &mut [u8],
) -> Result<usize, ClientError> {
    if binding.mode() != Some(MulticastMode::ToUnicast) {
        return Err(ClientError::WrongState {
            operation: "recv_multicast",
            state: "not a multicast-to-unicast receive binding",
        });
    }
    loop {
        let (len, from) = match socket.recv_from(buf) {
            Ok(received) => received,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error.into()),
        };
        if let Some(payload) = mu_payload(binding, from, &buf[..len]) {
            let payload_len = payload.len();
            buf.copy_within(len - payload_len..len, 0);
            return Ok(payload_len);
        }
    }
}

/// Sends `data` to the group of a send `binding` from the application's `socket` (bound at its
/// LOCAL): with the 8-octet header to the internal relay.
pub fn send_multicast(
    socket: &UdpSocket,
    binding: &MulticastBinding,
    data: &[u8],
) -> Result<usize, ClientError> {
    if binding.ttl().is_none() {
        return Err(ClientError::WrongState {
            operation: "send_multicast",
            state: "a receive binding",
        });
    }
    let mut out = Vec::with_capacity(DatagramHeader::LEN + data.len());
    DatagramHeader::new(binding.aid).encode(&mut out)?;
    out.extend_from_slice(data);
    socket.send_to(&out, binding.relay)?;
    Ok(data.len())
}
