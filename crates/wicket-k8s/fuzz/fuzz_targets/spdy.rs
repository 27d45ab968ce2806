//! Arbitrary bytes into the SPDY/3.1 frame decoder and header-block
//! inflater that wicket-k8s runs on every SPDY exec and attach (kubectl
//! 1.29 and older): it must never panic, never take more than the bytes
//! given nor allow a frame over its limit, and a decoded DATA frame must
//! encode back to the same bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wicket_spdy::{Frame, Inflater};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut inflater = Inflater::new();
    let mut taken = 0usize;
    while let Ok(Some(f)) = Frame::decode(&mut buf, 4096) {
        assert!(f.body().len() <= 4096);
        taken += f.raw().len();
        if let Some(block) = f.header_block() {
            if let Ok(h) = inflater.headers(block) {
                let _ = h.get("streamtype");
            }
        }
        if !f.is_control() {
            let again = Frame::data(f.stream().unwrap(), f.flags(), f.body());
            assert_eq!(again.raw(), f.raw());
        }
    }
    assert!(taken <= data.len());
});
