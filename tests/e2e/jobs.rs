//! Async jobs through the edge on the sync service's Postgres queue: submission with idempotency
//! keys, completion, tenancy, bad input, the offline fallback that queues a chat request whose
//! cloud targets are all down, and admission: a queued job holds its estimate against the budgets
//! until it is delivered (charged) or dies (released).

use std::time::Duration;

use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, chat_body};
use serde_json::{Value, json};

async fn submit(mesh: &TestMesh, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = mesh.http.post(format!("{}/v1/jobs", mesh.edge)).bearer_auth(ADMIN_KEY).json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap()
}

async fn get_job(mesh: &TestMesh, bearer: &str, id: &str) -> (u16, Value) {
    let response = mesh.http.get(format!("{}/v1/jobs/{id}", mesh.edge)).bearer_auth(bearer).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// The admin key's quota scope as `GET /v1/quota/status` reports it.
async fn key_quota(mesh: &TestMesh) -> Value {
    let status = mesh.get_json("/v1/quota/status", ADMIN_KEY).await;
    status["scopes"].as_array().unwrap().iter().find(|s| s["scope"]["kind"] == "key").unwrap().clone()
}

/// Polls the admin key's quota scope until `done` holds of it.
async fn key_quota_until(mesh: &TestMesh, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..200 {
        let key = key_quota(mesh).await;
        if done(&key) {
            return key;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the key's quota never got there: {}", key_quota(mesh).await);
}

async fn set_key_tokens_per_day(mesh: &TestMesh, tokens: i64) {
    let limits = json!({"scope": {"kind": "key", "id": "admin"}, "limits": {"tokens_per_day": tokens}});
    let set = mesh.http.put(format!("{}/v1/quota/limits", mesh.edge)).bearer_auth(ADMIN_KEY).json(&limits);
    assert_eq!(set.send().await.unwrap().status(), 200);
}

/// A mesh whose cloud providers answer 503 until told otherwise, and whose queue retries quickly.
async fn mesh_with_providers_down(max_attempts: u32) -> TestMesh {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(move |config| {
            config.sync.max_retries = 0;
            config.sync.queue.max_attempts = max_attempts;
            config.sync.queue.backoff_base_ms = 100;
            config.sync.queue.backoff_cap_ms = 200;
            config.sync.queue.poll_interval_ms = 50;
        }),
        ..MeshOptions::default()
    })
    .await;
    mesh.alpha.set_failures(1.0, 503);
    mesh.beta.set_failures(1.0, 503);
    mesh
}

/// Polls until the job reaches `status` (the queue's workers deliver in the background).
async fn wait_for(mesh: &TestMesh, id: &str, status: &str) -> Value {
    for _ in 0..200 {
        let (code, job) = get_job(mesh, ADMIN_KEY, id).await;
        assert_eq!(code, 200, "{job}");
        if job["status"] == status {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} never became {status}: {}", get_job(mesh, ADMIN_KEY, id).await.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_delivered_once_per_idempotency_key_and_scoped_to_its_project() {
    let mesh = TestMesh::start().await;
    let body = chat_body(CLOUD_MODEL, "summarise this later");
    let first = submit(&mesh, Some("report-2031-05-06"), &body).await;
    assert_eq!(first.status(), 202);
    let job: Value = first.json().await.unwrap();
    assert_eq!((job["object"].as_str(), job["idempotency_key"].as_str()), (Some("job"), Some("report-2031-05-06")));
    let id = job["id"].as_str().unwrap().to_owned();

    let replay = submit(&mesh, Some("report-2031-05-06"), &body).await;
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.json::<Value>().await.unwrap()["id"], id.as_str());
    let conflict = submit(&mesh, Some("report-2031-05-06"), &chat_body(CLOUD_MODEL, "something else")).await;
    assert_eq!(conflict.status(), 409);

    let done = wait_for(&mesh, &id, "succeeded").await;
    assert!(!done["result"]["content"].as_str().unwrap().is_empty(), "{done}");
    assert!(done["result"]["usage"]["total_tokens"].as_i64().unwrap() > 0);
    // Delivered once, under the job's id as the upstream Idempotency-Key.
    let completions = mesh.alpha.completions_for_idempotency_key(&id) + mesh.beta.completions_for_idempotency_key(&id);
    assert_eq!(completions, 1);

    // Another project's key cannot see it.
    let (_, project) = {
        let r = mesh
            .http
            .post(format!("{}/v1/projects", mesh.edge))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"name": "elsewhere"}))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    let key: Value = mesh
        .http
        .post(format!("{}/v1/keys", mesh.edge))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"project_id": project["id"], "service": true, "role": "developer"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let outsider = key["secret"].as_str().unwrap();
    assert_eq!(get_job(&mesh, outsider, &id).await.0, 404);
    let listed: Value = mesh.get_json("/v1/jobs", outsider).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "{listed}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_job_requests_are_4xx() {
    let mesh = TestMesh::start().await;
    let long_key = "k".repeat(300);
    let mut streaming = chat_body(CLOUD_MODEL, "x");
    streaming["stream"] = json!(true);
    let cases = [
        (Some(long_key.as_str()), chat_body(CLOUD_MODEL, "x"), 400),
        (None, streaming, 400),
        (None, json!({"model": CLOUD_MODEL}), 400),
        (None, json!("nope"), 400),
    ];
    for (key, body, expected) in cases {
        let response = submit(&mesh, key, &body).await;
        assert_eq!(response.status().as_u16(), expected, "{body}");
        let error: Value = response.json().await.unwrap();
        assert!(error["error"]["message"].is_string(), "{error}");
    }
    assert_eq!(get_job(&mesh, ADMIN_KEY, "job_does_not_exist").await.0, 404);
    assert_eq!(get_job(&mesh, ADMIN_KEY, "not a job id").await.0, 404);
    let bad_filter =
        mesh.http.get(format!("{}/v1/jobs?status=sleeping", mesh.edge)).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(bad_filter.status(), 400);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_cloud_target_down_an_allowed_request_is_queued_and_later_served() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| {
            config.sync.max_retries = 0;
            config.sync.queue.backoff_base_ms = 100;
            config.sync.queue.backoff_cap_ms = 200;
        }),
        ..MeshOptions::default()
    })
    .await;
    mesh.alpha.set_failures(1.0, 503);
    mesh.beta.set_failures(1.0, 503);

    let refused = mesh.chat(chat_body(CLOUD_MODEL, "the cloud is away")).await;
    assert!(refused.status().is_server_error(), "{}", refused.status());

    let queued = mesh
        .http
        .post(format!("{}/v1/chat/completions", mesh.edge))
        .bearer_auth(ADMIN_KEY)
        .header("x-meshgate-allow-queue", "true")
        .json(&chat_body(CLOUD_MODEL, "the cloud is away"))
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 202);
    let job: Value = queued.json().await.unwrap();
    assert_eq!(job["status"], "queued");
    let id = job["id"].as_str().unwrap().to_owned();

    // The project may allow it for every request.
    let limits = json!({"queue_when_unreachable": true});
    let set = mesh.http.put(format!("{}/v1/projects/default/limits", mesh.edge)).bearer_auth(ADMIN_KEY).json(&limits);
    assert_eq!(set.send().await.unwrap().status(), 200);
    let by_policy = mesh.chat(chat_body(CLOUD_MODEL, "queued by the project's limits")).await;
    assert_eq!(by_policy.status(), 202);
    let by_policy: Value = by_policy.json().await.unwrap();

    // Queued by the fallback, each holds its estimate like a submitted job.
    let key = key_quota(&mesh).await;
    assert!(key["reserved"]["tokens"].as_i64().unwrap() >= 2 * 64, "{key}");

    mesh.alpha.set_failures(0.0, 503);
    mesh.beta.set_failures(0.0, 503);
    let done = wait_for(&mesh, &id, "succeeded").await;
    assert!(done["attempts"].as_i64().unwrap() >= 1, "{done}");
    wait_for(&mesh, by_policy["id"].as_str().unwrap(), "succeeded").await;
    key_quota_until(&mesh, |k| k["reserved"]["tokens"] == 0 && k["used"]["requests"] == 2).await;
    mesh.stop().await;
}

/// The offline fallback is every chat-shaped endpoint's, and it holds once the router's breakers
/// have opened: with every cloud target down, each request allowing it — chat completions
/// (streamed or not), the Responses API, Anthropic Messages, legacy completions — is queued (202
/// and the job) and later delivered; `queue_when_unreachable` does the same without the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chat_shaped_request_allowing_it_is_queued_while_the_cloud_is_down() {
    let mesh = mesh_with_providers_down(1_000).await;
    let text = "the cloud is away";
    let requests = [
        ("/v1/chat/completions", chat_body(CLOUD_MODEL, text)),
        (
            "/v1/chat/completions",
            json!({"model": CLOUD_MODEL, "stream": true, "max_tokens": 64,
                   "messages": [{"role": "user", "content": text}]}),
        ),
        ("/v1/responses", json!({"model": CLOUD_MODEL, "input": text, "max_output_tokens": 64})),
        (
            "/v1/messages",
            json!({"model": CLOUD_MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": text}]}),
        ),
        ("/v1/completions", json!({"model": CLOUD_MODEL, "prompt": text, "max_tokens": 64})),
    ];
    let send = |path: &'static str, body: Value, allow: bool| {
        let mut request = mesh
            .http
            .post(format!("{}{path}", mesh.edge))
            .bearer_auth(ADMIN_KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&body);
        if allow {
            request = request.header("x-meshgate-allow-queue", "true");
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let mut ids = Vec::new();
    for round in ["closed", "open"] {
        if round == "open" {
            // Both targets failed every request of the first round: their circuits open, and the
            // plan keeps them only as last resorts, which fail too.
            let metrics = format!("{}/metrics", mesh.admin_url("router"));
            let mut open = 0;
            for _ in 0..100 {
                let page = mesh.http.get(&metrics).send().await.unwrap().text().await.unwrap();
                open = page
                    .lines()
                    .filter(|l| l.starts_with("meshgate_router_breaker_open{") && l.ends_with(" 1"))
                    .count();
                if open == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(open, 2, "both circuits open");
        }
        for (path, body) in &requests {
            let (status, job) = send(path, body.clone(), true).await;
            assert_eq!((status, job["object"].as_str()), (202, Some("job")), "{path} with the circuits {round}: {job}");
            ids.push(job["id"].as_str().unwrap().to_owned());
        }
    }
    let limits = json!({"queue_when_unreachable": true});
    let set = mesh.http.put(format!("{}/v1/projects/default/limits", mesh.edge)).bearer_auth(ADMIN_KEY).json(&limits);
    assert_eq!(set.send().await.unwrap().status(), 200);
    for (path, body) in &requests {
        let (status, job) = send(path, body.clone(), false).await;
        assert_eq!((status, job["object"].as_str()), (202, Some("job")), "{path} under queue_when_unreachable: {job}");
        ids.push(job["id"].as_str().unwrap().to_owned());
    }

    mesh.alpha.set_failures(0.0, 503);
    mesh.beta.set_failures(0.0, 503);
    for id in &ids {
        let done = wait_for(&mesh, id, "succeeded").await;
        assert!(done["result"]["content"].as_str().is_some_and(|c| c.contains(text)), "{done}");
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_does_not_fit_the_budget_is_refused_like_a_request() {
    let mesh = TestMesh::start().await;
    let limits = json!({"scope": {"kind": "key", "id": "admin"}, "limits": {"tokens_per_day": 10}});
    let set = mesh.http.put(format!("{}/v1/quota/limits", mesh.edge)).bearer_auth(ADMIN_KEY).json(&limits);
    assert_eq!(set.send().await.unwrap().status(), 200);

    // 64 completion tokens alone are over the key's 10 a day.
    let refused = submit(&mesh, Some("over-budget"), &chat_body(CLOUD_MODEL, "too big")).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["x-meshgate-quota-scope"], "key:admin");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
    let listed = mesh.get_json("/v1/jobs", ADMIN_KEY).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "nothing was queued: {listed}");

    mesh.stop().await;
}

/// Every queued job holds its estimate until it is delivered: jobs beyond what the budget fits are
/// refused at admission with 429, however long the others wait; delivered, each is charged its
/// actual usage and its hold is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_cannot_spend_more_than_the_budget() {
    let mesh = mesh_with_providers_down(1_000).await;
    let body = chat_body(CLOUD_MODEL, "wait for the cloud");
    let first: Value = submit(&mesh, None, &body).await.json().await.unwrap();
    let estimate = key_quota(&mesh).await["reserved"]["tokens"].as_i64().unwrap();
    assert!(estimate > 64, "prompt and max tokens are held: {estimate}");
    // Room for three such jobs and a half.
    set_key_tokens_per_day(&mesh, 3 * estimate + estimate / 2).await;
    let mut ids = vec![first["id"].as_str().unwrap().to_owned()];
    let mut refused = 0;
    for _ in 0..4 {
        let response = submit(&mesh, None, &body).await;
        match response.status().as_u16() {
            202 => ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()),
            429 => {
                refused += 1;
                assert_eq!(response.headers()["x-meshgate-quota-scope"], "key:admin");
                let error: Value = response.json().await.unwrap();
                assert_eq!(error["error"]["code"], "quota_exceeded", "{error}");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ids.len(), refused), (3, 2), "three jobs fit the budget");
    assert_eq!(key_quota(&mesh).await["reserved"]["tokens"].as_i64(), Some(3 * estimate));
    let listed = mesh.get_json("/v1/jobs", ADMIN_KEY).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 3, "{listed}");

    mesh.alpha.set_failures(0.0, 503);
    mesh.beta.set_failures(0.0, 503);
    let mut used = 0;
    for id in &ids {
        used += wait_for(&mesh, id, "succeeded").await["result"]["usage"]["total_tokens"].as_i64().unwrap();
    }
    let key = key_quota_until(&mesh, |k| k["reserved"]["tokens"] == 0).await;
    assert_eq!((key["used"]["tokens"].as_i64(), key["used"]["requests"].as_i64()), (Some(used), Some(3)), "{key}");
    mesh.stop().await;
}

/// A dead letter frees its hold; put back, it is admitted again like a new submission: refused
/// with 429 while the budget cannot hold it, queued (and charged when delivered) once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_frees_its_hold_and_is_admitted_again_when_retried() {
    let mesh = mesh_with_providers_down(1).await;
    let job: Value = submit(&mesh, None, &chat_body(CLOUD_MODEL, "doomed")).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    wait_for(&mesh, id, "dead").await;
    key_quota_until(&mesh, |k| k["reserved"]["tokens"] == 0).await;

    let retry = || mesh.http.post(format!("{}/v1/jobs/{id}/retry", mesh.edge)).bearer_auth(ADMIN_KEY).send();
    set_key_tokens_per_day(&mesh, 10).await;
    let refused = retry().await.unwrap();
    assert_eq!(refused.status(), 429);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "quota_exceeded", "{error}");
    assert_eq!(get_job(&mesh, ADMIN_KEY, id).await.1["status"], "dead", "still a dead letter");

    set_key_tokens_per_day(&mesh, 1_000_000).await;
    mesh.alpha.set_failures(0.0, 503);
    mesh.beta.set_failures(0.0, 503);
    let revived = retry().await.unwrap();
    assert_eq!(revived.status(), 200);
    let done = wait_for(&mesh, id, "succeeded").await;
    let tokens = done["result"]["usage"]["total_tokens"].as_i64().unwrap();
    let key = key_quota_until(&mesh, |k| k["reserved"]["tokens"] == 0 && k["used"]["requests"] == 1).await;
    assert_eq!(key["used"]["tokens"].as_i64(), Some(tokens), "{key}");
    let again = retry().await.unwrap();
    assert_eq!(again.status(), 409, "only dead letters are put back");
    mesh.stop().await;
}

/// The contract: a job submission or retry can be refused by a budget (`quota_exceeded`) or a
/// rate limit (`rate_limited`), and its documented 429 says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_429_of_job_admission_lists_both_codes() {
    let mesh = TestMesh::start_with(MeshOptions { stores: false, ..MeshOptions::default() }).await;
    let spec: Value = mesh.http.get(format!("{}/openapi.json", mesh.edge)).send().await.unwrap().json().await.unwrap();
    for (path, method) in [("/v1/jobs", "post"), ("/v1/jobs/{id}/retry", "post")] {
        let schema = &spec["paths"][path][method]["responses"]["429"]["content"]["application/json"]["schema"];
        let codes = schema["properties"]["error"]["properties"]["code"]["enum"].as_array().unwrap();
        for code in ["quota_exceeded", "rate_limited"] {
            assert!(codes.iter().any(|c| c == code), "{path}: {codes:?}");
        }
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_job_is_charged_to_its_caller_once() {
    let mesh = TestMesh::start().await;
    let queued = submit(&mesh, Some("charged-job"), &chat_body(CLOUD_MODEL, "charge this job")).await;
    assert_eq!(queued.status(), 202);
    let job: Value = queued.json().await.unwrap();
    let done = wait_for(&mesh, job["id"].as_str().unwrap(), "succeeded").await;
    let tokens = done["result"]["usage"]["total_tokens"].as_i64().unwrap();
    assert!(tokens > 0, "{done}");

    let status = mesh.get_json("/v1/quota/status", ADMIN_KEY).await;
    let key = status["scopes"].as_array().unwrap().iter().find(|s| s["scope"]["kind"] == "key").unwrap();
    assert_eq!((key["used"]["tokens"].as_i64(), key["used"]["requests"].as_i64()), (Some(tokens), Some(1)), "{key}");
    assert_eq!(key["reserved"]["tokens"], 0, "{key}");
    mesh.stop().await;
}
