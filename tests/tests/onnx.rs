//! ONNX import against PyTorch and against the traced models, on fixtures
//! written by `scripts/make_onnx_fixtures.py` (torch's two exporters), and
//! the importer's typed errors on broken and hostile files.

use candle_core::{DType, Device, Tensor};
use prost::Message;
use std::collections::HashMap;
use std::path::PathBuf;
use wick_engine::Engine;
use wick_ir::{Graph, Op};
use wick_models::{random_input, Model, ModelName, WeightSource};
use wick_onnx::proto::{self, ModelProto};
use wick_onnx::{import_bytes, import_file, ImportOptions, OnnxError};
use wick_passes::{PassManager, PassReport};
use wick_tests::{assert_close, fixtures_dir, max_abs_diff};

fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join("onnx").join(name)
}

fn at_batch(batch: usize) -> ImportOptions {
    ImportOptions {
        batch: Some(batch),
        ..Default::default()
    }
}

/// The CPU engine's output on `graph`, after the default pipeline when
/// `fused` (with its report).
fn run(graph: &Graph, x: &Tensor, fused: bool) -> (Tensor, Option<PassReport>) {
    let mut graph = graph.clone();
    let report = fused.then(|| PassManager::default_pipeline().run(&mut graph).unwrap());
    let compiled = Engine::cpu().compile(&graph).unwrap();
    (compiled.run(std::slice::from_ref(x)).unwrap().remove(0), report)
}

/// A small CNN with every operator family the importer lowers, exported
/// by the TorchScript and the dynamo exporter (opset 17 / 18, external
/// data, a symbolic batch), equals PyTorch's float64 output within 1e-5
/// of its scale, fused and unfused.
#[test]
fn tiny_exports_match_pytorch() {
    let io = candle_core::safetensors::load(fixture("tiny.io.safetensors"), &Device::Cpu).unwrap();
    let (x, want) = (&io["input"], &io["output"].to_dtype(DType::F32).unwrap());
    for file in ["tiny_torchscript.onnx", "tiny_dynamo.onnx"] {
        let graph = import_file(fixture(file), &at_batch(2)).unwrap();
        graph.verify().unwrap();
        for fused in [false, true] {
            let (got, _) = run(&graph, x, fused);
            assert_close(&got, want, 1e-5, &format!("{file} (fused: {fused}) vs PyTorch"));
        }
        // SiLU (Sigmoid · x) is one op after import; the SE scale a Mul.
        let ops: Vec<&str> = graph.nodes().iter().map(|n| n.op.name()).collect();
        assert!(
            ops.contains(&"silu") && !ops.contains(&"sigmoid") && ops.contains(&"mul"),
            "{file}: {ops:?}"
        );
        assert!(
            ops.contains(&"concat") && ops.contains(&"avg_pool2d"),
            "{file}: {ops:?}"
        );
        let ceil = graph
            .nodes()
            .iter()
            .any(|n| matches!(n.op, Op::MaxPool2d(p) if p.ceil_mode));
        assert!(ceil, "{file}: no ceil-mode pool");
        // Without --batch the symbolic batch is 1.
        let one = import_file(fixture(file), &ImportOptions::default()).unwrap();
        assert_eq!(one.node(one.inputs()[0]).fact.shape, [1, 3, 32, 32]);
    }
}

/// torchvision's ResNet18 exported with its batch norms (the structure
/// committed, the weights refilled from wick's seeded init by name) gives
/// torchvision's logits, the traced model's pass counts (20 / 8 / 9 / 1)
/// and the traced model's fused graph, node for node up to names.
#[test]
fn resnet18_export_fuses_like_the_traced_model() {
    let io =
        candle_core::safetensors::load(fixtures_dir().join("resnet18_random.io.safetensors"), &Device::Cpu).unwrap();
    let seeds: Vec<i64> = io["meta.seeds"].to_vec1().unwrap();
    let want = &io["output"];
    let shape = [want.dims()[0], 3, 224, 224];
    let model = Model::load(
        ModelName::Resnet18,
        WeightSource::Random { seed: seeds[0] as u64 },
        &Device::Cpu,
    )
    .unwrap();
    let traced = model.trace(&shape).unwrap();
    let mut file = ModelProto::decode(std::fs::read(fixture("resnet18_structure.onnx")).unwrap().as_slice()).unwrap();
    let graph = file.graph.as_mut().unwrap();
    for t in &mut graph.initializer {
        let data = traced
            .constant_data(&t.name)
            .unwrap_or_else(|| panic!("no weight `{}`", t.name));
        let values: Vec<f32> = data.flatten_all().unwrap().to_vec1().unwrap();
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    }
    let imported = import_bytes(&file.encode_to_vec(), &at_batch(shape[0])).unwrap();
    let x = random_input(seeds[1] as u64, &shape, &Device::Cpu).unwrap();
    let (unfused, _) = run(&imported, &x, false);
    assert_close(&unfused, want, 1e-4, "imported ResNet18 vs torchvision");
    let (fused, report) = run(&imported, &x, true);
    assert_close(&fused, want, 1e-4, "imported ResNet18 fused vs torchvision");
    let report = report.unwrap();
    let counts = [
        "fuse-conv-batch-norm",
        "fuse-conv-add-relu",
        "fuse-conv-relu",
        "fuse-conv-max-pool",
    ]
    .map(|p| report.count(p, "matched"));
    assert_eq!(counts, [20, 8, 9, 1], "{report}");

    let mut imported_fused = imported.clone();
    PassManager::default_pipeline().run(&mut imported_fused).unwrap();
    let mut traced_fused = traced.clone();
    PassManager::default_pipeline().run(&mut traced_fused).unwrap();
    let want = structure(&traced_fused);
    assert_eq!(
        want.len(),
        24,
        "the traced fused ResNet18: input, 20 fused convs, pool, flatten, linear"
    );
    assert_eq!(structure(&imported_fused), want);
}

/// A graph without its names: each node's op, fact and operand positions,
/// constants by their fact alone (and the order constants appear in is
/// not compared: a constant is listed where it is first used).
fn structure(graph: &Graph) -> Vec<String> {
    let position: HashMap<usize, usize> = graph
        .nodes()
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op != Op::Constant)
        .enumerate()
        .map(|(position, (index, _))| (index, position))
        .collect();
    graph
        .nodes()
        .iter()
        .filter(|n| n.op != Op::Constant)
        .map(|n| {
            let operands: Vec<String> = n
                .inputs
                .iter()
                .map(|i| match position.get(&i.index()) {
                    Some(p) => format!("%{p}"),
                    None => format!("@{}", graph.node(*i).fact),
                })
                .collect();
            format!("{:?} {} ({})", n.op, n.fact, operands.join(", "))
        })
        .collect()
}

/// A minimal valid model: `y = relu(x)` on `f32[batch, 4]`.
fn relu_model() -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![proto::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(proto::GraphProto {
            name: "g".into(),
            node: vec![node("relu", "Relu", &["x"], &["y"])],
            input: vec![value_info("x", &[None, Some(4)])],
            output: vec![value_info("y", &[None, Some(4)])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A graph input or output `name`: f32 of `dims` (`None`: the symbolic `batch`).
fn value_info(name: &str, dims: &[Option<i64>]) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: name.into(),
        r#type: Some(proto::TypeProto {
            tensor_type: Some(proto::TensorTypeProto {
                elem_type: 1,
                shape: Some(proto::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| proto::Dimension {
                            dim_value: *d,
                            dim_param: d.is_none().then(|| "batch".into()),
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> proto::NodeProto {
    proto::NodeProto {
        name: name.into(),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn import(model: &ModelProto) -> Result<Graph, OnnxError> {
    import_bytes(&model.encode_to_vec(), &ImportOptions::default())
}

/// Malformed bytes, a missing value, a cycle, an input the graph cannot
/// take, an unsupported opset and unsupported operators are typed errors
/// naming what is wrong; every unsupported node is listed.
#[test]
fn broken_files_are_typed_errors() {
    let graph = import(&relu_model()).unwrap();
    assert_eq!(graph.node(graph.inputs()[0]).fact.shape, [1, 4]);

    for bytes in [&b"not a protobuf at all"[..], &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f][..]] {
        assert!(matches!(
            import_bytes(bytes, &ImportOptions::default()),
            Err(OnnxError::Decode { .. })
        ));
    }
    let edit = |f: &dyn Fn(&mut proto::GraphProto)| {
        let mut model = relu_model();
        f(model.graph.as_mut().unwrap());
        import(&model)
    };
    let missing = edit(&|g| g.node[0].input[0] = "w".into());
    assert!(
        matches!(missing, Err(OnnxError::MissingValue { ref value, .. }) if value == "w"),
        "{missing:?}"
    );
    let cycle = edit(&|g| {
        g.node = vec![
            node("a", "Add", &["x", "c"], &["a"]),
            node("c", "Relu", &["a"], &["c"]),
            node("y", "Relu", &["c"], &["y"]),
        ];
    });
    assert!(
        matches!(cycle, Err(OnnxError::Cycle { ref nodes }) if nodes.len() == 3),
        "{cycle:?}"
    );
    let symbolic = edit(&|g| {
        g.input[0]
            .r#type
            .as_mut()
            .unwrap()
            .tensor_type
            .as_mut()
            .unwrap()
            .shape
            .as_mut()
            .unwrap()
            .dim[1] = proto::Dimension {
            dim_value: None,
            dim_param: Some("width".into()),
        }
    });
    assert!(
        matches!(&symbolic, Err(OnnxError::Input { message, .. }) if message.contains("`width`")),
        "{symbolic:?}"
    );
    let unsupported = edit(&|g| {
        g.node = vec![
            node("lrn", "LRN", &["x"], &["a"]),
            node("fine", "Relu", &["a"], &["b"]),
            node("topk", "TopK", &["b"], &["y"]),
            node("other", "Einsum", &["x"], &["z"]),
        ];
    });
    match unsupported {
        Err(OnnxError::Unsupported { nodes }) => {
            let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            assert_eq!(names, ["lrn", "topk", "other"]);
            assert!(nodes.iter().all(|n| n.opset == 17 && n.reason.contains(&n.op_type)));
        }
        other => panic!("{other:?}"),
    }
    let mut old = relu_model();
    old.opset_import[0].version = 9;
    assert!(matches!(import(&old), Err(OnnxError::Opset { version: 9, .. })));
    let mut no_graph = relu_model();
    no_graph.graph = None;
    assert!(matches!(import(&no_graph), Err(OnnxError::NoGraph)));
    let bad_attr = edit(&|g| {
        g.node[0] = node("clip", "Clip", &["x"], &["y"]);
        g.node[0].attribute.push(proto::AttributeProto {
            name: "min".into(),
            r#type: 1,
            ..Default::default()
        });
    });
    assert!(
        matches!(&bad_attr, Err(OnnxError::Unsupported { nodes }) if nodes[0].reason.contains("`min`")),
        "{bad_attr:?}"
    );
}

/// Inputs of the wrong shape reach the engine's typed input check; the
/// batch of an import follows `--batch`.
#[test]
fn wrong_input_shapes_are_refused() {
    let graph = import_bytes(&relu_model().encode_to_vec(), &at_batch(3)).unwrap();
    let compiled = Engine::cpu().compile(&graph).unwrap();
    let x = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(&compiled.run(std::slice::from_ref(&x)).unwrap()[0], &x),
        0.0
    );
    for wrong in [(2, 4), (3, 5)] {
        let x = Tensor::ones(wrong, DType::F32, &Device::Cpu).unwrap();
        assert!(compiled.run(&[x]).is_err(), "{wrong:?}");
    }
}

/// `Conv` padding in every form ONNX has: asymmetric `pads` and
/// `auto_pad` `SAME_UPPER` / `SAME_LOWER` (their odd extra at the end /
/// the beginning) and `VALID`, against candle's conv on an input padded by
/// hand (pads worked out by hand: 6x5 input, 3x2 kernel, stride 2 needs
/// one extra row and one extra column).
#[test]
fn conv_padding_forms() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 2, 6, 5), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (3, 2, 3, 2), &dev).unwrap();
    let weight = proto::TensorProto {
        name: "w".into(),
        dims: vec![3, 2, 3, 2],
        data_type: 1,
        float_data: w.flatten_all().unwrap().to_vec1().unwrap(),
        ..Default::default()
    };
    // (auto_pad, pads, stride, the padding that means [top, left, bottom, right]).
    type Case = (&'static str, Option<[i64; 4]>, i64, [usize; 4]);
    let cases: [Case; 5] = [
        ("NOTSET", Some([1, 0, 2, 1]), 1, [1, 0, 2, 1]),
        ("NOTSET", Some([1, 1, 1, 1]), 2, [1, 1, 1, 1]),
        ("SAME_UPPER", None, 2, [0, 0, 1, 1]),
        ("SAME_LOWER", None, 2, [1, 1, 0, 0]),
        ("VALID", None, 2, [0, 0, 0, 0]),
    ];
    for (auto_pad, pads, stride, [top, left, bottom, right]) in cases {
        let mut model = relu_model();
        let graph = model.graph.as_mut().unwrap();
        let mut conv = node("conv", "Conv", &["x", "w"], &["y"]);
        let attribute = |name: &str, r#type: i32| proto::AttributeProto {
            name: name.into(),
            r#type,
            ..Default::default()
        };
        conv.attribute.push(proto::AttributeProto {
            s: auto_pad.as_bytes().to_vec(),
            ..attribute("auto_pad", 3)
        });
        conv.attribute.push(proto::AttributeProto {
            ints: vec![stride, stride],
            ..attribute("strides", 7)
        });
        if let Some(pads) = pads {
            conv.attribute.push(proto::AttributeProto {
                ints: pads.to_vec(),
                ..attribute("pads", 7)
            });
        }
        graph.node = vec![conv];
        graph.initializer = vec![weight.clone()];
        graph.input = vec![value_info("x", &[Some(1), Some(2), Some(6), Some(5)])];
        graph.output = vec![proto::ValueInfoProto {
            name: "y".into(),
            r#type: None,
        }];
        let imported = import(&model).unwrap_or_else(|e| panic!("{auto_pad} {pads:?}: {e}"));
        let (got, _) = run(&imported, &x, true);
        let padded = x
            .pad_with_zeros(2, top, bottom)
            .unwrap()
            .pad_with_zeros(3, left, right)
            .unwrap();
        let want = padded.conv2d(&w, 0, stride as usize, 1, 1).unwrap();
        assert_eq!(got.dims(), want.dims(), "{auto_pad} {pads:?}");
        assert!(max_abs_diff(&got, &want) < 1e-5, "{auto_pad} {pads:?}");
        let pads_in_ir = imported.nodes().iter().any(|n| matches!(n.op, Op::Pad(_)));
        assert_eq!(
            pads_in_ir,
            top != bottom || left != right,
            "{auto_pad} {pads:?}: a pad op only for the uneven part"
        );
    }
}
