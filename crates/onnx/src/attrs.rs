//! Typed access to a node's attributes. Errors are the reason string of an
//! unsupported node (the importer collects them all): an attribute of the
//! wrong type, a value out of range, or one the op's lowering does not
//! know (which could change the result, so it is refused, not ignored).

use crate::proto::{attribute_type as ty, AttributeProto, NodeProto, TensorProto};

/// A node's attributes, by name.
pub(crate) struct Attrs<'a> {
    attributes: &'a [AttributeProto],
}

impl<'a> Attrs<'a> {
    /// The attributes of `node`.
    pub(crate) fn of(node: &'a NodeProto) -> Self {
        Self {
            attributes: &node.attribute,
        }
    }

    fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.attributes.iter().find(|a| a.name == name)
    }

    /// Refuses any attribute not in `known`.
    pub(crate) fn only(&self, known: &[&str]) -> Result<(), String> {
        match self.attributes.iter().find(|a| !known.contains(&a.name.as_str())) {
            Some(a) => Err(format!("attribute `{}` is not supported", a.name)),
            None => Ok(()),
        }
    }

    fn typed(&self, name: &str, want: i32, what: &str) -> Result<Option<&'a AttributeProto>, String> {
        match self.get(name) {
            None => Ok(None),
            // Type 0 (UNDEFINED) from writers that leave it unset: trust the field.
            Some(a) if a.r#type == want || a.r#type == 0 => Ok(Some(a)),
            Some(a) => Err(format!(
                "attribute `{name}` must be {what}, got attribute type {}",
                a.r#type
            )),
        }
    }

    /// An integer attribute, or `default`.
    pub(crate) fn int(&self, name: &str, default: i64) -> Result<i64, String> {
        Ok(self.typed(name, ty::INT, "an integer")?.map_or(default, |a| a.i))
    }

    /// A float attribute, or `default`.
    pub(crate) fn float(&self, name: &str, default: f32) -> Result<f32, String> {
        Ok(self.typed(name, ty::FLOAT, "a float")?.map_or(default, |a| a.f))
    }

    /// A list-of-integers attribute, if present.
    pub(crate) fn ints(&self, name: &str) -> Result<Option<&'a [i64]>, String> {
        Ok(self
            .typed(name, ty::INTS, "a list of integers")?
            .map(|a| a.ints.as_slice()))
    }

    /// A string attribute, or `default`.
    pub(crate) fn string(&self, name: &str, default: &str) -> Result<String, String> {
        match self.typed(name, ty::STRING, "a string")? {
            None => Ok(default.to_string()),
            Some(a) => String::from_utf8(a.s.clone()).map_err(|_| format!("attribute `{name}` is not UTF-8")),
        }
    }

    /// A tensor attribute, if present.
    pub(crate) fn tensor(&self, name: &str) -> Result<Option<&'a TensorProto>, String> {
        match self.typed(name, ty::TENSOR, "a tensor")? {
            None => Ok(None),
            Some(a) => {
                a.t.as_ref()
                    .map(Some)
                    .ok_or_else(|| format!("attribute `{name}` holds no tensor"))
            }
        }
    }

    /// `[h, w]` from a two-element list attribute of positive values, or
    /// `default` when absent.
    pub(crate) fn pair(&self, name: &str, default: [usize; 2]) -> Result<[usize; 2], String> {
        match self.ints(name)? {
            None => Ok(default),
            Some(&[h, w]) if h > 0 && w > 0 => Ok([h as usize, w as usize]),
            Some(values) => Err(format!("`{name}` must be two positive values (2-D), got {values:?}")),
        }
    }

    /// A conv's padding `[top, left, bottom, right]` on an `[h, w]` input:
    /// `pads` as given (each side on its own), or `auto_pad` `SAME_UPPER` /
    /// `SAME_LOWER` (output `ceil(in / stride)`, the odd extra at the end /
    /// the beginning) or `VALID`.
    pub(crate) fn conv_pads(
        &self,
        input: [usize; 2],
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
    ) -> Result<[usize; 4], String> {
        let same = |lower: bool| -> Result<[usize; 4], String> {
            let mut pads = [0; 4];
            for axis in 0..2 {
                let span = kernel[axis]
                    .checked_sub(1)
                    .ok_or("a kernel of size 0")?
                    .checked_mul(dilation[axis])
                    .and_then(|s| s.checked_add(1))
                    .ok_or("the kernel span overflows")?;
                let out = input[axis].div_ceil(stride[axis]);
                let needed = (out.saturating_sub(1))
                    .checked_mul(stride[axis])
                    .and_then(|n| n.checked_add(span))
                    .ok_or("the padding overflows")?;
                let total = needed.saturating_sub(input[axis]);
                let (small, large) = (total / 2, total - total / 2);
                (pads[axis], pads[axis + 2]) = if lower { (large, small) } else { (small, large) };
            }
            Ok(pads)
        };
        match self.string("auto_pad", "NOTSET")?.as_str() {
            "NOTSET" => {}
            "VALID" => return Ok([0; 4]),
            "SAME_UPPER" => return same(false),
            "SAME_LOWER" => return same(true),
            other => return Err(format!("auto_pad {other} is not an ONNX value")),
        }
        match self.ints("pads")? {
            None => Ok([0; 4]),
            Some(pads) if pads.len() == 4 && pads.iter().all(|&p| p >= 0) => Ok([0, 1, 2, 3].map(|i| pads[i] as usize)),
            Some(pads) => Err(format!("pads {pads:?} must be four non-negative values (2-D)")),
        }
    }

    /// A pool's symmetric 2-D padding `[h, w]` from `pads` (`[top, left,
    /// bottom, right]`) with `auto_pad` NOTSET (or VALID: none); asymmetric
    /// pads and SAME_* are refused (a pool pads with -inf, not zeros, so
    /// the conv's separate zero `pad` cannot stand in).
    pub(crate) fn padding(&self) -> Result<[usize; 2], String> {
        match self.string("auto_pad", "NOTSET")?.as_str() {
            "NOTSET" => {}
            "VALID" => return Ok([0, 0]),
            other => {
                return Err(format!(
                    "auto_pad {other} is not supported (explicit symmetric pads are)"
                ))
            }
        }
        match self.ints("pads")? {
            None => Ok([0, 0]),
            Some(&[top, left, bottom, right]) if top == bottom && left == right && top >= 0 && left >= 0 => {
                Ok([top as usize, left as usize])
            }
            Some(pads) => Err(format!(
                "pads {pads:?} are not supported: wick pads both sides of an axis alike ([t, l, t, l])"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::AttributeProto;

    fn node(attributes: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            attribute: attributes,
            ..Default::default()
        }
    }

    fn auto_pad(value: &str) -> AttributeProto {
        AttributeProto {
            name: "auto_pad".into(),
            r#type: ty::STRING,
            s: value.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    /// SAME padding as ONNX defines it (the odd extra at the end for
    /// UPPER, the beginning for LOWER); a zero-sized kernel or an unknown
    /// mode is an error, not an underflow; pads must be four and
    /// non-negative.
    #[test]
    fn conv_pads() {
        let upper = node(vec![auto_pad("SAME_UPPER")]);
        let lower = node(vec![auto_pad("SAME_LOWER")]);
        let pads = |n: &NodeProto, kernel| Attrs::of(n).conv_pads([6, 5], kernel, [2, 2], [1, 1]);
        assert_eq!(pads(&upper, [3, 2]).unwrap(), [0, 0, 1, 1]);
        assert_eq!(pads(&lower, [3, 2]).unwrap(), [1, 1, 0, 0]);
        assert!(pads(&upper, [0, 2]).unwrap_err().contains("size 0"));
        assert!(pads(&node(vec![auto_pad("SAME")]), [3, 2])
            .unwrap_err()
            .contains("SAME"));
        let explicit = |values: Vec<i64>| {
            node(vec![AttributeProto {
                name: "pads".into(),
                r#type: ty::INTS,
                ints: values,
                ..Default::default()
            }])
        };
        assert_eq!(pads(&explicit(vec![1, 0, 2, 1]), [3, 2]).unwrap(), [1, 0, 2, 1]);
        assert!(pads(&explicit(vec![1, 0, -2, 1]), [3, 2]).is_err());
        assert!(pads(&explicit(vec![1, 0]), [3, 2]).is_err());
    }
}
