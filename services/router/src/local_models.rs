//! Local models: re-read from the inference service, and its task classifier found among
//! them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_proto::inference::v1::{ClassifyRequest, ListModelsRequest};
use meshgate_runtime::{MeshChannel, Shutdown};

use crate::classifier::{CLASSIFIER_TASK, labels_are_tasks};
use crate::state::RouterCore;
use crate::targets::LocalModel;

/// Re-reads the inference service's loaded models every `every`, and whenever a plan asks for it
/// ([`RouterCore::read_local_models`]), into `core` (and, unless one is configured, finds the
/// task classifier among them) until `shutdown`.
pub async fn refresh(
    core: Arc<RouterCore>,
    mut client: InferenceClient<MeshChannel>,
    every: Duration,
    shutdown: Shutdown,
) {
    let mut reachable = true;
    let mut verdicts = HashMap::new();
    loop {
        match client.list_models(ListModelsRequest {}).await {
            Ok(response) => {
                let models: Vec<LocalModel> = response
                    .into_inner()
                    .models
                    .into_iter()
                    .filter(|m| m.loaded)
                    .map(|m| LocalModel { name: m.name, task: m.task, context_length: m.context_length })
                    .collect();
                if !core.classifier().is_pinned() {
                    let found = find_task_classifier(&mut client, &models, &mut verdicts).await;
                    core.set_discovered_classifier(found);
                }
                core.set_local_models(models);
                if !reachable {
                    tracing::info!("inference service reachable again");
                }
                reachable = true;
            }
            Err(status) => {
                // Keep the last known models: a blip must not drop L0 targets from every plan;
                // failed calls to them reach the breaker instead.
                if reachable {
                    tracing::warn!(%status, "cannot list local models; keeping the last known set");
                }
                reachable = false;
            }
        }
        core.local_read_done();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = core.local_read_wanted() => {}
        }
    }
}

/// The first loaded classification model whose labels are the router's tasks. The registry
/// has no "task classifier" kind and a model's name is no contract, so each classification
/// model is asked once and judged by the labels it answers with; a model that cannot answer
/// now is asked again on the next refresh.
async fn find_task_classifier(
    client: &mut InferenceClient<MeshChannel>,
    models: &[LocalModel],
    verdicts: &mut HashMap<String, bool>,
) -> Option<String> {
    for model in models.iter().filter(|m| m.task == "classification" || m.task == CLASSIFIER_TASK) {
        let fits = match verdicts.get(&model.name) {
            Some(fits) => *fits,
            None => {
                let request =
                    ClassifyRequest { model: model.name.clone(), inputs: vec!["hello".into()], ..Default::default() };
                let Ok(response) = client.classify(request).await else { continue };
                let labels: Vec<String> = response
                    .into_inner()
                    .results
                    .into_iter()
                    .next()
                    .map(|r| r.scores.into_iter().map(|s| s.label).collect())
                    .unwrap_or_default();
                let fits = labels_are_tasks(&labels);
                tracing::info!(model = %model.name, ?labels, task_classifier = fits, "classification model probed");
                verdicts.insert(model.name.clone(), fits);
                fits
            }
        };
        if fits {
            return Some(model.name.clone());
        }
    }
    None
}
