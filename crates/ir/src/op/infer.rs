//! Output-fact inference: each op's output shape and dtype from its
//! inputs', or what is wrong with them.

use super::*;
use crate::TensorFact;

impl Op {
    /// Infers the output fact from the input facts, or says what is wrong.
    ///
    /// `Input` and `Constant` have no inputs and declare their fact; for them
    /// this returns an error.
    pub fn infer(&self, inputs: &[&TensorFact]) -> Result<TensorFact, String> {
        let arity = self.arity();
        let accepted = match arity {
            [] => !inputs.is_empty(),
            counts => counts.contains(&inputs.len()),
        };
        if !accepted {
            let expected = match arity {
                [] => "at least 1".to_string(),
                counts => counts.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" or "),
            };
            return Err(format!("expected {expected} input(s), got {}", inputs.len()));
        }
        for (i, input) in inputs.iter().enumerate() {
            if input.shape.contains(&0) {
                return Err(format!(
                    "input {i} {input} has a zero-sized dimension; empty tensors are not supported"
                ));
            }
        }
        if let Some(first) = inputs.first() {
            for (i, other) in inputs.iter().enumerate().skip(1) {
                if other.dtype != first.dtype {
                    return Err(format!(
                        "input {i} has dtype {}, expected {} like input 0",
                        other.dtype.as_str(),
                        first.dtype.as_str()
                    ));
                }
            }
            if !first.dtype.is_float() && !matches!(self, Op::Input | Op::Constant) {
                return Err(format!("expected a floating-point dtype, got {}", first.dtype.as_str()));
            }
        }
        match self {
            Op::Input | Op::Constant => Err("declares its fact; nothing to infer".into()),
            Op::Conv2d(attrs) => infer_conv2d(attrs, inputs),
            Op::FusedConv2d(attrs) => {
                let operands = attrs.inputs(inputs).ok_or("operands do not fit the attributes")?;
                let out = infer_conv2d(&attrs.conv, &[operands.x, operands.weight, operands.bias])?;
                if let Some(residual) = operands.residual {
                    if residual.shape != out.shape {
                        return Err(format!("residual must be {out}, got {residual}"));
                    }
                }
                if let Some(scale) = operands.scale {
                    let x = operands.x;
                    let expected = [x.shape[0], x.shape[1], 1, 1];
                    if scale.shape != expected || scale.dtype != x.dtype {
                        return Err(format!(
                            "scale must be {} {expected:?} (one factor per image and input channel), got {scale}",
                            x.dtype.as_str()
                        ));
                    }
                }
                match &attrs.pool {
                    Some(pool) => infer_max_pool2d(pool, &out),
                    None => Ok(out),
                }
            }
            Op::BatchNorm(attrs) => infer_batch_norm(attrs, inputs),
            Op::Relu | Op::Relu6 | Op::HardSwish | Op::HardSigmoid | Op::Sigmoid | Op::Silu => Ok(inputs[0].clone()),
            Op::Mul => {
                let (a, b) = (&inputs[0].shape, &inputs[1].shape);
                let broadcasts = a.len() == b.len() && a.iter().zip(b).all(|(&a, &b)| b == a || b == 1);
                if !broadcasts {
                    return Err(format!(
                        "the second operand must broadcast to the first (same rank, each dimension equal or 1), got {} and {}",
                        inputs[0], inputs[1]
                    ));
                }
                Ok(inputs[0].clone())
            }
            Op::Add => {
                if inputs[0].shape != inputs[1].shape {
                    return Err(format!(
                        "operands must have equal shapes, got {} and {}",
                        inputs[0], inputs[1]
                    ));
                }
                Ok(inputs[0].clone())
            }
            Op::MaxPool2d(attrs) => infer_max_pool2d(attrs, inputs[0]),
            Op::GlobalAvgPool2d => {
                let x = expect_rank(inputs[0], 4, "input")?;
                Ok(TensorFact::new(inputs[0].dtype, [x[0], x[1], 1, 1]))
            }
            Op::AvgPool2d(attrs) => {
                check_positive(&attrs.kernel, "kernel")?;
                check_positive(&attrs.stride, "stride")?;
                let x = expect_rank(inputs[0], 4, "input")?;
                let axis = |i: usize| windowed_len(x[2 + i], attrs.kernel[i], attrs.stride[i], 0, 1);
                match (axis(0), axis(1)) {
                    (Some(oh), Some(ow)) => Ok(TensorFact::new(inputs[0].dtype, [x[0], x[1], oh, ow])),
                    _ => Err(format!("window {:?} does not fit input {}", attrs.kernel, inputs[0])),
                }
            }
            Op::Concat(ConcatAttrs { axis }) => infer_concat(*axis, inputs),
            Op::Pad(PadAttrs {
                pads: [top, left, bottom, right],
            }) => {
                let x = expect_rank(inputs[0], 4, "input")?;
                let grow = |len: usize, a: usize, b: usize| len.checked_add(a)?.checked_add(b);
                match (grow(x[2], *top, *bottom), grow(x[3], *left, *right)) {
                    (Some(h), Some(w)) => Ok(TensorFact::new(inputs[0].dtype, [x[0], x[1], h, w])),
                    _ => Err(format!(
                        "padding {:?} of {} overflows",
                        [top, left, bottom, right],
                        inputs[0]
                    )),
                }
            }
            Op::Flatten(FlattenAttrs { start_dim }) => {
                let x = &inputs[0].shape;
                if *start_dim >= x.len() {
                    return Err(format!(
                        "start_dim {start_dim} out of range for rank-{} input {}",
                        x.len(),
                        inputs[0]
                    ));
                }
                let Some(merged) = x[*start_dim..].iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
                    return Err(format!("merged dimension of {} overflows", inputs[0]));
                };
                let mut shape = x[..*start_dim].to_vec();
                shape.push(merged);
                Ok(TensorFact::new(inputs[0].dtype, shape))
            }
            Op::Linear => infer_linear(inputs),
        }
    }
}

fn expect_rank<'a>(fact: &'a TensorFact, rank: usize, what: &str) -> Result<&'a [usize], String> {
    if fact.rank() != rank {
        return Err(format!("{what} must have rank {rank}, got {fact}"));
    }
    Ok(&fact.shape)
}

fn expect_vector(fact: &TensorFact, len: usize, what: &str) -> Result<(), String> {
    if fact.shape != [len] {
        return Err(format!("{what} must have shape [{len}], got {fact}"));
    }
    Ok(())
}

fn check_positive(values: &[usize], what: &str) -> Result<(), String> {
    if values.contains(&0) {
        return Err(format!("{what} must be >= 1, got {values:?}"));
    }
    Ok(())
}

fn infer_conv2d(attrs: &Conv2dAttrs, inputs: &[&TensorFact]) -> Result<TensorFact, String> {
    check_positive(&attrs.stride, "stride")?;
    check_positive(&attrs.dilation, "dilation")?;
    check_positive(&[attrs.groups], "groups")?;
    let x = expect_rank(inputs[0], 4, "input")?;
    let w = expect_rank(inputs[1], 4, "weight")?;
    let (n, c, h, wd) = (x[0], x[1], x[2], x[3]);
    let (o, ci, kh, kw) = (w[0], w[1], w[2], w[3]);
    let g = attrs.groups;
    if c % g != 0 || o % g != 0 {
        return Err(format!(
            "groups={g} must divide input channels {c} and output channels {o}"
        ));
    }
    if ci.checked_mul(g) != Some(c) {
        return Err(format!(
            "weight {} expects {ci} input channels per group times groups={g}, input {} has {c}",
            inputs[1], inputs[0]
        ));
    }
    check_positive(&[kh, kw], "kernel size")?;
    if let Some(bias) = inputs.get(2) {
        expect_vector(bias, o, "bias")?;
    }
    match attrs.output_size([kh, kw], [h, wd]) {
        Some([oh, ow]) => Ok(TensorFact::new(inputs[0].dtype, [n, o, oh, ow])),
        None => Err(format!(
            "kernel {kh}x{kw} (dilation {:?}) does not fit input {} with padding {:?}",
            attrs.dilation, inputs[0], attrs.padding
        )),
    }
}

fn infer_batch_norm(attrs: &BatchNormAttrs, inputs: &[&TensorFact]) -> Result<TensorFact, String> {
    if !(attrs.eps >= 0.0 && attrs.eps.is_finite()) {
        return Err(format!("eps must be finite and >= 0, got {:?}", attrs.eps));
    }
    let x = &inputs[0].shape;
    if x.len() < 2 {
        return Err(format!("input must have rank >= 2, got {}", inputs[0]));
    }
    let names = ["running_mean", "running_var", "weight", "bias"];
    for (param, name) in inputs[1..].iter().zip(names) {
        expect_vector(param, x[1], name)?;
    }
    Ok(inputs[0].clone())
}

fn infer_max_pool2d(attrs: &MaxPool2dAttrs, input: &TensorFact) -> Result<TensorFact, String> {
    check_positive(&attrs.kernel, "kernel")?;
    check_positive(&attrs.stride, "stride")?;
    for axis in 0..2 {
        if attrs.padding[axis] > attrs.kernel[axis] / 2 {
            return Err(format!(
                "padding {:?} must be at most half of kernel {:?}",
                attrs.padding, attrs.kernel
            ));
        }
    }
    let x = expect_rank(input, 4, "input")?;
    match attrs.output_size([x[2], x[3]]) {
        Some([oh, ow]) => Ok(TensorFact::new(input.dtype, [x[0], x[1], oh, ow])),
        None => Err(format!(
            "window {:?} does not fit input {input} with padding {:?}",
            attrs.kernel, attrs.padding
        )),
    }
}

fn infer_concat(axis: usize, inputs: &[&TensorFact]) -> Result<TensorFact, String> {
    let first = &inputs[0].shape;
    if axis >= first.len() {
        return Err(format!(
            "axis {axis} out of range for rank-{} input {}",
            first.len(),
            inputs[0]
        ));
    }
    let mut shape = first.clone();
    for (i, input) in inputs.iter().enumerate().skip(1) {
        let agrees =
            input.shape.len() == first.len() && (0..first.len()).all(|d| d == axis || input.shape[d] == first[d]);
        if !agrees {
            return Err(format!(
                "input {i} {input} must match input 0 {} in every dimension but {axis}",
                inputs[0]
            ));
        }
        shape[axis] = shape[axis]
            .checked_add(input.shape[axis])
            .ok_or_else(|| format!("dimension {axis} of the result overflows"))?;
    }
    Ok(TensorFact::new(inputs[0].dtype, shape))
}

fn infer_linear(inputs: &[&TensorFact]) -> Result<TensorFact, String> {
    let x = &inputs[0].shape;
    let w = expect_rank(inputs[1], 2, "weight")?;
    let Some(&features) = x.last() else {
        return Err(format!("input must have rank >= 1, got {}", inputs[0]));
    };
    if w[1] != features {
        return Err(format!(
            "weight {} expects {} input features, input {} has {features}",
            inputs[1], w[1], inputs[0]
        ));
    }
    if let Some(bias) = inputs.get(2) {
        expect_vector(bias, w[0], "bias")?;
    }
    let mut shape = x.clone();
    *shape.last_mut().expect("rank checked above") = w[0];
    Ok(TensorFact::new(inputs[0].dtype, shape))
}
