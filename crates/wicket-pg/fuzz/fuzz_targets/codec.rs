//! Arbitrary bytes into the wire decoder, as a client or a server would send
//! them: framing, startup parameters and error fields must never panic, and
//! a decoded message must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wicket_pg::codec;

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
    }
    let _ = codec::startup_params(data);
    let mut p = 0;
    let _ = codec::cstr(data, &mut p);
});
