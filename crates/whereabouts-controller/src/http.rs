//! The controller's small HTTP server: Prometheus metrics, liveness and readiness.
//!
//! * `GET /metrics`: [`Metrics::encode`], as OpenMetrics text.
//! * `GET /healthz`: 200 `ok` whenever the process answers at all (liveness).
//! * `GET /readyz`: 200 `ok` while the `ready` receiver holds `true`, 503 `not ready` otherwise.
//!
//! Anything else is 404 (405 for another method on these paths).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{CONTENT_TYPE, Metrics};

/// What the handlers read.
#[derive(Debug, Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
}

/// Serves on `listener` until `shutdown` completes, then finishes the requests in progress and
/// returns. `ready` decides `/readyz`: the caller chooses what readiness means (started, leading).
///
/// # Errors
///
/// When accepting on the listener fails for good.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Shared { metrics, ready });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn metrics_text(State(shared): State<Shared>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], shared.metrics.encode())
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(shared): State<Shared>) -> (StatusCode, &'static str) {
    if *shared.ready.borrow() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}
