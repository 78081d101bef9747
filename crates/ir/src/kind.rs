//! Op kinds: each op's text name, defined once (printer, parser and errors
//! read it here), the role a node plays in a graph, and typed access to an
//! op's attributes.

use crate::{
    AvgPool2dAttrs, BatchNormAttrs, ConcatAttrs, Conv2dAttrs, FlattenAttrs, FusedConv2dAttrs, MaxPool2dAttrs, Op,
    PadAttrs,
};

/// Declares [`OpKind`] with each kind's IR text name, written once here and
/// read by the printer, the parser and error messages.
macro_rules! op_kinds {
    ($($(#[$doc:meta])* $kind:ident = $name:literal,)*) => {
        /// The kind of an [`Op`], without its attributes: what patterns match
        /// on, and what names an op in IR text.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum OpKind {
            $($(#[$doc])* $kind,)*
        }

        impl OpKind {
            /// Every kind, in declaration order.
            pub const ALL: &'static [OpKind] = &[$(OpKind::$kind,)*];

            /// The kind's name in IR text.
            pub fn name(self) -> &'static str {
                match self {
                    $(OpKind::$kind => $name,)*
                }
            }
        }
    };
}

op_kinds! {
    /// [`Op::Input`].
    Input = "input",
    /// [`Op::Constant`].
    Constant = "constant",
    /// [`Op::Conv2d`].
    Conv2d = "conv2d",
    /// [`Op::FusedConv2d`].
    FusedConv2d = "fused_conv2d",
    /// [`Op::BatchNorm`].
    BatchNorm = "batch_norm",
    /// [`Op::Relu`].
    Relu = "relu",
    /// [`Op::Relu6`].
    Relu6 = "relu6",
    /// [`Op::HardSwish`].
    HardSwish = "hardswish",
    /// [`Op::HardSigmoid`].
    HardSigmoid = "hardsigmoid",
    /// [`Op::Sigmoid`].
    Sigmoid = "sigmoid",
    /// [`Op::Silu`].
    Silu = "silu",
    /// [`Op::Add`].
    Add = "add",
    /// [`Op::Mul`].
    Mul = "mul",
    /// [`Op::MaxPool2d`].
    MaxPool2d = "max_pool2d",
    /// [`Op::GlobalAvgPool2d`].
    GlobalAvgPool2d = "global_avg_pool2d",
    /// [`Op::AvgPool2d`].
    AvgPool2d = "avg_pool2d",
    /// [`Op::Concat`].
    Concat = "concat",
    /// [`Op::Pad`].
    Pad = "pad",
    /// [`Op::Flatten`].
    Flatten = "flatten",
    /// [`Op::Linear`].
    Linear = "linear",
}

impl OpKind {
    /// The kind named `name` in IR text.
    pub fn from_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.iter().copied().find(|kind| kind.name() == name)
    }

    /// What a node of this kind is in a graph.
    pub fn role(self) -> OpRole {
        match self {
            OpKind::Input => OpRole::Input,
            OpKind::Constant => OpRole::Constant,
            OpKind::Conv2d
            | OpKind::FusedConv2d
            | OpKind::BatchNorm
            | OpKind::Relu
            | OpKind::Relu6
            | OpKind::HardSwish
            | OpKind::HardSigmoid
            | OpKind::Sigmoid
            | OpKind::Silu
            | OpKind::Add
            | OpKind::Mul
            | OpKind::MaxPool2d
            | OpKind::GlobalAvgPool2d
            | OpKind::AvgPool2d
            | OpKind::Concat
            | OpKind::Pad
            | OpKind::Flatten
            | OpKind::Linear => OpRole::Computed,
        }
    }
}

impl From<&Op> for OpKind {
    fn from(op: &Op) -> OpKind {
        op.kind()
    }
}

impl From<Op> for OpKind {
    fn from(op: Op) -> OpKind {
        op.kind()
    }
}

/// What a node is in a graph: the places that treat every computed op
/// alike (compiling, verifying, drawing) match on this, so that only the
/// places that must know each op match on [`Op`] itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpRole {
    /// A graph input.
    Input,
    /// A weight.
    Constant,
    /// An op computed from its operands.
    Computed,
}

/// An attribute struct carried by one op kind, read back from an [`Op`].
pub trait OpAttrs: Copy {
    /// The kind that carries it.
    const KIND: OpKind;
    /// The attributes of `op`, when it is of [`Self::KIND`].
    fn of(op: &Op) -> Option<Self>;
}

macro_rules! op_attrs {
    ($($attrs:ty => $kind:ident),* $(,)?) => {
        $(impl OpAttrs for $attrs {
            const KIND: OpKind = OpKind::$kind;
            fn of(op: &Op) -> Option<Self> {
                if let Op::$kind(attrs) = op {
                    Some(*attrs)
                } else {
                    None
                }
            }
        })*
    };
}

op_attrs! {
    Conv2dAttrs => Conv2d,
    FusedConv2dAttrs => FusedConv2d,
    BatchNormAttrs => BatchNorm,
    MaxPool2dAttrs => MaxPool2d,
    AvgPool2dAttrs => AvgPool2d,
    ConcatAttrs => Concat,
    PadAttrs => Pad,
    FlattenAttrs => Flatten,
}
