//! Input-scale fusion: `fuse-conv-input-scale` folds squeeze-and-excitation's
//! per-channel scale into the conv that reads the scaled value,
//!
//! `conv(mul(a, s), w[, b][, r])` ⇒ `fused_conv2d[.., input_scale=1](a, w, b[, r], s)`
//!
//! with `s` `[N, C, 1, 1]` (one factor per image and channel of `a`). Since
//! `conv(a · s, W) = conv(a, W · s)` per image, the engine can scale the
//! weights (`O·C` products per image) instead of the input (`C·H·W`) and
//! never materialise the scaled value: the MobileNetV3 and EfficientNet
//! blocks scale their depthwise output on its way into the projection.
//! The conv may be plain or already fused (the pass runs after the
//! epilogue fusions). Refusals are counted: a scale not of `[N, C, 1, 1]`
//! (`skipped.not_per_channel`), a conv that already has one
//! (`skipped.already_scaled`), the mul used elsewhere (by the matcher).

use crate::fuse_conv_epilogue::{bias_or_zeros, conv_on, fused_conv_on};
use crate::{Match, PassError, PatternBuilder, PatternId, PatternPass, Replacement, Rewriter};
use wick_ir::{Conv2dAttrs, FusedConv2dAttrs, Op, OpKind};

/// `mul(a, s)`, returning its pattern id.
fn scaled_input(p: &mut PatternBuilder) -> PatternId {
    let a = p.value("a");
    let s = p.value("scale");
    p.op("mul", OpKind::Mul, &[a, s])
}

/// `conv2d(mul(a, s), @w[, @b])`.
fn plain_pattern() -> crate::Pattern {
    let mut p = PatternBuilder::new();
    let x = scaled_input(&mut p);
    let conv = conv_on(&mut p, x);
    p.build(conv)
        .expect("the conv-input-scale pattern is well formed (unit-tested)")
}

/// `fused_conv2d(mul(a, s), @w, @b[, r])`.
fn fused_pattern(residual: bool) -> crate::Pattern {
    let mut p = PatternBuilder::new();
    let x = scaled_input(&mut p);
    let conv = fused_conv_on(&mut p, x, residual);
    p.build(conv)
        .expect("the fused-conv-input-scale pattern is well formed (unit-tested)")
}

/// The fused conv for a match: the conv's attributes (plain ones with no
/// epilogue) with `input_scale`, its operands with `a` for the mul and the
/// scale last.
fn fuse(found: &Match, rewriter: &mut Rewriter<'_>) -> Result<Replacement, PassError> {
    let (conv, a, scale, weight) = (
        found.node("conv")?,
        found.node("a")?,
        found.node("scale")?,
        found.node("conv.weight")?,
    );
    let graph = rewriter.graph();
    let (a_fact, s_fact) = (&graph.node(a).fact, &graph.node(scale).fact);
    let per_channel = a_fact.rank() == 4 && s_fact.shape == [a_fact.shape[0], a_fact.shape[1], 1, 1];
    if !per_channel || s_fact.dtype != a_fact.dtype {
        return Ok(Replacement::Refuse("not_per_channel"));
    }
    let conv_node = graph.node(conv);
    let attrs = match &conv_node.op {
        Op::FusedConv2d(attrs) if attrs.input_scale => return Ok(Replacement::Refuse("already_scaled")),
        Op::FusedConv2d(attrs) => *attrs,
        _ => FusedConv2dAttrs {
            conv: found.attrs::<Conv2dAttrs>(graph, "conv")?,
            ..Default::default()
        },
    };
    let name = format!("{}+scale", conv_node.name);
    let bias = bias_or_zeros(found, rewriter, &name)?;
    let mut inputs = vec![a, weight, bias];
    inputs.extend(found.get("residual"));
    inputs.push(scale);
    let fused = rewriter.add_node(
        &name,
        Op::FusedConv2d(FusedConv2dAttrs {
            input_scale: true,
            ..attrs
        }),
        &inputs,
    )?;
    Ok(Replacement::With(fused))
}

/// The `fuse-conv-input-scale` pass.
pub fn fuse_conv_input_scale() -> PatternPass {
    PatternPass::new("fuse-conv-input-scale")
        .register_replacement(plain_pattern(), fuse)
        .register_replacement(fused_pattern(false), fuse)
        .register_replacement(fused_pattern(true), fuse)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patterns pass the builder's validation.
    #[test]
    fn patterns_build() {
        let _ = (plain_pattern(), fused_pattern(false), fused_pattern(true));
    }
}
