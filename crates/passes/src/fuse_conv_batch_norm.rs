//! `fuse-conv-batch-norm`: conv2d → batch_norm ⇒ conv2d' with folded weights,
//! registered through the public pattern API like any user rewrite.

use crate::PassError;
use crate::{
    fold_conv_batch_norm, BatchNormParams, Match, Pattern, PatternBuilder, PatternPass, Replacement, Rewriter,
};
use wick_ir::{BatchNormAttrs, Conv2dAttrs, Op};

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
    let conv = p.op("conv", Op::Conv2d(Conv2dAttrs::default()), &[x, weight, bias]);
    let mean = p.constant("bn.running_mean");
    let var = p.constant("bn.running_var");
    let gamma = p.optional_constant("bn.weight");
    let beta = p.optional_constant("bn.bias");
    let bn = p.op(
        "bn",
        Op::BatchNorm(BatchNormAttrs { eps: 1e-5 }),
        &[conv, mean, var, gamma, beta],
    );
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
    let bound = |name: &str| found.get(name);
    let (Some(conv), Some(x), Some(weight)) = (bound("conv"), bound("x"), bound("conv.weight")) else {
        return Ok(Replacement::Refuse("incomplete_match"));
    };
    let bn = found.root();
    let graph = rewriter.graph();
    let (Op::Conv2d(conv_attrs), Op::BatchNorm(bn_attrs)) = (&graph.node(conv).op, &graph.node(bn).op) else {
        return Ok(Replacement::Refuse("unexpected_op"));
    };
    let (conv_attrs, eps) = (*conv_attrs, bn_attrs.eps);
    let name = fused_name(&graph.node(conv).name, &graph.node(bn).name);
    let data = |name: &str| bound(name).map(|id| rewriter.constant_data(id)).transpose();
    let (Some(running_mean), Some(running_var)) = (data("bn.running_mean")?, data("bn.running_var")?) else {
        return Ok(Replacement::Refuse("incomplete_match"));
    };
    let batch_norm = BatchNormParams {
        running_mean,
        running_var,
        weight: data("bn.weight")?,
        bias: data("bn.bias")?,
        eps,
    };
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
