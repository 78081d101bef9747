//! Operators folded at import: `Constant`, and the shape arithmetic
//! exporters emit around a flatten (`Shape`, `Gather`, `Unsqueeze`,
//! `Squeeze`, `Concat`, `Cast` on known values), computed on the static
//! shapes wick's IR carries. Only import-time operands: a computed value
//! reaching one of these (other than `Shape`, and a no-op `Cast`) is
//! unsupported.

use crate::attrs::Attrs;
use crate::import::{Importer, Value};
use crate::proto::{data_type, NodeProto};
use crate::tensor::{self, Const};
use candle_core::{Device, Tensor};
use wick_ir::plain_candle_message;

/// The value of a `Constant` node.
pub(crate) fn constant(imp: &Importer, node: &NodeProto) -> Result<Const, String> {
    let a = Attrs::of(node);
    a.only(&["value", "value_float", "value_floats", "value_int", "value_ints"])?;
    if let Some(t) = a.tensor("value")? {
        return tensor::read(
            t,
            &node.output.first().cloned().unwrap_or_default(),
            imp.max_elements,
            imp.external(),
        )
        .map_err(|e| e.to_string());
    }
    let floats = |values: Vec<f32>, dims: Vec<usize>| {
        Tensor::from_vec(values, dims, &Device::Cpu)
            .map(Const::F32)
            .map_err(plain_candle_message)
    };
    if node.attribute.iter().any(|x| x.name == "value_float") {
        return floats(vec![a.float("value_float", 0.0)?], vec![]);
    }
    if let Some(x) = node.attribute.iter().find(|x| x.name == "value_floats") {
        return floats(x.floats.clone(), vec![x.floats.len()]);
    }
    if node.attribute.iter().any(|x| x.name == "value_int") {
        return Ok(Const::I64 {
            dims: vec![],
            values: vec![a.int("value_int", 0)?],
        });
    }
    if let Some(values) = a.ints("value_ints")? {
        return Ok(Const::I64 {
            dims: vec![values.len()],
            values: values.to_vec(),
        });
    }
    Err("no value attribute (value, value_float(s), value_int(s) are supported)".into())
}

/// `Shape`, `Gather`, `Unsqueeze`, `Squeeze`, `Concat`, `Cast`.
pub(crate) fn shape_op(imp: &Importer, node: &NodeProto) -> Result<Vec<Value>, String> {
    let a = Attrs::of(node);
    let known = |index: usize| imp.known(node, index);
    let ints = |index: usize| -> Result<Vec<i64>, String> {
        Ok(known(index)?
            .ints()
            .ok_or(format!("input {index} must be integers"))?
            .to_vec())
    };
    let value = match node.op_type.as_str() {
        "Shape" => {
            a.only(&["start", "end"])?;
            let dims = match imp.operand(node, 0) {
                Some(Value::Ir(id)) => imp.shape(*id).to_vec(),
                Some(Value::Const(c)) => c.dims(),
                _ => return Err("input 0 is missing".into()),
            };
            let rank = dims.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
            let (start, end) = (clamp(a.int("start", 0)?), clamp(a.int("end", rank)?));
            let values: Vec<i64> = dims[start..end.max(start)].iter().map(|&d| d as i64).collect();
            Const::I64 {
                dims: vec![values.len()],
                values,
            }
        }
        "Gather" => {
            a.only(&["axis"])?;
            let data = ints(0)?;
            if known(0)?.dims().len() != 1 || a.int("axis", 0)? != 0 {
                return Err("only gathering from a 1-D integer constant along axis 0 is supported".into());
            }
            let indices = known(1)?;
            let picked = indices
                .ints()
                .ok_or("indices must be integers")?
                .iter()
                .map(|&i| {
                    let at = if i < 0 { i + data.len() as i64 } else { i };
                    usize::try_from(at)
                        .ok()
                        .and_then(|at| data.get(at).copied())
                        .ok_or(format!("index {i} out of range for {} values", data.len()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Const::I64 {
                dims: indices.dims(),
                values: picked,
            }
        }
        "Unsqueeze" | "Squeeze" => {
            a.only(&[])?;
            let data = known(0)?;
            let dims = data.dims();
            let axes = match imp.operand(node, 1) {
                Some(_) => Some(ints(1)?),
                None => None,
            };
            let new_dims = if node.op_type == "Unsqueeze" {
                let axes = axes.ok_or("axes are missing")?;
                let rank = (dims.len() + axes.len()) as i64;
                let mut axes: Vec<usize> = axes
                    .iter()
                    .map(|&ax| usize::try_from(if ax < 0 { ax + rank } else { ax }).map_err(|_| format!("axis {ax}")))
                    .collect::<Result<_, _>>()?;
                axes.sort_unstable();
                let mut out = dims.clone();
                for ax in axes {
                    if ax > out.len() {
                        return Err(format!("axis {ax} out of range"));
                    }
                    out.insert(ax, 1);
                }
                out
            } else {
                let rank = dims.len() as i64;
                let squeezed: Vec<usize> = match axes {
                    None => (0..dims.len()).filter(|&i| dims[i] == 1).collect(),
                    Some(axes) => axes
                        .iter()
                        .map(|&ax| (if ax < 0 { ax + rank } else { ax }) as usize)
                        .collect(),
                };
                if squeezed.iter().any(|&i| dims.get(i) != Some(&1)) {
                    return Err(format!("axes {squeezed:?} of shape {dims:?} are not all 1"));
                }
                (0..dims.len())
                    .filter(|i| !squeezed.contains(i))
                    .map(|i| dims[i])
                    .collect()
            };
            with_dims(data, new_dims)?
        }
        "Concat" => {
            a.only(&["axis"])?;
            let mut values = Vec::new();
            for index in 0..node.input.len() {
                if known(index)?.dims().len() != 1 {
                    return Err("only concatenating 1-D integer constants is supported".into());
                }
                values.extend(ints(index)?);
            }
            if !matches!(a.int("axis", 0)?, 0 | -1) {
                return Err("axis must be 0 for 1-D values".into());
            }
            Const::I64 {
                dims: vec![values.len()],
                values,
            }
        }
        "Cast" => {
            a.only(&["to", "saturate"])?;
            let to = a.int("to", 0)? as i32;
            match (imp.operand(node, 0), to) {
                (Some(Value::Ir(id)), data_type::FLOAT) => return Ok(vec![Value::Ir(*id)]),
                (Some(Value::Const(c)), data_type::INT64 | data_type::INT32) => match c {
                    Const::I64 { .. } => c.clone(),
                    Const::F32(t) => Const::I64 {
                        dims: t.dims().to_vec(),
                        values: t
                            .flatten_all()
                            .and_then(|t| t.to_vec1::<f32>())
                            .map_err(plain_candle_message)?
                            .into_iter()
                            .map(|v| v as i64)
                            .collect(),
                    },
                },
                (Some(Value::Const(c)), data_type::FLOAT | data_type::DOUBLE) => match c {
                    Const::F32(_) => c.clone(),
                    Const::I64 { dims, values } => Const::F32(
                        Tensor::from_vec(values.iter().map(|&v| v as f32).collect(), dims.clone(), &Device::Cpu)
                            .map_err(plain_candle_message)?,
                    ),
                },
                _ => return Err(format!("cast to {} is not supported here", data_type::name(to))),
            }
        }
        other => return Err(format!("operator {other} is not supported")),
    };
    Ok(vec![Value::Const(value)])
}

/// `c` with the same values in shape `dims`.
fn with_dims(c: &Const, dims: Vec<usize>) -> Result<Const, String> {
    Ok(match c {
        Const::F32(t) => Const::F32(t.reshape(dims).map_err(plain_candle_message)?),
        Const::I64 { values, .. } => Const::I64 {
            dims,
            values: values.clone(),
        },
    })
}

/// The dimensions `Reshape` gives `from` for `target` (0 copies the input's
/// dimension unless `allowzero`, one -1 is inferred), checked to hold the
/// same number of elements.
pub(crate) fn reshape_dims(from: &[usize], target: &[i64], allowzero: bool) -> Result<Vec<usize>, String> {
    let total: usize = from.iter().product();
    let mut dims = Vec::with_capacity(target.len());
    let mut inferred = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 if inferred.is_none() => {
                inferred = Some(i);
                dims.push(1);
            }
            0 if !allowzero => dims.push(*from.get(i).ok_or(format!("0 at {i} copies no input dimension"))?),
            t if t >= 0 => dims.push(t as usize),
            t => return Err(format!("shape value {t} is not supported")),
        }
    }
    // The extent too: a zero-sized target's other axes still make strides.
    if wick_ir::shape_extent(&dims).is_none() {
        return Err(format!("the target shape {target:?} overflows"));
    }
    let known: usize = dims.iter().product();
    if let Some(i) = inferred {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot infer -1 reshaping {from:?} to {target:?}"));
        }
        dims[i] = total / known;
    } else if known != total {
        return Err(format!("{from:?} has {total} elements, {target:?} wants {known}"));
    }
    Ok(dims)
}

#[cfg(test)]
mod tests {
    use super::reshape_dims;

    /// 0 copies, -1 infers, the element count is checked.
    #[test]
    fn reshape_targets() {
        assert_eq!(reshape_dims(&[2, 512, 1, 1], &[2, -1], false).unwrap(), [2, 512]);
        assert_eq!(reshape_dims(&[2, 512, 1, 1], &[0, -1], false).unwrap(), [2, 512]);
        assert!(reshape_dims(&[2, 512, 1, 1], &[3, -1], false).is_err());
        assert!(reshape_dims(&[2, 512], &[2, 100], false).is_err());
        assert!(reshape_dims(&[2, 512], &[-1, -1], false).is_err());
        assert!(reshape_dims(&[2, 512], &[i64::MAX, i64::MAX], false).is_err());
        // An empty tensor to a zero-sized shape whose strides overflow.
        let err = reshape_dims(&[0], &[0, 1 << 40, 1 << 40], true).unwrap_err();
        assert!(err.contains("overflows"), "{err}");
        assert_eq!(reshape_dims(&[0], &[0, 3], true).unwrap(), [0, 3]);
    }
}
