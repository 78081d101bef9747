//! The Open Inference Protocol's request decoding as a fuzz harness:
//! arbitrary bytes through [`oip::decode`] and, where they decode, the
//! response through [`oip::encode`] (the `oip_request` fuzz target and
//! the replay of its committed corpus in `cargo test`).

use crate::oip::{self, Encoded, ModelInfo, OipError, TensorInfo};
use candle_core::{DType, Device, Tensor};
use wick_ir::Limits;

/// Most elements a fuzzed request's tensor may hold (as the other fuzz
/// targets bound theirs).
const MAX_ELEMENTS: usize = 1 << 12;

/// The model the requests address: two inputs (`x` `[-1, 3, 2, 2]`, `y`
/// `[-1, 4]`) and two outputs (`logits` `[-1, 5]`, `features` `[-1, 2,
/// 3]`), enough for every rule of the decoder (names, order, ranks,
/// several binary inputs and outputs).
pub fn model() -> ModelInfo {
    let tensor = |name: &str, dims: &[usize]| TensorInfo {
        name: name.into(),
        dims: dims.to_vec(),
    };
    ModelInfo {
        name: "fuzzed".into(),
        inputs: vec![tensor("x", &[3, 2, 2]), tensor("y", &[4])],
        outputs: vec![tensor("logits", &[5]), tensor("features", &[2, 3])],
    }
}

/// Splits fuzzer bytes into the `Inference-Header-Content-Length` a
/// request states (an odd first byte: the next two bytes, little-endian)
/// and its body (the rest).
pub fn split_request(data: &[u8]) -> (Option<usize>, &[u8]) {
    match data {
        [flag, lo, hi, body @ ..] if flag & 1 == 1 => (Some(usize::from(u16::from_le_bytes([*lo, *hi]))), body),
        [_, body @ ..] => (None, body),
        [] => (None, data),
    }
}

/// Decodes `data` ([`split_request`]) for [`model`] and encodes a
/// response of zeros for what it asked: a protocol error, or the
/// response. Panics where the decoder breaks its contract (an input
/// missing, out of order or of another shape than the model's, an output
/// index past the model's) or the encoder fails on outputs of the
/// model's shapes: what the fuzzer is looking for.
pub fn request_round_trip(data: &[u8]) -> Result<Encoded, OipError> {
    let (header_len, body) = split_request(data);
    let model = model();
    let limits = Limits::default().with_max_elements(MAX_ELEMENTS);
    let decoded = oip::decode(&model, body, header_len, &limits)?;
    assert_eq!(decoded.inputs.len(), model.inputs.len(), "one tensor per model input");
    for (tensor, info) in decoded.inputs.iter().zip(&model.inputs) {
        let (batch, rest) = tensor.dims().split_first().expect("a batch dimension");
        assert!(
            *batch >= 1 && rest == info.dims,
            "`{}` decoded as {:?}",
            info.name,
            tensor.dims()
        );
        assert!(tensor.elem_count() <= MAX_ELEMENTS, "`{}` past the limit", info.name);
    }
    assert!(decoded.outputs.iter().all(|&(index, _)| index < model.outputs.len()));
    let batch = decoded.inputs[0].dims()[0];
    let outputs: Vec<Tensor> = model
        .outputs
        .iter()
        .map(|info| {
            let dims: Vec<usize> = std::iter::once(batch).chain(info.dims.iter().copied()).collect();
            Tensor::zeros(dims, DType::F32, &Device::Cpu).expect("a small zero tensor")
        })
        .collect();
    let encoded = oip::encode(&model, &decoded, &outputs).expect("encoding outputs of the model's shapes");
    let header = encoded.header_len.unwrap_or(encoded.body.len());
    let response: serde_json::Value =
        serde_json::from_slice(&encoded.body[..header]).expect("the response header is JSON");
    assert_eq!(
        response["outputs"].as_array().map(Vec::len),
        Some(decoded.outputs.len())
    );
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::{request_round_trip, split_request};
    use serde_json::json;

    fn json_request(value: serde_json::Value) -> Vec<u8> {
        let mut data = vec![0];
        data.extend(serde_json::to_vec(&value).unwrap());
        data
    }

    #[test]
    fn a_json_request_round_trips() {
        let data = json_request(json!({
            "id": "7",
            "inputs": [
                {"name": "y", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6, 7, 8]},
                {"name": "x", "shape": [2, 3, 2, 2], "datatype": "FP32", "data": vec![0.5; 24]}
            ],
            "outputs": [{"name": "features", "parameters": {"binary_data": true}}]
        }));
        let encoded = request_round_trip(&data).unwrap();
        // Two images of [2, 3] features as binary FP32 after the header.
        assert_eq!(encoded.body.len() - encoded.header_len.unwrap(), 2 * 6 * 4);
    }

    #[test]
    fn a_binary_request_round_trips_and_a_wrong_one_is_refused() {
        let header = serde_json::to_vec(&json!({
            "inputs": [
                {"name": "x", "shape": [1, 3, 2, 2], "datatype": "FP32", "parameters": {"binary_data_size": 48}},
                {"name": "y", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
            ]
        }))
        .unwrap();
        let mut data = vec![1];
        data.extend(u16::try_from(header.len()).unwrap().to_le_bytes());
        data.extend(&header);
        data.extend(std::iter::repeat_n(0u8, 64));
        assert!(request_round_trip(&data).is_ok());
        data.pop();
        let error = request_round_trip(&data).unwrap_err();
        assert_eq!(error.status, 400);
        assert!(
            error.message.contains("16 bytes of binary data announced"),
            "{}",
            error.message
        );
    }

    #[test]
    fn requests_split_by_their_first_byte() {
        assert_eq!(split_request(&[]), (None, &[][..]));
        assert_eq!(split_request(&[0, 9]), (None, &[9][..]));
        assert_eq!(split_request(&[1, 2, 1, 9]), (Some(258), &[9][..]));
        assert_eq!(split_request(&[1, 2]), (None, &[2][..]));
    }
}
