//! The Open Inference Protocol on loopback: every route, JSON and binary
//! tensors, and malformed requests, against the release or debug binary
//! serving the built-in ResNet18 (seeded weights). The outputs are compared
//! with the same model compiled in this process.

mod common;

use candle_core::{Device, Tensor};
use common::{request_raw, Server};
use serde_json::{json, Value};
use wick_engine::Engine;
use wick_models::{Model, ModelName, WeightSource};
use wick_passes::PassManager;

/// Extra request headers.
type Headers = Vec<(&'static str, String)>;

fn get(addr: &str, path: &str) -> (u16, Vec<u8>) {
    let (status, _, body) = request_raw(addr, "GET", path, &[], b"");
    (status, body)
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// ResNet18's logits for `x`, compiled here as the server compiles it.
fn reference(x: &Tensor) -> Vec<f32> {
    let model = Model::load(ModelName::Resnet18, WeightSource::Random { seed: 0 }, &Device::Cpu).unwrap();
    let mut graph = model.trace(x.dims()).unwrap();
    PassManager::default_pipeline().run(&mut graph).unwrap();
    let y = Engine::cpu()
        .compile(&graph)
        .unwrap()
        .run(std::slice::from_ref(x))
        .unwrap();
    y[0].flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-5 * scale, "max |diff| {diff} at scale {scale}");
}

#[test]
fn health_metadata_and_inference() {
    let server = Server::start_with(8_000_000, &[]);
    let addr = server.addr.as_str();
    for path in [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/resnet18/ready",
        "/v2/models/resnet18/versions/1/ready",
    ] {
        let (status, body) = get(addr, path);
        assert_eq!((status, body.len()), (200, 0), "{path}");
    }
    let (status, body) = get(addr, "/v2");
    assert_eq!(status, 200);
    let server_meta = json_of(&body);
    assert_eq!(server_meta["name"], "wick-serve");
    assert!(server_meta["version"].is_string());
    assert_eq!(server_meta["extensions"], json!(["binary_tensor_data"]));

    let (status, body) = get(addr, "/v2/models/resnet18");
    assert_eq!(status, 200);
    let meta = json_of(&body);
    assert_eq!(meta, json_of(&get(addr, "/v2/models/resnet18/versions/1").1));
    assert_eq!(meta["name"], "resnet18");
    assert_eq!(
        meta["inputs"],
        json!([{"name": "x", "datatype": "FP32", "shape": [-1, 3, 224, 224]}])
    );
    assert_eq!(meta["outputs"][0]["datatype"], "FP32");
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, 1000]));
    let output = meta["outputs"][0]["name"].as_str().unwrap().to_string();

    for path in [
        "/v2/models/resnet50",
        "/v2/models/resnet18/versions/2",
        "/v2/models/resnet50/ready",
    ] {
        let (status, body) = get(addr, path);
        assert_eq!(status, 404, "{path}");
        assert!(json_of(&body)["error"].is_string(), "{path}");
    }

    // Batch 2, JSON both ways, nested data.
    let x = wick_models::random_input(5, &[2, 3, 224, 224], &Device::Cpu).unwrap();
    let values: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let want = reference(&x);
    let request = json!({
        "id": "request-1",
        "inputs": [{"name": "x", "shape": [2, 3, 224, 224], "datatype": "FP32", "data": values}],
    });
    let content = ("Content-Type", "application/json".to_string());
    let (status, headers, body) = request_raw(
        addr,
        "POST",
        "/v2/models/resnet18/infer",
        std::slice::from_ref(&content),
        request.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(headers["content-type"].starts_with("application/json"));
    let response = json_of(&body);
    assert_eq!(response["id"], "request-1");
    assert_eq!(response["model_name"], "resnet18");
    assert_eq!(response["outputs"][0]["name"], output.as_str());
    assert_eq!(response["outputs"][0]["shape"], json!([2, 1000]));
    let got: Vec<f32> = response["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_close(&got, &want);

    // The same request with binary tensors both ways (Triton's extension).
    let header = json!({
        "inputs": [{"name": "x", "shape": [2, 3, 224, 224], "datatype": "FP32", "parameters": {"binary_data_size": values.len() * 4}}],
        "outputs": [{"name": output, "parameters": {"binary_data": true}}],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    let headers = [
        ("Content-Type", "application/octet-stream".to_string()),
        ("Inference-Header-Content-Length", header.len().to_string()),
    ];
    let (status, response_headers, body) =
        request_raw(addr, "POST", "/v2/models/resnet18/versions/1/infer", &headers, &body);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let json_len: usize = response_headers["inference-header-content-length"].parse().unwrap();
    let response = json_of(&body[..json_len]);
    assert_eq!(response["outputs"][0]["parameters"]["binary_data_size"], 8000);
    let binary: Vec<f32> = body[json_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(binary, got, "binary and JSON outputs agree exactly");

    // Malformed requests: the protocol's error object, 400 or 404.
    let bad: Vec<(&str, Headers, Vec<u8>, u16)> = vec![
        ("/v2/models/resnet18/infer", vec![content.clone()], b"{".to_vec(), 400),
        (
            "/v2/models/resnet18/infer",
            vec![content.clone()],
            json!({"inputs": [{"name": "x", "shape": [1, 3, 224], "datatype": "FP32", "data": [1]}]})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "/v2/models/resnet18/infer",
            vec![("Inference-Header-Content-Length", "999999".to_string())],
            b"{}".to_vec(),
            400,
        ),
        (
            "/v2/models/resnet18/infer",
            vec![("Inference-Header-Content-Length", "x".to_string())],
            b"{}".to_vec(),
            400,
        ),
        ("/v2/models/other/infer", vec![content.clone()], b"{}".to_vec(), 404),
        (
            "/v2/models/resnet18/versions/7/infer",
            vec![content.clone()],
            b"{}".to_vec(),
            404,
        ),
    ];
    for (path, headers, body, expected) in bad {
        let (status, _, response) = request_raw(addr, "POST", path, &headers, &body);
        assert_eq!(status, expected, "{path}: {}", String::from_utf8_lossy(&response));
        assert!(json_of(&response)["error"].is_string(), "{path}");
    }
    let (status, _) = get(addr, "/v2/health/live");
    assert_eq!(status, 200, "still live after the malformed requests");

    // What happened above, as Prometheus text.
    let (status, headers, body) = request_raw(addr, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    assert!(headers["content-type"].starts_with("text/plain"));
    let text = String::from_utf8(body).unwrap();
    for line in [
        "wick_requests_total{route=\"/v2/models/{name}/infer\",status=\"200\"} 1",
        "wick_requests_total{route=\"/v2/models/{name}/versions/{version}/infer\",status=\"200\"} 1",
        "wick_requests_total{route=\"/v2/models/{name}/infer\",status=\"400\"} 4",
        "wick_requests_total{route=\"/v2/models/{name}/infer\",status=\"404\"} 1",
        "wick_compute_seconds_count 2",
        "wick_batch_rows_bucket{le=\"2\"} 2",
        "wick_batch_cache_compiles_total 1",
        "wick_queue_depth 0",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
}

/// Binary batch-1 ResNet18 request body and its headers.
fn binary_request(seed: u64) -> (Headers, Vec<u8>) {
    let x = wick_models::random_input(seed, &[1, 3, 224, 224], &Device::Cpu).unwrap();
    let values: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let header = json!({
        "inputs": [{"name": "x", "shape": [1, 3, 224, 224], "datatype": "FP32", "parameters": {"binary_data_size": values.len() * 4}}],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    let headers = vec![
        ("Content-Type", "application/octet-stream".to_string()),
        ("Inference-Header-Content-Length", header.len().to_string()),
    ];
    (headers, body)
}

/// Overload: with one forward in flight and one request queued, a burst of
/// 24 concurrent requests gets 200s and 503s with `Retry-After` (never an
/// error of another kind), and the server stays live.
#[test]
fn overload_is_503_with_retry_after() {
    let server = Server::start_with(8_000_000, &["--max-queue", "1", "--workers", "1", "--max-batch", "1"]);
    let addr = server.addr.clone();
    let (headers, body) = binary_request(1);
    let handles: Vec<_> = (0..24)
        .map(|_| {
            let (addr, headers, body) = (addr.clone(), headers.clone(), body.clone());
            std::thread::spawn(move || request_raw(&addr, "POST", "/v2/models/resnet18/infer", &headers, &body))
        })
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for handle in handles {
        let (status, headers, body) = handle.join().unwrap();
        *counts.entry(status).or_insert(0) += 1;
        if status == 503 {
            assert_eq!(headers.get("retry-after").map(String::as_str), Some("1"));
            assert!(json_of(&body)["error"].as_str().unwrap().contains("overloaded"));
        }
    }
    assert!(counts.keys().all(|s| *s == 200 || *s == 503), "{counts:?}");
    assert!(
        counts.get(&503).copied().unwrap_or(0) > 0,
        "no request was shed: {counts:?}"
    );
    assert!(
        counts.get(&200).copied().unwrap_or(0) > 0,
        "nothing was served: {counts:?}"
    );
    assert_eq!(get(&addr, "/v2/health/live").0, 200);
}

/// Admission comes before the body: with two places (queue 1 + one
/// forward of 1), two clients that send headers but hold their bodies take
/// both, a third gets 503 at once (its body read and dropped), and when the
/// two disconnect their places come back.
#[test]
fn admission_precedes_the_body_and_disconnects_release_places() {
    use std::io::Write;
    let server = Server::start_with(8_000_000, &["--max-queue", "1", "--workers", "1", "--max-batch", "1"]);
    let (headers, body) = binary_request(3);
    let head = |addr: &str| {
        let mut head = format!(
            "POST /v2/models/resnet18/infer HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in &headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head + "\r\n"
    };
    let admitted = |addr: &str| {
        let text = String::from_utf8(get(addr, "/metrics").1).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("wick_requests_admitted "))
            .and_then(|v| v.parse::<u64>().ok())
            .expect("the admitted gauge")
    };
    let holders: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
            stream.write_all(head(&server.addr).as_bytes()).unwrap();
            stream.write_all(&body[..100]).unwrap();
            stream
        })
        .collect();
    let start = std::time::Instant::now();
    while admitted(&server.addr) < 2 {
        assert!(
            start.elapsed().as_secs() < 30,
            "the two held requests were never admitted"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (status, response_headers, response) =
        request_raw(&server.addr, "POST", "/v2/models/resnet18/infer", &headers, &body);
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&response));
    assert_eq!(response_headers.get("retry-after").map(String::as_str), Some("1"));
    drop(holders);
    while admitted(&server.addr) > 0 {
        assert!(start.elapsed().as_secs() < 30, "closed connections kept their places");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (status, _, response) = request_raw(&server.addr, "POST", "/v2/models/resnet18/infer", &headers, &body);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&response));
}

/// A chunked body (no `Content-Length`) is refused with 413 as soon as it
/// grows past the limit.
#[test]
fn chunked_body_over_the_limit_is_413() {
    use std::io::{Read, Write};
    let server = Server::start_with(1000, &[]);
    let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "POST /v2/models/resnet18/infer HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        server.addr
    );
    stream.write_all(head.as_bytes()).unwrap();
    for _ in 0..3 {
        let _ = stream.write_all(format!("{:x}\r\n{}\r\n", 600, "0".repeat(600)).as_bytes());
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("larger than 1000 bytes"), "{text}");
}

/// A deadline shorter than a forward: 504 with the protocol's error.
#[test]
fn a_passed_deadline_is_504() {
    let server = Server::start_with(8_000_000, &["--deadline-ms", "1"]);
    let (headers, body) = binary_request(2);
    let (status, _, response) = request_raw(&server.addr, "POST", "/v2/models/resnet18/infer", &headers, &body);
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&response));
    assert!(json_of(&response)["error"].is_string());
}
