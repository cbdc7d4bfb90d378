//! Chat models with the decoder interface of optimum's ONNX export (SmolLM2, Llama...):
//! `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key/value` ->
//! `logits`, `present.{i}.key/value`. Generation prefills the prompt once, then feeds one token per
//! step with the key/value cache of the previous step.

use std::borrow::Cow;
use std::path::Path;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};
use parking_lot::Mutex;
use tokenizers::Tokenizer;

use crate::error::Error;
use crate::manifest::{ChatTemplate, ModelEntry};
use crate::onnx;
use crate::sampling::{Sampler, SamplingConfig};
use crate::text::{IncrementalDecoder, StopBuffer, StopCheck};

/// ChatML markers.
const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";
/// Roles a conversation may use.
const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

impl ChatTurn {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Length and sampling controls of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Most tokens to generate (the context length may cut it shorter).
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation stops before the first of these strings; none may be empty.
    pub stop: Vec<String>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end token or a stop sequence.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// The consumer went away.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub finish_reason: FinishReason,
    /// Tokens of the rendered prompt.
    pub prompt_tokens: usize,
    /// Tokens the model produced, the end token included when one ended the generation.
    pub completion_tokens: usize,
    /// The produced tokens, without the end token.
    pub token_ids: Vec<u32>,
    /// The text sent to the consumer (stop sequences cut off).
    pub text: String,
}

/// Receives text as it is decoded.
pub trait GenerationSink {
    /// Takes one piece of text; returns false when the consumer is gone.
    fn delta(&mut self, text: &str) -> bool;
    /// Whether the consumer is gone (checked before each decoding step).
    fn is_closed(&self) -> bool;
}

/// The key/value cache of one sequence: `past_key_values.{i}.key/value` for the next step.
struct KvCache {
    values: Vec<DynValue>,
    len: usize,
}

/// A loaded chat model.
pub struct ChatModel {
    /// `run` needs exclusive access; concurrent generations take turns per decoding step.
    session: Mutex<Session>,
    tokenizer: Tokenizer,
    eos_ids: Vec<u32>,
    /// `past_key_values.{i}.key`, `past_key_values.{i}.value` for every layer, in order.
    past_names: Vec<String>,
    /// `present.{i}.key`, `present.{i}.value`, matching `past_names`.
    present_names: Vec<String>,
    kv_heads: usize,
    head_dim: usize,
    has_position_ids: bool,
    context_length: usize,
    template: ChatTemplate,
    default_system_prompt: Option<String>,
}

impl ChatModel {
    pub fn load(entry: &ModelEntry, session: Session, tokenizer_path: &Path) -> Result<Self, Error> {
        let mut tokenizer = crate::text::load_tokenizer(tokenizer_path)?;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| Error::Load(format!("tokenizer truncation: {e}")))?;

        let eos_ids = entry
            .eos_tokens
            .iter()
            .map(|t| {
                tokenizer.token_to_id(t).ok_or_else(|| Error::Load(format!("end token {t:?} is not in the tokenizer")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        match entry.chat_template {
            ChatTemplate::Chatml => {
                for marker in [IM_START, IM_END] {
                    if tokenizer.token_to_id(marker).is_none() {
                        return Err(Error::Load(format!(
                            "the ChatML template needs {marker}, which the tokenizer lacks"
                        )));
                    }
                }
            }
        }

        let input_names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        let output_names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !input_names.contains(&required) {
                return Err(Error::Load(format!("the graph has no `{required}` input (inputs: {input_names:?})")));
            }
        }
        if !output_names.contains(&"logits") {
            return Err(Error::Load(format!("the graph has no `logits` output (outputs: {output_names:?})")));
        }
        let layers = (0..).take_while(|i| input_names.contains(&format!("past_key_values.{i}.key").as_str())).count();
        if layers == 0 {
            return Err(Error::Load(
                "the graph has no `past_key_values.0.key` input: export it with a KV cache (optimum `--task text-generation-with-past`)".into(),
            ));
        }
        let mut past_names = Vec::with_capacity(2 * layers);
        let mut present_names = Vec::with_capacity(2 * layers);
        for i in 0..layers {
            for kind in ["key", "value"] {
                let past = format!("past_key_values.{i}.{kind}");
                let present = format!("present.{i}.{kind}");
                if !input_names.contains(&past.as_str()) {
                    return Err(Error::Load(format!("the graph has no `{past}` input")));
                }
                if !output_names.contains(&present.as_str()) {
                    return Err(Error::Load(format!("the graph has no `{present}` output")));
                }
                past_names.push(past);
                present_names.push(present);
            }
        }
        let kv_shape = session
            .inputs()
            .iter()
            .find(|i| i.name() == "past_key_values.0.key")
            .and_then(|i| onnx::tensor_shape(i.dtype()))
            .unwrap_or_default();
        let (kv_heads, head_dim) = match kv_shape.as_slice() {
            [_, heads, _, dim] if *heads > 0 && *dim > 0 => (*heads as usize, *dim as usize),
            other => {
                return Err(Error::Load(format!(
                    "`past_key_values.0.key` has shape {other:?}; expected [batch, kv_heads, past_sequence, head_dim] with fixed heads and head_dim"
                )));
            }
        };

        let has_position_ids = input_names.contains(&"position_ids");
        Ok(Self {
            session: Mutex::new(session),
            tokenizer,
            eos_ids,
            past_names,
            present_names,
            kv_heads,
            head_dim,
            has_position_ids,
            context_length: entry.context_length as usize,
            template: entry.chat_template,
            default_system_prompt: entry.default_system_prompt.clone(),
        })
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Renders a conversation with the model's chat template, ending with the assistant's turn.
    pub fn render(&self, messages: &[ChatTurn]) -> Result<String, Error> {
        if messages.is_empty() {
            return Err(Error::InvalidRequest("messages must not be empty".into()));
        }
        if let Some(bad) = messages.iter().find(|m| !ROLES.contains(&m.role.as_str())) {
            return Err(Error::InvalidRequest(format!(
                "message role {:?} is not one of {}",
                bad.role,
                ROLES.join(", ")
            )));
        }
        match self.template {
            ChatTemplate::Chatml => {
                let mut prompt = String::new();
                if let Some(system) = &self.default_system_prompt
                    && messages[0].role != "system"
                {
                    prompt.push_str(&format!("{IM_START}system\n{system}{IM_END}\n"));
                }
                for m in messages {
                    prompt.push_str(&format!("{IM_START}{}\n{}{IM_END}\n", m.role, m.content));
                }
                prompt.push_str(IM_START);
                prompt.push_str("assistant\n");
                Ok(prompt)
            }
        }
    }

    /// Token ids of the rendered conversation.
    pub fn encode_prompt(&self, messages: &[ChatTurn]) -> Result<Vec<u32>, Error> {
        let prompt = self.render(messages)?;
        let encoding = self.tokenizer.encode(prompt, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Generates a reply to `prompt` (blocking: run on a blocking thread), sending text to `sink`
    /// as it is decoded.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerationParams,
        sink: &mut dyn GenerationSink,
    ) -> Result<Completion, Error> {
        if prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if prompt.len() >= self.context_length {
            return Err(Error::InvalidRequest(format!(
                "the prompt is {} tokens; the model's context is {} tokens, leaving no room for a reply",
                prompt.len(),
                self.context_length
            )));
        }
        let budget = params.max_tokens.min(self.context_length - prompt.len());
        let mut completion = Completion {
            finish_reason: FinishReason::Length,
            prompt_tokens: prompt.len(),
            completion_tokens: 0,
            token_ids: Vec::new(),
            text: String::new(),
        };
        if budget == 0 {
            return Ok(completion);
        }

        let mut cache = self.empty_cache()?;
        let mut logits = self.forward(prompt, &mut cache)?;
        let mut sampler = Sampler::new(params.sampling.clone());
        let mut decoder = IncrementalDecoder::new();
        let mut stops = StopBuffer::new(params.stop.clone());
        loop {
            let token = sampler.sample(&logits);
            completion.completion_tokens += 1;
            if self.eos_ids.contains(&token) {
                completion.finish_reason = FinishReason::Stop;
                break;
            }
            completion.token_ids.push(token);
            let delta = decoder.push(&self.tokenizer, token)?;
            match stops.push(&delta) {
                StopCheck::Emit(text) => {
                    if !emit(sink, &mut completion, &text) {
                        completion.finish_reason = FinishReason::Cancelled;
                        return Ok(completion);
                    }
                }
                StopCheck::Stopped(text) => {
                    emit(sink, &mut completion, &text);
                    completion.finish_reason = FinishReason::Stop;
                    return Ok(completion);
                }
            }
            if completion.token_ids.len() >= budget {
                completion.finish_reason = FinishReason::Length;
                break;
            }
            if sink.is_closed() {
                completion.finish_reason = FinishReason::Cancelled;
                return Ok(completion);
            }
            logits = self.forward(&[token], &mut cache)?;
        }

        // Text held back for an incomplete character or a possible stop sequence.
        let rest = decoder.finish(&self.tokenizer)?;
        let tail = match stops.push(&rest) {
            StopCheck::Emit(text) => text + &stops.flush(),
            StopCheck::Stopped(text) => {
                completion.finish_reason = FinishReason::Stop;
                text
            }
        };
        emit(sink, &mut completion, &tail);
        Ok(completion)
    }

    /// The empty cache before the prompt.
    fn empty_cache(&self) -> Result<KvCache, Error> {
        let values = (0..self.past_names.len())
            .map(|_| Ok(Tensor::<f32>::from_array(([1, self.kv_heads, 0, self.head_dim], Vec::new()))?.into_dyn()))
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(KvCache { values, len: 0 })
    }

    /// Runs `ids` after the cached sequence; returns the logits of the last position and leaves
    /// the grown cache in `cache`.
    fn forward(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, Error> {
        let n = ids.len();
        let total = cache.len + n;
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(3 + self.past_names.len());
        let input_ids: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
        inputs.push(("input_ids".into(), Tensor::from_array(([1, n], input_ids))?.into()));
        inputs.push(("attention_mask".into(), Tensor::from_array(([1, total], vec![1i64; total]))?.into()));
        if self.has_position_ids {
            let positions: Vec<i64> = (cache.len as i64..total as i64).collect();
            inputs.push(("position_ids".into(), Tensor::from_array(([1, n], positions))?.into()));
        }
        for (name, value) in self.past_names.iter().zip(cache.values.drain(..)) {
            inputs.push((name.as_str().into(), value.into()));
        }

        let mut session = self.session.lock();
        let mut outputs = session.run(inputs)?;
        let (shape, data) = outputs["logits"].try_extract_tensor::<f32>()?;
        let vocab = match **shape {
            [1, seq, vocab] if seq as usize == n && vocab > 0 => vocab as usize,
            _ => return Err(Error::Runtime(format!("`logits` has shape {shape:?}, expected [1, {n}, vocab]"))),
        };
        let last = data[(n - 1) * vocab..n * vocab].to_vec();
        for name in &self.present_names {
            let value = outputs
                .remove(name.as_str())
                .ok_or_else(|| Error::Runtime(format!("the model returned no `{name}`")))?;
            cache.values.push(value);
        }
        cache.len = total;
        Ok(last)
    }
}

/// Records `text` in the completion and passes it on; false when the consumer is gone.
fn emit(sink: &mut dyn GenerationSink, completion: &mut Completion, text: &str) -> bool {
    if text.is_empty() {
        return true;
    }
    completion.text.push_str(text);
    sink.delta(text)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, OnceLock};

    use super::*;
    use crate::testing::{self, ChatReference};

    /// A sink that stops accepting after `limit` deltas.
    struct Collect {
        deltas: Vec<String>,
        limit: usize,
    }

    impl GenerationSink for Collect {
        fn delta(&mut self, text: &str) -> bool {
            self.deltas.push(text.to_owned());
            self.deltas.len() < self.limit
        }
        fn is_closed(&self) -> bool {
            self.deltas.len() >= self.limit
        }
    }

    /// The tiny chat model, loaded once per test process, with its reference runs.
    fn model() -> (Arc<ChatModel>, ChatReference) {
        static MODEL: OnceLock<(Arc<ChatModel>, ChatReference)> = OnceLock::new();
        MODEL
            .get_or_init(|| {
                let (dir, entry) = testing::chat_entry();
                let env = onnx::environment(Some(&testing::ort_dylib())).unwrap();
                let session = onnx::open_session(env, &dir.join(&entry.file), 1, false).unwrap();
                let model = ChatModel::load(&entry, session, &dir.join(&entry.tokenizer)).unwrap();
                (Arc::new(model), testing::chat_reference(&dir, &entry))
            })
            .clone()
    }

    #[test]
    fn cached_decoding_equals_a_full_recompute() {
        let (model, reference) = model();
        let case = &reference.greedy[1];
        let mut seq = case.prompt_ids.clone();
        let mut cache = model.empty_cache().unwrap();
        let mut step_logits = model.forward(&seq, &mut cache).unwrap();
        for _ in 0..8 {
            let token = crate::sampling::argmax(&step_logits);
            let mut fresh = model.empty_cache().unwrap();
            seq.push(token);
            step_logits = model.forward(&[token], &mut cache).unwrap();
            let full = model.forward(&seq, &mut fresh).unwrap();
            assert_eq!(cache.len, seq.len());
            let diff = full.iter().zip(&step_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-3, "cached and recomputed logits differ by {diff}");
        }
    }

    #[test]
    fn a_closed_sink_cancels_generation() {
        let (model, reference) = model();
        let params = GenerationParams { max_tokens: 50, sampling: SamplingConfig::default(), stop: vec![] };
        let mut sink = Collect { deltas: vec![], limit: 2 };
        let done = model.generate(&reference.greedy[1].prompt_ids, &params, &mut sink).unwrap();
        assert_eq!(done.finish_reason, FinishReason::Cancelled);
        assert_eq!(sink.deltas.len(), 2);
        assert!(done.completion_tokens < 50);
    }

    #[test]
    fn chatml_rendering_and_role_checks() {
        let (model, _) = model();
        let prompt = model.render(&[ChatTurn::new("system", "S"), ChatTurn::new("user", "hi")]).unwrap();
        assert_eq!(prompt, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert!(matches!(model.render(&[]), Err(Error::InvalidRequest(_))));
        assert!(matches!(model.render(&[ChatTurn::new("wizard", "x")]), Err(Error::InvalidRequest(_))));
    }
}
