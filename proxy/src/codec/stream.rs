//! Push decoding of a response's `Content-Encoding` for the proxy's own reading of a body that
//! streams past (the usage scanner of an SSE or JSON LLM answer).
//!
//! The whole-body decoder above reads a buffered body; a stream cannot be buffered without
//! holding it back from the client. So a copy of each chunk is pushed through write-side
//! decoders of the same codings, under the same kind of bounds (an absolute size and a ratio
//! past a floor, at most [`MAX_LAYERS`] layers), and the bytes the client gets are never
//! touched: they keep their encoding and label. Once a bound is passed the decoder stops (the
//! scanner then reports nothing, and the call is charged its reserved estimate).

use super::{codings, CodecError, Coding};
use std::io::Write;

/// Most decoded bytes produced for one body.
pub(crate) const MAX_DECODED: usize = 64 * 1024 * 1024;
/// Most decoded bytes per encoded byte, past [`RATIO_FLOOR`].
pub(crate) const MAX_RATIO: u64 = 200;
/// Decoded size below which the ratio is not checked.
pub(crate) const RATIO_FLOOR: u64 = 64 * 1024;
/// Most stacked codings decoded.
pub(crate) const MAX_LAYERS: usize = 3;

enum Layer {
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

impl Layer {
    fn new(c: Coding) -> Result<Self, CodecError> {
        Ok(match c {
            Coding::Gzip => Layer::Gzip(flate2::write::MultiGzDecoder::new(Vec::new())),
            Coding::Deflate => Layer::Zlib(flate2::write::ZlibDecoder::new(Vec::new())),
            Coding::Brotli => {
                Layer::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 8192)))
            }
            Coding::Zstd => {
                let mut d = zstd::stream::write::Decoder::new(Vec::new())
                    .map_err(|e| corrupt(Coding::Zstd, e))?;
                // The window bounds the decoder's memory, whatever the frame header asks for.
                d.window_log_max(super::ZSTD_WINDOW_LOG_MAX)
                    .map_err(|e| corrupt(Coding::Zstd, e))?;
                Layer::Zstd(d)
            }
        })
    }

    fn coding(&self) -> Coding {
        match self {
            Layer::Gzip(_) => Coding::Gzip,
            Layer::Zlib(_) => Coding::Deflate,
            Layer::Brotli(_) => Coding::Brotli,
            Layer::Zstd(_) => Coding::Zstd,
        }
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Layer::Gzip(d) => d,
            Layer::Zlib(d) => d,
            Layer::Brotli(d) => d.as_mut(),
            Layer::Zstd(d) => d,
        }
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Layer::Gzip(d) => d.get_mut(),
            Layer::Zlib(d) => d.get_mut(),
            Layer::Brotli(d) => d.get_mut(),
            Layer::Zstd(d) => d.get_mut(),
        }
    }

    /// Push coded bytes; returns what they decoded to so far.
    fn push(&mut self, input: &[u8]) -> Result<Vec<u8>, CodecError> {
        let c = self.coding();
        let w = self.writer();
        w.write_all(input)
            .and_then(|_| w.flush())
            .map_err(|e| corrupt(c, e))?;
        Ok(std::mem::take(self.output()))
    }
}

fn corrupt(c: Coding, e: std::io::Error) -> CodecError {
    CodecError::Corrupt {
        coding: c.as_str(),
        detail: e.to_string(),
    }
}

/// A push decoder for one body's content codings, undone in reverse of the order applied.
pub(crate) struct StreamDecoder {
    layers: Vec<Layer>,
    encoded: u64,
    decoded: u64,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.layers.iter().map(|l| l.coding().as_str()).collect();
        f.debug_struct("StreamDecoder")
            .field("layers", &names)
            .finish()
    }
}

impl StreamDecoder {
    /// A decoder for a response's headers; `Ok(None)` when the body is not coded.
    pub(crate) fn for_headers(h: &http::HeaderMap) -> Result<Option<Self>, CodecError> {
        let list = codings(h)?;
        if list.is_empty() {
            return Ok(None);
        }
        if list.len() > MAX_LAYERS {
            return Err(CodecError::TooManyLayers(MAX_LAYERS));
        }
        let layers = list
            .iter()
            .rev()
            .map(|c| Layer::new(*c))
            .collect::<Result<_, _>>()?;
        Ok(Some(Self {
            layers,
            encoded: 0,
            decoded: 0,
        }))
    }

    /// Push a chunk of the coded body; returns the bytes it decoded to.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<Vec<u8>, CodecError> {
        self.encoded += chunk.len() as u64;
        let mut data = chunk.to_vec();
        for l in &mut self.layers {
            data = l.push(&data)?;
        }
        self.decoded += data.len() as u64;
        if self.decoded > MAX_DECODED as u64 {
            return Err(CodecError::TooLarge(MAX_DECODED));
        }
        if self.decoded > RATIO_FLOOR.max(self.encoded.saturating_mul(MAX_RATIO)) {
            return Err(CodecError::RatioExceeded(MAX_RATIO));
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ce: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("content-encoding", ce.parse().unwrap());
        h
    }

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
        let mut br = Vec::new();
        brotli::BrotliCompress(&mut &text[..], &mut br, &Default::default()).unwrap();
        let zs = zstd::encode_all(&text[..], 3).unwrap();
        for (coding, enc) in [
            ("gzip", gzip(&text)),
            ("deflate", z.finish().unwrap()),
            ("br", br),
            ("zstd", zs),
            ("gzip, identity", gzip(&text)),
        ] {
            let mut d = StreamDecoder::for_headers(&headers(coding))
                .unwrap()
                .unwrap();
            let mut out = Vec::new();
            for c in enc.chunks(7) {
                out.extend(d.push(c).unwrap());
            }
            assert_eq!(out, text, "{coding}");
        }
        assert!(StreamDecoder::for_headers(&headers("identity"))
            .unwrap()
            .is_none());
        assert!(StreamDecoder::for_headers(&http::HeaderMap::new())
            .unwrap()
            .is_none());
        assert!(StreamDecoder::for_headers(&headers("compress")).is_err());
        assert!(StreamDecoder::for_headers(&headers("gzip, gzip, gzip, gzip")).is_err());
    }

    #[test]
    fn bombs_and_garbage_stop_decoding() {
        let bomb = gzip(&vec![0u8; 32 * 1024 * 1024]);
        let mut d = StreamDecoder::for_headers(&headers("gzip"))
            .unwrap()
            .unwrap();
        let r: Result<Vec<_>, _> = bomb.chunks(4096).map(|c| d.push(c)).collect();
        assert!(matches!(r, Err(CodecError::RatioExceeded(_))), "{r:?}");
        let mut d = StreamDecoder::for_headers(&headers("gzip"))
            .unwrap()
            .unwrap();
        assert!(d.push(b"not gzip at all, no magic").is_err());
    }
}
