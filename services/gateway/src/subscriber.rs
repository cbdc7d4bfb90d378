//! Listens for the changes other replicas publish (see [`crate::invalidation`]) and drops what
//! they invalidate from this replica's key and settings caches.

use std::time::Duration;

use futures::StreamExt;
use meshgate_runtime::Shutdown;

use crate::auth::Authenticator;
use crate::invalidation::{KEYS_CHANNEL, PROJECTS_CHANNEL, Subscription, USERS_CHANNEL};
use crate::settings::SettingsCache;

/// Listens until `stop`, reconnecting with backoff. The caches are trusted only while subscribed
/// (`subscription`), and emptied on every (re)subscription because messages sent meanwhile are
/// lost.
pub async fn listen(
    client: redis::Client,
    auth: Authenticator,
    settings: SettingsCache,
    subscription: Subscription,
    stop: Shutdown,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&[KEYS_CHANNEL, USERS_CHANNEL, PROJECTS_CHANNEL]).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            _ = stop.cancelled() => return,
            result = subscribed => result,
        };
        match pubsub {
            Ok(mut pubsub) => {
                auth.forget_all();
                settings.clear();
                subscription.set_live(true);
                backoff = Duration::from_millis(100);
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        message = messages.next() => match message {
                            Some(message) => match (message.get_channel_name(), message.get_payload::<String>()) {
                                (KEYS_CHANNEL, Ok(key_id)) => auth.invalidate(&key_id),
                                (USERS_CHANNEL, Ok(user_id)) => auth.invalidate_user(&user_id),
                                (PROJECTS_CHANNEL, Ok(project_id)) => settings.invalidate(&project_id),
                                (channel, Ok(_)) => tracing::warn!(channel, "invalidation on an unknown channel"),
                                (_, Err(err)) => tracing::warn!(%err, "unreadable invalidation"),
                            },
                            None => break,
                        },
                    }
                }
                tracing::warn!("invalidation subscription ended; reconnecting");
            }
            Err(err) => tracing::warn!(%err, "cannot subscribe to invalidations; retrying"),
        }
        subscription.set_live(false);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
