//! Constant tensors of an ONNX file (initializers, `Constant` values) as
//! the importer holds them: f32 weights as candle tensors, integer tensors
//! (shapes, axes, indices) as `i64` values. Sizes are checked before any
//! allocation: the element count must fit the declared data and wick's
//! element limit.

use crate::proto::{data_type, TensorProto};
use crate::OnnxError;
use candle_core::{Device, Tensor};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

/// A value known at import time.
#[derive(Debug, Clone)]
pub(crate) enum Const {
    /// Float data (f32, or f64 converted), as a candle tensor.
    F32(Tensor),
    /// Integer data (int32 or int64), row-major, with its shape.
    I64 {
        /// The shape.
        dims: Vec<usize>,
        /// The values.
        values: Vec<i64>,
    },
}

impl Const {
    /// The shape.
    pub(crate) fn dims(&self) -> Vec<usize> {
        match self {
            Const::F32(t) => t.dims().to_vec(),
            Const::I64 { dims, .. } => dims.clone(),
        }
    }

    /// The values as integers, if this is an integer tensor.
    pub(crate) fn ints(&self) -> Option<&[i64]> {
        match self {
            Const::I64 { values, .. } => Some(values),
            Const::F32(_) => None,
        }
    }

    /// A one-element float tensor's value (`Clip`'s bounds), if this is one.
    pub(crate) fn scalar_f32(&self) -> Option<f32> {
        match self {
            Const::F32(t) if t.elem_count() == 1 => t.flatten_all().ok()?.to_vec1::<f32>().ok()?.first().copied(),
            Const::I64 { values, .. } if values.len() == 1 => Some(values[0] as f32),
            _ => None,
        }
    }
}

/// The element count of `dims`, checked: each dimension non-negative, the
/// product within `max_elements`, and so is the product with each
/// zero-sized axis counted as one ([`wick_ir::shape_extent`]: a tensor
/// that holds no value still has strides).
pub(crate) fn element_count(name: &str, dims: &[i64], max_elements: usize) -> Result<(Vec<usize>, usize), OnnxError> {
    let error = |message: String| OnnxError::Tensor {
        name: name.to_string(),
        message,
    };
    let dims: Vec<usize> = dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| error(format!("negative dimension {d} in {dims:?}"))))
        .collect::<Result<_, _>>()?;
    if wick_ir::shape_extent(&dims).is_none_or(|n| n > max_elements) {
        return Err(error(format!(
            "shape {dims:?} has more than the {max_elements} elements wick allows (a zero-sized axis counted as one)"
        )));
    }
    // At most the extent: no overflow.
    let count = dims.iter().product();
    Ok((dims, count))
}

/// Where a tensor's external data is read from: the model file's
/// directory (external data in files beside it, as `torch.onnx.export`
/// writes for models over 2 GiB and its dynamo exporter always does).
#[derive(Debug, Clone, Copy)]
pub(crate) struct External<'a> {
    /// The directory `location`s are relative to; `None` for a model read
    /// from bytes, which then cannot have external data.
    pub(crate) dir: Option<&'a Path>,
}

/// Reads `tensor` (named `name` in errors), at most `max_elements` values,
/// its data from the file itself or from an external file.
pub(crate) fn read(
    tensor: &TensorProto,
    name: &str,
    max_elements: usize,
    external: External,
) -> Result<Const, OnnxError> {
    let error = |message: String| OnnxError::Tensor {
        name: name.to_string(),
        message,
    };
    let (dims, count) = element_count(name, &tensor.dims, max_elements)?;
    let external_raw;
    let raw = if tensor.data_location == 1 || !tensor.external_data.is_empty() {
        let width = match tensor.data_type {
            data_type::BOOL | data_type::UINT8 | data_type::INT8 => 1,
            data_type::FLOAT | data_type::INT32 => 4,
            data_type::INT64 | data_type::DOUBLE => 8,
            other => {
                return Err(error(format!(
                    "element type {} is not supported",
                    data_type::name(other)
                )))
            }
        };
        external_raw = read_external(tensor, count * width, external).map_err(error)?;
        &external_raw
    } else {
        &tensor.raw_data
    };
    // The values of one type: from `raw_data` (little-endian, `width` bytes
    // each) when present, else from the typed field.
    fn values<T: Copy, const W: usize>(
        raw: &[u8],
        typed: &[T],
        count: usize,
        decode: fn([u8; W]) -> T,
    ) -> Result<Vec<T>, String> {
        if !raw.is_empty() {
            if raw.len() / W != count || !raw.len().is_multiple_of(W) {
                return Err(format!(
                    "{} bytes of raw data for {count} values of {W} bytes",
                    raw.len()
                ));
            }
            return Ok(raw
                .chunks_exact(W)
                .map(|c| decode(c.try_into().expect("chunks of W bytes")))
                .collect());
        }
        if typed.len() != count {
            return Err(format!("{} values for a shape of {count}", typed.len()));
        }
        Ok(typed.to_vec())
    }
    let floats = |values: Vec<f32>| {
        Tensor::from_vec(values, dims.clone(), &Device::Cpu)
            .map(Const::F32)
            .map_err(|e| error(wick_ir::plain_candle_message(e)))
    };
    match tensor.data_type {
        data_type::FLOAT => floats(values(raw, &tensor.float_data, count, f32::from_le_bytes).map_err(error)?),
        data_type::DOUBLE => {
            let doubles = values(raw, &tensor.double_data, count, f64::from_le_bytes).map_err(error)?;
            floats(doubles.into_iter().map(|v| v as f32).collect())
        }
        data_type::INT64 => Ok(Const::I64 {
            values: values(raw, &tensor.int64_data, count, i64::from_le_bytes).map_err(error)?,
            dims,
        }),
        data_type::BOOL | data_type::UINT8 | data_type::INT8 => Ok(Const::I64 {
            values: values(raw, &tensor.int32_data, count, |[b]: [u8; 1]| i32::from(b))
                .map_err(error)?
                .into_iter()
                .map(|v| match tensor.data_type {
                    data_type::INT8 => i64::from(v as u8 as i8),
                    _ => i64::from(v),
                })
                .collect(),
            dims,
        }),
        data_type::INT32 => Ok(Const::I64 {
            values: values(raw, &tensor.int32_data, count, i32::from_le_bytes)
                .map_err(error)?
                .into_iter()
                .map(i64::from)
                .collect(),
            dims,
        }),
        other => Err(error(format!(
            "element type {} is not supported (FLOAT, DOUBLE, INT64, INT32, INT8, UINT8, BOOL are)",
            data_type::name(other)
        ))),
    }
}

/// The `bytes` bytes of `tensor`'s external data: `location` relative to
/// the model's directory (no absolute path, no `..`: a file cannot make the
/// importer read outside its directory), `offset` and `length` checked
/// against the file before anything is read.
fn read_external(tensor: &TensorProto, bytes: usize, external: External) -> Result<Vec<u8>, String> {
    let entry = |key: &str| {
        tensor
            .external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    };
    let location = entry("location").ok_or("external data without a `location`")?;
    let Some(dir) = external.dir else {
        return Err(format!(
            "its data is in external file `{location}`, and a model read from bytes has no directory to find it in"
        ));
    };
    let relative = Path::new(location);
    if location.is_empty() || !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!(
            "external data location `{location}` must be a relative path inside the model's directory"
        ));
    }
    let number = |key: &str| -> Result<Option<u64>, String> {
        entry(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("external data `{key}` `{v}` is not a size"))
            })
            .transpose()
    };
    let offset = number("offset")?.unwrap_or(0);
    let path = dir.join(relative);
    let mut file =
        std::fs::File::open(&path).map_err(|e| format!("cannot open external data `{}`: {e}", path.display()))?;
    let size = file
        .metadata()
        .map_err(|e| format!("cannot read external data `{}`: {e}", path.display()))?
        .len();
    let length = number("length")?.unwrap_or(size.saturating_sub(offset));
    if length != bytes as u64 {
        return Err(format!("external data of {length} bytes for a shape of {bytes} bytes"));
    }
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(format!(
            "external data at {offset}..+{length} lies past the end of `{}` ({size} bytes)",
            path.display()
        ));
    }
    let mut data = Vec::new();
    data.try_reserve_exact(bytes)
        .map_err(|_| format!("cannot allocate {bytes} bytes of external data"))?;
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.take(length).read_to_end(&mut data))
        .map_err(|e| format!("cannot read external data `{}`: {e}", path.display()))?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str) -> crate::proto::StringStringEntryProto {
        crate::proto::StringStringEntryProto {
            key: key.into(),
            value: value.into(),
        }
    }

    /// External data is read from beside the model at its offset; a
    /// location outside the directory, a range past the file's end and a
    /// length that does not match the shape are errors.
    #[test]
    fn external_data() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<u8> = [9f32, 1.5, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.path().join("w.bin"), &values).unwrap();
        let external = External { dir: Some(dir.path()) };
        let tensor = |entries: &[(&str, &str)], dims: &[i64]| TensorProto {
            data_location: 1,
            external_data: entries.iter().map(|(k, v)| entry(k, v)).collect(),
            ..proto(dims, data_type::FLOAT)
        };
        let t = tensor(&[("location", "w.bin"), ("offset", "4"), ("length", "8")], &[2]);
        let Const::F32(x) = read(&t, "w", 100, external).unwrap() else {
            panic!()
        };
        assert_eq!(x.to_vec1::<f32>().unwrap(), [1.5, -2.0]);
        for (entries, dims, want) in [
            (vec![("location", "../w.bin")], vec![3], "relative path inside"),
            (vec![("location", "/etc/passwd")], vec![3], "relative path inside"),
            (
                vec![("location", "w.bin"), ("offset", "8"), ("length", "8")],
                vec![2],
                "past the end",
            ),
            (
                vec![("location", "w.bin"), ("length", "8")],
                vec![3],
                "8 bytes for a shape of 12",
            ),
            (vec![("location", "w.bin"), ("offset", "x")], vec![3], "not a size"),
            (vec![("location", "missing.bin")], vec![3], "cannot open"),
        ] {
            let err = read(&tensor(&entries, &dims), "w", 100, external)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{entries:?}: {err}");
        }
    }

    fn proto(dims: &[i64], data_type: i32) -> TensorProto {
        TensorProto {
            dims: dims.to_vec(),
            data_type,
            ..Default::default()
        }
    }

    /// Raw and typed data both read; every mismatch of data and shape,
    /// negative or oversized shapes, external data and other types are
    /// errors naming the tensor.
    #[test]
    fn reads_and_refuses() {
        let mut t = proto(&[2], data_type::FLOAT);
        t.raw_data = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let none = External { dir: None };
        let Const::F32(x) = read(&t, "w", 100, none).unwrap() else {
            panic!()
        };
        assert_eq!(x.to_vec1::<f32>().unwrap(), [1.5, -2.0]);
        let mut t = proto(&[3], data_type::INT64);
        t.int64_data = vec![1, -1, 7];
        assert_eq!(read(&t, "s", 100, none).unwrap().ints().unwrap(), [1, -1, 7]);
        let mut t = proto(&[2], data_type::BOOL);
        t.raw_data = vec![1, 0];
        assert_eq!(read(&t, "mode", 100, none).unwrap().ints().unwrap(), [1, 0]);
        let mut t = proto(&[2], data_type::INT8);
        t.raw_data = vec![0xff, 7];
        assert_eq!(read(&t, "i8", 100, none).unwrap().ints().unwrap(), [-1, 7]);
        let mut t = proto(&[], data_type::FLOAT);
        t.float_data = vec![6.0];
        assert_eq!(read(&t, "max", 100, none).unwrap().scalar_f32(), Some(6.0));
        let bad = [
            (proto(&[2], data_type::FLOAT), "0 values for a shape of 2"),
            (
                TensorProto {
                    raw_data: vec![0; 7],
                    ..proto(&[2], data_type::FLOAT)
                },
                "7 bytes",
            ),
            (proto(&[-1], data_type::FLOAT), "negative dimension"),
            (
                proto(&[1 << 40, 1 << 40], data_type::FLOAT),
                "more than the 100 elements",
            ),
            // No values, but strides past `usize` (a fuzzed initializer
            // that panicked inside candle before).
            (
                proto(&[0, 1 << 40, 1 << 40], data_type::FLOAT),
                "more than the 100 elements",
            ),
            (proto(&[0, 101], data_type::FLOAT), "more than the 100 elements"),
            (proto(&[2], 10), "FLOAT16"),
            (
                TensorProto {
                    data_location: 1,
                    ..proto(&[2], data_type::FLOAT)
                },
                "without a `location`",
            ),
            (
                TensorProto {
                    data_location: 1,
                    external_data: vec![entry("location", "w.bin")],
                    ..proto(&[2], data_type::FLOAT)
                },
                "a model read from bytes",
            ),
        ];
        for (t, want) in bad {
            let err = read(&t, "w", 100, none).unwrap_err().to_string();
            assert!(err.contains("`w`") && err.contains(want), "{err}");
        }
    }
}
