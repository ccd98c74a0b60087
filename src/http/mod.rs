//! Pacer's HTTP listeners. For now: Prometheus metrics on their own port.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::controller::{Context, job};

/// `GET /metrics`: the Prometheus text exposition.
pub fn metrics_router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

async fn metrics(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    job::count_jobs(&ctx);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctx.metrics.encode(),
    )
}
