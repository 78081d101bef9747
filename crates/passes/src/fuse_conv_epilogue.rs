//! Epilogue fusion: a convolution absorbs the ops that follow it, so the
//! engine applies them while the output is still in cache.
//!
//! - `fuse-conv-add-relu`: `relu(add(conv2d(x, w[, b]), r))` ⇒ `fused_conv2d[relu](x, w, b, r)`
//!   (ResNet's block tail; either add operand may be the conv);
//! - `fuse-conv-relu`: `relu(conv2d(x, w[, b]))` ⇒ `fused_conv2d[relu](x, w, b)`;
//! - `fuse-conv-activation`: the same for ReLU6, hardswish, hardsigmoid,
//!   sigmoid and SiLU (the mobile models' activations);
//! - `fuse-conv-add`: `add(conv2d(x, w[, b]), r)` ⇒ `fused_conv2d(x, w, b, r)`
//!   (the mobile blocks' residual, with no activation after it; runs after
//!   `fuse-conv-add-relu`, which takes the adds a ReLU follows);
//! - `fuse-conv-max-pool`: max_pool2d(fused_conv2d(x, w, b[, r])) ⇒
//!   fused_conv2d[.., pool](x, w, b[, r]) (ResNet's stem: the conv's output,
//!   4× the pooled one, then never leaves the cache); refused after a
//!   non-monotonic activation (`skipped.non_monotonic`), which would not
//!   commute with the max.
//!
//! A missing bias becomes a zero constant. All are written with the public
//! pattern API; refusals (the conv or add used elsewhere) are counted.

use crate::{Match, PassError, Pattern, PatternBuilder, PatternId, PatternPass, Replacement, Rewriter};
use candle_core::Tensor;
use wick_ir::{Activation, Conv2dAttrs, FusedConv2dAttrs, MaxPool2dAttrs, NodeId, Op, OpKind};

/// `conv2d(x, @conv.weight[, @conv.bias])`, returning the conv's pattern id.
fn conv_operands(p: &mut PatternBuilder) -> PatternId {
    let x = p.value("x");
    conv_on(p, x)
}

/// `conv2d(x, @conv.weight[, @conv.bias])` on a given `x`.
pub(crate) fn conv_on(p: &mut PatternBuilder, x: PatternId) -> PatternId {
    let weight = p.constant("conv.weight");
    let bias = p.optional_constant("conv.bias");
    p.op("conv", OpKind::Conv2d, &[x, weight, bias])
}

/// `fused_conv2d(x, @conv.weight, @conv.bias[, residual])` on a given `x`.
pub(crate) fn fused_conv_on(p: &mut PatternBuilder, x: PatternId, residual: bool) -> PatternId {
    let weight = p.constant("conv.weight");
    let bias = p.constant("conv.bias");
    let mut operands = vec![x, weight, bias];
    if residual {
        operands.push(p.value("residual"));
    }
    p.op("conv", OpKind::FusedConv2d, &operands)
}

/// The match's `conv.bias`, or a zero constant `{name}.bias` of the
/// conv's output channels when it has none.
pub(crate) fn bias_or_zeros(found: &Match, rewriter: &mut Rewriter<'_>, name: &str) -> Result<NodeId, PassError> {
    if let Some(bias) = found.get("conv.bias") {
        return Ok(bias);
    }
    let (conv, weight) = (found.node("conv")?, found.node("conv.weight")?);
    let fact = &rewriter.graph().node(weight).fact;
    let zeros = Tensor::zeros(fact.shape[0], fact.dtype, &candle_core::Device::Cpu)
        .map_err(|e| rewriter.candle_error(conv, e))?;
    rewriter.add_constant(&format!("{name}.bias"), zeros)
}

/// relu(add(conv, r)) with the conv as add operand `conv_first ? 0 : 1`.
fn add_relu_pattern(conv_first: bool) -> Pattern {
    let mut p = PatternBuilder::new();
    let conv = conv_operands(&mut p);
    let residual = p.value("residual");
    let operands = if conv_first { [conv, residual] } else { [residual, conv] };
    let add = p.op("add", OpKind::Add, &operands);
    let relu = p.op("relu", OpKind::Relu, &[add]);
    p.build(relu)
        .expect("the conv-add-relu pattern is well formed (unit-tested)")
}

/// `activation(conv)`.
fn activation_pattern(activation: Activation) -> Pattern {
    let mut p = PatternBuilder::new();
    let conv = conv_operands(&mut p);
    let act = p.op("activation", activation.op().kind(), &[conv]);
    p.build(act)
        .expect("the conv-activation pattern is well formed (unit-tested)")
}

/// `add(conv, r)` with the conv as add operand `conv_first ? 0 : 1`.
fn add_pattern(conv_first: bool) -> Pattern {
    let mut p = PatternBuilder::new();
    let conv = conv_operands(&mut p);
    let residual = p.value("residual");
    let operands = if conv_first { [conv, residual] } else { [residual, conv] };
    let add = p.op("add", OpKind::Add, &operands);
    p.build(add).expect("the conv-add pattern is well formed (unit-tested)")
}

/// Builds the fused conv for a match, with `residual` as fourth operand
/// when given and `activation` after it.
fn fuse(
    found: &Match,
    rewriter: &mut Rewriter<'_>,
    residual: Option<NodeId>,
    activation: Option<Activation>,
    suffix: &str,
) -> Result<Replacement, PassError> {
    let (conv, x, weight) = (found.node("conv")?, found.node("x")?, found.node("conv.weight")?);
    let graph = rewriter.graph();
    let attrs: Conv2dAttrs = found.attrs(graph, "conv")?;
    let name = format!("{}+{suffix}", graph.node(conv).name);
    let bias = bias_or_zeros(found, rewriter, &name)?;
    let mut inputs = vec![x, weight, bias];
    inputs.extend(residual);
    let fused = rewriter.add_node(
        &name,
        Op::FusedConv2d(FusedConv2dAttrs {
            conv: attrs,
            activation,
            pool: None,
            input_scale: false,
        }),
        &inputs,
    )?;
    Ok(Replacement::With(fused))
}

/// The `fuse-conv-add-relu` pass.
pub fn fuse_conv_add_relu() -> PatternPass {
    let with_residual = |found: &Match, rewriter: &mut Rewriter<'_>| {
        fuse(
            found,
            rewriter,
            Some(found.node("residual")?),
            Some(Activation::Relu),
            "add+relu",
        )
    };
    PatternPass::new("fuse-conv-add-relu")
        .register_replacement(add_relu_pattern(true), with_residual)
        .register_replacement(add_relu_pattern(false), with_residual)
}

/// The `fuse-conv-relu` pass.
pub fn fuse_conv_relu() -> PatternPass {
    PatternPass::new("fuse-conv-relu").register_replacement(activation_pattern(Activation::Relu), |found, rewriter| {
        fuse(found, rewriter, None, Some(Activation::Relu), "relu")
    })
}

/// The `fuse-conv-activation` pass: every activation but ReLU (which
/// `fuse-conv-relu` takes).
pub fn fuse_conv_activation() -> PatternPass {
    Activation::ALL.into_iter().filter(|&a| a != Activation::Relu).fold(
        PatternPass::new("fuse-conv-activation"),
        |pass, activation| {
            pass.register_replacement(activation_pattern(activation), move |found, rewriter| {
                fuse(found, rewriter, None, Some(activation), activation.op().name())
            })
        },
    )
}

/// The `fuse-conv-add` pass.
pub fn fuse_conv_add() -> PatternPass {
    let with_residual =
        |found: &Match, rewriter: &mut Rewriter<'_>| fuse(found, rewriter, Some(found.node("residual")?), None, "add");
    PatternPass::new("fuse-conv-add")
        .register_replacement(add_pattern(true), with_residual)
        .register_replacement(add_pattern(false), with_residual)
}

/// max_pool2d(fused_conv2d(x, @w, @b[, residual])).
fn max_pool_pattern(residual: bool) -> Pattern {
    let mut p = PatternBuilder::new();
    let x = p.value("x");
    let conv = fused_conv_on(&mut p, x, residual);
    let pool = p.op("pool", OpKind::MaxPool2d, &[conv]);
    p.build(pool)
        .expect("the conv-max-pool pattern is well formed (unit-tested)")
}

/// The `fuse-conv-max-pool` pass.
pub fn fuse_conv_max_pool() -> PatternPass {
    let fuse_pool = |found: &Match, rewriter: &mut Rewriter<'_>| {
        let (conv, pool) = (found.node("conv")?, found.node("pool")?);
        let graph = rewriter.graph();
        let attrs: FusedConv2dAttrs = found.attrs(graph, "conv")?;
        let pool_attrs: MaxPool2dAttrs = found.attrs(graph, "pool")?;
        if attrs.pool.is_some() {
            return Ok(Replacement::Refuse("already_pooled"));
        }
        // The fused kernel pools in floor mode only: ceil-mode pools
        // (SqueezeNet's) stay ops of their own.
        if pool_attrs.ceil_mode {
            return Ok(Replacement::Refuse("ceil_mode"));
        }
        if attrs.activation.is_some_and(|a| !a.is_monotonic()) {
            return Ok(Replacement::Refuse("non_monotonic"));
        }
        let name = format!("{}+{}", graph.node(conv).name, graph.node(pool).path());
        let inputs = graph.node(conv).inputs.clone();
        let fused = rewriter.add_node(
            &name,
            Op::FusedConv2d(FusedConv2dAttrs {
                pool: Some(pool_attrs),
                ..attrs
            }),
            &inputs,
        )?;
        Ok(Replacement::With(fused))
    };
    PatternPass::new("fuse-conv-max-pool")
        .register_replacement(max_pool_pattern(false), fuse_pool)
        .register_replacement(max_pool_pattern(true), fuse_pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The epilogue patterns pass the builder's validation.
    #[test]
    fn patterns_build() {
        let _ = (
            add_relu_pattern(true),
            add_relu_pattern(false),
            add_pattern(true),
            add_pattern(false),
            max_pool_pattern(false),
            max_pool_pattern(false),
            max_pool_pattern(true),
        );
    }
}
