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

    /// Symmetric 2-D padding `[h, w]` from `pads` (`[top, left, bottom,
    /// right]`) with `auto_pad` NOTSET (or VALID: none); asymmetric pads
    /// and SAME_* are refused.
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
