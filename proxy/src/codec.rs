//! Bounded decoding of a buffered body's `Content-Encoding` (gzip, deflate, br, zstd, stacked).
//!
//! The request path decides on the *decoded* body, so a compressed body must be inflated
//! before it is parsed, and inflating is where a hostile body can cost the most: a 1 KiB zip
//! bomb expands to gigabytes. Every layer is therefore read through a limit that is the
//! smaller of an absolute output size ([`DecodeLimits::max_output`]) and a compression ratio
//! ([`DecodeLimits::max_ratio`] times the layer's input, never below
//! [`DecodeLimits::ratio_floor`] so small, highly compressible bodies still pass). Reading
//! stops one byte past the limit, so a bomb is refused after at most `limit + 1` bytes of
//! output and never fully expanded.
//!
//! Decoding is strict where decoders disagree: `deflate` is the zlib format RFC 9110 names
//! (raw deflate is refused), trailing bytes after a stream are refused, an unknown coding is
//! refused, and more than [`DecodeLimits::max_layers`] stacked codings are refused. The same
//! decoder serves request bodies (before parsing) and buffered response bodies (MCP
//! `tools/list` answers); [`stream`] decodes a response that streams past, for metering.

pub(crate) mod stream;

use http::header::CONTENT_ENCODING;
use http::HeaderMap;
use std::io::{BufRead, Read};

/// Largest zstd window accepted (8 MiB), so a frame cannot make the decoder allocate more.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// One content coding (RFC 9110 §8.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Coding {
    /// `gzip` (or its alias `x-gzip`); several concatenated members are one body.
    Gzip,
    /// `deflate`: the zlib format (RFC 1950), as RFC 9110 defines it.
    Deflate,
    /// `br` (RFC 7932).
    Brotli,
    /// `zstd` (RFC 8878).
    Zstd,
}

impl Coding {
    /// The coding's name in `Content-Encoding`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        }
    }

    /// Parse one coding name (case-insensitive). `identity` is `Ok(None)`.
    pub(crate) fn parse(name: &str) -> Result<Option<Coding>, CodecError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Ok(Some(Coding::Gzip)),
            "deflate" => Ok(Some(Coding::Deflate)),
            "br" => Ok(Some(Coding::Brotli)),
            "zstd" => Ok(Some(Coding::Zstd)),
            "identity" => Ok(None),
            other => Err(CodecError::Unsupported(other.to_string())),
        }
    }
}

/// Bounds applied while decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest decoded size of any layer, in bytes.
    pub max_output: usize,
    /// Largest output/input ratio of one layer, once its output is past `ratio_floor`.
    pub max_ratio: u64,
    /// Output size below which the ratio is not checked (tiny bodies compress very well).
    pub ratio_floor: usize,
    /// Most stacked codings accepted in one `Content-Encoding`.
    pub max_layers: usize,
}

impl DecodeLimits {
    /// Limits for a request body buffered up to `max_body` bytes: the decoded body may be as
    /// large as the buffer limit, at a ratio of at most 100:1 past 64 KiB, in at most two
    /// layers.
    pub fn for_body(max_body: usize) -> Self {
        Self {
            max_output: max_body,
            max_ratio: 100,
            ratio_floor: 64 * 1024,
            max_layers: 2,
        }
    }

    fn limit_for(&self, input_len: usize) -> (usize, bool) {
        let by_ratio = (input_len as u64)
            .saturating_mul(self.max_ratio)
            .max(self.ratio_floor as u64);
        if by_ratio < self.max_output as u64 {
            (by_ratio as usize, true)
        } else {
            (self.max_output, false)
        }
    }
}

/// Why a body could not be decoded. Every variant refuses the call (400, or 413 for size).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A coding Tollgate does not decode (`compress`, `exi`, …).
    #[error("unsupported Content-Encoding {0:?}")]
    Unsupported(String),
    /// More stacked codings than allowed.
    #[error("more than {0} stacked content codings")]
    TooManyLayers(usize),
    /// The coded data is malformed.
    #[error("body is not valid {coding} data: {detail}")]
    Corrupt {
        /// Coding name.
        coding: &'static str,
        /// Decoder message.
        detail: String,
    },
    /// Bytes after the end of a coded stream.
    #[error("trailing bytes after the {0} stream")]
    Trailing(&'static str),
    /// The decoded body is larger than the output bound.
    #[error("decoded body is larger than {0} bytes")]
    TooLarge(usize),
    /// The decoded body expands more than the ratio bound allows (a decompression bomb).
    #[error("decoded body expands more than {0}:1")]
    RatioExceeded(u64),
}

impl CodecError {
    /// Stable machine code for refusals and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            CodecError::Unsupported(_) => "unsupported_content_encoding",
            CodecError::TooManyLayers(_) => "too_many_content_encodings",
            CodecError::Corrupt { .. } => "corrupt_content_encoding",
            CodecError::Trailing(_) => "corrupt_content_encoding",
            CodecError::TooLarge(_) => "decoded_body_too_large",
            CodecError::RatioExceeded(_) => "decompression_ratio_exceeded",
        }
    }
}

/// The codings a header map declares, in the order they were applied (all `Content-Encoding`
/// field lines, comma lists flattened; `identity` dropped).
pub(crate) fn codings(headers: &HeaderMap) -> Result<Vec<Coding>, CodecError> {
    let mut out = Vec::new();
    for v in headers.get_all(CONTENT_ENCODING) {
        let v = v
            .to_str()
            .map_err(|_| CodecError::Unsupported(String::from_utf8_lossy(v.as_bytes()).into()))?;
        for name in v.split(',') {
            if name.trim().is_empty() {
                continue;
            }
            if let Some(c) = Coding::parse(name)? {
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// Decode `body`, coded with `codings` in the order they were applied (so the last is undone
/// first), under `limits`.
pub(crate) fn decode(
    body: &[u8],
    codings: &[Coding],
    limits: &DecodeLimits,
) -> Result<Vec<u8>, CodecError> {
    if codings.len() > limits.max_layers {
        return Err(CodecError::TooManyLayers(limits.max_layers));
    }
    let mut current = body.to_vec();
    for &c in codings.iter().rev() {
        current = decode_one(&current, c, limits)?;
    }
    Ok(current)
}

/// Decode a body by the `Content-Encoding` of `headers`. Returns `None` when the body is not
/// coded (no header, or only `identity`), so callers can keep the original bytes.
pub(crate) fn decode_by_headers(
    headers: &HeaderMap,
    body: &[u8],
    limits: &DecodeLimits,
) -> Result<Option<Vec<u8>>, CodecError> {
    let list = codings(headers)?;
    if list.is_empty() {
        return Ok(None);
    }
    decode(body, &list, limits).map(Some)
}

fn decode_one(input: &[u8], coding: Coding, limits: &DecodeLimits) -> Result<Vec<u8>, CodecError> {
    let corrupt = |e: std::io::Error| CodecError::Corrupt {
        coding: coding.as_str(),
        detail: e.to_string(),
    };
    let (limit, by_ratio) = limits.limit_for(input.len());
    let mut out = Vec::new();
    let mut src: &[u8] = input;
    match coding {
        Coding::Gzip => {
            // Every member is read; trailing bytes that are not a gzip member fail its header.
            let mut d = flate2::bufread::MultiGzDecoder::new(&mut src);
            read_bounded(&mut d, limit, &mut out).map_err(corrupt)?;
        }
        Coding::Deflate => {
            let mut d = flate2::bufread::ZlibDecoder::new(&mut src);
            read_bounded(&mut d, limit, &mut out).map_err(corrupt)?;
            if out.len() <= limit && !d.into_inner().fill_buf().map_err(corrupt)?.is_empty() {
                return Err(CodecError::Trailing(coding.as_str()));
            }
        }
        Coding::Brotli => {
            let mut d = brotli::Decompressor::new(&mut src, 4096);
            read_bounded(&mut d, limit, &mut out).map_err(corrupt)?;
            if out.len() <= limit {
                // One more read reports input buffered past the end of the stream; input
                // never read into the buffer is still in `src`.
                let buffered_extra = d.read(&mut [0u8; 1]).is_err();
                if buffered_extra || !d.into_inner().is_empty() {
                    return Err(CodecError::Trailing(coding.as_str()));
                }
            }
        }
        Coding::Zstd => {
            // Several frames are one body; bytes that are not a frame fail as a bad frame.
            let mut d = zstd::stream::read::Decoder::with_buffer(&mut src).map_err(corrupt)?;
            // The window bounds the decoder's memory, whatever the frame header asks for.
            d.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(corrupt)?;
            read_bounded(&mut d, limit, &mut out).map_err(corrupt)?;
        }
    }
    if out.len() > limit {
        return Err(if by_ratio {
            CodecError::RatioExceeded(limits.max_ratio)
        } else {
            CodecError::TooLarge(limits.max_output)
        });
    }
    if out.is_empty() && input.is_empty() {
        return Err(CodecError::Corrupt {
            coding: coding.as_str(),
            detail: "empty coded body".into(),
        });
    }
    Ok(out)
}

/// Read at most `limit + 1` bytes: one byte past the limit is enough to know it was passed.
fn read_bounded(r: &mut impl Read, limit: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
    r.take(limit as u64 + 1).read_to_end(out)?;
    Ok(())
}

#[cfg(test)]
mod tests;
