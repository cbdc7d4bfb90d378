//! How much the edge does at once. A request holds its place in the edge's limit until its
//! response body ends — a stream is in flight for as long as it streams, not only until its
//! headers leave — and open streams (and edge batch uploads) are capped per key and per project,
//! so one tenant's long-lived work cannot take every place.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use meshgate_proto::common::v1::Principal;
use meshgate_runtime::{ApiError, ErrorCode};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

/// The edge's limit on requests in flight, responses included.
#[derive(Clone)]
pub struct InFlight(Arc<Semaphore>);

impl InFlight {
    pub fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max.max(1))))
    }
}

/// Middleware: takes a place (or sheds the request with 503 `overloaded`) and keeps it in the
/// response body until the body ends or is dropped.
pub async fn hold_place(State(in_flight): State<InFlight>, request: Request, next: Next) -> Response {
    let Ok(permit) = in_flight.0.clone().try_acquire_owned() else {
        let err = ApiError::new(ErrorCode::Overloaded, "the gateway is at its concurrency limit; retry shortly")
            .with_retry_after(1);
        return crate::response::error_response(&err, "");
    };
    next.run(request).await.map(|body| Body::new(Holding { body, _held: permit }))
}

/// A body that holds `_held` until it ends or is dropped.
struct Holding<G> {
    body: Body,
    _held: G,
}

impl<G: Unpin + Send + 'static> http_body::Body for Holding<G> {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<G> std::fmt::Debug for Holding<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holding").finish_non_exhaustive()
    }
}

/// Things in progress per key and per project — open streams (`[gateway] max_streams_per_key`,
/// `max_streams_per_project`), edge batch uploads (`edge_uploads_per_key`); 0 = no cap.
#[derive(Clone)]
pub struct TenantCaps {
    /// What is counted, for the refusal ("streams open").
    what: &'static str,
    per_key: usize,
    per_project: usize,
    open: Arc<Mutex<OpenStreams>>,
}

#[derive(Default)]
struct OpenStreams {
    keys: HashMap<String, usize>,
    projects: HashMap<String, usize>,
}

impl TenantCaps {
    pub fn new(what: &'static str, per_key: usize, per_project: usize) -> Self {
        Self { what, per_key, per_project, open: Arc::default() }
    }

    /// A place for one more of `principal`'s, held until the returned slot is dropped, or a 429
    /// naming the cap that is full.
    pub fn open(&self, principal: &Principal) -> Result<TenantSlot, ApiError> {
        let mut open = self.open.lock();
        let full = |cap: usize, count: Option<&usize>| cap > 0 && count.copied().unwrap_or(0) >= cap;
        let which = if full(self.per_key, open.keys.get(&principal.key_id)) {
            Some(("key", self.per_key))
        } else if full(self.per_project, open.projects.get(&principal.project_id)) {
            Some(("project", self.per_project))
        } else {
            None
        };
        if let Some((scope, cap)) = which {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                format!("this {scope} has {cap} {} at once, its limit; retry when one ends", self.what),
            )
            .with_retry_after(1));
        }
        *open.keys.entry(principal.key_id.clone()).or_default() += 1;
        *open.projects.entry(principal.project_id.clone()).or_default() += 1;
        Ok(TenantSlot { caps: self.open.clone(), key: principal.key_id.clone(), project: principal.project_id.clone() })
    }

    /// How many `key_id` holds now.
    pub fn open_for_key(&self, key_id: &str) -> usize {
        self.open.lock().keys.get(key_id).copied().unwrap_or(0)
    }
}

/// One place held; it is given back when dropped.
pub struct TenantSlot {
    caps: Arc<Mutex<OpenStreams>>,
    key: String,
    project: String,
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut open = self.caps.lock();
        let OpenStreams { keys, projects } = &mut *open;
        for (map, id) in [(keys, &self.key), (projects, &self.project)] {
            if let Some(count) = map.get_mut(id) {
                *count -= 1;
                if *count == 0 {
                    map.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(key: &str, project: &str) -> Principal {
        Principal { key_id: key.into(), project_id: project.into(), ..Default::default() }
    }

    #[test]
    fn streams_are_capped_per_key_and_project_and_given_back_on_drop() {
        let caps = TenantCaps::new("streams open", 2, 3);
        let a1 = caps.open(&principal("a", "p")).unwrap();
        let _a2 = caps.open(&principal("a", "p")).unwrap();
        let err = caps.open(&principal("a", "p")).err().unwrap();
        assert_eq!(err.code, ErrorCode::RateLimited);
        assert!(err.message.contains("key"), "{}", err.message);
        let _b1 = caps.open(&principal("b", "p")).unwrap();
        let err = caps.open(&principal("b", "p")).err().unwrap();
        assert!(err.message.contains("project"), "{}", err.message);
        assert!(caps.open(&principal("c", "other")).is_ok(), "another project is not affected");
        drop(a1);
        assert_eq!(caps.open_for_key("a"), 1);
        assert!(caps.open(&principal("b", "p")).is_ok());
        assert!(TenantCaps::new("streams open", 0, 0).open(&principal("a", "p")).is_ok(), "0 = no cap");
    }
}
