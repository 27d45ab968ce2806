//! The built-in detectors, run together in one pass over the bytes.
//!
//! The scanner walks the text once. It looks for the next candidate: a word
//! (a run of letters and digits) whose first byte an enabled detector can
//! start with, or a trigger byte. When few letters can start a candidate (the
//! usual secret detectors), it reads sixteen bytes at a time through a flag
//! table and finds the candidate with bit arithmetic, with no branch per
//! word; otherwise it walks word by word. At a candidate word it tries the
//! detectors that can start with that byte, then jumps over the word. `@` looks back for an e-mail's local part, `+`
//! and `(` start phone numbers, `-` starts a PEM block, `:` an IPv6 address.
//! Every candidate is validated (Luhn for cards, the SSA's ranges for SSNs,
//! mod 97 for IBANs, the address parsers for IPs), so random numbers and
//! words rarely match.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// What a built-in detector finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    /// An e-mail address.
    Email,
    /// A payment card number (known issuer prefix, 13 to 19 digits, Luhn-valid).
    CreditCard,
    /// A US social security number in `AAA-GG-SSSS` or `AAA GG SSSS` form, in the valid ranges.
    UsSsn,
    /// An IBAN (country code, check digits valid by mod 97).
    Iban,
    /// A phone number: international (`+` and 8 to 15 digits) or North American with separators.
    Phone,
    /// An IPv4 address.
    Ipv4,
    /// An IPv6 address.
    Ipv6,
    /// A JSON Web Token (`eyJ….eyJ….sig`).
    Jwt,
    /// A cloud or SaaS access key (AWS, Google, GitHub, Slack, Stripe).
    CloudKey,
    /// A PEM private key block.
    PrivateKey,
}

impl Entity {
    /// Every built-in entity.
    pub const ALL: [Entity; 10] = [
        Entity::Email,
        Entity::CreditCard,
        Entity::UsSsn,
        Entity::Iban,
        Entity::Phone,
        Entity::Ipv4,
        Entity::Ipv6,
        Entity::Jwt,
        Entity::CloudKey,
        Entity::PrivateKey,
    ];

    /// The entity's name in policy and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Email => "email",
            Entity::CreditCard => "card",
            Entity::UsSsn => "ssn",
            Entity::Iban => "iban",
            Entity::Phone => "phone",
            Entity::Ipv4 => "ipv4",
            Entity::Ipv6 => "ipv6",
            Entity::Jwt => "jwt",
            Entity::CloudKey => "cloud_key",
            Entity::PrivateKey => "private_key",
        }
    }

    /// Whether the value is a credential (partial masking keeps its start, not its end).
    pub fn is_secret(self) -> bool {
        matches!(self, Entity::Jwt | Entity::CloudKey | Entity::PrivateKey)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl FromStr for Entity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Entity::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Entity::ALL.iter().map(|e| e.as_str()).collect();
                format!("unknown detector `{s}` (known: {})", names.join(", "))
            })
    }
}

/// Which built-in detectors run, and which bytes can begin a word one of
/// them reads (most words cannot, and are skipped without a look).
#[derive(Clone, Debug)]
pub(crate) struct Enabled {
    on: [bool; Entity::ALL.len()],
    /// Per byte value: [`F_ALNUM`], [`F_START`] (can begin a word an enabled
    /// detector reads), [`F_TRIGGER`] (an enabled detector's trigger byte).
    flags: [u8; 256],
    /// Few letters begin a candidate word: skipping sixteen bytes at a time
    /// pays ([`next_candidate`]); otherwise words are walked one by one
    /// ([`next_word`]), as most of them are looked at anyway.
    sparse: bool,
}

/// A letter or digit.
const F_ALNUM: u8 = 1;
/// Can begin a word one of the enabled detectors reads.
const F_START: u8 = 2;
/// Starts an enabled detector by itself (`@`, `+`, `(`, `-`, `:`).
const F_TRIGGER: u8 = 4;

impl Enabled {
    /// The detectors in `on` (indexed by [`Entity::index`]).
    pub(crate) fn new(on: [bool; Entity::ALL.len()]) -> Enabled {
        let mut flags = [0u8; 256];
        for c in 0..=255u8 {
            let digit = c.is_ascii_digit();
            let hex = c.is_ascii_hexdigit();
            // Card numbers start with an issuer's digit (see `known_issuer`).
            let issuer = matches!(c, b'2'..=b'6');
            let start = (digit
                && [Entity::Ipv4, Entity::UsSsn, Entity::Phone]
                    .iter()
                    .any(|e| on[e.index()]))
                || (issuer && on[Entity::CreditCard.index()])
                || (c == b'e' && on[Entity::Jwt.index()])
                || (matches!(c, b'A' | b'g' | b'x' | b's' | b'r') && on[Entity::CloudKey.index()])
                || (c.is_ascii_uppercase() && on[Entity::Iban.index()])
                || (hex && on[Entity::Ipv6.index()]);
            let trigger = match c {
                b'@' => on[Entity::Email.index()],
                b'+' | b'(' => on[Entity::Phone.index()],
                b'-' => on[Entity::PrivateKey.index()],
                b':' => on[Entity::Ipv6.index()],
                _ => false,
            };
            flags[usize::from(c)] = if c.is_ascii_alphanumeric() {
                F_ALNUM
            } else {
                0
            } | if start { F_START } else { 0 }
                | if trigger { F_TRIGGER } else { 0 };
        }
        let letters = flags
            .iter()
            .enumerate()
            .filter(|&(c, f)| (c as u8).is_ascii_alphabetic() && f & F_START != 0)
            .count();
        Enabled {
            on,
            flags,
            sparse: letters <= 8,
        }
    }
}

impl std::ops::Index<usize> for Enabled {
    type Output = bool;
    fn index(&self, i: usize) -> &bool {
        &self.on[i]
    }
}

const ALNUM: u8 = 1;
const DIGIT: u8 = 2;
const UPPER: u8 = 4;
const HEX: u8 = 8;
const LOCAL: u8 = 16; // e-mail local part
const TRIGGER: u8 = 32; // `@`, `+`, `(`, `-`, `:`

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        let mut v = 0;
        if b.is_ascii_alphanumeric() {
            v |= ALNUM | LOCAL;
        }
        if b.is_ascii_digit() {
            v |= DIGIT | HEX;
        }
        if b.is_ascii_uppercase() {
            v |= UPPER;
        }
        if matches!(b, b'a'..=b'f' | b'A'..=b'F') {
            v |= HEX;
        }
        if matches!(b, b'.' | b'_' | b'%' | b'+' | b'-') {
            v |= LOCAL;
        }
        if matches!(b, b'@' | b'+' | b'(' | b'-' | b':') {
            v |= TRIGGER;
        }
        t[c] = v;
        c += 1;
    }
    t
};

#[inline]
fn class(b: &[u8], i: usize) -> u8 {
    b.get(i).map_or(0, |&c| CLASS[c as usize])
}

#[inline]
fn is(b: &[u8], i: usize, flag: u8) -> bool {
    class(b, i) & flag != 0
}

/// Finds every enabled entity; pushes `(entity, start, end)` in text order
/// (spans may overlap; the caller merges them).
pub(crate) fn scan(text: &str, on: &Enabled, out: &mut Vec<(Entity, usize, usize)>) {
    let b = text.as_bytes();
    let n = b.len();
    let mut i = 0;
    // Where the last value ended: a boundary as good as a space, so that what
    // follows a value is judged as it will be once the value is replaced.
    let mut floor = 0;
    // Whether `i` is looked at even if it is inside a word: the text's start,
    // and where a value ended.
    let mut resume = true;
    loop {
        if !resume {
            i = if on.sparse {
                next_candidate(b, i, on)
            } else {
                next_word(b, i, on)
            };
        }
        resume = false;
        if i >= n {
            break;
        }
        let c = CLASS[b[i] as usize];
        if c & ALNUM != 0 {
            if on.flags[usize::from(b[i])] & F_START != 0
                && let Some((e, end)) = at_word(b, i, on, floor)
            {
                out.push((e, i, end));
                i = end.max(i + 1);
                floor = i;
                resume = true;
            } else {
                i = alnum_run_end(b, i);
            }
            continue;
        }
        if c & TRIGGER != 0 {
            let found = match b[i] {
                b'@' if on[Entity::Email.index()] => email(b, i),
                b'+' | b'(' if on[Entity::Phone.index()] => phone(b, i, floor).map(|end| (i, end)),
                b'-' if on[Entity::PrivateKey.index()] => pem(b, i).map(|end| (i, end)),
                b':' if on[Entity::Ipv6.index()] => ipv6(b, i, floor).map(|end| (i, end)),
                _ => None,
            };
            if let Some((start, end)) = found {
                let e = match b[i] {
                    b'@' => Entity::Email,
                    b'+' | b'(' => Entity::Phone,
                    b'-' => Entity::PrivateKey,
                    _ => Entity::Ipv6,
                };
                out.push((e, start, end));
                i = end.max(i + 1);
                floor = i;
                resume = true;
                continue;
            }
        }
        i += 1;
    }
}

/// What [`next_candidate`] finds, a word or a byte at a time; `i` is not
/// inside a word.
#[inline]
fn next_word(b: &[u8], mut i: usize, on: &Enabled) -> usize {
    while i < b.len() {
        let f = on.flags[usize::from(b[i])];
        if f & (F_START | F_TRIGGER) != 0 {
            return i;
        }
        i = if f & F_ALNUM != 0 {
            alnum_run_end(b, i)
        } else {
            i + 1
        };
    }
    b.len()
}

/// The first position from `i` on where an enabled detector could begin: a
/// word (a letter or digit after anything else) whose first byte some
/// detector reads, or an enabled trigger byte; `b.len()` if none.
///
/// Sixteen bytes at a time, without a branch per byte or per word: most text
/// has no candidate for many words, and words end at unpredictable lengths.
#[inline]
fn next_candidate(b: &[u8], mut i: usize, on: &Enabled) -> usize {
    let flag = |j: usize| u64::from(on.flags[usize::from(b[j])]);
    // Whether the byte before `i` is a letter or digit (so `i` starts no word).
    let mut prev = u64::from(i > 0 && b[i - 1].is_ascii_alphanumeric());
    // Byte k of the result holds the flags of chunk[k].
    let flags8 = |chunk: &[u8; 8]| {
        chunk.iter().enumerate().fold(0u64, |m, (k, &c)| {
            m | u64::from(on.flags[usize::from(c)]) << (8 * k)
        })
    };
    // The candidates among eight bytes' flags `m`, given whether the byte
    // before them is a letter or digit.
    let hits = |m: u64, prev: u64| {
        let alnum = m & (ONES * u64::from(F_ALNUM));
        let starts = (m >> F_START.trailing_zeros()) & ONES;
        let triggers = (m >> F_TRIGGER.trailing_zeros()) & ONES;
        ((starts & !((alnum << 8) | prev)) | triggers, alnum >> 56)
    };
    while let Some(chunk) = b.get(i..i + 16) {
        let (lo, hi) = chunk.split_at(8);
        let (h0, p0) = hits(flags8(lo.try_into().expect("8")), prev);
        let (h1, p1) = hits(flags8(hi.try_into().expect("8")), p0);
        if h0 | h1 != 0 {
            let at = if h0 != 0 {
                h0.trailing_zeros() / 8
            } else {
                8 + h1.trailing_zeros() / 8
            };
            return i + at as usize;
        }
        prev = p1;
        i += 16;
    }
    while i < b.len() {
        let f = flag(i);
        if (f & u64::from(F_START) != 0 && prev == 0) || f & u64::from(F_TRIGGER) != 0 {
            return i;
        }
        prev = f & u64::from(F_ALNUM);
        i += 1;
    }
    b.len()
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The high bit of each of the eight bytes of `x` (little-endian) that is
/// an ASCII letter or digit.
#[inline]
fn alnum_mask(x: u64) -> u64 {
    // Each byte's low seven bits plus a constant below 0x80 stays below
    // 0x100: no carry crosses into the next byte, and the byte's high bit
    // says whether it reached the constant's threshold.
    let low = x & !HIGH;
    let at_least = |lo: u8| (low + ONES * u64::from(0x80 - lo)) & HIGH;
    let above = |hi: u8| (low + ONES * u64::from(0x7f - hi)) & HIGH;
    ((at_least(b'0') & !above(b'9'))
        | (at_least(b'A') & !above(b'Z'))
        | (at_least(b'a') & !above(b'z')))
        & !x
}

/// End of the run of ASCII letters and digits starting at `i`, the same as
/// `run(b, i, ALNUM)`, eight bytes at a time: words end at unpredictable
/// lengths, and a branch per byte was most of the scan's time.
#[inline]
fn alnum_run_end(b: &[u8], mut i: usize) -> usize {
    while let Some(chunk) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let stop = !alnum_mask(x) & HIGH;
        if stop != 0 {
            return i + (stop.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    run(b, i, ALNUM)
}

/// End of the run of bytes of class `flag` starting at `i`.
#[inline]
fn run(b: &[u8], mut i: usize, flag: u8) -> usize {
    while i < b.len() && CLASS[b[i] as usize] & flag != 0 {
        i += 1;
    }
    i
}

/// The detectors that start with a letter or digit, at the start of a word.
fn at_word(b: &[u8], i: usize, on: &Enabled, floor: usize) -> Option<(Entity, usize)> {
    let first = b[i];
    if first.is_ascii_digit() {
        if on[Entity::Ipv4.index()]
            && let Some(end) = ipv4(b, i, floor)
        {
            return Some((Entity::Ipv4, end));
        }
        if on[Entity::UsSsn.index()]
            && let Some(end) = ssn(b, i)
        {
            return Some((Entity::UsSsn, end));
        }
        if on[Entity::CreditCard.index()]
            && let Some(end) = card(b, i)
        {
            return Some((Entity::CreditCard, end));
        }
        if on[Entity::Phone.index()]
            && let Some(end) = phone(b, i, floor)
        {
            return Some((Entity::Phone, end));
        }
    } else {
        if on[Entity::Jwt.index()]
            && b[i..].starts_with(b"eyJ")
            && let Some(end) = jwt(b, i)
        {
            return Some((Entity::Jwt, end));
        }
        if on[Entity::CloudKey.index()]
            && let Some(end) = cloud_key(b, i)
        {
            return Some((Entity::CloudKey, end));
        }
        if on[Entity::Iban.index()]
            && is(b, i, UPPER)
            && let Some(end) = iban(b, i)
        {
            return Some((Entity::Iban, end));
        }
    }
    if on[Entity::Ipv6.index()]
        && is(b, i, HEX)
        && let Some(end) = ipv6(b, i, floor)
    {
        return Some((Entity::Ipv6, end));
    }
    None
}

/// Whether the byte at `i` ends a value (not a letter or digit).
#[inline]
fn ends(b: &[u8], i: usize) -> bool {
    !is(b, i, ALNUM)
}

fn email(b: &[u8], at: usize) -> Option<(usize, usize)> {
    // Local part: back over [A-Za-z0-9._%+-], at most 64 bytes, not starting with a dot.
    let mut start = at;
    while start > 0 && at - start < 64 && is(b, start - 1, LOCAL) {
        start -= 1;
    }
    while start < at && matches!(b[start], b'.' | b'-' | b'+') {
        start += 1;
    }
    if start == at {
        return None;
    }
    // Domain: labels of [A-Za-z0-9-] separated by dots, a last label of two or more letters.
    let mut i = at + 1;
    let mut end = None;
    let mut labels = 0;
    loop {
        let label_start = i;
        while i < b.len() && (is(b, i, ALNUM) || b[i] == b'-') && i - at <= 255 {
            i += 1;
        }
        if i == label_start {
            break;
        }
        labels += 1;
        let label = &b[label_start..i];
        if labels >= 2 && label.len() >= 2 && label.iter().all(u8::is_ascii_alphabetic) {
            end = Some(i);
        }
        if i + 1 < b.len() && b[i] == b'.' && is(b, i + 1, ALNUM) {
            i += 1;
        } else {
            break;
        }
    }
    end.map(|e| (start, e))
}

fn ipv4(b: &[u8], i: usize, floor: usize) -> Option<usize> {
    // Not the tail of a longer dotted number (`1.2.3.4.5`, `v1.2.3.4`).
    if i >= floor + 2 && b[i - 1] == b'.' && is(b, i - 2, ALNUM) {
        return None;
    }
    let mut j = i;
    for part in 0..4 {
        let s = j;
        while j < b.len() && j - s < 3 && b[j].is_ascii_digit() {
            j += 1;
        }
        if j == s {
            return None;
        }
        if part < 3 {
            if b.get(j) != Some(&b'.') {
                return None;
            }
            j += 1;
        }
    }
    if !ends(b, j) || (b.get(j) == Some(&b'.') && is(b, j + 1, DIGIT)) {
        return None;
    }
    Ipv4Addr::from_str(std::str::from_utf8(&b[i..j]).ok()?).ok()?;
    Some(j)
}

fn digits_at(b: &[u8], i: usize, n: usize) -> Option<u32> {
    let s = b.get(i..i + n)?;
    s.iter().try_fold(0u32, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

fn ssn(b: &[u8], i: usize) -> Option<usize> {
    let sep = *b.get(i + 3)?;
    if !matches!(sep, b'-' | b' ') || b.get(i + 6) != Some(&sep) {
        return None;
    }
    let area = digits_at(b, i, 3)?;
    let group = digits_at(b, i + 4, 2)?;
    let serial = digits_at(b, i + 7, 4)?;
    let end = i + 11;
    if !ends(b, end) || (b.get(end) == Some(&sep) && is(b, end + 1, DIGIT)) {
        return None;
    }
    let valid = area != 0 && area != 666 && area < 900 && group != 0 && serial != 0;
    valid.then_some(end)
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (k, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

fn known_issuer(d: &[u8]) -> bool {
    let n = |k: usize| d[..k].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    match d[0] {
        4 => true,                                                                    // Visa
        5 => (51..=55).contains(&n(2)),                                               // Mastercard
        2 => (2221..=2720).contains(&n(4)), // Mastercard 2-series
        3 => matches!(n(2), 34 | 37 | 35 | 36 | 38 | 39 | 30), // Amex, JCB, Diners
        6 => n(4) == 6011 || n(2) == 65 || (644..=649).contains(&n(3)) || n(2) == 62, // Discover, UnionPay
        _ => false,
    }
}

fn card(b: &[u8], i: usize) -> Option<usize> {
    // Digits in groups separated by single spaces or dashes.
    let mut digits = [0u8; 19];
    let mut count = 0;
    let mut j = i;
    let mut best = None;
    let mut sep: Option<u8> = None;
    loop {
        while j < b.len() && b[j].is_ascii_digit() {
            if count == 19 {
                return best;
            }
            digits[count] = b[j] - b'0';
            count += 1;
            j += 1;
        }
        // A group ends here: a card if the digits so far are one and nothing glued follows.
        if (13..=19).contains(&count)
            && ends(b, j)
            && known_issuer(&digits[..count])
            && luhn(&digits[..count])
        {
            best = Some(j);
        }
        match b.get(j) {
            Some(&s @ (b' ' | b'-'))
                if sep.is_none_or(|x| x == s) && is(b, j + 1, DIGIT) && count < 19 =>
            {
                sep = Some(s);
                j += 1;
            }
            _ => return best,
        }
    }
}

fn phone(b: &[u8], i: usize, floor: usize) -> Option<usize> {
    match b[i] {
        b'+' => {
            // +CC then digits with spaces, dashes, dots or parentheses: 8 to 15 digits.
            if !is(b, i + 1, DIGIT) || (i > floor && is(b, i - 1, ALNUM)) {
                return None;
            }
            let mut j = i + 1;
            let mut count = 0;
            let mut last_digit = j;
            while j < b.len() && j - i < 24 {
                match b[j] {
                    c if c.is_ascii_digit() => {
                        count += 1;
                        last_digit = j + 1;
                    }
                    b' ' | b'-' | b'.' | b'(' | b')' if is(b, j + 1, DIGIT) || b[j] == b')' => {}
                    _ => break,
                }
                j += 1;
            }
            ((8..=15).contains(&count) && ends(b, last_digit)).then_some(last_digit)
        }
        b'(' => {
            // (ddd) ddd-dddd
            if b.get(i + 4) != Some(&b')') {
                return None;
            }
            digits_at(b, i + 1, 3)?;
            let mut j = i + 5;
            if b.get(j) == Some(&b' ') {
                j += 1;
            }
            nanp_tail(b, j)
        }
        _ => {
            // ddd-ddd-dddd, ddd.ddd.dddd, ddd ddd dddd
            let sep = *b.get(i + 3)?;
            if !matches!(sep, b'-' | b'.' | b' ') {
                return None;
            }
            digits_at(b, i, 3)?;
            nanp_tail(b, i + 4)
        }
    }
}

/// `ddd[-. ]dddd` at `j`, not followed by more digits.
fn nanp_tail(b: &[u8], j: usize) -> Option<usize> {
    digits_at(b, j, 3)?;
    if !matches!(b.get(j + 3), Some(b'-' | b'.' | b' ')) {
        return None;
    }
    digits_at(b, j + 4, 4)?;
    let end = j + 8;
    ends(b, end).then_some(end)
}

fn ipv6(b: &[u8], i: usize, floor: usize) -> Option<usize> {
    if i > floor && (is(b, i - 1, ALNUM) || b[i - 1] == b':') {
        return None;
    }
    let mut j = i;
    let mut colons = 0;
    while j < b.len() && j - i < 45 {
        match b[j] {
            b':' => colons += 1,
            b'.' => {}
            c if CLASS[c as usize] & HEX != 0 => {}
            _ => break,
        }
        j += 1;
    }
    // `::` alone (the unspecified address) says nothing about anyone.
    if colons < 2 || !b[i..j].iter().any(u8::is_ascii_hexdigit) {
        return None;
    }
    // The longest prefix that is an address and ends before a dot or a colon
    // (`::1.` ends a sentence; `…:0.a` is followed by a word).
    let mut end = j;
    while end > i {
        if end == j || matches!(b[end], b'.' | b':') {
            let s = std::str::from_utf8(&b[i..end]).ok()?;
            if Ipv6Addr::from_str(s).is_ok() {
                return Some(end);
            }
        }
        end -= 1;
    }
    None
}

#[inline]
fn is_b64url(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

fn b64url_run(b: &[u8], mut j: usize) -> usize {
    while j < b.len() && is_b64url(b[j]) {
        j += 1;
    }
    j
}

fn jwt(b: &[u8], i: usize) -> Option<usize> {
    let h = b64url_run(b, i);
    if h - i < 10 || b.get(h) != Some(&b'.') || !b[h + 1..].starts_with(b"eyJ") {
        return None;
    }
    let p = b64url_run(b, h + 1);
    if b.get(p) != Some(&b'.') {
        return None;
    }
    let s = b64url_run(b, p + 1);
    Some(s)
}

fn cloud_key(b: &[u8], i: usize) -> Option<usize> {
    // Most words start with none of the prefixes: decide that before
    // scanning the word (this runs at every word start).
    const AWS: [&[u8]; 10] = [
        b"AKIA", b"ASIA", b"AGPA", b"AIDA", b"AROA", b"AIPA", b"ANPA", b"ANVA", b"ABIA", b"ACCA",
    ];
    let s = &b[i..];
    let candidate = match s.first()? {
        b'A' => AWS.iter().any(|p| s.starts_with(p)) || s.starts_with(b"AIza"),
        b'g' => s.starts_with(b"gh"),
        b'x' => s.starts_with(b"xox"),
        b's' => s.starts_with(b"sk_live_"),
        b'r' => s.starts_with(b"rk_live_"),
        _ => false,
    };
    if !candidate {
        return None;
    }
    let token_end = b64url_run(b, i);
    let t = &b[i..token_end];
    let rest_alnum = |from: usize| t[from..].iter().all(u8::is_ascii_alphanumeric);
    let ok = match t.first()? {
        b'A' => {
            // AWS access key ids: a 4-letter prefix and 16 upper-case letters or digits.
            (t.len() == 20
                && AWS.iter().any(|p| t.starts_with(p))
                && t[4..]
                    .iter()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()))
                || (t.len() == 39 && t.starts_with(b"AIza"))
        }
        b'g' => {
            (t.len() == 40
                && t.starts_with(b"gh")
                && matches!(t.get(2), Some(b'p' | b'o' | b'u' | b's' | b'r'))
                && t.get(3) == Some(&b'_')
                && rest_alnum(4))
                || (t.starts_with(b"github_pat_") && t.len() >= 40)
        }
        b'x' => {
            t.starts_with(b"xox")
                && matches!(t.get(3), Some(b'a' | b'b' | b'p' | b'r' | b's'))
                && t.get(4) == Some(&b'-')
                && t.len() >= 15
        }
        b's' | b'r' => {
            (t.starts_with(b"sk_live_") || t.starts_with(b"rk_live_"))
                && t.len() >= 24
                && rest_alnum(8)
        }
        _ => false,
    };
    ok.then_some(token_end)
}

fn iban(b: &[u8], i: usize) -> Option<usize> {
    // CC dd then upper-case letters and digits, in print groups of four or not.
    if !(is(b, i + 1, UPPER) && is(b, i + 2, DIGIT) && is(b, i + 3, DIGIT)) {
        return None;
    }
    let mut chars = [0u8; 34];
    let mut count = 0;
    let mut j = i;
    let mut best = None;
    loop {
        while j < b.len() && (b[j].is_ascii_digit() || b[j].is_ascii_uppercase()) {
            if count == 34 {
                return best;
            }
            chars[count] = b[j];
            count += 1;
            j += 1;
        }
        if count >= 15 && ends(b, j) && mod97(&chars[..count]) {
            best = Some(j);
        }
        if b.get(j) == Some(&b' ') && is(b, j + 1, ALNUM) && count.is_multiple_of(4) {
            j += 1;
        } else {
            return best;
        }
    }
}

fn mod97(s: &[u8]) -> bool {
    // Move the first four characters to the end; letters count as 10..35.
    let mut r = 0u32;
    for &c in s[4..].iter().chain(&s[..4]) {
        let v = if c.is_ascii_digit() {
            u32::from(c - b'0')
        } else {
            u32::from(c - b'A') + 10
        };
        r = if v >= 10 {
            (r * 100 + v) % 97
        } else {
            (r * 10 + v) % 97
        };
    }
    r == 1
}

fn pem(b: &[u8], i: usize) -> Option<usize> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    if !b[i..].starts_with(BEGIN) {
        return None;
    }
    let line_end = b[i..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |p| i + p);
    let header = &b[i..line_end];
    if !contains(header, b"PRIVATE KEY-----") {
        return None;
    }
    // Up to the end of the matching END line; no END means the rest of the text.
    let Some(p) = find(&b[line_end..], b"-----END ") else {
        return Some(b.len());
    };
    let end_start = line_end + p + b"-----END ".len();
    match find(&b[end_start..], b"-----") {
        Some(q) => Some(end_start + q + 5),
        None => Some(b.len()),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan as it was before it skipped words no enabled detector can
    /// start with: a byte at a time, every word start looked at.
    fn reference_scan(text: &str, on: &Enabled) -> Vec<(Entity, usize, usize)> {
        let mut out = Vec::new();
        let b = text.as_bytes();
        let (mut i, mut floor) = (0, 0);
        while i < b.len() {
            let c = CLASS[b[i] as usize];
            if c & ALNUM != 0 {
                let run_end = run(b, i, ALNUM);
                if let Some((e, end)) = at_word(b, i, on, floor) {
                    out.push((e, i, end));
                    i = end.max(i + 1);
                    floor = i;
                } else {
                    i = run_end;
                }
                continue;
            }
            if c & TRIGGER != 0 {
                let found = match b[i] {
                    b'@' if on[Entity::Email.index()] => email(b, i).map(|s| (Entity::Email, s)),
                    b'+' | b'(' if on[Entity::Phone.index()] => {
                        phone(b, i, floor).map(|e| (Entity::Phone, (i, e)))
                    }
                    b'-' if on[Entity::PrivateKey.index()] => {
                        pem(b, i).map(|e| (Entity::PrivateKey, (i, e)))
                    }
                    b':' if on[Entity::Ipv6.index()] => {
                        ipv6(b, i, floor).map(|e| (Entity::Ipv6, (i, e)))
                    }
                    _ => None,
                };
                if let Some((e, (start, end))) = found {
                    out.push((e, start, end));
                    i = end.max(i + 1);
                    floor = i;
                    continue;
                }
            }
            i += 1;
        }
        out
    }

    #[test]
    fn skipping_words_finds_what_the_byte_scan_found() {
        const PIECES: &[&str] = &[
            "the ",
            "quick ",
            "mail ",
            "a.b@example.com",
            " ",
            "\n",
            "-",
            ":",
            "(",
            "+",
            "4111 1111 1111 1111",
            "4111111111111111",
            "078-05-1120",
            "192.168.1.20",
            "2001:db8::8a2e:370:7334",
            "fe80::1",
            "+1 (415) 555-0132",
            "(415) 555-0132",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
            "AKIAIOSFODNN7EXAMPLE",
            "ghp_0123456789abcdefghijABCDEFGHIJ012345",
            "GB82WEST12345698765432",
            "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----",
            "é",
            "x",
            "0",
            "sk_live_0123456789abcdef01234567",
            "@",
            ".",
            ",",
            "v1.2.3.4",
            "e",
            "A",
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..3000 {
            let mut on = [false; Entity::ALL.len()];
            let bits = if round == 0 { u64::MAX } else { next() };
            for (k, o) in on.iter_mut().enumerate() {
                *o = bits >> k & 1 == 1;
            }
            let on = Enabled::new(on);
            let mut text = String::new();
            for _ in 0..(next() % 60) {
                text.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            let want = reference_scan(&text, &on);
            // Both ways of finding the next candidate, whichever `new` chose.
            for sparse in [true, false] {
                let on = Enabled {
                    sparse,
                    ..on.clone()
                };
                let mut got = Vec::new();
                scan(&text, &on, &mut got);
                assert_eq!(got, want, "{text:?} with {:?}, sparse {sparse}", on.on);
            }
        }
    }

    #[test]
    fn the_eight_byte_alnum_run_agrees_with_the_byte_loop() {
        // Every byte value at every position of a word, then random text.
        for stop in 0..=255u8 {
            for at in 0..20 {
                let mut b = vec![b'a'; 24];
                b[at] = stop;
                for start in 0..4 {
                    assert_eq!(
                        alnum_run_end(&b, start),
                        run(&b, start, ALNUM),
                        "byte {stop} at {at} from {start}"
                    );
                }
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut b = Vec::new();
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly letters and digits, some of everything else.
            let c = (x >> 32) as u8;
            b.push(if c < 200 {
                b"aZ09mQ5x"[usize::from(c % 8)]
            } else {
                c
            });
        }
        for i in 0..b.len() {
            assert_eq!(alnum_run_end(&b, i), run(&b, i, ALNUM), "at {i}");
        }
    }

    #[test]
    fn checksums() {
        let d: Vec<u8> = b"4111111111111111".iter().map(|c| c - b'0').collect();
        assert!(luhn(&d));
        let d: Vec<u8> = b"4111111111111112".iter().map(|c| c - b'0').collect();
        assert!(!luhn(&d));
        assert!(mod97(b"GB82WEST12345698765432"));
        assert!(!mod97(b"GB82WEST12345698765433"));
        assert!(mod97(b"DE89370400440532013000"));
    }
}
