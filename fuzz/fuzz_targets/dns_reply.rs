//! A datagram on the resolver's query socket (a hostile host may race the nameserver): only a
//! response to our id and question is an answer, and every address it yields is one of the
//! answer's records of the asked type for the asked name or its CNAME chain.
#![no_main]

use std::net::IpAddr;

use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RData, RecordType},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, datagram)) = data.split_first() else {
        return;
    };
    let record_type = if which % 2 == 0 {
        RecordType::A
    } else {
        RecordType::AAAA
    };
    let fqdn = Name::from_ascii("media.example.").unwrap();
    let question = Query::query(fqdn.clone(), record_type);
    let Ok(message) = Message::from_vec(datagram) else {
        assert!(
            gateway::resolver::judge_reply(
                datagram,
                0x1234,
                &question,
                "media.example",
                &fqdn,
                record_type
            )
            .is_none(),
            "garbage is never an answer"
        );
        return;
    };
    let id = message.metadata.id;
    let verdict = gateway::resolver::judge_reply(
        datagram,
        id,
        &question,
        "media.example",
        &fqdn,
        record_type,
    );
    // Another id: never an answer.
    assert!(
        gateway::resolver::judge_reply(
            datagram,
            id.wrapping_add(1),
            &question,
            "media.example",
            &fqdn,
            record_type
        )
        .is_none()
    );
    if let Some(Ok((addresses, ttl))) = verdict {
        assert!(!addresses.is_empty());
        for address in &addresses {
            let found = message
                .answers
                .iter()
                .any(|record| match (&record.data, address) {
                    (RData::A(a), IpAddr::V4(v4)) => a.0 == *v4 && record_type == RecordType::A,
                    (RData::AAAA(a), IpAddr::V6(v6)) => {
                        a.0 == *v6 && record_type == RecordType::AAAA
                    }
                    _ => false,
                });
            assert!(found, "{address} is not a record of the answer");
        }
        let shortest = message
            .answers
            .iter()
            .map(|r| r.ttl)
            .min()
            .unwrap_or(u32::MAX);
        assert!(ttl.as_secs() >= u64::from(shortest));
    }
});
