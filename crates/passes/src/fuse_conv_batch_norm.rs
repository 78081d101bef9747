//! `fuse-conv-batch-norm`: conv2d → batch_norm ⇒ conv2d' with folded weights,
//! registered through the public pattern API like any user rewrite.

use crate::PassError;
use crate::{
    fold_conv_batch_norm, BatchNormParams, Match, Pattern, PatternBuilder, PatternPass, Replacement, Rewriter,
};
use wick_ir::{BatchNormAttrs, Conv2dAttrs, Op, OpKind};

/// The pattern `batch_norm(conv2d(x, @w[, @b]), @mean, @var[, @gamma, @beta])`.
///
/// Stride, padding, dilation, groups and eps are captured from the match, and
/// bias and affine parameters are optional, so every conv → bn pair fuses
/// (the tutorial's pattern hard-codes eps = 1e-5 and default conv attributes).
pub fn conv_batch_norm_pattern() -> Pattern {
    let mut p = PatternBuilder::new();
    let x = p.value("x");
    let weight = p.constant("conv.weight");
    let bias = p.optional_constant("conv.bias");
    let conv = p.op("conv", OpKind::Conv2d, &[x, weight, bias]);
    let mean = p.constant("bn.running_mean");
    let var = p.constant("bn.running_var");
    let gamma = p.optional_constant("bn.weight");
    let beta = p.optional_constant("bn.bias");
    let bn = p.op("bn", OpKind::BatchNorm, &[conv, mean, var, gamma, beta]);
    p.build(bn)
        .expect("the conv-batch-norm pattern is well formed (unit-tested)")
}

/// Name of the fused node: the shared module prefix once, then both leaves:
/// `layer1.0.conv1` + `layer1.0.bn1` → `layer1.0.conv1+bn1`,
/// `layer2.0.downsample.0` + `layer2.0.downsample.1` → `layer2.0.downsample.0+1`.
pub fn fused_name(conv: &str, batch_norm: &str) -> String {
    let a: Vec<&str> = conv.split('.').collect();
    let b: Vec<&str> = batch_norm.split('.').collect();
    let shared = a
        .iter()
        .zip(&b)
        .take(a.len().min(b.len()) - 1)
        .take_while(|(x, y)| x == y)
        .count();
    format!("{}+{}", a.join("."), b[shared..].join("."))
}

fn replace(found: &Match, rewriter: &mut Rewriter<'_>) -> Result<Replacement, PassError> {
    let (conv, x, weight, bn) = (
        found.node("conv")?,
        found.node("x")?,
        found.node("conv.weight")?,
        found.root(),
    );
    let graph = rewriter.graph();
    let conv_attrs: Conv2dAttrs = found.attrs(graph, "conv")?;
    let eps = found.attrs::<BatchNormAttrs>(graph, "bn")?.eps;
    let name = fused_name(&graph.node(conv).name, &graph.node(bn).name);
    let data = |name: &str| found.get(name).map(|id| rewriter.constant_data(id)).transpose();
    let (running_mean, running_var) = (
        rewriter.constant_data(found.node("bn.running_mean")?)?,
        rewriter.constant_data(found.node("bn.running_var")?)?,
    );
    let affine = data("bn.weight")?.zip(data("bn.bias")?);
    let batch_norm = BatchNormParams::new(running_mean, running_var, affine, eps);
    let (folded_weight, folded_bias) =
        fold_conv_batch_norm(rewriter.constant_data(weight)?, data("conv.bias")?, &batch_norm)
            .map_err(|e| rewriter.candle_error(bn, e))?;
    let weight = rewriter.add_constant(&format!("{name}.weight"), folded_weight)?;
    let bias = rewriter.add_constant(&format!("{name}.bias"), folded_bias)?;
    let fused = rewriter.add_node(&name, Op::Conv2d(conv_attrs), &[x, weight, bias])?;
    Ok(Replacement::With(fused))
}

/// The `fuse-conv-batch-norm` pass.
pub fn fuse_conv_batch_norm() -> PatternPass {
    PatternPass::new("fuse-conv-batch-norm").register_replacement(conv_batch_norm_pattern(), replace)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fused names keep the shared module prefix once.
    #[test]
    fn fused_names() {
        assert_eq!(fused_name("layer1.0.conv1", "layer1.0.bn1"), "layer1.0.conv1+bn1");
        assert_eq!(
            fused_name("layer2.0.downsample.0", "layer2.0.downsample.1"),
            "layer2.0.downsample.0+1"
        );
        assert_eq!(fused_name("conv1", "bn1"), "conv1+bn1");
        assert_eq!(fused_name("nested.1", "wrapped.mod"), "nested.1+wrapped.mod");
        assert_eq!(fused_name("0", "1"), "0+1");
    }

    /// The built-in pattern passes the builder's validation.
    #[test]
    fn pattern_builds() {
        let _ = conv_batch_norm_pattern();
    }
}
