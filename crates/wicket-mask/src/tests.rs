//! Table-driven detector tests and properties.

use proptest::prelude::*;

use super::{Entity, Masker, Style};

fn masker() -> Masker {
    Masker::builder()
        .all(Style::Redact)
        .hash_key(b"test key")
        .build()
        .expect("builds")
}

/// (text, the values it holds, by detector)
const POSITIVE: &[(&str, &[(&str, &str)])] = &[
    (
        "mail ann.lee+x@mail.example.com now",
        &[("email", "ann.lee+x@mail.example.com")],
    ),
    ("<bob@example.org>", &[("email", "bob@example.org")]),
    (
        "card 4111 1111 1111 1111.",
        &[("card", "4111 1111 1111 1111")],
    ),
    ("4111-1111-1111-1111", &[("card", "4111-1111-1111-1111")]),
    ("amex 378282246310005", &[("card", "378282246310005")]),
    ("mc 5555555555554444,", &[("card", "5555555555554444")]),
    ("disc 6011111111111117", &[("card", "6011111111111117")]),
    ("ssn 123-45-6789", &[("ssn", "123-45-6789")]),
    ("ssn: 078 05 1120", &[("ssn", "078 05 1120")]),
    (
        "iban GB82WEST12345698765432",
        &[("iban", "GB82WEST12345698765432")],
    ),
    (
        "IBAN DE89 3704 0044 0532 0130 00",
        &[("iban", "DE89 3704 0044 0532 0130 00")],
    ),
    ("call +1 415 555 2671", &[("phone", "+1 415 555 2671")]),
    (
        "call +44 20 7946 0958 today",
        &[("phone", "+44 20 7946 0958")],
    ),
    ("tel (415) 555-2671", &[("phone", "(415) 555-2671")]),
    ("tel 415-555-2671", &[("phone", "415-555-2671")]),
    ("from 10.0.0.12:5432", &[("ipv4", "10.0.0.12")]),
    ("ip=192.168.1.254,", &[("ipv4", "192.168.1.254")]),
    (
        "v6 2001:db8::8a2e:370:7334 up",
        &[("ipv6", "2001:db8::8a2e:370:7334")],
    ),
    ("lo ::1.", &[("ipv6", "::1")]),
    (
        "fe80::1ff:fe23:4567:890a",
        &[("ipv6", "fe80::1ff:fe23:4567:890a")],
    ),
    (
        "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U ok",
        &[(
            "jwt",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        )],
    ),
    (
        "key AKIAIOSFODNN7EXAMPLE",
        &[("cloud_key", "AKIAIOSFODNN7EXAMPLE")],
    ),
    (
        "gh ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        &[("cloud_key", "ghp_abcdefghijklmnopqrstuvwxyz0123456789")],
    ),
    (
        "slack xoxb-1234567890-abcdefghij",
        &[("cloud_key", "xoxb-1234567890-abcdefghij")],
    ),
    (
        "g AIzaSyA1234567890abcdefghijklmnopqrstuv",
        &[("cloud_key", "AIzaSyA1234567890abcdefghijklmnopqrstuv")],
    ),
    (
        "k -----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\nabc\n-----END RSA PRIVATE KEY----- tail",
        &[(
            "private_key",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\nabc\n-----END RSA PRIVATE KEY-----",
        )],
    ),
    (
        "two: a@b.io and 123-45-6789",
        &[("email", "a@b.io"), ("ssn", "123-45-6789")],
    ),
];

/// Text that must come through unchanged.
const NEGATIVE: &[&str] = &[
    "plain words, nothing to see",
    "order 4111111111111112 (bad Luhn)",
    "id 1234567890123456",
    "ssn 666-12-3456 and 000-12-3456 and 123-00-4567 and 900-12-3456",
    "version 1.2.3.4.5 and 999.1.1.1",
    "time 12:30:45 and mac 00:1a:2b:3c:4d:5e",
    "GB82WEST12345698765433",
    "user@localhost",
    "@handle and a@ and @b.com",
    "AKIA1234 too short",
    "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    "count 12345 rows in 0.5 s",
    "2024-01-15 10:00:00+00",
];

#[test]
fn every_detector_finds_its_values() {
    let m = masker();
    for (text, expected) in POSITIVE {
        let found: Vec<(&str, &str)> = m
            .find(text)
            .into_iter()
            .map(|f| (m.detector_name(f.detector), &text[f.start..f.end]))
            .collect();
        assert_eq!(&found, expected, "in {text:?}");
        let (out, counts) = m.mask(text);
        for (name, value) in *expected {
            assert!(!out.contains(value), "{value} left in {out:?}");
            assert!(out.contains(&format!("[redacted:{name}]")), "{out:?}");
            assert!(counts.get(name) >= 1, "{name} not counted");
        }
    }
}

#[test]
fn innocent_text_is_left_alone() {
    let m = masker();
    for text in NEGATIVE {
        let found: Vec<&str> = m.find(text).iter().map(|f| &text[f.start..f.end]).collect();
        assert!(found.is_empty(), "{text:?}: {found:?}");
        let (out, counts) = m.mask(text);
        assert_eq!(out, *text);
        assert_eq!(counts.total(), 0);
    }
}

#[test]
fn styles() {
    let m = Masker::builder()
        .all(Style::Partial)
        .detector(Entity::UsSsn, Style::Hash)
        .hash_key(b"k")
        .build()
        .unwrap();
    let (out, _) = m.mask("4111 1111 1111 1111 / ann@example.com / AKIAIOSFODNN7EXAMPLE");
    assert_eq!(out, "****1111 / a***@example.com / AKIA****");
    let (a, _) = m.mask("123-45-6789");
    let (b, _) = m.mask("x 123-45-6789 y");
    assert!(a.starts_with("hmac:") && a.len() == 21, "{a}");
    assert_eq!(format!("x {a} y"), b, "equal values hash equally");
    let other = Masker::builder()
        .detector(Entity::UsSsn, Style::Hash)
        .hash_key(b"another")
        .build()
        .unwrap();
    assert_ne!(other.mask("123-45-6789").0, a, "the key matters");
    assert_eq!(
        m.mask_whole("Ann Lee", "name", Style::Redact),
        "[redacted:name]"
    );
    assert_eq!(
        m.mask_whole("4111111111111111", "card", Style::Partial),
        "****1111"
    );
}

#[test]
fn custom_detectors_and_errors() {
    let m = Masker::builder()
        .detector(Entity::Email, Style::Redact)
        .custom("employee_id", r"\bEMP-\d{6}\b", Style::Redact)
        .build()
        .unwrap();
    let (out, counts) = m.mask("EMP-123456 mailed x@y.com; EMP-12 is not one");
    assert_eq!(
        out,
        "[redacted:employee_id] mailed [redacted:email]; EMP-12 is not one"
    );
    assert_eq!(counts.get("employee_id"), 1);
    assert_eq!(counts.get("email"), 1);
    let err = Masker::builder()
        .custom("bad", "(", Style::Redact)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("custom detector `bad`"), "{err}");
    assert!(
        Masker::builder()
            .all(Style::Redact)
            .custom("email", "x", Style::Redact)
            .build()
            .is_err()
    );
    assert!("nope".parse::<Style>().is_err());
    assert!("us_ssn".parse::<Entity>().unwrap_err().contains("ssn"));
}

#[test]
fn overlapping_values_are_masked_whole() {
    let m = masker();
    // A card number as an e-mail's local part: the whole address goes.
    let (out, counts) = m.mask("x 4111111111111111@example.com y");
    assert_eq!(out, "x [redacted:email] y");
    assert_eq!(counts.total(), 1);
}

#[test]
fn multibyte_text_is_safe() {
    let m = masker();
    let (out, _) = m.mask("Zoë — ann@example.com — 東京 4111 1111 1111 1111 ✓");
    assert_eq!(out, "Zoë — [redacted:email] — 東京 [redacted:card] ✓");
}

fn luhn_complete(prefix: &str, len: usize) -> String {
    // Random-free: pad with digits, then fix the check digit.
    let mut d: Vec<u8> = prefix.bytes().map(|c| c - b'0').collect();
    while d.len() < len - 1 {
        d.push(((d.len() * 7) % 10) as u8);
    }
    for check in 0..10u8 {
        let mut all = d.clone();
        all.push(check);
        let sum: u32 = all
            .iter()
            .rev()
            .enumerate()
            .map(|(k, &x)| {
                let v = u32::from(x) * if k % 2 == 1 { 2 } else { 1 };
                if v > 9 { v - 9 } else { v }
            })
            .sum();
        if sum.is_multiple_of(10) {
            return all.iter().map(|x| (x + b'0') as char).collect();
        }
    }
    unreachable!("one check digit fits")
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            "[a-z]{1,8}(\\.[a-z]{1,5})?",
            "[a-z]{2,10}",
            "(com|org|io|de)"
        )
            .prop_map(|(l, d, t)| format!("{l}@{d}.{t}")),
        (
            prop::sample::select(vec!["4", "51", "37", "6011"]),
            13usize..=16
        )
            .prop_map(|(p, n)| luhn_complete(p, n.max(p.len() + 2))),
        (1u32..=899, 1u32..=99, 1u32..=9999)
            .prop_filter("not 666", |(a, _, _)| *a != 666)
            .prop_map(|(a, g, s)| format!("{a:03}-{g:02}-{s:04}")),
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        (any::<u16>(), any::<u16>(), any::<u16>())
            .prop_map(|(a, b, c)| format!("2001:db8:{a:x}::{b:x}:{c:x}")),
        "AKIA[A-Z0-9]{16}",
        "\\+[1-9][0-9]{9,12}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Masked output never contains a detected value, whatever surrounds it.
    #[test]
    fn masked_output_never_contains_a_detected_value(
        before in "[a-z ,;:()]{0,12}",
        v in value(),
        after in "[ ,;.)]{1}[a-z ]{0,12}",
        style in prop::sample::select(vec![Style::Redact, Style::Partial, Style::Hash]),
    ) {
        let m = Masker::builder().all(style).hash_key(b"k").build().unwrap();
        let text = format!("{before} {v}{after}");
        let found: Vec<&str> = m.find(&text).iter().map(|f| &text[f.start..f.end]).collect();
        prop_assert!(found.iter().any(|f| f.contains(v.as_str())), "{v:?} not found in {text:?}: {found:?}");
        let (out, counts) = m.mask(&text);
        prop_assert!(!out.contains(v.as_str()), "{v:?} left in {out:?}");
        prop_assert!(counts.total() >= 1);
    }

    /// Values glued to each other by any separator: what comes out holds
    /// nothing a detector would still find.
    #[test]
    fn masking_glued_values_leaves_nothing_to_find(
        parts in prop::collection::vec((value(), "[-. ,:;()/+@]{0,2}"), 1..5),
    ) {
        let m = masker();
        let text: String = parts.iter().map(|(v, sep)| format!("{v}{sep}")).collect();
        let (out, _) = m.mask(&text);
        let (again, _) = m.mask(&out);
        prop_assert_eq!(&again, &out, "from {:?}", text);
    }

    /// Any input: no panic, spans on char boundaries, masking idempotent in length terms.
    #[test]
    fn any_text_is_handled(text in "\\PC{0,200}") {
        let m = masker();
        for f in m.find(&text) {
            prop_assert!(text.is_char_boundary(f.start) && text.is_char_boundary(f.end));
            prop_assert!(f.start < f.end);
        }
        let _ = m.mask(&text);
    }
}
