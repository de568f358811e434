//! Kubernetes events about jobs (`kubectl describe tj`), published as
//! `events.k8s.io/v1` Events.
//!
//! Repeats of one event (same object, type, reason and message) within
//! [`SERIES_WINDOW`] become one Event whose series counts them, as
//! `kubectl` expects. Unlike kube's `Recorder`, which keys a series by
//! reason alone and keeps the first message (`MeshEpoch (x7) mesh epoch 1`
//! at epoch 1003), a new message is a new Event. Messages are cut to the
//! API server's limit of 1,024 bytes rather than refused whole.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// How long a repeat joins the series of an earlier event.
pub const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// The most bytes of a message the API server takes.
pub const NOTE_LIMIT: usize = 1024;

/// Normal or Warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn name(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    uid: String,
    type_: EventType,
    reason: String,
    note: String,
}

/// Publishes events as one controller instance.
pub struct Events {
    client: Client,
    controller: String,
    instance: String,
    recent: tokio::sync::Mutex<HashMap<Key, Event>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

/// `note` cut to at most [`NOTE_LIMIT`] bytes on a character boundary,
/// ending in `…` when cut.
pub fn fit_note(note: &str) -> String {
    if note.len() <= NOTE_LIMIT {
        return note.to_string();
    }
    let ellipsis = "…";
    let mut end = NOTE_LIMIT - ellipsis.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &note[..end])
}

impl Events {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Events {
            client,
            controller: controller.to_string(),
            instance: instance.unwrap_or_else(|| controller.to_string()),
            recent: Default::default(),
        }
    }

    /// Publishes (or counts again) the event `reason`/`note` about `regarding`.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let note = fit_note(note);
        let key = Key {
            uid: regarding.uid.clone().unwrap_or_default(),
            type_,
            reason: reason.to_string(),
            note: note.clone(),
        };
        let namespace = regarding.namespace.clone().unwrap_or("default".into());
        let events: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        // The lock is never held across a call to the API server.
        let earlier = {
            let mut recent = self.recent.lock().await;
            recent
                .retain(|_, e| last_seen(e).is_some_and(|t| now.duration_since(t) < SERIES_WINDOW));
            recent.get(&key).cloned()
        };
        if let Some(mut earlier) = earlier {
            let count = earlier.series.as_ref().map_or(2, |s| s.count + 1);
            let series = EventSeries {
                count,
                last_observed_time: MicroTime(now),
            };
            let patch = serde_json::json!({ "series": series });
            let name = earlier.metadata.name.clone().unwrap_or_default();
            match events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    earlier.series = Some(series);
                    self.recent.lock().await.insert(key, earlier);
                    return Ok(());
                }
                // Gone (expired, deleted): a new one below.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let event = Event {
            action: Some("Reconcile".to_string()),
            reason: Some(reason.to_string()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            note: Some(note),
            metadata: ObjectMeta {
                namespace: Some(namespace),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(&self.controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(type_.name().to_string()),
            ..Default::default()
        };
        let made = events.create(&PostParams::default(), &event).await?;
        self.recent.lock().await.insert(key, made);
        Ok(())
    }
}

fn last_seen(event: &Event) -> Option<Timestamp> {
    event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        assert_eq!(fit_note("short"), "short");
        let long = "é".repeat(800);
        let cut = fit_note(&long);
        assert!(cut.len() <= NOTE_LIMIT, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.starts_with("éé"));
        let exact = "a".repeat(NOTE_LIMIT);
        assert_eq!(fit_note(&exact), exact);
    }
}
