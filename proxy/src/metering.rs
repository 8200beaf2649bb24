//! Cost models: a fixed amount per call, exposure per unit of a request field, and LLM token
//! usage priced per model. The estimate is reserved before forwarding; the actual cost is
//! known at the response (fixed, per-unit) or at the end of its body (LLM usage, read from a
//! JSON body or from SSE events as they stream past, without holding them back).

use crate::config::{CostModel, LlmCost};
use crate::limits::to_micros;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde_json::Value;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Token counts read from a response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Prompt (input) tokens.
    pub prompt: u64,
    /// Completion (output) tokens.
    pub completion: u64,
}

/// What a call is expected to cost.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Estimate {
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
    pub fn llm_spend(&self, t: Tokens) -> i64 {
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
pub fn estimate(cost: &CostModel, input: &Value, body_len: usize) -> Result<Estimate, String> {
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
        let (p, c, max) = llm_price(llm, input)?;
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

fn llm_price(llm: &LlmCost, input: &Value) -> Result<(f64, f64, u64), String> {
    let model = input.get("model").and_then(Value::as_str).unwrap_or("");
    let price = llm
        .prices
        .get(model)
        .or_else(|| llm.prices.get("*"))
        .ok_or_else(|| format!("model {model:?} has no price in this tool's cost table; the call's cost cannot be bounded"))?;
    let max = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| input.get(*k).and_then(Value::as_u64))
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

/// Add `stream_options.include_usage` to a streamed OpenAI-style request that lacks it.
/// Returns the new body, or `None` when nothing needs changing.
pub fn inject_stream_usage(input: &Value) -> Option<Value> {
    if input.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    if input.pointer("/stream_options/include_usage").is_some() {
        return None;
    }
    // Anthropic's messages API reports usage in its events already and rejects the field.
    if input.get("anthropic_version").is_some() {
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

/// Fold every `usage` object in a JSON value into `t` (OpenAI chat/completions:
/// `prompt_tokens`/`completion_tokens`; responses and Anthropic: `input_tokens`/
/// `output_tokens`, where Anthropic's deltas are cumulative, hence `max`).
pub fn fold_usage(v: &Value, t: &mut Tokens) {
    match v {
        Value::Object(o) => {
            if let Some(Value::Object(u)) = o.get("usage") {
                let get = |k: &str| u.get(k).and_then(Value::as_u64);
                if let Some(p) = get("prompt_tokens").or_else(|| get("input_tokens")) {
                    t.prompt = t.prompt.max(p);
                }
                if let Some(c) = get("completion_tokens").or_else(|| get("output_tokens")) {
                    t.completion = t.completion.max(c);
                }
            }
            for (k, x) in o {
                if k != "usage" {
                    fold_usage(x, t);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| fold_usage(x, t)),
        _ => {}
    }
}

/// Most bytes of a non-streamed response kept to read its usage.
const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;

/// Reads token usage out of a response body as it passes.
#[derive(Debug, Default)]
pub struct UsageScanner {
    sse: bool,
    buf: Vec<u8>,
    overflow: bool,
    seen: bool,
    tokens: Tokens,
}

impl UsageScanner {
    /// A scanner for an SSE (`text/event-stream`) or JSON body.
    pub fn new(sse: bool) -> Self {
        Self {
            sse,
            ..Default::default()
        }
    }

    /// Feed a chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.overflow {
            return;
        }
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
            if let Ok(v) = serde_json::from_str::<Value>(data.trim_start()) {
                let before = self.tokens;
                fold_usage(&v, &mut self.tokens);
                self.seen |= before != self.tokens || v.get("usage").is_some();
            }
        }
    }

    /// Usage read, if the body reported any.
    pub fn finish(mut self) -> Option<Tokens> {
        if self.sse {
            let rest = std::mem::take(&mut self.buf);
            self.line(&rest);
        } else if !self.overflow {
            if let Ok(v) = serde_json::from_slice::<Value>(&self.buf) {
                fold_usage(&v, &mut self.tokens);
                self.seen = v.get("usage").is_some() || self.tokens != Tokens::default();
            }
        }
        self.seen.then_some(self.tokens)
    }
}

/// Called once when a metered body ends (`Some` usage) or is dropped early (`None`).
pub type OnDone = Box<dyn FnOnce(Option<Tokens>) + Send + Sync>;

pin_project_lite::pin_project! {
    /// A response body that reads usage as it streams and reports it once at the end.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        scanner: Option<UsageScanner>,
        done: Option<OnDone>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(done) = this.done.take() {
                let usage = this.scanner.take().and_then(UsageScanner::finish);
                done(usage);
            }
        }
    }
}

impl<B> MeteredBody<B> {
    /// Wrap `inner`.
    pub fn new(inner: B, sse: bool, done: OnDone) -> Self {
        Self {
            inner,
            scanner: Some(UsageScanner::new(sse)),
            done: Some(done),
        }
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(s)) = (f.data_ref(), this.scanner.as_mut()) {
                    s.feed(d);
                }
            }
            Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    let usage = this.scanner.take().and_then(UsageScanner::finish);
                    done(usage);
                }
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
            s.finish(),
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
            s.finish(),
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
            s.finish(),
            Some(Tokens {
                prompt: 25,
                completion: 15
            })
        );
        // Responses API: usage inside response.completed.
        let mut s = UsageScanner::new(true);
        s.feed(b"data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":6}}}\n");
        assert_eq!(
            s.finish(),
            Some(Tokens {
                prompt: 5,
                completion: 6
            })
        );
        assert_eq!(UsageScanner::new(false).finish(), None);
    }

    #[test]
    fn stream_usage_is_injected_only_when_missing() {
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
