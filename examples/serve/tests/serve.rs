//! Starts the example service on 127.0.0.1 and sends it concurrent valid and
//! malformed requests (bounded in count and time), then shuts it down.

mod common;

use common::{png, request, uniform_png, Server};
use std::process::Command;
use std::time::Duration;
use wick_serve::declared_png;

/// Health, concurrent predictions and malformed requests, then graceful shutdown.
#[test]
fn serves_valid_and_rejects_malformed_requests() {
    let server = Server::start();
    let addr = server.addr.clone();
    let (status, json) = request(&addr, "GET", "/healthz", "text/plain", b"");
    assert_eq!((status, json["status"].as_str()), (200, Some("ok")));

    let image = png(320, 240);
    let path = "/v1/models/resnet18:predict?top_k=3";
    let mut handles = Vec::new();
    for _ in 0..4 {
        let (addr, image) = (addr.clone(), image.clone());
        handles.push(std::thread::spawn(move || {
            request(&addr, "POST", path, "image/png", &image)
        }));
    }
    let malformed: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        (path, "image/png", b"not a png".to_vec(), 400),
        (path, "text/plain", b"hello".to_vec(), 415),
        ("/v1/models/resnet18:predict?top_k=0", "image/png", image.clone(), 400),
        (path, "image/png", vec![0u8; 2_000_000], 413),
        ("/v1/models/resnet50:predict", "image/png", image.clone(), 404),
    ];
    for (path, content_type, body, expected) in malformed.clone() {
        let addr = addr.clone();
        handles.push(std::thread::spawn(move || {
            let (status, json) = request(&addr, "POST", path, content_type, &body);
            assert_eq!(status, expected, "{path} {content_type}: {json}");
            assert!(json["error"].is_string(), "{path}: {json}");
            (status, json)
        }));
    }
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let first = &results[0].1["predictions"];
    for (status, json) in &results[..4] {
        assert_eq!(*status, 200, "{json}");
        let top = json["predictions"][0].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let scores: Vec<f64> = top.iter().map(|p| p["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]) && scores.iter().sum::<f64>() <= 1.0 + 1e-6);
        assert!(top.iter().all(|p| p["class"].as_u64().unwrap() < 1000));
        // Same image, same answer: the same classes, scores equal up to the
        // summation order of the batch the request happened to share
        // (dynamic batching runs it at batch 1 to 4).
        let first = first[0].as_array().unwrap();
        for (p, q) in top.iter().zip(first) {
            assert_eq!(p["class"], q["class"], "{json}");
            let (a, b) = (p["score"].as_f64().unwrap(), q["score"].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-3), "{a} vs {b}");
        }
    }

    // A raw tensor of the wrong shape is a typed 4xx error, not a crash.
    let tensor = candle_core::Tensor::zeros((1, 4, 8, 8), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("input.safetensors");
    candle_core::safetensors::save(&std::collections::HashMap::from([("input".to_string(), tensor)]), &file).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let (status, json) = request(&addr, "POST", path, "application/x-safetensors", &bytes);
    assert_eq!(status, 422, "{json}");

    // Graceful shutdown on SIGTERM.
    let mut server = server;
    let killed = Command::new("kill")
        .arg(server.child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let mut exit = None;
    for _ in 0..100 {
        if let Some(status) = server.child.try_wait().unwrap() {
            exit = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(exit.expect("server did not stop within 10 s").success());
}

/// Image bombs: a tall, a wide and a huge-area image each get 413 with a
/// JSON error, and the server still answers `/healthz` and predicts.
#[test]
fn image_bombs_get_413_and_the_server_stays_up() {
    let server = Server::start();
    let addr = server.addr.clone();
    let path = "/v1/models/resnet18:predict";
    for (what, body) in [
        ("tall", uniform_png(1, 1_000_000)),
        ("wide", uniform_png(1_000_000, 1)),
        ("huge area", declared_png(100_000, 100_000)),
    ] {
        assert!(body.len() < 100_000, "{what}: {} bytes", body.len());
        let (status, json) = request(&addr, "POST", path, "image/png", &body);
        assert_eq!(status, 413, "{what}: {json}");
        assert!(
            json["error"].as_str().is_some_and(|e| e.contains("image")),
            "{what}: {json}"
        );
        let (status, json) = request(&addr, "GET", "/healthz", "text/plain", b"");
        assert_eq!((status, json["status"].as_str()), (200, Some("ok")), "after {what}");
    }
    let (status, json) = request(&addr, "POST", path, "image/png", &png(64, 48));
    assert_eq!(status, 200, "{json}");
}
