//! A scripted nameserver on 203.0.113.53:53 in `server`: each query is handed to a script that
//! says which datagrams to send back (none: the query is dropped, as a lossy path or an
//! overloaded server would). Shared by the resolver tests and the soak; included with
//! `#[path]` where needed, so files without it carry no unused code.

use std::{
    net::{Ipv4Addr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, Record, rdata::A},
};
use testbed::{Netns, addr};

/// What the nameserver saw of each query: id, source port, name.
pub type Seen = Arc<Mutex<Vec<(u16, u16, String)>>>;

/// Stops its thread when dropped.
pub struct ScriptedNameserver {
    seen: Seen,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A response to `query` carrying `question` and `answers`.
pub fn reply(query: &Message, question: Query, answers: Vec<Record>) -> Vec<u8> {
    let mut reply = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata.recursion_available = true;
    reply.add_query(question);
    for record in answers {
        reply.add_answer(record);
    }
    reply.to_vec().unwrap()
}

pub fn a_record(owner: &Name, ip: Ipv4Addr, ttl: u32) -> Record {
    Record::from_rdata(owner.clone(), ttl, RData::A(A(ip)))
}

impl ScriptedNameserver {
    /// Adds 203.0.113.53 to `server` and answers there; `script` gets each well-formed query
    /// and its first question and returns the datagrams to send back.
    pub fn start(
        server: &Netns,
        mut script: impl FnMut(&Message, &Query) -> Vec<Vec<u8>> + Send + 'static,
    ) -> Self {
        testbed::peers::add_nameserver_address(server).unwrap();
        let socket = server
            .run(|| UdpSocket::bind((addr::SERVER_DNS_V4, 53)))
            .unwrap()
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let seen: Seen = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopped) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1500];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((len, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(query) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let Some(question) = query.queries.first().cloned() else {
                    continue;
                };
                log.lock().unwrap().push((
                    query.metadata.id,
                    from.port(),
                    question.name().to_ascii(),
                ));
                for datagram in script(&query, &question) {
                    let _ = socket.send_to(&datagram, from);
                }
            }
        });
        Self {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn seen(&self) -> Vec<(u16, u16, String)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ScriptedNameserver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
