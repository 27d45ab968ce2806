//! Arbitrary bytes into the SPDY/3.1 frame decoder and header-block
//! inflater that wicket-k8s runs on every SPDY exec and attach (kubectl
//! 1.29 and older): it must never panic, never take more than the bytes
//! given nor allow a frame over its limit, and a decoded DATA frame must
//! encode back to the same bytes.
//!
//! Random bytes rarely make a valid zlib block, so the input is also read
//! as header pairs (split on NUL bytes), compressed the way kubectl does,
//! checked to inflate back to the same pairs, and then inflated again with
//! one byte of the block changed (chosen by the input): an error, never a
//! panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wicket_spdy::{Deflater, Frame, Inflater};

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

    // Structure-aware: header pairs from the input, through a real block.
    let text = String::from_utf8_lossy(data);
    let parts: Vec<&str> = text.split('\0').filter(|p| !p.is_empty()).collect();
    let pairs: Vec<(&str, &str)> = parts
        .chunks(2)
        .map(|c| (c[0], c.get(1).copied().unwrap_or("")))
        .collect();
    let mut deflater = Deflater::new();
    let block = deflater.block(&pairs);
    let frame = Frame::syn_stream(1, 0, &block);
    let mut wire = BytesMut::from(&frame.raw()[..]);
    let back = Frame::decode(&mut wire, usize::MAX).unwrap().unwrap();
    let headers = Inflater::new()
        .headers(back.header_block().unwrap())
        .unwrap();
    let want: Vec<(String, String)> = pairs
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
        .collect();
    assert_eq!(headers.0, want);
    if let Some(&k) = data.first() {
        let mut bad = block.clone();
        let at = usize::from(k) % bad.len();
        bad[at] ^= data.get(1).copied().unwrap_or(0x5a) | 1;
        let _ = Inflater::new().headers(&bad);
    }
});
