//! Incremental decoding of a response's `Content-Encoding` (gzip, deflate, br, zstd) for the
//! proxy's own reading of a body that streams past: the usage scanner of an SSE or JSON LLM
//! answer. The bytes the client gets are never touched (they keep their encoding and label);
//! a copy is pushed through a decoder chunk by chunk, so nothing is held back.
//!
//! Bounded: decoded output past [`MAX_DECODED`] bytes, or more than [`MAX_RATIO`] times the
//! encoded input, stops the decoding (the scanner then reports nothing and the call is
//! charged its reserved estimate).

use std::io::Write;

/// Most decoded bytes produced for one body.
pub const MAX_DECODED: u64 = 64 * 1024 * 1024;
/// Most decoded bytes per encoded byte (beyond the first 64 KiB).
pub const MAX_RATIO: u64 = 200;

/// Why decoding stopped.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A coding this proxy cannot decode.
    #[error("unsupported content-encoding {0:?}")]
    Unsupported(String),
    /// The encoded bytes are corrupt.
    #[error("corrupt {coding} body: {message}")]
    Corrupt {
        /// The coding.
        coding: &'static str,
        /// Decoder message.
        message: String,
    },
    /// Output past the size or ratio bound.
    #[error("decoded body exceeds {0} bytes or the {MAX_RATIO}:1 ratio bound")]
    TooLarge(u64),
}

enum Stage {
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Deflate(flate2::write::DeflateDecoder<Vec<u8>>),
    /// `deflate` whose first bytes are not yet seen (zlib-wrapped or raw, both occur).
    DeflateUnknown(Vec<u8>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

impl Stage {
    fn new(coding: &str) -> Result<Option<Self>, DecodeError> {
        Ok(Some(match coding {
            "identity" | "" => return Ok(None),
            "gzip" | "x-gzip" => Stage::Gzip(flate2::write::MultiGzDecoder::new(Vec::new())),
            "deflate" => Stage::DeflateUnknown(Vec::new()),
            "br" => Stage::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 8192))),
            "zstd" => Stage::Zstd(zstd::stream::write::Decoder::new(Vec::new()).map_err(|e| {
                DecodeError::Corrupt {
                    coding: "zstd",
                    message: e.to_string(),
                }
            })?),
            other => return Err(DecodeError::Unsupported(other.to_string())),
        }))
    }

    fn name(&self) -> &'static str {
        match self {
            Stage::Gzip(_) => "gzip",
            Stage::Zlib(_) | Stage::Deflate(_) | Stage::DeflateUnknown(_) => "deflate",
            Stage::Brotli(_) => "br",
            Stage::Zstd(_) => "zstd",
        }
    }

    /// Push encoded bytes; returns what decoded so far.
    fn push(&mut self, input: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let coding = self.name();
        let corrupt = |e: std::io::Error| DecodeError::Corrupt {
            coding,
            message: e.to_string(),
        };
        if let Stage::DeflateUnknown(head) = self {
            head.extend_from_slice(input);
            if head.len() < 2 {
                return Ok(Vec::new());
            }
            // RFC 9110 says zlib; some servers send raw deflate. A zlib header is CM=8 with a
            // check value making the first two bytes a multiple of 31.
            let zlib =
                head[0] & 0x0f == 8 && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0;
            let head = std::mem::take(head);
            *self = if zlib {
                Stage::Zlib(flate2::write::ZlibDecoder::new(Vec::new()))
            } else {
                Stage::Deflate(flate2::write::DeflateDecoder::new(Vec::new()))
            };
            return self.push(&head);
        }
        match self {
            Stage::Gzip(d) => d
                .write_all(input)
                .and_then(|_| d.flush())
                .map_err(corrupt)?,
            Stage::Zlib(d) => d
                .write_all(input)
                .and_then(|_| d.flush())
                .map_err(corrupt)?,
            Stage::Deflate(d) => d
                .write_all(input)
                .and_then(|_| d.flush())
                .map_err(corrupt)?,
            Stage::Brotli(d) => d
                .write_all(input)
                .and_then(|_| d.flush())
                .map_err(corrupt)?,
            Stage::Zstd(d) => d
                .write_all(input)
                .and_then(|_| d.flush())
                .map_err(corrupt)?,
            Stage::DeflateUnknown(_) => unreachable!("resolved above"),
        }
        Ok(std::mem::take(match self {
            Stage::Gzip(d) => d.get_mut(),
            Stage::Zlib(d) => d.get_mut(),
            Stage::Deflate(d) => d.get_mut(),
            Stage::Brotli(d) => d.get_mut(),
            Stage::Zstd(d) => d.get_mut(),
            Stage::DeflateUnknown(_) => unreachable!("resolved above"),
        }))
    }
}

/// A push decoder for one body's content codings, applied in reverse of the order listed.
pub struct StreamDecoder {
    stages: Vec<Stage>,
    encoded: u64,
    decoded: u64,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field(
                "stages",
                &self.stages.iter().map(Stage::name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl StreamDecoder {
    /// A decoder for a `Content-Encoding` header value; `Ok(None)` for identity.
    pub fn for_header(value: &str) -> Result<Option<Self>, DecodeError> {
        let mut stages = Vec::new();
        for coding in value.split(',').rev() {
            if let Some(s) = Stage::new(coding.trim().to_ascii_lowercase().as_str())? {
                stages.push(s);
            }
        }
        if stages.len() > 3 {
            return Err(DecodeError::Unsupported(value.to_string()));
        }
        Ok((!stages.is_empty()).then_some(Self {
            stages,
            encoded: 0,
            decoded: 0,
        }))
    }

    /// A decoder for a response's headers; `Ok(None)` when the body is not encoded.
    pub fn for_headers(h: &http::HeaderMap) -> Result<Option<Self>, DecodeError> {
        match h.get(http::header::CONTENT_ENCODING) {
            None => Ok(None),
            Some(v) => Self::for_header(v.to_str().map_err(|_| {
                DecodeError::Unsupported(String::from_utf8_lossy(v.as_bytes()).into_owned())
            })?),
        }
    }

    /// Push a chunk of the encoded body; returns the bytes it decoded to.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<u8>, DecodeError> {
        self.encoded += chunk.len() as u64;
        let mut data = chunk.to_vec();
        for s in &mut self.stages {
            data = s.push(&data)?;
        }
        self.decoded += data.len() as u64;
        if self.decoded > MAX_DECODED
            || self.decoded > 64 * 1024 + self.encoded.saturating_mul(MAX_RATIO)
        {
            return Err(DecodeError::TooLarge(MAX_DECODED));
        }
        Ok(data)
    }

    /// Decode a whole buffered body.
    pub fn decode_all(value: &str, body: &[u8]) -> Result<Vec<u8>, DecodeError> {
        match Self::for_header(value)? {
            None => Ok(body.to_vec()),
            Some(mut d) => d.push(body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn every_coding_decodes_chunk_by_chunk() {
        let text = b"data: {\"usage\":{\"prompt_tokens\":7}}\n\n".repeat(50);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&text).unwrap();
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(&text).unwrap();
        let mut br = Vec::new();
        brotli::BrotliCompress(&mut &text[..], &mut br, &Default::default()).unwrap();
        let zs = zstd::encode_all(&text[..], 3).unwrap();
        for (coding, enc) in [
            ("gzip", gzip(&text)),
            ("deflate", z.finish().unwrap()),
            ("deflate", raw.finish().unwrap()),
            ("br", br),
            ("zstd", zs),
        ] {
            let mut d = StreamDecoder::for_header(coding).unwrap().unwrap();
            let mut out = Vec::new();
            for c in enc.chunks(7) {
                out.extend(d.push(c).unwrap());
            }
            assert_eq!(out, text, "{coding}");
        }
        assert!(StreamDecoder::for_header("identity").unwrap().is_none());
        assert!(StreamDecoder::for_header("compress").is_err());
        assert_eq!(
            StreamDecoder::decode_all("gzip, identity", &gzip(b"hi")).unwrap(),
            b"hi"
        );
    }

    #[test]
    fn bombs_and_garbage_stop_decoding() {
        let bomb = gzip(&vec![0u8; 32 * 1024 * 1024]);
        let mut d = StreamDecoder::for_header("gzip").unwrap().unwrap();
        let r: Result<Vec<_>, _> = bomb.chunks(4096).map(|c| d.push(c)).collect();
        assert!(matches!(r, Err(DecodeError::TooLarge(_))), "{r:?}");
        let mut d = StreamDecoder::for_header("gzip").unwrap().unwrap();
        assert!(d.push(b"not gzip at all, no magic").is_err());
    }
}
