//! Any text: no panic, findings on character boundaries and in order, one
//! count per finding, and masking is idempotent (what comes out holds
//! nothing a detector would still find).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wicket_mask::{Masker, Style};

fn masker() -> &'static Masker {
    static M: OnceLock<Masker> = OnceLock::new();
    M.get_or_init(|| {
        Masker::builder()
            .all(Style::Redact)
            .custom("ticket", r"TICKET-[0-9]{4,}", Style::Hash)
            .hash_key(b"fuzz")
            .build()
            .expect("masker")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let m = masker();
    let found = m.find(text);
    let mut at = 0;
    for f in &found {
        assert!(f.start >= at && f.start < f.end, "findings overlap or are empty");
        assert!(text.is_char_boundary(f.start) && text.is_char_boundary(f.end));
        at = f.end;
    }
    let (out, counts) = m.mask(text);
    assert!(counts.total() as usize >= found.len());
    let (again, _) = m.mask(&out);
    assert_eq!(again, out, "masked output still holds a detected value");
});
