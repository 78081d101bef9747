//! Example wick service: ResNet18 classification over HTTP.
//!
//! `POST /v1/models/resnet18:predict[?top_k=K]` takes a PNG or JPEG image
//! (`Content-Type: image/png` / `image/jpeg`; resized and normalised as
//! torchvision does for ImageNet) or a raw tensor (`application/x-safetensors`
//! with one tensor `input` `[N, 3, H, W]`) and answers the top-K classes per
//! image as JSON. `GET /healthz` answers `{"status":"ok"}`. Request bodies
//! are bounded; malformed requests get 4xx JSON errors.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use wick_engine::BatchedModel;

/// ImageNet normalisation used by torchvision's ResNet weights.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviations.
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Shared state: the compiled model (any batch size).
pub struct AppState {
    /// The model served.
    pub model: BatchedModel,
    /// Name in the URL and responses.
    pub name: String,
}

/// An error answered as `{"error": ...}` with a status code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// Builds the router with a request body limit of `max_body_bytes`.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/v1/models/resnet18:predict", post(predict))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct PredictQuery {
    top_k: Option<usize>,
}

/// torchvision's ImageNet eval transform: resize the shorter side to 256
/// (bilinear), centre-crop 224, scale to [0, 1], normalise; `[1, 3, 224, 224]`.
pub fn preprocess(bytes: &[u8]) -> Result<Tensor, String> {
    let image = image::load_from_memory(bytes)
        .map_err(|e| format!("cannot decode image: {e}"))?
        .to_rgb8();
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    let scale = 256.0 / w.min(h) as f64;
    let (rw, rh) = (
        ((w as f64 * scale).round() as u32).max(224),
        ((h as f64 * scale).round() as u32).max(224),
    );
    let resized = image::imageops::resize(&image, rw, rh, image::imageops::FilterType::Triangle);
    let (x0, y0) = ((rw - 224) / 2, (rh - 224) / 2);
    let mut data = vec![0f32; 3 * 224 * 224];
    for y in 0..224 {
        for x in 0..224 {
            let pixel = resized.get_pixel(x0 + x, y0 + y);
            for c in 0..3 {
                data[(c * 224 + y as usize) * 224 + x as usize] = (pixel[c] as f32 / 255.0 - MEAN[c]) / STD[c];
            }
        }
    }
    Tensor::from_vec(data, (1, 3, 224, 224), &Device::Cpu).map_err(|e| e.to_string())
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
    query: Result<Query<PredictQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
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
        .unwrap_or("");
    let input = match content_type.split(';').next().unwrap_or("").trim() {
        "image/png" | "image/jpeg" => preprocess(&body),
        "application/x-safetensors" => raw_tensor(&body),
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported Content-Type `{other}`; use image/png, image/jpeg or application/x-safetensors"),
            ))
        }
    }
    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let state_for_run = Arc::clone(&state);
    let logits = tokio::task::spawn_blocking(move || state_for_run.model.run(&[input]))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?
        .remove(0);
    let predictions = top_classes(&logits, top_k).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(json!({ "model": state.name, "predictions": predictions })))
}

/// Softmax probabilities of the `k` best classes per row of `[N, classes]` logits.
pub fn top_classes(logits: &Tensor, k: usize) -> Result<Vec<Vec<serde_json::Value>>, String> {
    let probabilities = candle_core::Tensor::exp(
        &logits
            .broadcast_sub(&logits.max_keepdim(D::Minus1).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?,
    )
    .and_then(|e| e.broadcast_div(&e.sum_keepdim(D::Minus1)?))
    .and_then(|p| p.to_dtype(DType::F32)?.to_vec2::<f32>())
    .map_err(|e| e.to_string())?;
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

    /// A uniform image becomes the normalised constant per channel, at 224x224.
    #[test]
    fn preprocess_normalises_like_torchvision() {
        let image = image::RgbImage::from_pixel(300, 500, image::Rgb([255, 0, 128]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        let x = preprocess(&bytes.into_inner()).unwrap();
        assert_eq!(x.dims(), [1, 3, 224, 224]);
        for (c, value) in [255.0f32, 0.0, 128.0].into_iter().enumerate() {
            let plane = x
                .narrow(1, c, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = (value / 255.0 - MEAN[c]) / STD[c];
            assert!(plane.iter().all(|v| (v - want).abs() < 1e-5), "channel {c}");
        }
    }

    /// Top-k is sorted, sums to at most 1, and k is honoured.
    #[test]
    fn top_classes_sorted() {
        let logits = Tensor::new(&[[0.0f32, 3.0, 1.0, 2.0]], &Device::Cpu).unwrap();
        let top = top_classes(&logits, 2).unwrap();
        let classes: Vec<u64> = top[0].iter().map(|p| p["class"].as_u64().unwrap()).collect();
        assert_eq!(classes, [1, 3]);
    }
}
