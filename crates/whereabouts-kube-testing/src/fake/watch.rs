//! WATCH: a chunked stream of `{"type": ..., "object": ...}` lines, one per event.
//!
//! The initial events (a synthetic ADDED per current object, or the recorded events after the asked
//! resourceVersion) are taken and the live subscription is registered under the same state lock, so
//! no change falls between them. A resourceVersion older than the kept history gets one ERROR event
//! carrying a 410 `Expired` Status, as from a real server after etcd compaction.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use futures::stream;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::Shared;
use super::error::ApiError;
use super::resource::{Representation, ResourceType};
use super::select::Selector;
use super::store::{Event, EventType, metadata_str};

/// How long a watch with `allowWatchBookmarks=true` stays quiet before it sends a BOOKMARK.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// Where a watch starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// A synthetic ADDED event per current object, then live events (`resourceVersion` unset or "0").
    Snapshot,
    /// Every event after this resourceVersion, then live events.
    After(u64),
}

/// A parsed WATCH request.
#[derive(Debug)]
pub(crate) struct WatchRequest {
    pub(crate) rt: Arc<ResourceType>,
    pub(crate) namespace: Option<String>,
    pub(crate) selector: Selector,
    pub(crate) representation: Representation,
    pub(crate) start: Start,
    /// `sendInitialEvents=true`: a BOOKMARK annotated `k8s.io/initial-events-end` follows the
    /// initial events.
    pub(crate) initial_events_end: bool,
    /// `allowWatchBookmarks=true`.
    pub(crate) bookmarks: bool,
    /// `timeoutSeconds`: the stream ends after this long.
    pub(crate) timeout: Option<Duration>,
}

/// Starts a watch; the returned response streams until the client goes away, the timeout passes,
/// the server is made unavailable or stops.
pub(crate) fn start(shared: &Arc<Shared>, request: WatchRequest) -> Response {
    let type_key = request.rt.type_key();
    let namespace = request.namespace.clone();
    let (sender, events) = mpsc::unbounded_channel();
    let (initial, subscribed_at) = {
        let mut state = shared.state();
        let initial = match request.start {
            Start::Snapshot => Ok(state
                .list(&type_key, namespace.as_deref())
                .into_iter()
                .map(|object| {
                    Arc::new(Event {
                        resource_version: metadata_str(&object, "resourceVersion")
                            .parse()
                            .unwrap_or_default(),
                        event_type: EventType::Added,
                        type_key: type_key.clone(),
                        namespace: metadata_str(&object, "namespace").to_owned(),
                        object,
                        previous: None,
                    })
                })
                .collect()),
            Start::After(resource_version) => state
                .events_after(resource_version, &type_key, namespace.as_deref())
                .map_err(|floor| ApiError::expired(resource_version, floor)),
        };
        if initial.is_ok() {
            state.subscribe(type_key, namespace, sender);
        }
        (initial, state.resource_version())
    };
    let (output, chunks) = mpsc::channel::<Bytes>(64);
    let deadline = request.timeout.map(|timeout| Instant::now() + timeout);
    let pump = Pump { shared: shared.clone(), request, output };
    tokio::spawn(pump.run(initial, subscribed_at, events, deadline));
    let body = Body::from_stream(stream::unfold(chunks, |mut chunks| async move {
        chunks.recv().await.map(|chunk| (Ok::<_, Infallible>(chunk), chunks))
    }));
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

/// Resolves once the server is made unavailable (an API server restart ends every watch).
async fn until_unavailable(mut unavailable: watch::Receiver<bool>) {
    while !*unavailable.borrow_and_update() {
        if unavailable.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Writes one watch's events into its response body.
struct Pump {
    shared: Arc<Shared>,
    request: WatchRequest,
    output: mpsc::Sender<Bytes>,
}

impl Pump {
    async fn run(
        self,
        initial: Result<Vec<Arc<Event>>, ApiError>,
        subscribed_at: u64,
        mut events: mpsc::UnboundedReceiver<Arc<Event>>,
        deadline: Option<Instant>,
    ) {
        let initial = match initial {
            Ok(initial) => initial,
            Err(expired) => {
                self.send("ERROR", expired.status()).await;
                return;
            }
        };
        for event in &initial {
            if !self.deliver(event).await {
                return;
            }
        }
        if self.request.initial_events_end && !self.bookmark(subscribed_at, true).await {
            return;
        }
        let unavailable = until_unavailable(self.shared.unavailable.subscribe());
        tokio::pin!(unavailable);
        let timeout = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(timeout);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) if self.deliver(&event).await => {}
                    _ => return,
                },
                () = tokio::time::sleep(BOOKMARK_INTERVAL), if self.request.bookmarks => {
                    // All events up to the current resourceVersion have been delivered once the
                    // queue is empty (events are queued under the state lock).
                    let quiet_at = {
                        let state = self.shared.state();
                        events.is_empty().then(|| state.resource_version())
                    };
                    if let Some(resource_version) = quiet_at
                        && !self.bookmark(resource_version, false).await
                    {
                        return;
                    }
                }
                () = &mut timeout => return,
                () = self.output.closed() => return,
                () = &mut unavailable => return,
            }
        }
    }

    /// Sends an event if the watch's selector lets it through; a MODIFIED event becomes ADDED or
    /// DELETED when the object starts or stops matching. False once the client is gone.
    async fn deliver(&self, event: &Event) -> bool {
        let matches = |object: &Value| self.request.selector.matches(object);
        let event_type = match event.event_type {
            EventType::Modified => {
                match (event.previous.as_deref().is_some_and(matches), matches(&event.object)) {
                    (true, true) => Some(EventType::Modified),
                    (false, true) => Some(EventType::Added),
                    (true, false) => Some(EventType::Deleted),
                    (false, false) => None,
                }
            }
            other => matches(&event.object).then_some(other),
        };
        match event_type {
            Some(event_type) => {
                self.send(
                    event_type.name(),
                    self.request.rt.render(&event.object, self.request.representation),
                )
                .await
            }
            None => true,
        }
    }

    async fn bookmark(&self, resource_version: u64, initial_events_end: bool) -> bool {
        let mut metadata = json!({"resourceVersion": resource_version.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let rt = &self.request.rt;
        self.send("BOOKMARK", json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata}))
            .await
    }

    async fn send(&self, event_type: &str, object: Value) -> bool {
        let mut line = json!({"type": event_type, "object": object}).to_string().into_bytes();
        line.push(b'\n');
        self.output.send(Bytes::from(line)).await.is_ok()
    }
}
