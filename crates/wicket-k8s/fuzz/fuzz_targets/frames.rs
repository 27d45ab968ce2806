//! Arbitrary bytes into the WebSocket channel-frame decoder that wicket-k8s
//! runs on every exec and attach stream, as a client and as the API server
//! would send them: it must never panic, never take more than the bytes
//! given nor allow a payload over its limit, and a decoded frame must
//! encode back to a frame that decodes the same.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wicket_sidecar::websocket::{self as ws, Sender};

fuzz_target!(|data: &[u8]| {
    for from in [Sender::Client, Sender::Server] {
        let mut buf = BytesMut::from(data);
        let mut seen = 0usize;
        while let Ok(Some(frame)) = ws::decode(&mut buf, from, 4096) {
            assert!(frame.payload.len() <= 4096);
            seen += 1;
            let mask = (from == Sender::Client).then_some([1, 2, 3, 4]);
            let mut again = BytesMut::new();
            ws::encode(&frame, mask, &mut again);
            let back = ws::decode(&mut again, from, 4096).unwrap().unwrap();
            assert_eq!(back, frame);
            assert!(again.is_empty());
            // The channel byte of the Kubernetes channel protocol.
            let _channel = frame.payload.first();
        }
        assert!(seen <= data.len() / 2 + 1);
    }
});
