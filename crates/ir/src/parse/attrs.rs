//! An op's attributes as parsed (`name = value` pairs) and the table that
//! hands them to the op's fields, refusing unknown or repeated names.

use super::{Parser, Result};
use crate::{Conv2dAttrs, IrError, MaxPool2dAttrs};
use std::str::FromStr;

/// An attribute's value as written.
pub(super) enum AttrValue {
    Number(String),
    List(Vec<String>),
    /// A name, such as an activation's.
    Word(String),
}

/// An op's attributes, each taken once by the field it sets; what is left
/// over is an error ([`AttrTable::finish`]).
pub(super) struct AttrTable<'p> {
    pub(super) attrs: Vec<(String, AttrValue, usize)>,
    pub(super) used: Vec<String>,
    pub(super) parser: &'p mut Parser,
}

impl AttrTable<'_> {
    pub(super) fn take(&mut self, name: &str) -> Option<(AttrValue, usize)> {
        self.used.push(name.to_string());
        let index = self.attrs.iter().position(|(n, _, _)| n == name)?;
        let (_, value, position) = self.attrs.remove(index);
        Some((value, position))
    }

    pub(super) fn bad(&mut self, position: usize, message: String) -> IrError {
        self.parser.lexer.position = position;
        self.parser.error_here(message)
    }

    pub(super) fn scalar<T: FromStr>(&mut self, name: &str) -> Result<Option<T>> {
        match self.take(name) {
            None => Ok(None),
            Some((AttrValue::Number(n), position)) => n
                .parse()
                .map(Some)
                .map_err(|_| self.bad(position, format!("attribute `{name}`: cannot read `{n}`"))),
            Some((AttrValue::Word(word), position)) => Err(self.bad(
                position,
                format!("attribute `{name}`: expected a number, found `{word}`"),
            )),
            Some((AttrValue::List(_), position)) => {
                Err(self.bad(position, format!("attribute `{name}` takes one number")))
            }
        }
    }

    /// A max pool's attributes besides its `kernel`, each name after
    /// `prefix` (`pool_` inside a fused conv): stride (default the
    /// kernel), padding (default 0), ceil_mode (default 0).
    pub(super) fn max_pool(&mut self, prefix: &str, kernel: [usize; 2]) -> Result<MaxPool2dAttrs> {
        Ok(MaxPool2dAttrs {
            kernel,
            stride: self.pair(&format!("{prefix}stride"))?.unwrap_or(kernel),
            padding: self.pair(&format!("{prefix}padding"))?.unwrap_or([0, 0]),
            ceil_mode: self.flag(&format!("{prefix}ceil_mode"))?,
        })
    }

    /// A 0/1 attribute, false when absent.
    pub(super) fn flag(&mut self, name: &str) -> Result<bool> {
        match self.scalar::<u8>(name)? {
            None | Some(0) => Ok(false),
            Some(1) => Ok(true),
            Some(other) => Err(self
                .parser
                .error_here(format!("attribute `{name}` is 0 or 1, got {other}"))),
        }
    }

    pub(super) fn word(&mut self, name: &str) -> Result<Option<String>> {
        match self.take(name) {
            None => Ok(None),
            Some((AttrValue::Word(word), _)) => Ok(Some(word)),
            Some((_, position)) => Err(self.bad(position, format!("attribute `{name}` takes a name"))),
        }
    }

    pub(super) fn pair(&mut self, name: &str) -> Result<Option<[usize; 2]>> {
        let parse = |s: &str| s.parse::<usize>().ok();
        match self.take(name) {
            None => Ok(None),
            Some((AttrValue::Number(n), position)) => match parse(&n) {
                Some(v) => Ok(Some([v, v])),
                None => Err(self.bad(
                    position,
                    format!("attribute `{name}`: expected a non-negative integer, found `{n}`"),
                )),
            },
            Some((AttrValue::Word(word), position)) => Err(self.bad(
                position,
                format!("attribute `{name}`: expected a non-negative integer, found `{word}`"),
            )),
            Some((AttrValue::List(items), position)) => {
                match items.iter().map(|s| parse(s)).collect::<Option<Vec<_>>>() {
                    Some(v) if v.len() == 2 => Ok(Some([v[0], v[1]])),
                    _ => Err(self.bad(
                        position,
                        format!("attribute `{name}`: expected [h,w] of non-negative integers"),
                    )),
                }
            }
        }
    }

    /// A conv's attributes, PyTorch's defaults where omitted.
    pub(super) fn conv(&mut self) -> Result<Conv2dAttrs> {
        Ok(Conv2dAttrs {
            stride: self.pair("stride")?.unwrap_or([1, 1]),
            padding: self.pair("padding")?.unwrap_or([0, 0]),
            dilation: self.pair("dilation")?.unwrap_or([1, 1]),
            groups: self.scalar("groups")?.unwrap_or(1),
        })
    }

    /// The error for the first attribute no field took, naming those the op takes.
    pub(super) fn finish(mut self) -> Result<()> {
        if let Some((name, _, position)) = self.attrs.first() {
            let (name, position) = (name.clone(), *position);
            let known = self.used.join(", ");
            return Err(self.bad(position, format!("unknown attribute `{name}`; this op takes {known}")));
        }
        Ok(())
    }
}
