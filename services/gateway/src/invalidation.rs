//! Changes one replica makes that every other replica must see at once: key revocations, role
//! changes and project settings. They are durable in the store; Redis pub/sub only tells the other
//! replicas to drop what they cached. [`Invalidator`] publishes, [`Subscription`] says whether this
//! replica hears the others (its caches are trusted only while it does), and the subscriber
//! module listens.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Channel carrying the ids of revoked keys.
pub const KEYS_CHANNEL: &str = "meshgate:keys:invalidate";
/// Channel carrying the ids of users whose roles changed.
pub const USERS_CHANNEL: &str = "meshgate:users:invalidate";
/// Channel carrying the ids of projects whose settings changed.
pub const PROJECTS_CHANNEL: &str = "meshgate:projects:invalidate";

/// Whether changes made on other replicas reach this one as they happen.
#[derive(Clone, Debug)]
pub struct Subscription(Arc<AtomicBool>);

impl Subscription {
    /// `shared`: other replicas may change keys and settings, so nothing is heard until the
    /// subscriber is subscribed; alone, there is nobody to hear from.
    pub fn new(shared: bool) -> Self {
        Self(Arc::new(AtomicBool::new(!shared)))
    }

    pub fn is_live(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn set_live(&self, live: bool) {
        self.0.store(live, Ordering::Release);
    }
}

/// Publishes changes to every replica (over Redis, when there are replicas to tell).
#[derive(Clone, Default)]
pub struct Invalidator {
    redis: Option<meshgate_storage::RedisConnection>,
}

impl Invalidator {
    pub fn new(redis: Option<meshgate_storage::RedisConnection>) -> Self {
        Self { redis }
    }

    /// Tells every replica that a key was revoked.
    pub async fn publish_key(&self, key_id: &str) {
        self.send(KEYS_CHANNEL, key_id, "a key revocation").await;
    }

    /// Tells every replica that a user's roles changed: their cached keys of the user go.
    pub async fn publish_user(&self, user_id: &str) {
        self.send(USERS_CHANNEL, user_id, "a role change").await;
    }

    /// Tells every replica that a project's settings changed.
    pub async fn publish_project(&self, project_id: &str) {
        self.send(PROJECTS_CHANNEL, project_id, "a project settings change").await;
    }

    /// Best effort with a log: the change itself is durable, and replicas that miss the message
    /// stop trusting their caches while their subscription is down.
    async fn send(&self, channel: &str, id: &str, what: &str) {
        let Some(redis) = &self.redis else { return };
        let mut conn = redis.clone();
        let published: Result<i64, _> = redis::cmd("PUBLISH").arg(channel).arg(id).query_async(&mut conn).await;
        if let Err(err) = published {
            tracing::warn!(%err, id, "could not publish {what}; other replicas see it when their cache entry expires");
        }
    }
}
