//! Arbitrary bytes into the wire decoder, as a client or a server would send
//! them: framing, startup parameters and error fields must never panic, and
//! a decoded message must encode back to the same bytes. The decoded
//! messages are also fed, as server replies, to the result tracker, which
//! must never panic or grow past what it was told to expect.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wicket_pg::codec;
use wicket_pg::results::{Expect, Pending, Tracker};

fuzz_target!(|data: &[u8]| {
    if let Ok(messages) = codec::decode_all(data, 1 << 20) {
        let mut pos = 0;
        for m in &messages {
            let encoded = m.encode();
            assert_eq!(&data[pos..pos + encoded.len()], &encoded[..]);
            pos += encoded.len();
            if matches!(m.tag, b'E' | b'N') {
                let _ = codec::error_fields(&m.body);
            }
        }
        // The first byte picks what the client is waiting for.
        let mut t = Tracker::default();
        let pending = || {
            Some(Pending {
                command_id: "c".into(),
                started: std::time::Instant::now(),
            })
        };
        let expected = match data.first().copied().unwrap_or(0) % 4 {
            0 => vec![Expect::Query([pending(), pending()].into())],
            1 => vec![Expect::Ack, Expect::Ack, Expect::Execute(pending()), Expect::Sync],
            2 => vec![Expect::Describe(None), Expect::Describe(Some(Default::default())), Expect::Execute(pending()), Expect::Sync, Expect::Execute(None)],
            _ => vec![Expect::Guarded { shift: 7, nonce: "n".into(), query: true }],
        };
        let n = expected.len();
        for e in expected {
            t.push(e);
        }
        let mut done = Vec::new();
        for m in &messages {
            let _ = t.on_server(m.tag, &m.body, &mut done);
        }
        assert!(done.len() <= n * 2);
    }
    let _ = codec::startup_params(data);
    let mut p = 0;
    let _ = codec::cstr(data, &mut p);
});
