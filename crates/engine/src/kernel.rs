//! What one step executes, chosen per node at compile time: a [`Kernel`] is
//! either one of wick's own CPU kernels (weights packed, operands the
//! activations only) or candle's device-generic ops, each variant naming its
//! operands by role (`x`, `residual`, `weight`, …) as value slots.

use crate::candle::{batch_norm_affine, CandleOp, FusedConv};
use crate::cpu::budget::{self, PlannedConv, WeightBudget};
use crate::cpu::conv::{ConvSpec, CpuConv};
use crate::cpu::linear::CpuLinear;
use crate::cpu::{conv_algorithm, ConvAlgorithm, CpuKernel, PackedCache};
use crate::error::AtNode;
use crate::machine::Machine;
use crate::EngineError;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use wick_ir::{Activation, FusedConv2dAttrs, Graph, Limits, Node, Op};
use wick_passes::BatchNormParams;

/// A value's place in a run: the index of the node that produces it.
pub(crate) type Slot = usize;

/// What one step executes.
#[derive(Debug)]
pub(crate) enum Kernel {
    /// Device-generic candle ops.
    Candle(CandleOp),
    /// wick's own CPU f32 kernels.
    Cpu(CpuKernel),
}

/// What lowering needs beside the node: the device, the CPU's path and
/// caches (when on the CPU), the limits, and packed weights to share.
pub(crate) struct Lowering<'a> {
    pub(crate) device: &'a Device,
    pub(crate) machine: Option<Machine>,
    pub(crate) limits: &'a Limits,
    pub(crate) packed: Option<&'a PackedCache>,
    /// The algorithm of each CPU conv by node name ([`plan_cpu_convs`]).
    pub(crate) conv_algorithms: &'a HashMap<String, ConvAlgorithm>,
}

/// The algorithm of every conv node wick's CPU convs will run (on the CPU,
/// f32, constant weight and bias), by node name: the policy's choice per
/// conv, then F(4×4) convs stepped down until the graph's packed weights
/// fit `budget`, for `machine`. Convs this cannot size are left to
/// lowering's errors.
pub(crate) fn plan_cpu_convs(graph: &Graph, budget: WeightBudget, machine: &Machine) -> HashMap<String, ConvAlgorithm> {
    let mut names = Vec::new();
    let mut convs = Vec::new();
    for id in graph.node_ids() {
        let node = graph.node(id);
        let (attrs, pooled, bias) = match &node.op {
            Op::Conv2d(attrs) => (*attrs, false, node.inputs.get(2)),
            Op::FusedConv2d(fused) => (fused.conv, fused.pool.is_some(), node.inputs.get(2)),
            _ => continue,
        };
        let constant_bias = bias.is_none_or(|_| constant(graph, node, 2).is_some());
        let (Some(weight), true, DType::F32) = (constant(graph, node, 1), constant_bias, node.fact.dtype) else {
            continue;
        };
        let (Ok(spec), Ok(out_shape)) = (
            ConvSpec::of(weight, attrs),
            <[usize; 4]>::try_from(node.fact.shape.as_slice()),
        ) else {
            continue;
        };
        names.push(node.name.clone());
        convs.push(PlannedConv {
            spec,
            out_shape,
            algorithm: conv_algorithm(&spec, pooled, out_shape, machine),
        });
    }
    budget::fit(&mut convs, budget, machine);
    names.into_iter().zip(convs.iter().map(|c| c.algorithm)).collect()
}

/// A conv node's operands by role (the IR's order: x, weight, bias,
/// residual, scale).
struct ConvOperands {
    x: Slot,
    weight: Slot,
    bias: Option<Slot>,
    residual: Option<Slot>,
    scale: Option<Slot>,
}

impl Kernel {
    /// Lowers `node` (neither an input nor a constant) as `how` says,
    /// refusing a kernel whose workspace would exceed its limits.
    pub(crate) fn lower(graph: &Graph, node: &Node, how: &Lowering<'_>) -> Result<Kernel, EngineError> {
        let device = how.device;
        let slot = |i: usize| node.inputs[i].index();
        let optional = |i: usize| node.inputs.get(i).map(|id| id.index());
        let candle = |op: CandleOp| Ok(Kernel::Candle(op));
        match &node.op {
            Op::Input | Op::Constant => Err(unsupported(
                node,
                device,
                "inputs and constants are not executed".into(),
            )),
            Op::Conv2d(attrs) => {
                let operands = ConvOperands {
                    x: slot(0),
                    weight: slot(1),
                    bias: optional(2),
                    residual: None,
                    scale: None,
                };
                let plain = FusedConv2dAttrs {
                    conv: *attrs,
                    ..Default::default()
                };
                lower_conv(graph, node, how, (plain, false), operands)
            }
            Op::FusedConv2d(fused) => {
                let slots: Vec<Slot> = node.inputs.iter().map(|id| id.index()).collect();
                let Some(inputs) = fused.inputs(&slots) else {
                    return Err(unsupported(node, device, "operands do not fit the attributes".into()));
                };
                let operands = ConvOperands {
                    x: inputs.x,
                    weight: inputs.weight,
                    bias: Some(inputs.bias),
                    residual: inputs.residual,
                    scale: inputs.scale,
                };
                lower_conv(graph, node, how, (*fused, true), operands)
            }
            Op::BatchNorm(attrs) => {
                let params: Option<Vec<&Tensor>> = (1..node.inputs.len()).map(|i| constant(graph, node, i)).collect();
                let x = slot(0);
                match params.as_deref() {
                    Some(&[running_mean, running_var, ref affine @ ..]) => {
                        let affine = match affine {
                            [weight, bias] => Some((*weight, *bias)),
                            _ => None,
                        };
                        let params = BatchNormParams::new(running_mean, running_var, affine, attrs.eps);
                        let (scale, shift) =
                            batch_norm_affine(&params, node.fact.dtype, node.fact.rank(), device).at(&node.name)?;
                        match how.machine {
                            // A batch norm no conv precedes (DenseNet's pre-activation ones).
                            Some(machine) if node.fact.dtype == DType::F32 && node.fact.rank() == 4 => {
                                let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                                Ok(Kernel::Cpu(CpuKernel::ChannelAffine {
                                    isa: machine.isa,
                                    scale: values(&scale).at(&node.name)?,
                                    shift: values(&shift).at(&node.name)?,
                                    x,
                                }))
                            }
                            _ => candle(CandleOp::BatchNormFolded { scale, shift, x }),
                        }
                    }
                    _ => candle(CandleOp::BatchNorm {
                        eps: attrs.eps,
                        x,
                        mean: slot(1),
                        var: slot(2),
                        affine: optional(3).zip(optional(4)),
                    }),
                }
            }
            Op::Relu | Op::Relu6 | Op::HardSwish | Op::HardSigmoid | Op::Sigmoid | Op::Silu => {
                let activation = Activation::of(&node.op).expect("an activation op");
                match how.machine {
                    Some(machine) if node.fact.dtype == DType::F32 => Ok(Kernel::Cpu(CpuKernel::Activation {
                        isa: machine.isa,
                        activation,
                        x: slot(0),
                    })),
                    _ => candle(CandleOp::Activation { activation, x: slot(0) }),
                }
            }
            Op::Add => candle(CandleOp::Add { a: slot(0), b: slot(1) }),
            Op::Mul => {
                let [a, s] = [0, 1].map(|i| &graph.node(node.inputs[i]).fact.shape);
                let per_plane = a.len() == 4 && s.as_slice() == [a[0], a[1], 1, 1];
                match how.machine {
                    Some(machine) if node.fact.dtype == DType::F32 && per_plane => {
                        Ok(Kernel::Cpu(CpuKernel::ChannelScale {
                            isa: machine.isa,
                            a: slot(0),
                            s: slot(1),
                        }))
                    }
                    _ => candle(CandleOp::Mul { a: slot(0), b: slot(1) }),
                }
            }
            Op::MaxPool2d(attrs) => match how.machine {
                Some(machine) if node.fact.dtype == DType::F32 => Ok(Kernel::Cpu(CpuKernel::MaxPool2d {
                    pool: crate::cpu::pool::MaxPool {
                        attrs: *attrs,
                        isa: machine.isa,
                    },
                    x: slot(0),
                })),
                _ => candle(CandleOp::MaxPool2d {
                    attrs: *attrs,
                    x: slot(0),
                }),
            },
            Op::GlobalAvgPool2d => match how.machine {
                Some(machine) if node.fact.dtype == DType::F32 => Ok(Kernel::Cpu(CpuKernel::GlobalAvgPool2d {
                    isa: machine.isa,
                    x: slot(0),
                })),
                _ => candle(CandleOp::GlobalAvgPool2d { x: slot(0) }),
            },
            Op::AvgPool2d(attrs) => candle(CandleOp::AvgPool2d {
                attrs: *attrs,
                x: slot(0),
            }),
            Op::Pad(attrs) => candle(CandleOp::Pad {
                pads: attrs.pads,
                x: slot(0),
            }),
            Op::Concat(attrs) => candle(CandleOp::Concat {
                axis: attrs.axis,
                xs: node.inputs.iter().map(|id| id.index()).collect(),
            }),
            Op::Flatten(_) => candle(CandleOp::Reshape {
                shape: node.fact.shape.clone(),
                x: slot(0),
            }),
            Op::Linear => {
                let weight = constant(graph, node, 1);
                let bias = (node.inputs.len() > 2).then(|| constant(graph, node, 2));
                match (how.machine, weight, bias) {
                    (Some(machine), Some(weight), None | Some(Some(_))) if node.fact.dtype == DType::F32 => {
                        let pack = || {
                            let (weight, bias) = on_host(weight, bias.flatten())?;
                            CpuLinear::new(&weight, bias.as_ref(), machine.isa)
                        };
                        let linear = PackedCache::linear(how.packed, &node.name, pack).at(&node.name)?;
                        Ok(Kernel::Cpu(CpuKernel::Linear { linear, x: slot(0) }))
                    }
                    _ => candle(CandleOp::Linear {
                        x: slot(0),
                        weight: slot(1),
                        bias: optional(2),
                    }),
                }
            }
        }
    }

    /// The slots the kernel reads at run time (a CPU conv: its activations only).
    pub(crate) fn reads(&self) -> Vec<Slot> {
        match self {
            Kernel::Candle(op) => op.reads(),
            Kernel::Cpu(kernel) => kernel.reads(),
        }
    }

    /// Runs the kernel on the values `value` returns for its slots.
    pub(crate) fn run(&self, value: impl Fn(Slot) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        match self {
            Kernel::Candle(op) => op.run(value),
            Kernel::Cpu(kernel) => kernel.run(value),
        }
    }
}

/// Data of operand `i` of `node` if it is a constant.
pub(crate) fn constant<'g>(graph: &'g Graph, node: &Node, i: usize) -> Option<&'g Tensor> {
    let operand = graph.node(node.inputs[i]);
    (operand.op == Op::Constant)
        .then(|| graph.constant_data(&operand.name))
        .flatten()
}

/// A CPU kernel's weight and bias on the host, to be packed there: a
/// graph's constants may live on another device (a model traced on a GPU,
/// compiled for the CPU engine). A copy only when they do.
pub(crate) fn on_host(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let host = candle_core::Device::Cpu;
    Ok((weight.to_device(&host)?, bias.map(|b| b.to_device(&host)).transpose()?))
}

/// A conv (a plain one as `activation: None, pool: None`; `fused` for the fused
/// op): wick's CPU conv when on the CPU in f32 with constant weight and
/// bias, candle's ops otherwise.
fn lower_conv(
    graph: &Graph,
    node: &Node,
    how: &Lowering<'_>,
    (conv, fused): (FusedConv2dAttrs, bool),
    operands: ConvOperands,
) -> Result<Kernel, EngineError> {
    let (device, machine, limits) = (how.device, how.machine, how.limits);
    let FusedConv2dAttrs {
        conv: attrs,
        activation,
        pool,
        input_scale: _,
    } = conv;
    let weight = constant(graph, node, 1);
    let bias = operands.bias.map(|_| constant(graph, node, 2));
    if let (Some(machine), DType::F32, Some(weight), None | Some(Some(_))) = (machine, node.fact.dtype, weight, bias) {
        let spec = ConvSpec::of(weight, attrs).at(&node.name)?;
        // The node's fact: the conv's output, or the pooled one (whose
        // spatial size the policy does not read).
        let Ok(out_shape) = <[usize; 4]>::try_from(node.fact.shape.as_slice()) else {
            return Err(unsupported(
                node,
                device,
                format!("conv output must be NCHW, got {}", node.fact),
            ));
        };
        // As planned for the whole graph (the weight budget), or the policy's.
        let algorithm = how
            .conv_algorithms
            .get(&node.name)
            .copied()
            .unwrap_or_else(|| conv_algorithm(&spec, pool.is_some(), out_shape, &machine));
        let pack = || {
            let (weight, bias) = on_host(weight, bias.flatten())?;
            CpuConv::new(algorithm, &weight, bias.as_ref(), attrs, activation, pool, machine)
        };
        let conv = PackedCache::conv(how.packed, &node.name, algorithm, pack).at(&node.name)?;
        let form = conv.form(out_shape[3]);
        tracing::debug!(node = %node.name, kernel = conv.algorithm().name(), form, "cpu conv kernel");
        return Ok(Kernel::Cpu(CpuKernel::Conv {
            conv,
            x: operands.x,
            residual: operands.residual,
            scale: operands.scale,
            isa: machine.isa,
        }));
    }
    if attrs.stride[0] != attrs.stride[1] || attrs.dilation[0] != attrs.dilation[1] {
        return Err(unsupported(
            node,
            device,
            format!(
                "candle's conv2d needs equal stride and dilation on both axes, got stride {:?}, dilation {:?}",
                attrs.stride, attrs.dilation
            ),
        ));
    }
    // candle unfolds the input (im2col): N·OH·OW rows of C/g·kh·kw values.
    let (x_dims, w_dims) = (
        &graph.node(node.inputs[0]).fact.shape,
        &graph.node(node.inputs[1]).fact.shape,
    );
    let unfolded = match (x_dims.as_slice(), w_dims.as_slice()) {
        (&[n, _, h, w], &[_, c, kh, kw]) => attrs
            .output_size([kh, kw], [h, w])
            .and_then(|[oh, ow]| [n, oh, ow, c, kh, kw].iter().try_fold(1usize, |p, &d| p.checked_mul(d))),
        _ => None,
    };
    if unfolded.is_none_or(|n| n > limits.max_elements()) {
        return Err(EngineError::TooLarge {
            node: node.name.clone(),
            what: "the unfolded (im2col) input of candle's conv2d".into(),
            limit: limits.max_elements(),
        });
    }
    let ConvOperands {
        x,
        weight,
        bias,
        residual,
        scale,
    } = operands;
    Ok(Kernel::Candle(match (fused, bias) {
        (false, bias) => CandleOp::Conv2d { attrs, x, weight, bias },
        (true, Some(bias)) => CandleOp::FusedConv2d(FusedConv {
            attrs,
            activation,
            pool,
            x,
            weight,
            bias,
            residual,
            scale,
        }),
        (true, None) => return Err(unsupported(node, device, "a fused conv needs a bias operand".into())),
    }))
}

fn unsupported(node: &Node, device: &Device, reason: String) -> EngineError {
    EngineError::Unsupported {
        node: node.name.clone(),
        op: node.op.name(),
        device: format!("{:?}", device.location()),
        reason,
    }
}
