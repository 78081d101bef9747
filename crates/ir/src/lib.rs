//! wick's intermediate representation: a typed SSA graph of tensor ops.
//!
//! Every value is produced by exactly one [`Node`], nodes are kept in
//! topological order, and every node carries the [`TensorFact`] (dtype and
//! static shape) of the value it produces. Weights are [`Op::Constant`] nodes
//! named by their safetensors key; their data lives beside the graph. The text
//! form ([`Graph`]'s `Display` and [`Graph::parse`]) is the same in dumps,
//! errors and golden tests, and round-trips.

#![warn(missing_docs)]

mod activation;
mod candle_error;
mod cost;
mod dot;
mod error;
mod fact;
mod graph;
mod kind;
mod limits;
mod op;
mod parse;
mod print;
mod verify;

pub use activation::Activation;
pub use candle_error::{plain_candle_error, plain_candle_message};
pub use error::{IrError, ParseError, Violation};
pub use fact::{shape_extent, TensorFact};
pub use graph::{Graph, Node, NodeId};
pub use kind::{OpAttrs, OpKind, OpRole};
pub use limits::{Limits, DEFAULT_MAX_ELEMENTS, MAX_ELEMENTS_ENV};
pub use op::{
    windowed_len, AvgPool2dAttrs, BatchNormAttrs, ConcatAttrs, Conv2dAttrs, FlattenAttrs, FusedConv2dAttrs,
    FusedConvInputs, MaxPool2dAttrs, Op, PadAttrs,
};

/// The `DType` of candle, re-exported because facts are written in it.
pub use candle_core::DType;

#[cfg(test)]
mod tests;
