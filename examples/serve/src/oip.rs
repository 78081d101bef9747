//! The Open Inference Protocol (KServe v2, the REST API Triton, KServe,
//! Seldon, OpenVINO Model Server and ONNX Runtime Server share): a served
//! model's metadata, inference requests decoded into tensors, responses
//! encoded, with the binary tensor data extension Triton's clients use
//! (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data`,
//! `binary_data_output`). Everything a request states is checked against
//! the model before a tensor is built: names, datatype, rank, the
//! non-batch dimensions, element counts (checked arithmetic, within the
//! engine's limits) and byte sizes.

use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use wick_ir::{Graph, Limits};

/// The protocol's name for f32 tensors, the only element type wick serves.
const FP32: &str = "FP32";
/// The model version served (wick serves one version per model).
pub const MODEL_VERSION: &str = "1";

/// A protocol error: the HTTP status and the `{"error": ...}` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OipError {
    /// HTTP status code.
    pub status: u16,
    /// The message.
    pub message: String,
}

fn bad(message: impl Into<String>) -> OipError {
    OipError {
        status: 400,
        message: message.into(),
    }
}

/// One input or output as the model metadata lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The graph value's name.
    pub name: String,
    /// Dimensions after the batch (the batch is `-1` in the metadata).
    pub dims: Vec<usize>,
}

/// What the protocol says of a served model: its name and its graph's
/// inputs and outputs (f32, first dimension the batch).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The name in URLs and responses.
    pub name: String,
    /// The graph's inputs, in signature order.
    pub inputs: Vec<TensorInfo>,
    /// The graph's outputs, in return order.
    pub outputs: Vec<TensorInfo>,
}

impl ModelInfo {
    /// The metadata of `graph` served as `name`: every input and output
    /// must be f32 with a batch dimension first.
    pub fn of(graph: &Graph, name: &str) -> Result<Self, String> {
        let info = |ids: &[wick_ir::NodeId]| -> Result<Vec<TensorInfo>, String> {
            ids.iter()
                .map(|&id| {
                    let node = graph.node(id);
                    match (node.fact.dtype, node.fact.shape.split_first()) {
                        (candle_core::DType::F32, Some((_, dims))) => Ok(TensorInfo {
                            name: node.name.clone(),
                            dims: dims.to_vec(),
                        }),
                        _ => Err(format!(
                            "`{}` is {}: served tensors are f32 with a batch dimension",
                            node.name, node.fact
                        )),
                    }
                })
                .collect()
        };
        Ok(Self {
            name: name.to_string(),
            inputs: info(graph.inputs())?,
            outputs: info(graph.outputs())?,
        })
    }

    /// `GET /v2/models/{name}`: the model metadata response.
    pub fn metadata(&self) -> Value {
        let tensors = |list: &[TensorInfo]| -> Vec<Value> {
            list.iter()
                .map(|t| {
                    let shape: Vec<i64> = std::iter::once(-1).chain(t.dims.iter().map(|&d| d as i64)).collect();
                    json!({ "name": t.name, "datatype": FP32, "shape": shape })
                })
                .collect()
        };
        json!({
            "name": self.name,
            "versions": [MODEL_VERSION],
            "platform": "wick",
            "inputs": tensors(&self.inputs),
            "outputs": tensors(&self.outputs),
        })
    }
}

#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<RequestInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestOutput>>,
}

#[derive(Debug, Deserialize)]
struct RequestInput {
    name: String,
    shape: Vec<u64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct RequestOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// A decoded inference request: the model's inputs in signature order and
/// which outputs to return, each as JSON or binary.
#[derive(Debug)]
pub struct Decoded {
    /// The request's `id`, echoed in the response.
    pub id: Option<Value>,
    /// One tensor per model input, in signature order.
    pub inputs: Vec<Tensor>,
    /// `(index among the model's outputs, as binary)`, in response order.
    pub outputs: Vec<(usize, bool)>,
}

fn flag(parameters: &Option<Map<String, Value>>, key: &str) -> Result<Option<bool>, OipError> {
    match parameters.as_ref().and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad(format!("parameter `{key}` must be a boolean, got {other}"))),
    }
}

/// Decodes `body` (JSON, or with `header_len` the JSON header followed by
/// binary tensor data) for `model`, checking every input against it.
pub fn decode(model: &ModelInfo, body: &[u8], header_len: Option<usize>, limits: &Limits) -> Result<Decoded, OipError> {
    let (header, mut binary) = match header_len {
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(bad(format!(
                "Inference-Header-Content-Length {n} exceeds the body's {} bytes",
                body.len()
            )))
        }
        None => (body, &[][..]),
    };
    let request: InferRequest =
        serde_json::from_slice(header).map_err(|e| bad(format!("malformed inference request: {e}")))?;
    let mut inputs: Vec<Option<Tensor>> = vec![None; model.inputs.len()];
    for input in &request.inputs {
        let index = model
            .inputs
            .iter()
            .position(|t| t.name == input.name)
            .ok_or_else(|| bad(format!("model `{}` has no input `{}`", model.name, input.name)))?;
        if inputs[index].is_some() {
            return Err(bad(format!("input `{}` given twice", input.name)));
        }
        let dims = check_shape(&model.inputs[index], input, limits)?;
        let count: usize = dims.iter().product();
        let size = input.parameters.as_ref().and_then(|p| p.get("binary_data_size"));
        let values = match (size, &input.data) {
            (Some(size), None) => {
                let expected = count * 4;
                if size.as_u64() != Some(expected as u64) {
                    return Err(bad(format!(
                        "input `{}`: binary_data_size {size} is not {expected} ({count} FP32 values)",
                        input.name
                    )));
                }
                if binary.len() < expected {
                    return Err(bad(format!(
                        "input `{}`: {expected} bytes of binary data announced, {} left in the body",
                        input.name,
                        binary.len()
                    )));
                }
                let (bytes, rest) = binary.split_at(expected);
                binary = rest;
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            }
            (None, Some(data)) => json_values(data, count, &input.name)?,
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "input `{}` has both `data` and binary_data_size",
                    input.name
                )))
            }
            (None, None) => return Err(bad(format!("input `{}` has no `data`", input.name))),
        };
        let tensor = Tensor::from_vec(values, dims, &Device::Cpu).map_err(|e| bad(wick_ir::plain_candle_message(e)))?;
        inputs[index] = Some(tensor);
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the inputs that announced theirs",
            binary.len()
        )));
    }
    let inputs = inputs
        .into_iter()
        .zip(&model.inputs)
        .map(|(t, info)| t.ok_or_else(|| bad(format!("missing input `{}`", info.name))))
        .collect::<Result<Vec<_>, _>>()?;
    let all_binary = flag(&request.parameters, "binary_data_output")?.unwrap_or(false);
    let outputs = match &request.outputs {
        None => (0..model.outputs.len()).map(|i| (i, all_binary)).collect(),
        Some(wanted) => wanted
            .iter()
            .map(|o| {
                let index = model
                    .outputs
                    .iter()
                    .position(|t| t.name == o.name)
                    .ok_or_else(|| bad(format!("model `{}` has no output `{}`", model.name, o.name)))?;
                Ok((index, flag(&o.parameters, "binary_data")?.unwrap_or(all_binary)))
            })
            .collect::<Result<Vec<_>, OipError>>()?,
    };
    Ok(Decoded {
        id: request.id,
        inputs,
        outputs,
    })
}

/// The input's dimensions, checked: FP32, the model's rank and non-batch
/// dimensions, a batch of at least 1, and an element count within `limits`.
fn check_shape(info: &TensorInfo, input: &RequestInput, limits: &Limits) -> Result<Vec<usize>, OipError> {
    if input.datatype != FP32 {
        return Err(bad(format!(
            "input `{}` is {}, the model takes {FP32}",
            input.name, input.datatype
        )));
    }
    let expected: Vec<String> = std::iter::once("-1".to_string())
        .chain(info.dims.iter().map(|d| d.to_string()))
        .collect();
    let mismatch = || {
        bad(format!(
            "input `{}` has shape {:?}, the model takes [{}]",
            input.name,
            input.shape,
            expected.join(", ")
        ))
    };
    let Some((&batch, rest)) = input.shape.split_first() else {
        return Err(mismatch());
    };
    if batch == 0 || rest.len() != info.dims.len() || rest.iter().zip(&info.dims).any(|(&a, &b)| a != b as u64) {
        return Err(mismatch());
    }
    let dims: Vec<usize> = input
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| mismatch()))
        .collect::<Result<_, _>>()?;
    let fact = wick_ir::TensorFact::new(candle_core::DType::F32, dims.clone());
    limits
        .check(&fact)
        .map_err(|e| bad(format!("input `{}`: {e}", input.name)))?;
    Ok(dims)
}

/// `count` f32 values from JSON `data`, flat or nested (row-major).
fn json_values(data: &Value, count: usize, name: &str) -> Result<Vec<f32>, OipError> {
    // Grown as values arrive: `count` is what the request claims, not what it holds.
    let mut values = Vec::with_capacity(count.min(1 << 16));
    let mut stack = vec![data];
    while let Some(value) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items.iter().rev()),
            Value::Number(n) => {
                if values.len() == count {
                    return Err(bad(format!("input `{name}` has more than {count} values")));
                }
                values.push(n.as_f64().unwrap_or(f64::NAN) as f32);
            }
            other => return Err(bad(format!("input `{name}`: {other} is not a number"))),
        }
    }
    if values.len() != count {
        return Err(bad(format!(
            "input `{name}` has {} values, its shape needs {count}",
            values.len()
        )));
    }
    Ok(values)
}

/// An encoded response: the body and, when it carries binary tensors, the
/// length of its JSON header (for `Inference-Header-Content-Length`).
#[derive(Debug)]
pub struct Encoded {
    /// The body.
    pub body: Vec<u8>,
    /// `Some(json_len)` when binary data follows the JSON.
    pub header_len: Option<usize>,
}

/// Encodes the model's `outputs` as the request asked (`decoded.outputs`).
pub fn encode(model: &ModelInfo, decoded: &Decoded, outputs: &[Tensor]) -> Result<Encoded, OipError> {
    let internal = |e: candle_core::Error| OipError {
        status: 500,
        message: wick_ir::plain_candle_message(e),
    };
    let mut binary = Vec::new();
    let mut listed = Vec::new();
    for &(index, as_binary) in &decoded.outputs {
        let tensor = outputs.get(index).ok_or_else(|| OipError {
            status: 500,
            message: format!("the model produced no output #{index}"),
        })?;
        let values = tensor
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(internal)?;
        let mut output = json!({
            "name": model.outputs[index].name,
            "shape": tensor.dims(),
            "datatype": FP32,
        });
        if as_binary {
            output["parameters"] = json!({ "binary_data_size": values.len() * 4 });
            binary.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        } else {
            output["data"] = json!(values);
        }
        listed.push(output);
    }
    let mut response = json!({
        "model_name": model.name,
        "model_version": MODEL_VERSION,
        "outputs": listed,
    });
    if let Some(id) = &decoded.id {
        response["id"] = id.clone();
    }
    let mut body = serde_json::to_vec(&response).map_err(|e| OipError {
        status: 500,
        message: e.to_string(),
    })?;
    let header_len = (!binary.is_empty()).then_some(body.len());
    body.extend(binary);
    Ok(Encoded { body, header_len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            inputs: vec![TensorInfo {
                name: "x".into(),
                dims: vec![2, 3],
            }],
            outputs: vec![
                TensorInfo {
                    name: "y".into(),
                    dims: vec![4],
                },
                TensorInfo {
                    name: "z".into(),
                    dims: vec![1],
                },
            ],
        }
    }

    fn decode_json(body: Value) -> Result<Decoded, OipError> {
        decode(&model(), body.to_string().as_bytes(), None, &Limits::default())
    }

    /// JSON data, flat or nested, becomes the input tensor; all outputs by
    /// default; the id is kept.
    #[test]
    fn json_requests_decode() {
        let flat = (0..12).map(|i| i as f32).collect::<Vec<_>>();
        let d = decode_json(
            json!({"id": "7", "inputs": [{"name": "x", "shape": [2, 2, 3], "datatype": "FP32", "data": flat}]}),
        )
        .unwrap();
        assert_eq!(d.inputs[0].dims(), [2, 2, 3]);
        assert_eq!(d.outputs, [(0, false), (1, false)]);
        assert_eq!(d.id, Some(json!("7")));
        let nested = json!([[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]);
        let d2 = decode_json(json!({"inputs": [{"name": "x", "shape": [2, 2, 3], "datatype": "FP32", "data": nested}], "outputs": [{"name": "z"}]})).unwrap();
        assert_eq!(
            d2.inputs[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            d.inputs[0].flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(d2.outputs, [(1, false)]);
    }

    /// Binary inputs after the JSON header, and binary outputs on request.
    #[test]
    fn binary_requests_decode_and_encode() {
        let header = json!({
            "inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}}],
            "outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}]
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend((0..6).flat_map(|i| (i as f32 * 0.5).to_le_bytes()));
        let d = decode(&model(), &body, Some(header.len()), &Limits::default()).unwrap();
        assert_eq!(
            d.inputs[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
        );
        assert_eq!(d.outputs, [(0, true), (1, false)]);
        let y = Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
        let z = Tensor::new(&[[9f32]], &Device::Cpu).unwrap();
        let e = encode(&model(), &d, &[y, z]).unwrap();
        let n = e.header_len.unwrap();
        let json: Value = serde_json::from_slice(&e.body[..n]).unwrap();
        assert_eq!(json["outputs"][0]["parameters"]["binary_data_size"], 16);
        assert_eq!(json["outputs"][1]["data"], json!([9.0]));
        let tail: Vec<f32> = e.body[n..]
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(tail, [1.0, 2.0, 3.0, 4.0]);
    }

    /// Every way a request can disagree with the model is a 400 naming it.
    #[test]
    fn bad_requests_are_named() {
        let cases = [
            (json!({"inputs": []}), "missing input `x`"),
            (
                json!({"inputs": [{"name": "q", "shape": [1, 2, 3], "datatype": "FP32", "data": [0]}]}),
                "no input `q`",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "INT8", "data": [0]}]}),
                "is INT8",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1, 3, 2], "datatype": "FP32", "data": [0]}]}),
                "the model takes [-1, 2, 3]",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [0, 2, 3], "datatype": "FP32", "data": []}]}),
                "the model takes",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [1, 2]}]}),
                "has 2 values",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": ["a"]}]}),
                "is not a number",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0,0,0,0,0,0,0]}]}),
                "more than 6",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [4000000000u64, 2, 3], "datatype": "FP32", "data": [0]}]}),
                "more than the limit",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}}]}),
                "left in the body",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0,0,0,0,0,0]}], "outputs": [{"name": "w"}]}),
                "no output `w`",
            ),
        ];
        for (body, needle) in cases {
            let err = decode_json(body.clone()).unwrap_err();
            assert_eq!(err.status, 400, "{body}");
            assert!(
                err.message.contains(needle),
                "{body}: `{}` lacks `{needle}`",
                err.message
            );
        }
        let err = decode(&model(), b"{}", Some(99), &Limits::default()).unwrap_err();
        assert!(err.message.contains("exceeds the body"), "{}", err.message);
        let err = decode(&model(), b"not json", None, &Limits::default()).unwrap_err();
        assert!(err.message.contains("malformed"), "{}", err.message);
    }
}
