//! Weight loading: strict safetensors checks with typed errors, and the hf-hub loader against a local cache.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use wick_models::hub::{self, HubOptions};
use wick_models::{Model, ModelError, ModelName, WeightSource};
use wick_tests::fixtures_dir;

fn toy_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures_dir().join("toy.weights.safetensors"), &Device::Cpu).unwrap()
}

fn load_toy(tensors: HashMap<String, Tensor>) -> Result<Model, ModelError> {
    Model::load(ModelName::Toy, WeightSource::Tensors(tensors), &Device::Cpu)
}

fn save(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> std::path::PathBuf {
    let path = dir.join(name);
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}

/// A missing parameter names the key and the model.
#[test]
fn missing_weight_is_named() {
    let mut tensors = toy_tensors();
    tensors.remove("nested.0.running_var");
    let err = load_toy(tensors).unwrap_err();
    assert!(
        matches!(err, ModelError::MissingWeight { ref name, ref model, .. } if name == "nested.0.running_var" && model == "toy"),
        "{err}"
    );
}

/// A parameter of the wrong shape names the key and both shapes.
#[test]
fn wrong_shape_is_named() {
    let mut tensors = toy_tensors();
    tensors.insert(
        "conv2.weight".into(),
        Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load_toy(tensors).unwrap_err();
    assert_eq!(
        err.to_string(),
        "weight `conv2.weight` has shape [1, 1, 3, 3], expected [1, 1, 1, 1]"
    );
}

/// Mixed dtypes are refused rather than silently converted.
#[test]
fn mixed_dtype_is_refused() {
    let mut tensors = toy_tensors();
    let bias = tensors["bn1.bias"].to_dtype(DType::F64).unwrap();
    tensors.insert("bn1.bias".into(), bias);
    let err = load_toy(tensors).unwrap_err();
    assert!(
        matches!(err, ModelError::WeightDtype { ref name, .. } if name == "bn1.bias"),
        "{err}"
    );
}

/// Tensors the model does not use (another model's file?) are an error;
/// PyTorch's `num_batches_tracked` is not.
#[test]
fn unexpected_tensors_are_refused() {
    let tensors = toy_tensors();
    assert!(tensors.contains_key("bn1.num_batches_tracked"));
    load_toy(tensors.clone()).unwrap();
    let mut extra = tensors;
    extra.insert(
        "layer9.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load_toy(extra).unwrap_err();
    assert!(err.to_string().contains("`layer9.weight`"), "{err}");
}

/// Truncated and garbage files give a Safetensors error naming the file, never a panic.
#[test]
fn corrupt_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixtures_dir().join("toy.weights.safetensors")).unwrap();
    // A tensor with no values whose strides overflow (the class of input
    // the `onnx_import` fuzz target found panicking inside candle).
    let zero_sized = wick_tests::hostile::dataless_safetensors("w", &[0, 1 << 40, 1 << 40]);
    let cases: [(&str, &[u8]); 5] = [
        ("truncated.safetensors", &good[..good.len() - 10]),
        ("header-only.safetensors", &good[..12]),
        ("empty.safetensors", &[]),
        ("garbage.safetensors", b"this is not a safetensors file at all"),
        ("zero-sized.safetensors", &zero_sized),
    ];
    for (name, bytes) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = Model::load(ModelName::Toy, WeightSource::File(path.clone()), &Device::Cpu).unwrap_err();
        assert!(
            matches!(err, ModelError::Safetensors { ref path, .. } if path.ends_with(name)),
            "{name}: {err}"
        );
    }
    let err = Model::load(
        ModelName::Toy,
        WeightSource::File(dir.path().join("absent.safetensors")),
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err}");
}

/// Unknown model names list the known ones.
#[test]
fn unknown_model_name() {
    let err = "resnet101".parse::<ModelName>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown model `resnet101`; expected one of: toy, toy-sequential, resnet18, resnet34, resnet50, mobilenet-v2, mobilenet-v3-large, efficientnet-b0"
    );
}

/// The hub loader finds timm's ResNet18 file in a Hugging Face cache laid
/// out as huggingface_hub does, offline, and the weights load with timm names.
#[test]
fn hub_loader_reads_local_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let options = HubOptions {
        cache_dir: Some(cache.clone()),
        offline: true,
    };
    let err = hub::resnet18_weights(&options).unwrap_err();
    assert!(matches!(err, ModelError::NotInCache { .. }), "{err}");

    // Export a ResNet18 checkpoint with timm/torchvision names into the cache.
    let Model::Resnet18(resnet) = wick_tests::random_model(ModelName::Resnet18, 3) else {
        unreachable!()
    };
    let tensors = resnet.named_tensors().unwrap();
    assert_eq!(tensors.len(), 20 + 20 * 4 + 2);
    let exported = save(dir.path(), "export.safetensors", &tensors);
    hub::seed_cache(
        &cache,
        hub::RESNET18_REPO,
        "0123456789abcdef",
        hub::RESNET18_FILE,
        &exported,
    )
    .unwrap();

    let path = hub::resnet18_weights(&options).unwrap();
    assert!(
        path.starts_with(&cache) && path.ends_with("snapshots/0123456789abcdef/model.safetensors"),
        "{}",
        path.display()
    );
    let loaded = Model::load(ModelName::Resnet18, WeightSource::File(path), &Device::Cpu).unwrap();
    let x = wick_models::random_input(5, &[1, 3, 64, 64], &Device::Cpu).unwrap();
    let a = loaded.forward_eager(&x).unwrap();
    let b = Model::Resnet18(resnet).forward_eager(&x).unwrap();
    assert_eq!(wick_tests::max_abs_diff(&a, &b), 0.0);
}

/// ResNet34 and ResNet50 take their class count from the weights: a
/// checkpoint exported with a 10-way `fc` loads strictly and answers 10
/// logits per image, the first 10 of the model it was exported from.
#[test]
fn resnets_take_the_class_count_from_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    for name in [ModelName::Resnet34, ModelName::Resnet50] {
        let model = wick_tests::random_model(name, 4);
        let (Model::Resnet34(resnet) | Model::Resnet50(resnet)) = &model else {
            unreachable!()
        };
        let mut tensors = resnet.named_tensors().unwrap();
        let features = tensors["fc.weight"].dims()[1];
        tensors.insert("fc.weight".into(), tensors["fc.weight"].narrow(0, 0, 10).unwrap());
        tensors.insert("fc.bias".into(), tensors["fc.bias"].narrow(0, 0, 10).unwrap());
        let exported = save(dir.path(), &format!("{name}.safetensors"), &tensors);
        let loaded = Model::load(name, WeightSource::File(exported), &Device::Cpu).unwrap();
        let x = wick_models::random_input(5, &[2, 3, 64, 64], &Device::Cpu).unwrap();
        let got = loaded.forward_eager(&x).unwrap();
        assert_eq!(got.dims(), [2, 10], "{name}");
        let full = model.forward_eager(&x).unwrap().narrow(1, 0, 10).unwrap();
        // The 10-way product may take another GEMM kernel than the 1000-way one.
        wick_tests::assert_close(&got, &full, 1e-5, name.as_str());
        assert_eq!(features, if name == ModelName::Resnet50 { 2048 } else { 512 });
    }
}

/// `--hub` knows timm's ResNet34/50 repositories and names the model it
/// has none for.
#[test]
fn hub_repositories_per_model() {
    let dir = tempfile::tempdir().unwrap();
    let options = HubOptions {
        cache_dir: Some(dir.path().join("hub")),
        offline: true,
    };
    for (name, repo) in [
        (ModelName::Resnet34, "timm/resnet34.a1_in1k"),
        (ModelName::Resnet50, "timm/resnet50.a1_in1k"),
    ] {
        match hub::weights(name, &options).unwrap_err() {
            ModelError::NotInCache { repo: got, .. } => assert_eq!(got, repo),
            other => panic!("{other}"),
        }
    }
    let err = hub::weights(ModelName::Toy, &options).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no hub weights for `toy`; --hub takes one of: resnet18, resnet34, resnet50"
    );
}
