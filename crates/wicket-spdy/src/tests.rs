use super::*;

#[test]
fn the_dictionary_is_the_spdy3_one() {
    let d = dictionary();
    assert_eq!(d.len(), 1423);
    assert!(d.starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
    assert!(d.ends_with(b"utf-,*,enq=0."));
}

#[test]
fn frames_are_laid_out_as_spdy_3() {
    let f = Frame::syn_reply(5, 0, &[]);
    assert_eq!(f.raw().as_ref(), [0x80, 3, 0, 2, 0, 0, 0, 4, 0, 0, 0, 5]);
    assert_eq!(f.kind(), Some(kind::SYN_REPLY));
    assert_eq!(f.stream(), Some(5));
    let d = Frame::data(5, FLAG_FIN, b"hi");
    assert_eq!(d.raw().as_ref(), [0, 0, 0, 5, 1, 0, 0, 2, b'h', b'i']);
    assert!(!d.is_control() && d.fin());
    assert_eq!((d.stream(), d.body()), (Some(5), &b"hi"[..]));
    let s = Frame::syn_stream(7, FLAG_FIN, b"xyz");
    assert_eq!(s.stream(), Some(7));
    assert_eq!(s.header_block(), Some(&b"xyz"[..]));
    let p = Frame::control(kind::PING, 0, &[0, 0, 0, 1]);
    assert_eq!(p.stream(), None);
}

#[test]
fn decode_waits_for_whole_frames_and_refuses_bad_ones() {
    let mut buf = BytesMut::new();
    let a = Frame::data(1, 0, b"hello");
    let b = Frame::syn_reply(3, 0, b"");
    buf.extend_from_slice(a.raw());
    buf.extend_from_slice(&b.raw()[..5]);
    assert_eq!(Frame::decode(&mut buf, 1024).unwrap(), Some(a));
    assert_eq!(Frame::decode(&mut buf, 1024).unwrap(), None);
    buf.extend_from_slice(&b.raw()[5..]);
    assert_eq!(Frame::decode(&mut buf, 1024).unwrap(), Some(b));
    assert!(buf.is_empty());

    let mut big = BytesMut::from(&Frame::data(1, 0, &[0; 100]).raw()[..8]);
    assert_eq!(
        Frame::decode(&mut big, 99),
        Err(Error::TooLarge(100, 99)),
        "the length is checked before the body arrives"
    );
    let mut v2 = BytesMut::from(&[0x80u8, 2, 0, 1, 0, 0, 0, 0][..]);
    assert_eq!(Frame::decode(&mut v2, 99), Err(Error::Version(2)));
    let mut short = BytesMut::from(&[0x80u8, 3, 0, 1, 0, 0, 0, 2, 0, 0][..]);
    assert_eq!(Frame::decode(&mut short, 99), Err(Error::Short(1)));
}

#[test]
fn header_blocks_round_trip_as_one_zlib_stream() {
    let mut d = Deflater::new();
    let mut i = Inflater::new();
    let first = d.block(&[("streamType", "error"), ("port", "8080")]);
    let second = d.block(&[("streamtype", "stdout")]);
    // One zlib stream: its header (with the dictionary id) only once.
    assert_eq!(first[0], 0x78);
    assert_ne!(second[0], 0x78);
    let h = i.headers(&first).unwrap();
    assert_eq!(h.get("streamtype"), Some("error"));
    assert_eq!(h.get("port"), Some("8080"));
    assert_eq!(
        i.headers(&second).unwrap().get("streamtype"),
        Some("stdout")
    );
    // Large blocks too (the output buffer grows).
    let long = "v".repeat(50_000);
    let third = d.block(&[("x", long.as_str())]);
    assert_eq!(i.headers(&third).unwrap().get("x"), Some(long.as_str()));
}

#[test]
fn blocks_compressed_without_the_dictionary_are_read_too() {
    let mut z = flate2::Compress::new(flate2::Compression::fast(), true);
    let mut out = Vec::with_capacity(64);
    z.compress_vec(&[0, 0, 0, 0], &mut out, flate2::FlushCompress::Sync)
        .unwrap();
    assert_eq!(Inflater::new().headers(&out).unwrap(), Headers::default());
}

#[test]
fn bad_header_blocks_are_errors_not_panics() {
    assert!(matches!(
        Inflater::new().headers(b"not zlib at all"),
        Err(Error::Zlib(_))
    ));
    let mut z = flate2::Compress::new(flate2::Compression::fast(), true);
    let mut bomb = Vec::with_capacity(1 << 20);
    let zeros = vec![0u8; MAX_HEADER_BYTES + 10];
    z.compress_vec(&zeros, &mut bomb, flate2::FlushCompress::Sync)
        .unwrap();
    assert_eq!(Inflater::new().headers(&bomb), Err(Error::HeadersTooLarge));
    for raw in [
        &[0u8, 0, 0][..],
        &[0, 0, 0, 1, 0, 0, 0, 9, b'a'],
        &[0, 0, 0, 200, 0, 0, 0, 1, b'a', 0, 0, 0, 0],
        &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    ] {
        let mut z = flate2::Compress::new(flate2::Compression::fast(), true);
        let mut block = Vec::with_capacity(64);
        z.compress_vec(raw, &mut block, flate2::FlushCompress::Sync)
            .unwrap();
        assert!(
            matches!(Inflater::new().headers(&block), Err(Error::Headers(_))),
            "{raw:?}"
        );
    }
}
