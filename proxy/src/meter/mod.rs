//! Cost models: a fixed amount per call, exposure per unit of a request field, and LLM token
//! usage priced per model. The estimate is reserved before forwarding; the actual cost is
//! known at the response (fixed, per-unit) or at the end of its body (LLM usage, read from a
//! JSON body or from SSE events as they stream past, without holding them back, decoding a
//! compressed body on the side). The provider shapes read are listed at [`fold_usage`].
//!
//! (One file, about 630 lines: every provider's usage shape next to the one estimator and
//! scanner that read them, plus their tests.)

use crate::codec::stream::StreamDecoder;
use crate::config::{CostModel, LlmCost, LlmProvider};
use crate::limits::to_micros;
use serde_json::Value;

/// Token counts read from a response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tokens {
    /// Prompt (input) tokens.
    pub prompt: u64,
    /// Completion (output) tokens.
    pub completion: u64,
}

/// What a call is expected to cost.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Estimate {
    /// Spend, micro-dollars.
    pub spend: i64,
    /// Financial exposure, micro-dollars.
    pub exposure: i64,
    /// LLM pricing for the model the call names (actual spend comes from usage).
    pub llm: Option<(f64, f64)>,
    /// Estimated tokens.
    pub tokens: Tokens,
}

impl Estimate {
    /// Spend of an LLM call that used `t` tokens.
    pub(crate) fn llm_spend(&self, t: Tokens) -> i64 {
        match self.llm {
            Some((p, c)) => to_micros((t.prompt as f64 * p + t.completion as f64 * c) / 1e6),
            None => self.spend,
        }
    }
}

/// Read a dotted path (`a.b.c`) from the input.
fn field<'v>(input: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(input, |v, k| v.get(k))
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        // Form bodies carry numbers as strings.
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Estimate a call from its tool's cost model and input. An LLM call to a model without a
/// configured price is an error (its cost could not be bounded).
#[cfg(test)]
fn estimate(cost: &CostModel, input: &Value, body_len: usize) -> Result<Estimate, String> {
    estimate_call(cost, input, body_len, None)
}

/// The model a call names: the body's `model`, or for Gemini the path's
/// `/models/{model}:generateContent`.
pub(crate) fn model_of<'a>(input: &'a Value, path: &'a str) -> &'a str {
    if let Some(m) = input.get("model").and_then(Value::as_str) {
        return m;
    }
    path.rsplit_once("/models/")
        .map(|(_, rest)| rest.split([':', '/']).next().unwrap_or(""))
        .unwrap_or("")
}

/// [`estimate`] for a call whose path may name the model (Gemini).
pub(crate) fn estimate_call(
    cost: &CostModel,
    input: &Value,
    body_len: usize,
    path: Option<&str>,
) -> Result<Estimate, String> {
    let mut e = Estimate::default();
    if let Some(usd) = cost.per_call_usd {
        e.spend += to_micros(usd);
    }
    if let (Some(per), Some(f)) = (cost.per_unit_usd, cost.unit_field.as_deref()) {
        if let Some(units) = field(input, f).and_then(number) {
            if units.is_finite() && units > 0.0 {
                e.exposure = to_micros(units * per);
            }
        }
    }
    if let Some(llm) = &cost.llm {
        let (p, c, max) = llm_price(llm, input, path.unwrap_or(""))?;
        let prompt = (body_len as u64).div_ceil(4);
        e.llm = Some((p, c));
        e.tokens = Tokens {
            prompt,
            completion: max,
        };
        e.spend += e.llm_spend(e.tokens);
    }
    Ok(e)
}

/// Most choices one LLM call may ask for.
const MAX_CHOICES: u64 = 128;

fn llm_price(llm: &LlmCost, input: &Value, path: &str) -> Result<(f64, f64, u64), String> {
    let model = model_of(input, path);
    let price = llm
        .prices
        .get(model)
        .or_else(|| llm.prices.get("*"))
        .ok_or_else(|| format!("model {model:?} has no price in this tool's cost table; the call's cost cannot be bounded"))?;
    let max = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| input.get(*k).and_then(Value::as_u64))
        .or_else(|| {
            input
                .pointer("/generationConfig/maxOutputTokens")
                .and_then(Value::as_u64)
        })
        .or(price.max_output_tokens)
        .or(llm.default_max_tokens)
        .unwrap_or(4096);
    // Every one of `n` choices (OpenAI `n`, Gemini `candidateCount`) may use the whole budget.
    let choices = match ["n", "candidate_count", "candidateCount"]
        .iter()
        .find_map(|k| input.get(*k))
    {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_CHOICES).contains(n))
            .ok_or_else(|| format!("`n` must be an integer from 1 to {MAX_CHOICES}; the call's cost cannot be bounded"))?,
    };
    Ok((
        price.prompt_per_mtok,
        price.completion_per_mtok,
        max.saturating_mul(choices),
    ))
}

/// Does this provider's API at `path` take `stream_options.include_usage`? Only OpenAI-style
/// chat/completions and completions do (the responses API always reports usage and rejects
/// the field; Anthropic and Gemini report usage in their events already).
pub(crate) fn takes_stream_usage(provider: Option<LlmProvider>, path: &str) -> bool {
    matches!(
        provider,
        Some(LlmProvider::Openai | LlmProvider::OpenaiCompatible)
    ) && (path.ends_with("/chat/completions") || path.ends_with("/completions"))
}

/// Add `stream_options.include_usage` to a streamed OpenAI-style request that lacks it.
/// Returns the new body, or `None` when nothing needs changing. The caller checks
/// [`takes_stream_usage`] first: which API this is comes from the tool's declared provider.
pub(crate) fn inject_stream_usage(input: &Value) -> Option<Value> {
    if input.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    if input.pointer("/stream_options/include_usage").is_some() {
        return None;
    }
    let mut v = input.clone();
    let o = v.as_object_mut()?;
    let so = o
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Default::default()));
    so.as_object_mut()?
        .insert("include_usage".into(), Value::Bool(true));
    Some(v)
}

/// Fold every usage report in a JSON value into `t`. Shapes: OpenAI chat/completions
/// (`usage.prompt_tokens`/`completion_tokens`), OpenAI responses and Anthropic messages
/// (`usage.input_tokens`/`output_tokens`; Anthropic's cache writes and reads are input too,
/// and its stream deltas are cumulative, hence `max`), Gemini (`usageMetadata` with
/// `promptTokenCount`, `candidatesTokenCount` and `thoughtsTokenCount`, cumulative per chunk).
pub(crate) fn fold_usage(v: &Value, t: &mut Tokens) -> bool {
    let mut seen = false;
    match v {
        Value::Object(o) => {
            if let Some(Value::Object(u)) = o.get("usage") {
                seen = true;
                let get = |k: &str| u.get(k).and_then(Value::as_u64);
                let prompt = get("prompt_tokens").or_else(|| {
                    get("input_tokens").map(|i| {
                        i + get("cache_creation_input_tokens").unwrap_or(0)
                            + get("cache_read_input_tokens").unwrap_or(0)
                    })
                });
                if let Some(p) = prompt {
                    t.prompt = t.prompt.max(p);
                }
                if let Some(c) = get("completion_tokens").or_else(|| get("output_tokens")) {
                    t.completion = t.completion.max(c);
                }
            }
            if let Some(Value::Object(u)) = o.get("usageMetadata") {
                seen = true;
                let get = |k: &str| u.get(k).and_then(Value::as_u64);
                if let Some(p) = get("promptTokenCount") {
                    t.prompt = t.prompt.max(p);
                }
                let c = get("candidatesTokenCount").unwrap_or(0)
                    + get("thoughtsTokenCount").unwrap_or(0);
                t.completion = t.completion.max(c);
            }
            for (k, x) in o {
                if k != "usage" && k != "usageMetadata" {
                    seen |= fold_usage(x, t);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| seen |= fold_usage(x, t)),
        _ => {}
    }
    seen
}

/// Characters of generated text (and tool-call arguments) one streamed event delivers, in
/// any of the shapes above: what a stream cut short is charged for.
pub(crate) fn delivered_chars(v: &Value) -> u64 {
    let len = |x: Option<&Value>| {
        x.and_then(Value::as_str)
            .map_or(0, |s| s.chars().count() as u64)
    };
    let mut n = 0;
    // Anthropic content_block_delta; OpenAI responses `response.*.delta` events.
    if let Some(d) = v.get("delta") {
        n += len(Some(d));
        n += len(d.get("text")) + len(d.get("partial_json")) + len(d.get("thinking"));
    }
    for c in v
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        n += len(c.get("text"));
        if let Some(d) = c.get("delta") {
            n += len(d.get("content")) + len(d.get("reasoning_content"));
            for tc in d
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                n += len(tc.pointer("/function/arguments"));
            }
        }
    }
    for c in v
        .get("candidates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for p in c
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            n += len(p.get("text"));
        }
    }
    n
}

/// Is this streamed event the last of its answer?
fn is_terminal(v: &Value) -> bool {
    matches!(
        v.get("type").and_then(Value::as_str),
        Some("message_stop" | "response.completed" | "response.failed" | "response.incomplete")
    ) || v
        .get("candidates")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|c| c.get("finishReason").is_some()))
}

/// Most bytes of a non-streamed response kept to read its usage.
const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;

/// What a scanned body reported and delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// Usage the body reported, if any.
    pub reported: Option<Tokens>,
    /// Characters of generated text delivered (streams).
    pub delivered_chars: u64,
    /// The stream's terminal event passed (`[DONE]`, Anthropic `message_stop`, responses
    /// `response.completed`, a Gemini `finishReason`): a client closing after it cut nothing.
    pub complete: bool,
}

/// Reads token usage out of a response body as it passes. An encoded body is decoded on the
/// side (see codec/stream.rs); the bytes passed on are never changed.
#[derive(Debug, Default)]
pub(crate) struct UsageScanner {
    sse: bool,
    buf: Vec<u8>,
    overflow: bool,
    seen: bool,
    tokens: Tokens,
    delivered: u64,
    complete: bool,
    decoder: Option<StreamDecoder>,
}

impl UsageScanner {
    /// A scanner for an SSE (`text/event-stream`) or JSON body.
    pub(crate) fn new(sse: bool) -> Self {
        Self {
            sse,
            ..Default::default()
        }
    }

    /// A scanner for a response with these headers (content type and encoding). An encoding
    /// it cannot decode leaves it blind: the call is charged its estimate.
    pub(crate) fn for_response(h: &http::HeaderMap) -> Self {
        let mut s = Self::new(is_sse(h));
        match StreamDecoder::for_headers(h) {
            Ok(d) => s.decoder = d,
            Err(e) => {
                tracing::warn!(error = %e, "response usage cannot be read");
                s.overflow = true;
            }
        }
        s
    }

    /// Feed a chunk of the body as it travels (still encoded, if it is).
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        if self.overflow {
            return;
        }
        let decoded;
        let chunk = match self.decoder.as_mut().map(|d| d.push(chunk)) {
            None => chunk,
            Some(Ok(d)) => {
                decoded = d;
                &decoded[..]
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "response usage cannot be read");
                self.overflow = true;
                self.buf = Vec::new();
                return;
            }
        };
        self.buf.extend_from_slice(chunk);
        if self.sse {
            while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                self.line(&line);
            }
        }
        if self.buf.len() > MAX_JSON_BYTES {
            self.overflow = true;
            self.buf = Vec::new();
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(data) = line.strip_prefix("data:") {
            let data = data.trim_start();
            if data == "[DONE]" {
                self.complete = true;
            } else if let Ok(v) = serde_json::from_str::<Value>(data) {
                self.seen |= fold_usage(&v, &mut self.tokens);
                self.delivered += delivered_chars(&v);
                self.complete |= is_terminal(&v);
            }
        }
    }

    /// What the body reported and delivered.
    pub(crate) fn finish(mut self) -> Scanned {
        if self.sse {
            let rest = std::mem::take(&mut self.buf);
            self.line(&rest);
        } else if !self.overflow {
            if let Ok(v) = serde_json::from_slice::<Value>(&self.buf) {
                self.seen = fold_usage(&v, &mut self.tokens);
            }
        }
        Scanned {
            reported: self.seen.then_some(self.tokens),
            delivered_chars: self.delivered,
            complete: self.complete,
        }
    }
}

/// Is this response an SSE stream?
pub(crate) fn is_sse(h: &http::HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
}

/// The tokens a call is charged. A body that ended normally is charged what it reported
/// (or, reporting nothing, the reserved estimate). A body cut short (timeout, upstream error,
/// client gone) is charged what was delivered: the reported prompt (or the estimated one,
/// the prompt was sent) and the larger of the reported completion and the delivered text at
/// four characters a token.
pub(crate) fn charged_tokens(est: &Estimate, scanned: &Scanned, cut: bool) -> Tokens {
    match (scanned.reported, cut) {
        (Some(t), false) => t,
        (None, false) => est.tokens,
        (reported, true) => {
            let delivered = scanned.delivered_chars.div_ceil(4);
            let r = reported.unwrap_or_default();
            Tokens {
                prompt: if r.prompt > 0 {
                    r.prompt
                } else {
                    est.tokens.prompt
                },
                completion: r.completion.max(delivered),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llm() -> CostModel {
        serde_json::from_value(json!({"llm": {"prices": {"gpt-4o": {"promptPerMtok": 2.5, "completionPerMtok": 10.0}}, "defaultMaxTokens": 1000}})).unwrap()
    }

    #[test]
    fn fixed_per_unit_and_llm_estimates() {
        let c: CostModel = serde_json::from_value(
            json!({"perCallUsd": 0.01, "perUnitUsd": 0.01, "unitField": "amount"}),
        )
        .unwrap();
        let e = estimate(&c, &json!({"amount": 1250}), 10).unwrap();
        assert_eq!((e.spend, e.exposure), (10_000, 12_500_000));
        let e = estimate(&c, &json!({"amount": "300"}), 10).unwrap();
        assert_eq!(e.exposure, 3_000_000, "form numbers count");
        let e = estimate(&llm(), &json!({"model": "gpt-4o", "max_tokens": 100}), 400).unwrap();
        // 100 prompt tokens (400 bytes / 4) * 2.5 + 100 completion * 10, per million.
        assert_eq!(e.spend, to_micros((100.0 * 2.5 + 100.0 * 10.0) / 1e6));
        assert!(
            estimate(&llm(), &json!({"model": "gpt-9"}), 10).is_err(),
            "unpriced models are refused"
        );
        let e = estimate(&llm(), &json!({"model": "gpt-4o"}), 0).unwrap();
        assert_eq!(e.tokens.completion, 1000, "defaultMaxTokens");
    }

    #[test]
    fn every_choice_and_the_models_own_limit_are_reserved() {
        let e = estimate(
            &llm(),
            &json!({"model": "gpt-4o", "max_tokens": 100, "n": 25}),
            0,
        )
        .unwrap();
        assert_eq!(e.tokens.completion, 2500, "n choices of max_tokens each");
        assert!(estimate(&llm(), &json!({"model": "gpt-4o", "n": 0}), 0).is_err());
        assert!(estimate(&llm(), &json!({"model": "gpt-4o", "n": 1e9}), 0).is_err());
        let c: CostModel = serde_json::from_value(json!({"llm": {"prices": {"m": {"promptPerMtok": 1.0, "completionPerMtok": 1.0, "maxOutputTokens": 64000}}, "defaultMaxTokens": 1000}})).unwrap();
        let e = estimate(&c, &json!({"model": "m"}), 0).unwrap();
        assert_eq!(
            e.tokens.completion, 64000,
            "the model's own limit before the tool default"
        );
    }

    #[test]
    fn usage_is_read_from_json_and_sse_bodies() {
        let mut s = UsageScanner::new(false);
        let body = json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 34}})
            .to_string();
        let (a, b) = body.as_bytes().split_at(10);
        s.feed(a);
        s.feed(b);
        assert_eq!(
            s.finish().reported,
            Some(Tokens {
                prompt: 12,
                completion: 34
            })
        );
        // OpenAI stream with include_usage: the last chunk carries usage.
        let mut s = UsageScanner::new(true);
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tok");
        s.feed(b"ens\":7,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n");
        assert_eq!(
            s.finish().reported,
            Some(Tokens {
                prompt: 7,
                completion: 3
            })
        );
        // Anthropic: input in message_start, cumulative output in message_delta.
        let mut s = UsageScanner::new(true);
        s.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n");
        s.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n");
        assert_eq!(
            s.finish().reported,
            Some(Tokens {
                prompt: 25,
                completion: 15
            })
        );
        // Responses API: usage inside response.completed.
        let mut s = UsageScanner::new(true);
        s.feed(b"data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":6}}}\n");
        assert_eq!(
            s.finish().reported,
            Some(Tokens {
                prompt: 5,
                completion: 6
            })
        );
        assert_eq!(UsageScanner::new(false).finish().reported, None);
    }

    #[test]
    fn gemini_compressed_and_cut_streams() {
        // Gemini streamGenerateContent?alt=sse: usageMetadata is cumulative per chunk.
        let mut s = UsageScanner::new(true);
        s.feed(b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hello\"}]}}],\"usageMetadata\":{\"promptTokenCount\":9,\"candidatesTokenCount\":1}}\r\n\r\n");
        s.feed(b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\" world\"}]}}],\"usageMetadata\":{\"promptTokenCount\":9,\"candidatesTokenCount\":4,\"thoughtsTokenCount\":3}}\r\n\r\n");
        let sc = s.finish();
        assert_eq!(
            sc.reported,
            Some(Tokens {
                prompt: 9,
                completion: 7
            })
        );
        assert_eq!(sc.delivered_chars, 11);
        // A gzip-labelled JSON body is read through the decoder.
        let body = json!({"usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 2}}).to_string();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut e, body.as_bytes()).unwrap();
        let gz = e.finish().unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("content-encoding", "gzip".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        let mut s = UsageScanner::for_response(&h);
        for c in gz.chunks(5) {
            s.feed(c);
        }
        assert_eq!(
            s.finish().reported,
            Some(Tokens {
                prompt: 15,
                completion: 2
            })
        );
        // A cut stream is charged the delivered text, not the estimate.
        let est = Estimate {
            tokens: Tokens {
                prompt: 100,
                completion: 4096,
            },
            ..Default::default()
        };
        let cut = Scanned {
            reported: None,
            delivered_chars: 41,
            complete: false,
        };
        assert_eq!(
            charged_tokens(&est, &cut, true),
            Tokens {
                prompt: 100,
                completion: 11
            }
        );
        assert_eq!(charged_tokens(&est, &cut, false), est.tokens);
        let anth = Scanned {
            reported: Some(Tokens {
                prompt: 25,
                completion: 1,
            }),
            delivered_chars: 400,
            complete: false,
        };
        assert_eq!(
            charged_tokens(&est, &anth, true),
            Tokens {
                prompt: 25,
                completion: 100
            }
        );
        assert_eq!(
            model_of(
                &json!({}),
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
            ),
            "gemini-2.5-flash"
        );
    }

    #[test]
    fn stream_usage_is_injected_only_when_missing() {
        use crate::config::LlmProvider::*;
        assert!(takes_stream_usage(Some(Openai), "/v1/chat/completions"));
        assert!(takes_stream_usage(
            Some(OpenaiCompatible),
            "/v1/completions"
        ));
        assert!(!takes_stream_usage(Some(Openai), "/v1/responses"));
        assert!(!takes_stream_usage(Some(Anthropic), "/v1/messages"));
        assert!(!takes_stream_usage(None, "/v1/chat/completions"));
        let v = inject_stream_usage(&json!({"model": "m", "stream": true})).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(inject_stream_usage(&json!({"stream": false})), None);
        assert_eq!(
            inject_stream_usage(
                &json!({"stream": true, "stream_options": {"include_usage": false}})
            ),
            None
        );
    }
}
