use super::*;
use std::io::Write;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn br(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
        w.write_all(data).unwrap();
    }
    out
}

fn zst(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

fn limits() -> DecodeLimits {
    DecodeLimits::for_body(1024 * 1024)
}

#[test]
fn every_coding_round_trips() {
    let body = br#"{"amount":100,"charge":"ch_1"}"#;
    for (c, coded) in [
        (Coding::Gzip, gzip(body)),
        (Coding::Deflate, zlib(body)),
        (Coding::Brotli, br(body)),
        (Coding::Zstd, zst(body)),
    ] {
        assert_eq!(decode(&coded, &[c], &limits()).unwrap(), body, "{c:?}");
    }
}

#[test]
fn stacked_codings_are_undone_last_first() {
    let body = b"amount=100";
    // Content-Encoding: gzip, br means gzip was applied first, then br.
    let coded = br(&gzip(body));
    let mut h = HeaderMap::new();
    h.insert(CONTENT_ENCODING, "gzip, br".parse().unwrap());
    assert_eq!(
        decode_by_headers(&h, &coded, &limits()).unwrap().unwrap(),
        body
    );
    // The same codings on two field lines are one list.
    let mut h = HeaderMap::new();
    h.append(CONTENT_ENCODING, "gzip".parse().unwrap());
    h.append(CONTENT_ENCODING, "br".parse().unwrap());
    assert_eq!(
        decode_by_headers(&h, &coded, &limits()).unwrap().unwrap(),
        body
    );
    // In the wrong order it does not decode.
    assert!(decode(&coded, &[Coding::Brotli, Coding::Gzip], &limits()).is_err());
}

#[test]
fn too_many_layers_are_refused() {
    let coded = gzip(&gzip(&gzip(b"a=1")));
    let err = decode(&coded, &[Coding::Gzip; 3], &limits()).unwrap_err();
    assert_eq!(err, CodecError::TooManyLayers(2));
    assert_eq!(err.code(), "too_many_content_encodings");
}

#[test]
fn identity_and_absence_mean_not_coded() {
    let mut h = HeaderMap::new();
    assert_eq!(decode_by_headers(&h, b"x", &limits()).unwrap(), None);
    h.insert(CONTENT_ENCODING, "identity".parse().unwrap());
    assert_eq!(decode_by_headers(&h, b"x", &limits()).unwrap(), None);
    h.insert(CONTENT_ENCODING, "X-GZIP".parse().unwrap());
    assert_eq!(codings(&h).unwrap(), vec![Coding::Gzip]);
}

#[test]
fn unknown_codings_are_refused() {
    for name in ["compress", "exi", "pack200-gzip", "gzip;q=1", "aes128gcm"] {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_ENCODING, name.parse().unwrap());
        let err = decode_by_headers(&h, b"x", &limits()).unwrap_err();
        assert!(matches!(err, CodecError::Unsupported(_)), "{name}: {err:?}");
        assert_eq!(err.code(), "unsupported_content_encoding");
    }
}

#[test]
fn corrupt_and_trailing_data_are_refused() {
    let body = b"amount=100";
    // Plain bytes labelled gzip.
    assert!(matches!(
        decode(body, &[Coding::Gzip], &limits()),
        Err(CodecError::Corrupt { .. })
    ));
    // A truncated member.
    let g = gzip(body);
    assert!(decode(&g[..g.len() - 4], &[Coding::Gzip], &limits()).is_err());
    // Bytes after the stream, for every coding.
    for (c, mut coded) in [
        (Coding::Gzip, gzip(body)),
        (Coding::Deflate, zlib(body)),
        (Coding::Brotli, br(body)),
        (Coding::Zstd, zst(body)),
    ] {
        coded.extend_from_slice(b"&amount=5000");
        assert!(decode(&coded, &[c], &limits()).is_err(), "{c:?}");
    }
    // Raw deflate is not what `deflate` means.
    assert!(decode(&raw_deflate(body), &[Coding::Deflate], &limits()).is_err());
    // An empty body labelled as coded.
    assert!(decode(b"", &[Coding::Gzip], &limits()).is_err());
}

#[test]
fn concatenated_gzip_members_are_one_body() {
    let mut coded = gzip(b"amount=1");
    coded.extend(gzip(b"00&x=2"));
    assert_eq!(
        decode(&coded, &[Coding::Gzip], &limits()).unwrap(),
        b"amount=100&x=2"
    );
}

#[test]
fn zip_bombs_are_refused_without_expanding() {
    // 64 MiB of zeros compresses to about 64 KiB of gzip: far past the 1 MiB output bound.
    let zeros = vec![0u8; 64 * 1024 * 1024];
    for (c, coded) in [
        (Coding::Gzip, gzip(&zeros)),
        (Coding::Deflate, zlib(&zeros)),
        (Coding::Brotli, br(&zeros)),
        (Coding::Zstd, zst(&zeros)),
    ] {
        assert!(
            coded.len() < 128 * 1024,
            "{c:?} bomb is {} bytes",
            coded.len()
        );
        let err = decode(&coded, &[c], &limits()).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::RatioExceeded(100) | CodecError::TooLarge(_)
            ),
            "{c:?}: {err:?}"
        );
    }
    // A nested bomb: each layer is small, the inner one explodes.
    let nested = gzip(&gzip(&zeros));
    assert!(decode(&nested, &[Coding::Gzip, Coding::Gzip], &limits()).is_err());
}

#[test]
fn ratio_bound_and_size_bound_are_distinct() {
    // 512 KiB of zeros: under the 1 MiB size bound, but about 500:1.
    let zeros = vec![0u8; 512 * 1024];
    let err = decode(&gzip(&zeros), &[Coding::Gzip], &limits()).unwrap_err();
    assert_eq!(err, CodecError::RatioExceeded(100));
    assert_eq!(err.code(), "decompression_ratio_exceeded");
    // Under the ratio floor, a compressible body passes.
    let small = vec![b'a'; 32 * 1024];
    assert_eq!(
        decode(&gzip(&small), &[Coding::Gzip], &limits()).unwrap(),
        small
    );
    // Incompressible data larger than the size bound hits the size bound.
    let noise: Vec<u8> = (0..(2 * 1024 * 1024u32))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let err = decode(&zst(&noise), &[Coding::Zstd], &limits()).unwrap_err();
    assert_eq!(err, CodecError::TooLarge(1024 * 1024));
}
