//! Shape inference of each op: output shapes, what is accepted and what
//! is refused.

use super::*;
use crate::TensorFact;
use candle_core::DType;

fn f(shape: &[usize]) -> TensorFact {
    TensorFact::new(DType::F32, shape)
}

/// Conv output size follows PyTorch's formula per axis, with h != w attributes.
#[test]
fn conv2d_output_shape_per_axis() {
    let attrs = Conv2dAttrs {
        stride: [2, 1],
        padding: [1, 0],
        dilation: [1, 2],
        groups: 1,
    };
    let out = Op::Conv2d(attrs)
        .infer(&[&f(&[2, 3, 9, 10]), &f(&[4, 3, 3, 2])])
        .unwrap();
    // h: (9 + 2 - 3) / 2 + 1 = 5; w: (10 - 2*(2-1) - 1) / 1 + 1 = 8
    assert_eq!(out.shape, vec![2, 4, 5, 8]);
}

/// Depthwise conv: groups == channels with one input channel per group.
#[test]
fn conv2d_depthwise_accepted_and_bad_groups_rejected() {
    let dw = Conv2dAttrs {
        groups: 4,
        ..Default::default()
    };
    assert!(Op::Conv2d(dw).infer(&[&f(&[1, 4, 5, 5]), &f(&[4, 1, 3, 3])]).is_ok());
    let bad = Conv2dAttrs {
        groups: 3,
        ..Default::default()
    };
    let err = Op::Conv2d(bad)
        .infer(&[&f(&[1, 4, 5, 5]), &f(&[4, 1, 3, 3])])
        .unwrap_err();
    assert!(err.contains("groups=3"), "{err}");
}

/// The window formula per axis; a window that does not fit, a zero
/// stride or kernel, and sizes whose arithmetic overflows give `None`.
#[test]
fn windowed_len_is_checked() {
    assert_eq!(windowed_len(224, 7, 2, 3, 1), Some(112));
    assert_eq!(windowed_len(10, 2, 1, 0, 2), Some(8));
    assert_eq!(windowed_len(2, 3, 1, 0, 1), None);
    assert_eq!(windowed_len(4, 0, 1, 0, 1), None);
    assert_eq!(windowed_len(4, 1, 0, 0, 1), None);
    assert_eq!(windowed_len(4, 3, 1, 1 << 63, 1), None);
    assert_eq!(windowed_len(usize::MAX, 1, 1, 1, 1), None);
    assert_eq!(windowed_len(4, 3, 1, 0, usize::MAX), None);
    // Fits usize but not isize: refused (kernels use signed offsets).
    assert_eq!(windowed_len(1, 2, 1, 1 << 62, 1 << 63), None);
}

/// A kernel larger than the padded input is an error, not an underflow.
#[test]
fn conv2d_kernel_too_large_is_error() {
    let err = Op::Conv2d(Conv2dAttrs::default())
        .infer(&[&f(&[1, 1, 2, 2]), &f(&[1, 1, 3, 3])])
        .unwrap_err();
    assert!(err.contains("does not fit"), "{err}");
}

/// Mixed dtypes are reported with both names.
#[test]
fn dtype_mismatch_is_reported() {
    let err = Op::Add
        .infer(&[&f(&[2]), &TensorFact::new(DType::F16, [2])])
        .unwrap_err();
    assert!(err.contains("f16") && err.contains("f32"), "{err}");
}

/// Ceil mode as PyTorch computes it: SqueezeNet's 3x3 stride-2 pools
/// (109 -> 54, 54 -> 27, 27 -> 13; floor: 54, 26, 13), and no window
/// that would start in the right padding (3 wide, window 2, stride 2,
/// padding 1: 2, not 3).
#[test]
fn max_pool_ceil_mode() {
    let pool = |len: usize, kernel: usize, stride: usize, padding: usize, ceil_mode: bool| {
        let attrs = MaxPool2dAttrs {
            kernel: [kernel, 1],
            stride: [stride, 1],
            padding: [padding, 0],
            ceil_mode,
        };
        attrs.output_size([len, 1]).unwrap()[0]
    };
    let squeezenet: Vec<[usize; 2]> = [109, 54, 27]
        .iter()
        .map(|&l| [pool(l, 3, 2, 0, true), pool(l, 3, 2, 0, false)])
        .collect();
    assert_eq!(squeezenet, [[54, 54], [27, 26], [13, 13]]);
    assert_eq!(pool(3, 2, 2, 1, true), 2);
    assert_eq!(pool(5, 3, 2, 1, true), 3);
    assert_eq!(pool(5, 2, 2, 0, true), 3);
    let text = Op::MaxPool2d(MaxPool2dAttrs {
        kernel: [3, 3],
        stride: [2, 2],
        padding: [0, 0],
        ceil_mode: true,
    });
    assert_eq!(
        crate::print::op_text(&text),
        "max_pool2d[kernel=[3,3], stride=[2,2], padding=[0,0], ceil_mode=1]"
    );
}

/// torchvision's stem max pool: 3x3, stride 2, padding 1 on 112x112 gives 56x56.
#[test]
fn max_pool_matches_torchvision_stem() {
    let attrs = MaxPool2dAttrs {
        ceil_mode: false,
        kernel: [3, 3],
        stride: [2, 2],
        padding: [1, 1],
    };
    let out = Op::MaxPool2d(attrs).infer(&[&f(&[1, 64, 112, 112])]).unwrap();
    assert_eq!(out.shape, vec![1, 64, 56, 56]);
}

/// Linear checks its weight's input features and keeps leading dims.
#[test]
fn linear_shapes() {
    let out = Op::Linear
        .infer(&[&f(&[10, 512]), &f(&[1000, 512]), &f(&[1000])])
        .unwrap();
    assert_eq!(out.shape, vec![10, 1000]);
    assert!(Op::Linear.infer(&[&f(&[10, 511]), &f(&[1000, 512])]).is_err());
}

/// Batch-norm parameters must match the channel count; eps must be non-negative.
#[test]
fn batch_norm_checks() {
    let x = f(&[1, 3, 2, 2]);
    let v = f(&[3]);
    let ok = Op::BatchNorm(BatchNormAttrs { eps: 1e-5 });
    assert!(ok.infer(&[&x, &v, &v]).is_ok());
    assert!(ok.infer(&[&x, &v, &f(&[4])]).is_err());
    assert!(ok.infer(&[&x, &v, &v, &v]).is_err());
    let neg = Op::BatchNorm(BatchNormAttrs { eps: -1.0 });
    assert!(neg.infer(&[&x, &v, &v]).is_err());
}
