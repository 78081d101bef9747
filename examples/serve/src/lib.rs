//! Example wick service: any wick graph over HTTP, speaking the Open
//! Inference Protocol (KServe v2) that Triton's, KServe's and OpenVINO
//! Model Server's clients speak, plus an image convenience route.
//!
//! - `GET /v2/health/live`, `GET /v2/health/ready`: 200, empty body.
//! - `GET /v2`: server metadata (`extensions: ["binary_tensor_data"]`).
//! - `GET /v2/models/{name}[/versions/1]`: inputs and outputs with name,
//!   datatype (`FP32`) and shape (`-1` for the batch), from the served graph.
//! - `GET /v2/models/{name}[/versions/1]/ready`: 200, or 404 for another model.
//! - `POST /v2/models/{name}[/versions/1]/infer`: JSON tensors, or Triton's
//!   binary tensor data extension (`Inference-Header-Content-Length`,
//!   `binary_data_size`, `binary_data`, `binary_data_output`) both ways.
//! - `POST /v1/models/{name}:predict[?top_k=K]`: a PNG or JPEG image
//!   (resized and normalised as torchvision does for ImageNet) or a raw
//!   tensor (`application/x-safetensors`, one tensor `input`), answered
//!   with the top-K classes per image. `GET /healthz`: `{"status":"ok"}`.
//!
//! Errors are the protocol's `{"error": "..."}` with a 4xx/5xx status;
//! request bodies are bounded.

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_core::{DType, Device, Tensor, D};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use wick_engine::BatchedModel;
use wick_ir::Limits;

pub mod admission;
pub mod batcher;
pub mod fuzzing;
mod image;
pub mod metrics;
pub mod oip;
#[doc(hidden)]
pub use image::declared_png;
pub use image::{preprocess, ImageError, MAX_ASPECT_RATIO, MAX_DECODE_BYTES, MAX_IMAGE_SIDE};
use oip::ModelInfo;

/// Shared state: the model behind its batching queue, and what the
/// protocol says of it.
pub struct AppState {
    /// The queue in front of the model (any batch size).
    pub batcher: batcher::Batcher,
    /// Its name, inputs and outputs.
    pub info: ModelInfo,
    /// Size limits on request tensors (the engine's).
    pub limits: Limits,
    /// How long a request may wait for its forward to start (504 after).
    pub deadline: std::time::Duration,
    /// What `/metrics` reports.
    pub metrics: Arc<metrics::Metrics>,
    /// Requests held at once, from before their bodies are read.
    pub admission: Arc<admission::Admission>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
}

impl AppState {
    /// Serves `model` as `info` through a [`batcher::Batcher`] with
    /// `config`, admitting at most [`batcher::BatchConfig::max_admitted`]
    /// requests at once and bodies of at most [`DEFAULT_MAX_BODY_BYTES`].
    pub fn new(
        model: BatchedModel,
        info: ModelInfo,
        limits: Limits,
        config: batcher::BatchConfig,
        deadline: std::time::Duration,
    ) -> Self {
        let metrics = Arc::new(metrics::Metrics::default());
        Self {
            admission: admission::Admission::new(config.max_admitted()),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            batcher: batcher::Batcher::new(Arc::new(model), config, Arc::clone(&metrics)),
            info,
            limits,
            deadline,
            metrics,
        }
    }

    /// The same state accepting bodies of at most `max_body_bytes`.
    pub fn with_max_body_bytes(self, max_body_bytes: usize) -> Self {
        Self { max_body_bytes, ..self }
    }

    /// Admits one more request before its body is read (503 with
    /// `Retry-After` when all places are taken: the body is then read and
    /// dropped as it arrives, never held), then reads the body,
    /// refusing one over the limit (413) by its `Content-Length` before
    /// reading it, or as soon as it grows past the limit.
    async fn admit_and_read(&self, headers: &HeaderMap, body: Body) -> Result<(admission::Ticket, Bytes), ApiError> {
        let Some(ticket) = self.admission.try_admit() else {
            // Read and drop the body (never more than the limit), so the
            // client gets its 503 on a connection that stays usable.
            let mut rest = http_body_util::Limited::new(body, self.max_body_bytes);
            while let Some(Ok(_)) = rest.frame().await {}
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "overloaded: {} requests already admitted; retry later",
                    self.admission.capacity()
                ),
            )
            .retry_after(1));
        };
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {} bytes", self.max_body_bytes),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(too_large());
        }
        let bytes = axum::body::to_bytes(body, self.max_body_bytes).await.map_err(|e| {
            // axum wraps the limit's error in its own, possibly twice.
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let over_limit = std::iter::from_fn(|| {
                let current = source?;
                source = current.source();
                Some(current)
            })
            .any(|s| s.is::<http_body_util::LengthLimitError>());
            if over_limit {
                too_large()
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"))
            }
        })?;
        Ok((ticket, bytes))
    }

    /// Queues `inputs` for a batched forward and waits for this request's
    /// rows: 503 (with `Retry-After`) when the queue is full, 504 when the
    /// deadline passes first, 500 when the forward fails.
    async fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ApiError> {
        let deadline = std::time::Instant::now() + self.deadline;
        let receiver = self.batcher.submit(inputs, deadline).map_err(|e| match e {
            batcher::SubmitError::Full => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "overloaded: {} requests already queued; retry later",
                    self.batcher.config().max_queue
                ),
            )
            .retry_after(1),
            batcher::SubmitError::BadInputs(message) => ApiError::new(StatusCode::BAD_REQUEST, message),
        })?;
        match tokio::time::timeout(self.deadline, receiver).await {
            Ok(Ok(Ok(outputs))) => Ok(outputs),
            Ok(Ok(Err(batcher::Failure::Deadline(message)))) => {
                Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, message))
            }
            Ok(Ok(Err(batcher::Failure::Refused(message)))) => Err(ApiError::new(StatusCode::BAD_REQUEST, message)),
            Ok(Ok(Err(batcher::Failure::Failed(message)))) => {
                Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message))
            }
            Ok(Err(_)) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model's worker stopped",
            )),
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("no answer within the {} ms deadline", self.deadline.as_millis()),
            )),
        }
    }
}

/// An error answered as `{"error": ...}` with a status code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error with a `Retry-After` header of `seconds`.
    fn retry_after(self, seconds: u32) -> Self {
        Self {
            retry_after: Some(seconds),
            ..self
        }
    }
}

impl From<oip::OipError> for ApiError {
    fn from(e: oip::OipError) -> Self {
        Self::new(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The request body limit unless [`AppState::with_max_body_bytes`] sets one.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

/// Builds the router.
pub fn router(state: Arc<AppState>) -> Router {
    let max_body_bytes = state.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(|| async { StatusCode::OK }))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
        .route("/v1/models/{spec}", post(predict))
        .route("/metrics", get(render_metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), track))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Counts and logs every request: one `tracing` line (target `wick_serve`,
/// level info) with method, route template, status and milliseconds.
async fn track(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let start = std::time::Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("(unmatched)", |p| p.as_str())
        .to_string();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let elapsed = start.elapsed();
    let status = response.status().as_u16();
    state.metrics.request(&route, status, elapsed);
    tracing::info!(%method, %path, %route, status, ms = elapsed.as_secs_f64() * 1e3, "request");
    response
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(
        state.batcher.queue_depth(),
        state.admission.admitted(),
        state.batcher.model().stats(),
    );
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "wick-serve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

/// The served model if the path names it (and version 1, if a version is given).
fn served<'a>(state: &'a AppState, path: &HashMap<String, String>) -> Result<&'a ModelInfo, ApiError> {
    let name = path.get("name").map(String::as_str).unwrap_or_default();
    if name != state.info.name {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown model `{name}`; this server serves `{}`", state.info.name),
        ));
    }
    match path.get("version") {
        Some(v) if v != oip::MODEL_VERSION => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("model `{name}` has no version `{v}` (it has {})", oip::MODEL_VERSION),
        )),
        _ => Ok(&state.info),
    }
}

async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(served(&state, &path)?.metadata()))
}

async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<StatusCode, ApiError> {
    served(&state, &path).map(|_| StatusCode::OK)
}

/// The protocol's inference: decode (JSON or binary), run, encode.
async fn infer(
    State(state): State<Arc<AppState>>,
    Path(path): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    served(&state, &path)?;
    let (_ticket, body) = state.admit_and_read(&headers, body).await?;
    let header_len = match headers.get("inference-header-content-length") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "Inference-Header-Content-Length must be a byte count",
                    )
                })?,
        ),
    };
    // Decoding and encoding are CPU work: off the async workers.
    let for_decode = Arc::clone(&state);
    let decoded =
        tokio::task::spawn_blocking(move || oip::decode(&for_decode.info, &body, header_len, &for_decode.limits))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let decoded = Arc::new(decoded);
    let outputs = state.forward(decoded.inputs.clone()).await?;
    let for_encode = Arc::clone(&state);
    let encoded = tokio::task::spawn_blocking(move || oip::encode(&for_encode.info, &decoded, &outputs))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let mut response = encoded.body.into_response();
    let headers = response.headers_mut();
    match encoded.header_len {
        Some(n) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert("inference-header-content-length", HeaderValue::from(n));
        }
        None => {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    Ok(response)
}

#[derive(Debug, Deserialize)]
struct PredictQuery {
    top_k: Option<usize>,
}

fn raw_tensor(bytes: &[u8]) -> Result<Tensor, String> {
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| format!("not a valid safetensors body: {e}"))?;
    match tensors.get("input") {
        Some(t) if tensors.len() == 1 => Ok(t.clone()),
        _ => Err("the safetensors body must hold exactly one tensor named `input`".into()),
    }
}

async fn predict(
    State(state): State<Arc<AppState>>,
    Path(spec): Path<String>,
    query: Result<Query<PredictQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = spec
        .strip_suffix(":predict")
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no such route: /v1/models/{spec}")))?;
    served(&state, &HashMap::from([("name".to_string(), name.to_string())]))?;
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let top_k = query.top_k.unwrap_or(5);
    if !(1..=1000).contains(&top_k) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "top_k must be between 1 and 1000",
        ));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (_ticket, body) = state.admit_and_read(&headers, body).await?;
    let input = match content_type.split(';').next().unwrap_or("").trim() {
        "image/png" | "image/jpeg" => tokio::task::spawn_blocking(move || preprocess(&body))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError::new(e.status(), e.to_string()))?,
        "application/x-safetensors" => raw_tensor(&body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?,
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported Content-Type `{other}`; use image/png, image/jpeg or application/x-safetensors"),
            ))
        }
    };
    if state.info.inputs.len() != 1 || input.dims().get(1..) != Some(&state.info.inputs[0].dims[..]) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "model `{}` takes {:?} per image, got {:?}",
                state.info.name,
                state.info.inputs.iter().map(|i| &i.dims).collect::<Vec<_>>(),
                input.dims()
            ),
        ));
    }
    let logits = state.forward(vec![input]).await?.remove(0);
    let predictions = top_classes(&logits, top_k).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(json!({ "model": state.info.name, "predictions": predictions })))
}

/// Softmax probabilities of the `k` best classes per row of `[N, classes]` logits.
pub fn top_classes(logits: &Tensor, k: usize) -> Result<Vec<Vec<serde_json::Value>>, String> {
    let softmax = || {
        let e = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()
    };
    let probabilities = softmax().map_err(wick_ir::plain_candle_message)?;
    Ok(probabilities
        .iter()
        .map(|row| {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            order
                .iter()
                .take(k)
                .map(|&class| json!({ "class": class, "score": row[class] }))
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Top-k is sorted, sums to at most 1, and k is honoured.
    #[test]
    fn top_classes_sorted() {
        let logits = Tensor::new(&[[0.0f32, 3.0, 1.0, 2.0]], &Device::Cpu).unwrap();
        let top = top_classes(&logits, 2).unwrap();
        let classes: Vec<u64> = top[0].iter().map(|p| p["class"].as_u64().unwrap()).collect();
        assert_eq!(classes, [1, 3]);
    }
}
