//! Each supported ONNX operator lowered to wick IR (or folded at import when
//! its operands are known). An `Err` is the reason the node is unsupported:
//! the operator, an attribute value, or an operand wick needs constant.
//! The table in the README lists the same operators and limits.

use crate::attrs::Attrs;
use crate::fold;
use crate::import::{Importer, Value};
use crate::proto::NodeProto;
use crate::tensor::Const;
use wick_ir::{
    plain_candle_message, Activation, AvgPool2dAttrs, BatchNormAttrs, ConcatAttrs, Conv2dAttrs, FlattenAttrs,
    MaxPool2dAttrs, NodeId, Op, PadAttrs,
};

/// The operators [`lower`] knows (some only for some attributes or
/// constant operands); it refuses any other before looking at the node.
pub(crate) const OPERATORS: &[&str] = &[
    "Identity",
    "Dropout",
    "Constant",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Cast",
    "Conv",
    "BatchNormalization",
    "Relu",
    "Sigmoid",
    "HardSwish",
    "HardSigmoid",
    "Clip",
    "Add",
    "Mul",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Flatten",
    "Reshape",
    "Gemm",
    "MatMul",
];

/// The outputs of `node`, one value per output name.
pub(crate) fn lower(imp: &mut Importer, node: &NodeProto) -> Result<Vec<Value>, String> {
    if !(node.domain.is_empty() || node.domain == "ai.onnx") {
        return Err(format!("operator domain `{}` is not supported", node.domain));
    }
    // Only listed operators reach their arms: an arm added without its
    // `OPERATORS` entry stays unreachable (its own tests fail), and a test
    // below checks that every entry reaches an arm.
    if !OPERATORS.contains(&node.op_type.as_str()) {
        return Err(format!("operator {} is not supported", node.op_type));
    }
    let a = Attrs::of(node);
    let one = |id: NodeId| Ok(vec![Value::Ir(id)]);
    match node.op_type.as_str() {
        "Identity" => {
            a.only(&[])?;
            Ok(vec![operand(imp, node, 0)?])
        }
        "Dropout" => {
            a.only(&["seed"])?;
            if node.output.get(1).is_some_and(|m| !m.is_empty()) {
                return Err("the mask output is not supported (inference drops nothing)".into());
            }
            if imp.operand(node, 2).is_some() {
                match imp.known(node, 2)?.ints() {
                    Some([0]) => {}
                    _ => return Err("training_mode must be a constant false".into()),
                }
            }
            Ok(vec![operand(imp, node, 0)?])
        }
        "Constant" => Ok(vec![Value::Const(fold::constant(imp, node)?)]),
        "Concat"
            if (0..node.input.len())
                .any(|i| !matches!(imp.operand(node, i), Some(Value::Const(Const::I64 { .. })))) =>
        {
            concat(imp, node, &a)
        }
        "Shape" | "Gather" | "Unsqueeze" | "Squeeze" | "Concat" | "Cast" => fold::shape_op(imp, node),
        "Conv" => conv(imp, node, &a),
        "BatchNormalization" => {
            a.only(&["epsilon", "momentum", "training_mode"])?;
            if a.int("training_mode", 0)? != 0 {
                return Err("training_mode 1 is not supported (inference only)".into());
            }
            if node.output.iter().skip(1).any(|o| !o.is_empty()) {
                return Err("the running-statistics outputs are not supported (inference only)".into());
            }
            let eps = f64::from(a.float("epsilon", 1e-5)?);
            let x = imp.ir(node, 0)?;
            // ONNX (X, scale, B, mean, var) -> IR (x, mean, var, weight, bias).
            let [scale, bias, mean, var] = [1, 2, 3, 4].map(|i| imp.ir(node, i));
            one(imp.add(
                node,
                "",
                Op::BatchNorm(BatchNormAttrs { eps }),
                &[x, mean?, var?, scale?, bias?],
            )?)
        }
        "Relu" => activation(imp, node, &a, Activation::Relu),
        "Sigmoid" => {
            let y = activation_id(imp, node, &a, Activation::Sigmoid)?;
            let x = imp.ir(node, 0)?;
            imp.sigmoid_of.insert(y, x);
            one(y)
        }
        "HardSwish" => activation(imp, node, &a, Activation::HardSwish),
        "HardSigmoid" => {
            a.only(&["alpha", "beta"])?;
            let (alpha, beta) = (a.float("alpha", 0.2)?, a.float("beta", 0.5)?);
            if (alpha - 1.0 / 6.0).abs() > 1e-6 || beta != 0.5 {
                return Err(format!(
                    "alpha {alpha}, beta {beta}: only PyTorch's hardsigmoid (alpha 1/6, beta 0.5) is supported"
                ));
            }
            let x = imp.ir(node, 0)?;
            one(imp.add(node, "", Activation::HardSigmoid.op(), &[x])?)
        }
        "Clip" => clip(imp, node, &a),
        "Add" => add(imp, node, &a),
        "Mul" => mul(imp, node, &a),
        "MaxPool" => max_pool(imp, node, &a),
        "AveragePool" => {
            a.only(&[
                "kernel_shape",
                "strides",
                "pads",
                "auto_pad",
                "ceil_mode",
                "count_include_pad",
            ])?;
            let (kernel, stride) = (a.pair("kernel_shape", [0, 0])?, a.pair("strides", [1, 1])?);
            if kernel.contains(&0) {
                return Err("kernel_shape is missing".into());
            }
            if a.padding()? != [0, 0] || a.int("ceil_mode", 0)? != 0 {
                return Err("padding and ceil_mode are not supported (torchvision's pools have neither)".into());
            }
            // A 1x1 window with stride 1 (an adaptive pool to the input's own
            // size, as VGG's at 224x224) is the identity.
            if kernel == [1, 1] && stride == [1, 1] {
                return Ok(vec![operand(imp, node, 0)?]);
            }
            let x = imp.ir(node, 0)?;
            one(imp.add(node, "", Op::AvgPool2d(AvgPool2dAttrs { kernel, stride }), &[x])?)
        }
        "GlobalAveragePool" => {
            a.only(&[])?;
            let x = imp.ir(node, 0)?;
            one(imp.add(node, "", Op::GlobalAvgPool2d, &[x])?)
        }
        "ReduceMean" => reduce_mean(imp, node, &a),
        "Flatten" => {
            a.only(&["axis"])?;
            let x = imp.ir(node, 0)?;
            match (a.int("axis", 1)?, imp.shape(x).len()) {
                (1, 2) => one(x),
                (1, _) => one(imp.add(node, "", Op::Flatten(FlattenAttrs { start_dim: 1 }), &[x])?),
                (axis, _) => Err(format!("axis {axis} is not supported (axis 1 is)")),
            }
        }
        "Reshape" => reshape(imp, node, &a),
        "Gemm" => gemm(imp, node, &a),
        "MatMul" => matmul(imp, node, &a),
        other => Err(format!("operator {other} is not supported")),
    }
}

/// Operand `index` as it is (for ops that pass a value through).
fn operand(imp: &Importer, node: &NodeProto, index: usize) -> Result<Value, String> {
    imp.operand(node, index)
        .cloned()
        .ok_or_else(|| format!("input {index} is missing"))
}

fn activation_id(imp: &mut Importer, node: &NodeProto, a: &Attrs, act: Activation) -> Result<NodeId, String> {
    a.only(&[])?;
    let x = imp.ir(node, 0)?;
    imp.add(node, "", act.op(), &[x])
}

fn activation(imp: &mut Importer, node: &NodeProto, a: &Attrs, act: Activation) -> Result<Vec<Value>, String> {
    Ok(vec![Value::Ir(activation_id(imp, node, a, act)?)])
}

fn conv(imp: &mut Importer, node: &NodeProto, a: &Attrs) -> Result<Vec<Value>, String> {
    a.only(&["kernel_shape", "strides", "pads", "dilations", "group", "auto_pad"])?;
    let group = a.int("group", 1)?;
    let groups = usize::try_from(group)
        .ok()
        .filter(|&g| g > 0)
        .ok_or(format!("group {group} must be positive"))?;
    let (stride, dilation) = (a.pair("strides", [1, 1])?, a.pair("dilations", [1, 1])?);
    let mut x = imp.ir(node, 0)?;
    let w = imp.ir(node, 1)?;
    let weight = imp.shape(w).to_vec();
    if weight.len() != 4 || imp.shape(x).len() != 4 {
        return Err(format!(
            "weight of shape {weight:?}: only 2-D convolutions (4-D weights) are supported"
        ));
    }
    if let Some(kernel) = a.ints("kernel_shape")? {
        if kernel.len() != 2 || kernel.iter().zip(&weight[2..]).any(|(&k, &w)| k as usize != w) {
            return Err(format!("kernel_shape {kernel:?} does not match the weight {weight:?}"));
        }
    }
    let input = [imp.shape(x)[2], imp.shape(x)[3]];
    let [top, left, bottom, right] = a.conv_pads(input, [weight[2], weight[3]], stride, dilation)?;
    // The conv pads both sides of an axis alike; what one side has more of
    // is a zero padding of its own before it.
    let padding = [top.min(bottom), left.min(right)];
    let extra = [
        top - padding[0],
        left - padding[1],
        bottom - padding[0],
        right - padding[1],
    ];
    if extra != [0; 4] {
        x = imp.add(node, ".pad", Op::Pad(PadAttrs { pads: extra }), &[x])?;
    }
    let attrs = Conv2dAttrs {
        stride,
        padding,
        dilation,
        groups,
    };
    let mut inputs = vec![x, w];
    if imp.operand(node, 2).is_some() {
        inputs.push(imp.ir(node, 2)?);
    }
    Ok(vec![Value::Ir(imp.add(node, "", Op::Conv2d(attrs), &inputs)?)])
}

/// `Concat` of computed values (DenseNet's and SqueezeNet's channel joins;
/// integer constants are shape arithmetic, folded in [`fold`]).
fn concat(imp: &mut Importer, node: &NodeProto, a: &Attrs) -> Result<Vec<Value>, String> {
    a.only(&["axis"])?;
    let inputs = (0..node.input.len())
        .map(|i| imp.ir(node, i))
        .collect::<Result<Vec<_>, _>>()?;
    let rank = imp.shape(*inputs.first().ok_or("no inputs")?).len() as i64;
    let axis = a.int("axis", 1)?;
    let axis = usize::try_from(if axis < 0 { axis + rank } else { axis })
        .ok()
        .filter(|&ax| (ax as i64) < rank)
        .ok_or(format!("axis {axis} out of range for rank {rank}"))?;
    Ok(vec![Value::Ir(imp.add(
        node,
        "",
        Op::Concat(ConcatAttrs { axis }),
        &inputs,
    )?)])
}

/// `Clip(x, min, max)`: ReLU6 for (0, 6), ReLU for (0, none).
fn clip(imp: &mut Importer, node: &NodeProto, a: &Attrs) -> Result<Vec<Value>, String> {
    a.only(&[])?;
    let bound = |index: usize, default: f32| -> Result<f32, String> {
        match imp.operand(node, index) {
            None => Ok(default),
            Some(_) => imp
                .known(node, index)?
                .scalar_f32()
                .ok_or(format!("bound {index} must be a one-value constant")),
        }
    };
    let (min, max) = (bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?);
    let act = match (min, max) {
        (0.0, 6.0) => Activation::Relu6,
        (0.0, m) if m == f32::INFINITY => Activation::Relu,
        _ => {
            return Err(format!(
                "bounds ({min}, {max}): only (0, 6) (ReLU6) and (0, none) (ReLU) are supported"
            ))
        }
    };
    let x = imp.ir(node, 0)?;
    Ok(vec![Value::Ir(imp.add(node, "", act.op(), &[x])?)])
}

/// `Add`: two values of one shape; a constant vector after a bias-less
/// linear becomes its bias (`MatMul` + `Add`).
fn add(imp: &mut Importer, node: &NodeProto, a: &Attrs) -> Result<Vec<Value>, String> {
    a.only(&[])?;
    for (value, constant) in [(0, 1), (1, 0)] {
        if let (Some(Value::Ir(y)), Some(Value::Const(Const::F32(bias)))) =
            (imp.operand(node, value), imp.operand(node, constant))
        {
            if let Some(&(x, w)) = imp.bare_linear.get(y) {
                let out = imp.shape(w)[0];
                if bias.elem_count() == out && bias.dims().iter().rev().skip(1).all(|&d| d == 1) {
                    let bias = bias.reshape(out).map_err(plain_candle_message)?;
                    let b = imp.constant(&node.input[constant], bias).map_err(|e| e.to_string())?;
                    return Ok(vec![Value::Ir(imp.add(node, "", Op::Linear, &[x, w, b])?)]);
                }
            }
        }
    }
    let (x, y) = (imp.ir(node, 0)?, imp.ir(node, 1)?);
    if imp.shape(x) != imp.shape(y) {
        return Err(format!(
            "operands of shapes {:?} and {:?}: broadcasting Add is not supported (equal shapes are)",
            imp.shape(x),
            imp.shape(y)
        ));
    }
    Ok(vec![Value::Ir(imp.add(node, "", Op::Add, &[x, y])?)])
}

/// `Mul`: `x · sigmoid(x)` is SiLU; otherwise one operand broadcast to the
/// other's shape (squeeze-and-excitation's `[N,C,H,W] · [N,C,1,1]`).
fn mul(imp: &mut Importer, node: &NodeProto, a: &Attrs) -> Result<Vec<Value>, String> {
    a.only(&[])?;
    let (x, y) = (imp.ir(node, 0)?, imp.ir(node, 1)?);
    for (value, gate) in [(x, y), (y, x)] {
        if imp.sigmoid_of.get(&gate) == Some(&value) {
            return Ok(vec![Value::Ir(imp.add(node, "", Activation::Silu.op(), &[value])?)]);
        }
    }
    let broadcasts =
        |to: &[usize], from: &[usize]| to.len() == from.len() && to.iter().zip(from).all(|(&t, &f)| f == t || f == 1);
    let (sx, sy) = (imp.shape(x).to_vec(), imp.shape(y).to_vec());
    let inputs = if broadcasts(&sx, &sy) {
        [x, y]
    } else if broadcasts(&sy, &sx) {
        [y, x]
    } else {
        return Err(format!(
            "operands of shapes {sx:?} and {sy:?}: one must broadcast to the other (same rank)"
        ));
    };
    Ok(vec![Value::Ir(imp.add(node, "", Op::Mul, &inputs)?)])
}

fn max_pool(imp: &mut Importer, node: &NodeProto, a: &Attrs) -> Result<Vec<Value>, String> {
    a.only(&[
        "kernel_shape",
        "strides",
        "pads",
        "dilations",
        "ceil_mode",
        "auto_pad",
        "storage_order",
    ])?;
    if node.output.get(1).is_some_and(|o| !o.is_empty()) {
        return Err("the indices output is not supported".into());
    }
    if a.pair("dilations", [1, 1])? != [1, 1] || a.int("storage_order", 0)? != 0 {
        return Err("dilations other than 1 and storage_order 1 are not supported".into());
    }
    let kernel = a.pair("kernel_shape", [0, 0])?;
    if kernel.contains(&0) {
        return Err("kernel_shape is missing".into());
    }
    let attrs = MaxPool2dAttrs {
        kernel,
        stride: a.pair("strides", [1, 1])?,
        padding: a.padding()?,
        ceil_mode: a.int("ceil_mode", 0)? != 0,
    };
    let x = imp.ir(node, 0)?;
    Ok(vec![Value::Ir(imp.add(node, "", Op::MaxPool2d(attrs), &[x])?)])
}

/// `ReduceMean` over the two spatial axes of an NCHW value: the global
/// average pool, then a flatten when the axes are not kept.
fn reduce_mean(imp: &mut Importer, node: &NodeProto, a: &Attrs) -> Result<Vec<Value>, String> {
    a.only(&["axes", "keepdims", "noop_with_empty_axes"])?;
    let x = imp.ir(node, 0)?;
    let rank = imp.shape(x).len() as i64;
    let axes: Vec<i64> = match (a.ints("axes")?, imp.operand(node, 1)) {
        (Some(axes), _) => axes.to_vec(),
        (None, Some(_)) => imp.known(node, 1)?.ints().ok_or("axes must be integers")?.to_vec(),
        (None, None) => return Err("reducing over every axis is not supported (axes 2, 3 are)".into()),
    };
    let mut axes: Vec<i64> = axes.iter().map(|&ax| if ax < 0 { ax + rank } else { ax }).collect();
    axes.sort_unstable();
    if rank != 4 || axes != [2, 3] {
        return Err(format!(
            "axes {axes:?} of a rank-{rank} value: only the spatial mean of NCHW (axes 2, 3) is supported"
        ));
    }
    let pooled = imp.add(node, "", Op::GlobalAvgPool2d, &[x])?;
    match a.int("keepdims", 1)? {
        0 => Ok(vec![Value::Ir(imp.add(
            node,
            ".flatten",
            Op::Flatten(FlattenAttrs { start_dim: 1 }),
            &[pooled],
        )?)]),
        _ => Ok(vec![Value::Ir(pooled)]),
    }
}

/// `Reshape` to a constant shape: the identity, or a flatten to `[N, rest]`.
fn reshape(imp: &mut Importer, node: &NodeProto, a: &Attrs) -> Result<Vec<Value>, String> {
    a.only(&["allowzero"])?;
    let x = imp.ir(node, 0)?;
    let target = imp.known(node, 1)?.ints().ok_or("the shape must be integers")?.to_vec();
    let from = imp.shape(x).to_vec();
    let dims = fold::reshape_dims(&from, &target, a.int("allowzero", 0)? != 0)?;
    if dims == from {
        return Ok(vec![Value::Ir(x)]);
    }
    if dims.len() == 2 && from.len() > 2 && dims[0] == from[0] {
        return Ok(vec![Value::Ir(imp.add(
            node,
            "",
            Op::Flatten(FlattenAttrs { start_dim: 1 }),
            &[x],
        )?)]);
    }
    Err(format!(
        "{from:?} to {dims:?}: only a flatten to [N, rest] is supported"
    ))
}

/// `Gemm(A, B, C)` with a constant `B`: a linear layer (`B` transposed
/// at import unless `transB`); alpha and beta 1, `A` not transposed.
fn gemm(imp: &mut Importer, node: &NodeProto, a: &Attrs) -> Result<Vec<Value>, String> {
    a.only(&["alpha", "beta", "transA", "transB"])?;
    if a.float("alpha", 1.0)? != 1.0 || a.int("transA", 0)? != 0 {
        return Err("alpha other than 1 and transA are not supported".into());
    }
    let has_bias = imp.operand(node, 2).is_some();
    if has_bias && a.float("beta", 1.0)? != 1.0 {
        return Err("beta other than 1 is not supported".into());
    }
    let x = imp.ir(node, 0)?;
    let w = weight_rows(imp, node, a.int("transB", 0)? != 0)?;
    let mut inputs = vec![x, w];
    if has_bias {
        let out = imp.shape(w)[0];
        let Const::F32(bias) = imp.known(node, 2)?.clone() else {
            return Err("the bias C must be a float constant".into());
        };
        if bias.elem_count() != out || bias.dims().iter().rev().skip(1).any(|&d| d != 1) {
            return Err(format!(
                "bias C of shape {:?} for {out} outputs: only a per-output bias is supported",
                bias.dims()
            ));
        }
        let bias = bias.reshape(out).map_err(plain_candle_message)?;
        inputs.push(imp.constant(&node.input[2], bias).map_err(|e| e.to_string())?);
    }
    Ok(vec![Value::Ir(imp.add(node, "", Op::Linear, &inputs)?)])
}

/// `MatMul(A, B)` with a constant 2-D `B`: a linear layer without bias
/// (an `Add` of a bias vector after it is folded in: see [`add`]).
fn matmul(imp: &mut Importer, node: &NodeProto, a: &Attrs) -> Result<Vec<Value>, String> {
    a.only(&[])?;
    let x = imp.ir(node, 0)?;
    let w = weight_rows(imp, node, false)?;
    let y = imp.add(node, "", Op::Linear, &[x, w])?;
    imp.bare_linear.insert(y, (x, w));
    Ok(vec![Value::Ir(y)])
}

/// Input 1 as the `[out, in]` weight of a linear layer: a constant `[in,
/// out]` matrix transposed at import, or `[out, in]` as it is when `rows`.
fn weight_rows(imp: &mut Importer, node: &NodeProto, rows: bool) -> Result<NodeId, String> {
    let Const::F32(b) = imp.known(node, 1)?.clone() else {
        return Err("the weight B must be a float constant".into());
    };
    if b.rank() != 2 {
        return Err(format!("weight B of shape {:?}: only a matrix is supported", b.dims()));
    }
    if rows {
        return imp.constant(&node.input[1], b).map_err(|e| e.to_string());
    }
    let t = b.t().and_then(|t| t.contiguous()).map_err(plain_candle_message)?;
    imp.constant(&format!("{}.T", node.input[1]), t)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every listed operator reaches an arm of `lower` (a node without
    /// operands fails there for another reason, never as an unsupported
    /// operator), and an unlisted one is refused as unsupported.
    #[test]
    fn every_listed_operator_is_lowered() {
        for &op in OPERATORS {
            let node = NodeProto {
                op_type: op.to_string(),
                ..Default::default()
            };
            if let Err(reason) = lower(&mut Importer::empty(), &node) {
                assert_ne!(reason, format!("operator {op} is not supported"));
            }
        }
        let node = NodeProto {
            op_type: "Softmax".into(),
            ..Default::default()
        };
        let reason = lower(&mut Importer::empty(), &node).unwrap_err();
        assert_eq!(reason, "operator Softmax is not supported");
    }
}
