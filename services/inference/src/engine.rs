//! The model registry and the requests it serves. Model work runs on blocking threads so the
//! async workers never wait on ONNX Runtime.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use meshgate_proto::common::v1::SamplingParams;
use parking_lot::RwLock;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::batcher::Batcher;
use crate::cascade::{self, CascadeClassifier, Classified, EncoderModel, Stage};
use crate::chat::{ChatModel, ChatTurn, Completion, FinishReason, GenerationParams, GenerationSink};
use crate::config::Config;
use crate::embedding_cache::EmbeddingCache;
use crate::encoder::{ClassifyModel, EmbedModel};
use crate::error::Error;
use crate::manifest::{Manifest, ModelEntry, Task};
use crate::metrics::InferenceMetrics;
use crate::onnx;
use crate::sampling::SamplingConfig;

/// Most stop sequences one generation may set.
pub const MAX_STOP_SEQUENCES: usize = 8;

/// A loaded model, shared by the requests using it (an unload frees it once they finish).
#[derive(Clone)]
pub enum LoadedModel {
    Chat(Arc<ChatModel>),
    Embed(Arc<EncoderModel>),
    /// A classifier graph with its own encoder.
    Classify(Arc<Batcher<ClassifyModel>>),
    /// A classifier head over a shared encoder, with its first stage (see [`crate::cascade`]).
    Cascade(Arc<CascadeClassifier>),
}

impl LoadedModel {
    /// Requests waiting in the model's batching queue and its capacity (encoder models).
    fn queue(&self) -> Option<(usize, usize)> {
        match self {
            LoadedModel::Chat(_) | LoadedModel::Cascade(_) => None,
            LoadedModel::Embed(e) => Some((e.batcher.queue_depth(), e.batcher.queue_capacity())),
            LoadedModel::Classify(b) => Some((b.queue_depth(), b.queue_capacity())),
        }
    }
}

enum SlotState {
    /// Not loaded (never, or unloaded on request).
    Unloaded(String),
    Loading,
    Loaded(LoadedModel),
    /// Loading failed; the reason is reported and returned to requests.
    Failed(String),
}

struct Slot {
    entry: ModelEntry,
    state: RwLock<SlotState>,
    /// Serialises loads and unloads of this model.
    transition: tokio::sync::Mutex<()>,
}

/// What the registry says about one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatus {
    pub name: String,
    pub task: Task,
    pub loaded: bool,
    /// Why the model is not serving, when it is not.
    pub error: Option<String>,
    /// Embedding dimensions (embedding models).
    pub dims: Option<u32>,
    pub context_length: u32,
    /// Requests waiting in the model's batching queue (loaded encoder models; 0 otherwise).
    pub queue_depth: usize,
    /// How many requests that queue holds before refusing (0 for models without one).
    pub queue_capacity: usize,
}

/// Vectors of one `Embed` call.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedOutput {
    pub vectors: Vec<Vec<f32>>,
    pub dims: usize,
    pub prompt_tokens: u64,
}

/// Label scores of one classifier in a `Classify` call.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifyOutput {
    /// The classifier's registry name.
    pub model: String,
    /// Per input, in input order: every label with its probability, most likely first, and what
    /// settled them.
    pub results: Vec<Classified>,
    pub prompt_tokens: u64,
}

/// One event of a generation stream.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// Text decoded since the previous event.
    Delta(String),
    /// The last event: finish reason, exact usage and the produced tokens.
    Done(Completion),
}

/// The events of one generation; an `Err` ends the stream.
pub type GenerateStream = ReceiverStream<Result<GenerateEvent, Error>>;

/// The inference engine: registry, loading, and request execution. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    slots: BTreeMap<String, Slot>,
    in_flight: AtomicUsize,
    /// Set once the models to load at start have all been tried.
    initialized: AtomicBool,
    metrics: InferenceMetrics,
}

/// Counts one executing request until dropped.
struct InFlight(Arc<Inner>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.in_flight.dec();
    }
}

impl Engine {
    /// Reads the manifest of `config.models_dir` without loading any model. A missing manifest
    /// gives an empty registry (models not fetched yet); an invalid one is an error.
    pub fn new(config: Config, metrics: InferenceMetrics) -> Result<Self, Error> {
        config.validate()?;
        let manifest_path = config.models_dir.join("manifest.json");
        let entries = if manifest_path.exists() {
            Manifest::load(&manifest_path)?.models
        } else {
            tracing::warn!(path = %manifest_path.display(), "no model manifest; serving no local models");
            Vec::new()
        };
        let initial = if config.load_on_start { "waiting to load" } else { "not loaded; call Load" }.to_owned();
        let slots = entries
            .into_iter()
            .map(|entry| {
                metrics.model_loaded.with_label_values(&[entry.name.as_str()]).set(0);
                let slot = Slot {
                    state: RwLock::new(SlotState::Unloaded(initial.clone())),
                    transition: tokio::sync::Mutex::new(()),
                    entry,
                };
                (slot.entry.name.clone(), slot)
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                slots,
                in_flight: AtomicUsize::new(0),
                initialized: AtomicBool::new(false),
                metrics,
            }),
        })
    }

    /// [`Engine::new`], then loads the models in the background when `load_on_start` is set.
    pub fn start(config: Config, metrics: InferenceMetrics) -> Result<Self, Error> {
        let engine = Self::new(config, metrics)?;
        if engine.inner.config.load_on_start {
            let loader = engine.clone();
            tokio::spawn(async move { loader.load_all().await });
        } else {
            engine.inner.initialized.store(true, Ordering::Release);
        }
        Ok(engine)
    }

    /// Loads every model of the registry, one after the other (classifiers over a shared encoder
    /// after the encoders); failures are recorded per model.
    pub async fn load_all(&self) {
        let mut slots: Vec<&Slot> = self.inner.slots.values().collect();
        slots.sort_by_key(|slot| slot.entry.encoder.is_some());
        for slot in slots {
            let status = self.load_slot(slot).await;
            if let Some(reason) = &status.error {
                tracing::error!(model = %status.name, %reason, "model not loaded");
            }
        }
        self.inner.initialized.store(true, Ordering::Release);
    }

    /// Ready once the start-up loading finished, whatever its per-model outcome.
    pub fn ready(&self) -> Result<(), String> {
        if self.inner.initialized.load(Ordering::Acquire) { Ok(()) } else { Err("loading models".into()) }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Requests executing now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// Requests waiting in the batching queues of all models.
    pub fn queued(&self) -> usize {
        self.inner.slots.values().filter_map(|slot| loaded(slot).and_then(|m| m.queue())).map(|(depth, _)| depth).sum()
    }

    /// Every model of the registry, by name.
    pub fn models(&self) -> Vec<ModelStatus> {
        self.inner.slots.values().map(status).collect()
    }

    /// Loads `name` (no-op when loaded) and reports its state.
    pub async fn load(&self, name: &str) -> Result<ModelStatus, Error> {
        let slot = self.slot(name)?;
        Ok(self.load_slot(slot).await)
    }

    /// Unloads `name`; requests already running keep the model until they finish.
    pub async fn unload(&self, name: &str) -> Result<ModelStatus, Error> {
        let slot = self.slot(name)?;
        let _transition = slot.transition.lock().await;
        *slot.state.write() = SlotState::Unloaded("unloaded on request".into());
        self.inner.metrics.model_loaded.with_label_values(&[name]).set(0);
        Ok(status(slot))
    }

    async fn load_slot(&self, slot: &Slot) -> ModelStatus {
        let name = slot.entry.name.as_str();
        let _transition = slot.transition.lock().await;
        if matches!(*slot.state.read(), SlotState::Loaded(_)) {
            return status(slot);
        }
        *slot.state.write() = SlotState::Loading;
        let encoder = match &slot.entry.encoder {
            Some(encoder) => match self.loaded_encoder(encoder).await {
                Ok(loaded) => Some((encoder.clone(), loaded)),
                Err(reason) => {
                    *slot.state.write() = SlotState::Failed(reason);
                    return status(slot);
                }
            },
            None => None,
        };
        let entry = slot.entry.clone();
        let config = self.inner.config.clone();
        let metrics = self.inner.metrics.clone();
        let started = Instant::now();
        let loaded = tokio::task::spawn_blocking(move || load_model(&entry, &config, &metrics, encoder)).await;
        let state = match loaded {
            Ok(Ok(model)) => {
                tracing::info!(model = %name, seconds = started.elapsed().as_secs_f64(), "loaded");
                self.inner.metrics.model_loaded.with_label_values(&[name]).set(1);
                SlotState::Loaded(model)
            }
            Ok(Err(err)) => SlotState::Failed(err.to_string()),
            Err(join) => SlotState::Failed(format!("loading stopped abnormally: {join}")),
        };
        *slot.state.write() = state;
        status(slot)
    }

    /// The shared encoder `name`, loaded first when it is not; the reason when it cannot be.
    async fn loaded_encoder(&self, name: &str) -> Result<Arc<EncoderModel>, String> {
        let slot = self.inner.slots.get(name).ok_or_else(|| format!("encoder `{name}` is not in the registry"))?;
        if loaded(slot).is_none() {
            // The manifest allows no encoder that is itself a cascade, so this recursion stops here.
            Box::pin(self.load_slot(slot)).await;
        }
        match loaded(slot) {
            Some(LoadedModel::Embed(encoder)) => Ok(encoder),
            Some(_) => Err(format!("encoder `{name}` is not an embeddings model")),
            None => Err(format!("encoder `{name}` is not loaded: {}", status(slot).error.unwrap_or_default())),
        }
    }

    fn slot(&self, name: &str) -> Result<&Slot, Error> {
        if name.trim().is_empty() {
            return Err(Error::InvalidRequest("model is required".into()));
        }
        self.inner.slots.get(name).ok_or_else(|| Error::ModelNotFound(name.to_owned()))
    }

    /// The loaded model `name`, which must do `task`.
    fn model(&self, name: &str, task: Task) -> Result<LoadedModel, Error> {
        let slot = self.slot(name)?;
        if slot.entry.task != task {
            return Err(Error::WrongTask {
                model: name.to_owned(),
                expected: task.as_str(),
                actual: slot.entry.task.as_str(),
            });
        }
        let unavailable = |reason: &str| Error::ModelUnavailable { model: name.to_owned(), reason: reason.to_owned() };
        match &*slot.state.read() {
            SlotState::Loaded(model) => Ok(model.clone()),
            SlotState::Loading => Err(unavailable("it is loading")),
            SlotState::Unloaded(reason) | SlotState::Failed(reason) => Err(unavailable(reason)),
        }
    }

    fn enter(&self) -> Result<InFlight, Error> {
        let now = self.inner.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = InFlight(self.inner.clone());
        self.inner.metrics.in_flight.inc();
        if now > self.inner.config.max_in_flight {
            return Err(Error::Overloaded(now - 1));
        }
        Ok(guard)
    }

    fn count(&self, model: &str, task: Task, outcome: &str) {
        self.inner.metrics.requests.with_label_values(&[model, task.as_str(), outcome]).inc();
    }

    /// Embeds `inputs` with the embedding model `model`, batched with other requests for it.
    pub async fn embed(&self, model: &str, inputs: Vec<String>) -> Result<EmbedOutput, Error> {
        let LoadedModel::Embed(encoder) = self.model(model, Task::Embeddings)? else {
            return Err(Error::Internal(format!(
                "model `{model}` is registered as embeddings but loaded as another task"
            )));
        };
        check_inputs(&inputs, self.inner.config.max_batch_inputs)?;
        let _guard = self.enter().inspect_err(|err| self.count(model, Task::Embeddings, outcome(err)))?;
        let started = Instant::now();
        let batcher = &encoder.batcher;
        match batcher.submit(inputs).await {
            Ok(items) => {
                self.inner.metrics.embed_duration.with_label_values(&[model]).observe(started.elapsed().as_secs_f64());
                let prompt_tokens = items.iter().map(|(_, tokens)| tokens).sum();
                self.inner.metrics.tokens.with_label_values(&[model, "prompt"]).inc_by(prompt_tokens);
                self.count(model, Task::Embeddings, "ok");
                let dims = batcher.model().dims();
                Ok(EmbedOutput { vectors: items.into_iter().map(|(v, _)| v).collect(), dims, prompt_tokens })
            }
            Err(err) => {
                self.count(model, Task::Embeddings, outcome(&err));
                Err(err)
            }
        }
    }

    /// Scores `inputs` with the classifier `model` (see [`Engine::classify_many`]).
    pub async fn classify(&self, model: &str, inputs: Vec<String>) -> Result<ClassifyOutput, Error> {
        let mut outputs = self.classify_many(&[model.to_owned()], inputs).await?;
        outputs.pop().ok_or_else(|| Error::Internal("no classification result".into()))
    }

    /// Scores `inputs` with each classifier of `models` (a name given twice runs once), one output
    /// per distinct name in order. Classifier graphs are batched with other requests for them;
    /// cascades settle what their first stage is sure of and share one embedding per text and
    /// encoder for the rest (see [`crate::cascade`]).
    pub async fn classify_many(&self, models: &[String], inputs: Vec<String>) -> Result<Vec<ClassifyOutput>, Error> {
        let mut names: Vec<&str> = Vec::with_capacity(models.len());
        for name in models {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        if names.is_empty() {
            return Err(Error::InvalidRequest("model is required".into()));
        }
        let loaded = names
            .iter()
            .map(|name| self.model(name, Task::Classification))
            .collect::<Result<Vec<_>, _>>()
            .inspect_err(|err| names.iter().for_each(|name| self.count(name, Task::Classification, outcome(err))))?;
        check_inputs(&inputs, self.inner.config.max_batch_inputs)?;
        let _guard = self
            .enter()
            .inspect_err(|err| names.iter().for_each(|name| self.count(name, Task::Classification, outcome(err))))?;
        let result = self.run_classifiers(&names, loaded, inputs).await;
        match &result {
            Ok(outputs) => {
                for out in outputs {
                    let model = out.model.as_str();
                    self.inner.metrics.tokens.with_label_values(&[model, "prompt"]).inc_by(out.prompt_tokens);
                    self.count(model, Task::Classification, "ok");
                    for stage in [Stage::FirstStage, Stage::Encoder] {
                        let settled = out.results.iter().filter(|r| r.stage == stage).count() as u64;
                        self.inner.metrics.classify_stage.with_label_values(&[model, stage.as_str()]).inc_by(settled);
                    }
                }
            }
            Err(err) => names.iter().for_each(|name| self.count(name, Task::Classification, outcome(err))),
        }
        result
    }

    async fn run_classifiers(
        &self,
        names: &[&str],
        loaded: Vec<LoadedModel>,
        inputs: Vec<String>,
    ) -> Result<Vec<ClassifyOutput>, Error> {
        let mut outputs: Vec<Option<ClassifyOutput>> = vec![None; names.len()];
        let mut cascades = Vec::new();
        let mut cascade_slots = Vec::new();
        for (i, model) in loaded.into_iter().enumerate() {
            let output = |results, prompt_tokens| ClassifyOutput { model: names[i].to_owned(), results, prompt_tokens };
            match model {
                LoadedModel::Classify(batcher) => {
                    let items = batcher.submit(inputs.clone()).await?;
                    let prompt_tokens = items.iter().map(|(_, tokens)| tokens).sum();
                    let results = items
                        .into_iter()
                        .map(|(scores, _)| Classified { scores, stage: Stage::Encoder, cached: false })
                        .collect();
                    outputs[i] = Some(output(results, prompt_tokens));
                }
                LoadedModel::Cascade(classifier) => {
                    cascades.push(classifier);
                    cascade_slots.push(i);
                }
                LoadedModel::Chat(_) | LoadedModel::Embed(_) => {
                    return Err(Error::Internal(format!(
                        "model `{}` is registered as classification but loaded as another task",
                        names[i]
                    )));
                }
            }
        }
        if !cascades.is_empty() {
            let results = cascade::classify(&cascades, &inputs).await?;
            let encoders: Vec<&str> = cascades.iter().map(|c| c.encoder_name()).collect();
            for ((i, (classified, tokens)), encoder) in cascade_slots.into_iter().zip(results).zip(encoders) {
                let hits = classified.iter().filter(|r| r.cached).count() as u64;
                let misses = classified.iter().filter(|r| r.stage == Stage::Encoder && !r.cached).count() as u64;
                self.inner.metrics.embedding_cache.with_label_values(&[encoder, "hit"]).inc_by(hits);
                self.inner.metrics.embedding_cache.with_label_values(&[encoder, "miss"]).inc_by(misses);
                outputs[i] = Some(ClassifyOutput {
                    model: names[i].to_owned(),
                    results: classified,
                    prompt_tokens: tokens.iter().sum(),
                });
            }
        }
        outputs.into_iter().map(|o| o.ok_or_else(|| Error::Internal("a classifier gave no result".into()))).collect()
    }

    /// Starts a generation with the chat model `model`. Invalid requests fail here, before any
    /// event; the stream then yields deltas as they are decoded and ends with
    /// [`GenerateEvent::Done`]. Dropping the stream stops the generation.
    pub async fn generate(
        &self,
        model: &str,
        messages: Vec<ChatTurn>,
        sampling: Option<SamplingParams>,
    ) -> Result<GenerateStream, Error> {
        let LoadedModel::Chat(chat) = self.model(model, Task::Chat)? else {
            return Err(Error::Internal(format!("model `{model}` is registered as chat but loaded as another task")));
        };
        let params = generation_params(sampling.unwrap_or_default(), self.inner.config.default_max_tokens)?;
        let guard = self.enter()?;
        let started = Instant::now();

        let encoder = chat.clone();
        let prompt = tokio::task::spawn_blocking(move || encoder.encode_prompt(&messages))
            .await
            .map_err(|join| Error::Internal(format!("tokenization stopped abnormally: {join}")))??;
        if prompt.len() >= chat.context_length() {
            return Err(Error::InvalidRequest(format!(
                "the prompt is {} tokens; model `{model}` has a context of {} tokens, leaving no room for a reply",
                prompt.len(),
                chat.context_length()
            )));
        }

        let (tx, rx) = mpsc::channel(self.inner.config.stream_buffer.max(1));
        let engine = self.clone();
        let model = model.to_owned();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let mut sink = ChannelSink { tx: tx.clone(), started, first: None };
            let result = chat.generate(&prompt, &params, &mut sink);
            let metrics = &engine.inner.metrics;
            if let Some(ttft) = sink.first {
                metrics.time_to_first_token.with_label_values(&[model.as_str()]).observe(ttft);
            }
            match result {
                Ok(done) => {
                    metrics.tokens.with_label_values(&[model.as_str(), "prompt"]).inc_by(done.prompt_tokens as u64);
                    metrics
                        .tokens
                        .with_label_values(&[model.as_str(), "completion"])
                        .inc_by(done.completion_tokens as u64);
                    if done.finish_reason == FinishReason::Cancelled {
                        engine.count(&model, Task::Chat, "cancelled");
                        tracing::debug!(%model, tokens = done.completion_tokens, "generation cancelled by the client");
                    } else {
                        engine.count(&model, Task::Chat, "ok");
                        // The receiver may be gone by now; nothing is left to tell it.
                        let _ = tx.blocking_send(Ok(GenerateEvent::Done(done)));
                    }
                }
                Err(err) => {
                    engine.count(&model, Task::Chat, "error");
                    tracing::error!(%model, %err, "generation failed");
                    let _ = tx.blocking_send(Err(err));
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

/// Sends deltas into a bounded channel: decoding waits while the client is slow, and stops when
/// the client is gone.
struct ChannelSink {
    tx: mpsc::Sender<Result<GenerateEvent, Error>>,
    started: Instant,
    first: Option<f64>,
}

impl GenerationSink for ChannelSink {
    fn delta(&mut self, text: &str) -> bool {
        self.first.get_or_insert_with(|| self.started.elapsed().as_secs_f64());
        self.tx.blocking_send(Ok(GenerateEvent::Delta(text.to_owned()))).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The loaded model of `slot`, if any.
fn loaded(slot: &Slot) -> Option<LoadedModel> {
    match &*slot.state.read() {
        SlotState::Loaded(model) => Some(model.clone()),
        _ => None,
    }
}

fn status(slot: &Slot) -> ModelStatus {
    let entry = &slot.entry;
    let (loaded, error, dims, queue) = match &*slot.state.read() {
        SlotState::Loaded(model) => {
            let dims = match model {
                LoadedModel::Embed(e) => Some(e.batcher.model().dims() as u32),
                LoadedModel::Chat(_) | LoadedModel::Classify(_) | LoadedModel::Cascade(_) => None,
            };
            (true, None, dims, model.queue())
        }
        SlotState::Loading => (false, Some("loading".to_owned()), entry.dims, None),
        SlotState::Unloaded(reason) | SlotState::Failed(reason) => (false, Some(reason.clone()), entry.dims, None),
    };
    let (queue_depth, queue_capacity) = queue.unwrap_or((0, 0));
    ModelStatus {
        name: entry.name.clone(),
        task: entry.task,
        loaded,
        error,
        dims,
        context_length: entry.context_length,
        queue_depth,
        queue_capacity,
    }
}

/// The `outcome` label of a failed request: refusals for load apart from errors.
fn outcome(err: &Error) -> &'static str {
    match err {
        Error::QueueFull { .. } | Error::Overloaded(_) => "rejected",
        _ => "error",
    }
}

/// Loads one model (blocking); `encoder` is the loaded shared encoder of a cascade classifier.
fn load_model(
    entry: &ModelEntry,
    config: &Config,
    metrics: &InferenceMetrics,
    encoder: Option<(String, Arc<EncoderModel>)>,
) -> Result<LoadedModel, Error> {
    let dir: &Path = &config.models_dir;
    let file: PathBuf = dir.join(&entry.file);
    let tokenizer = dir.join(&entry.tokenizer);
    onnx::verify_file(&file, entry.sha256.as_deref(), config.verify_sha256)?;
    onnx::verify_file(&tokenizer, entry.tokenizer_sha256.as_deref(), config.verify_sha256)?;
    if let Some(stage) = &entry.first_stage {
        onnx::verify_file(&dir.join(&stage.file), stage.sha256.as_deref(), config.verify_sha256)?;
    }
    if let Some((name, encoder)) = encoder {
        return Ok(LoadedModel::Cascade(Arc::new(CascadeClassifier::load(entry, dir, &name, encoder)?)));
    }
    let open = || {
        let env = onnx::environment(config.ort_dylib_path.as_deref())?;
        onnx::open_session(env, &file, config.intra_op_threads, config.intra_op_spinning)
    };
    match entry.task {
        Task::Chat => Ok(LoadedModel::Chat(Arc::new(ChatModel::load(entry, open()?, &tokenizer)?))),
        Task::Embeddings => {
            let model = Arc::new(EmbedModel::load(entry, open()?, &tokenizer)?);
            let batcher = Batcher::start(&entry.name, model, &config.batching, metrics.batch(&entry.name))?;
            let cache = EmbeddingCache::new(config.classification_cache_entries);
            Ok(LoadedModel::Embed(Arc::new(EncoderModel { batcher, cache })))
        }
        Task::Classification => {
            let model = Arc::new(ClassifyModel::load(entry, open()?, &tokenizer)?);
            let batcher = Batcher::start(&entry.name, model, &config.batching, metrics.batch(&entry.name))?;
            Ok(LoadedModel::Classify(Arc::new(batcher)))
        }
    }
}

/// Validates the texts of an `Embed` or `Classify` call.
fn check_inputs(inputs: &[String], max: usize) -> Result<(), Error> {
    if inputs.is_empty() {
        return Err(Error::InvalidRequest("inputs must not be empty".into()));
    }
    if inputs.len() > max {
        return Err(Error::InvalidRequest(format!("{} inputs in one call; the limit is {max}", inputs.len())));
    }
    if let Some(i) = inputs.iter().position(|s| s.trim().is_empty()) {
        return Err(Error::InvalidRequest(format!("inputs[{i}] is empty")));
    }
    Ok(())
}

/// Validates the request's length, sampling and stop controls.
pub fn generation_params(sampling: SamplingParams, default_max_tokens: u32) -> Result<GenerationParams, Error> {
    let max_tokens = match sampling.max_tokens {
        None => default_max_tokens as usize,
        Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => return Err(Error::InvalidRequest(format!("max_tokens must be at least 1, got {n}"))),
    };
    if sampling.stop.len() > MAX_STOP_SEQUENCES {
        return Err(Error::InvalidRequest(format!(
            "{} stop sequences; the limit is {MAX_STOP_SEQUENCES}",
            sampling.stop.len()
        )));
    }
    if sampling.stop.iter().any(String::is_empty) {
        return Err(Error::InvalidRequest("stop sequences must not be empty".into()));
    }
    let config = SamplingConfig::from_request(sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed)?;
    Ok(GenerationParams { max_tokens, sampling: config, stop: sampling.stop })
}
