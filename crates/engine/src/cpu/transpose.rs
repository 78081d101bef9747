//! Columns of a row-major block into rows, eight at a time: a kernel that
//! computes `[pixels][channels]` (output channels on the vector lanes)
//! writing the NCHW planes. With AVX2, 8 × 8 blocks go through registers
//! (24 shuffles a block, against a load and a store per value one by one).

use crate::cpu::gemm::Isa;

/// `dst[k][r] = src[r·stride + col + k]` for `k < 8`, `r < dst[k].len()`
/// (the same for all eight): columns `col..col + 8` of `src`'s rows into
/// the eight rows of `dst`. Panics when `src` is short or the rows'
/// lengths differ.
pub(crate) fn columns_to_rows8(isa: Isa, src: &[f32], stride: usize, col: usize, mut dst: [&mut [f32]; 8]) {
    let rows = dst[0].len();
    assert!(dst.iter().all(|d| d.len() == rows), "rows of different lengths");
    if rows == 0 {
        return;
    }
    let reach = (rows - 1)
        .checked_mul(stride)
        .and_then(|n| n.checked_add(col)?.checked_add(8));
    assert!(reach.is_some_and(|n| src.len() >= n), "columns past the source");
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut r = 0;
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Avx2Fma) {
        let out = dst.each_mut().map(|d| d.as_mut_ptr());
        while r + 8 <= rows {
            // SAFETY: rows r..r + 8 of columns col..col + 8 lie within `src`
            // (checked above); each `dst` row holds r + 8 values; both paths
            // have AVX2 (`Isa::available` hands them out only then).
            unsafe { x86::block8(src.as_ptr().add(r * stride + col), stride, out.map(|d| d.add(r))) };
            r += 8;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    for r in r..rows {
        for (k, d) in dst.iter_mut().enumerate() {
            d[r] = src[r * stride + col + k];
        }
    }
}

/// [`columns_to_rows8`] into eight rows of `len` values `dst_stride`
/// apart in `dst` (row `k` at `dst[k·dst_stride..][..len]`): a block of
/// channels' rows in a scratch buffer. Panics when `dst` holds fewer than
/// eight such rows or `len > dst_stride`.
pub(crate) fn columns_to_block8(
    isa: Isa,
    src: &[f32],
    stride: usize,
    col: usize,
    dst: &mut [f32],
    (dst_stride, len): (usize, usize),
) {
    assert!(
        len <= dst_stride && dst.len() >= 8 * dst_stride,
        "block short of eight rows"
    );
    let mut rows = dst.chunks_exact_mut(dst_stride).map(|row| &mut row[..len]);
    let rows = std::array::from_fn(|_| rows.next().unwrap_or_default());
    columns_to_rows8(isa, src, stride, col, rows);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The 8 × 8 block at `src` (rows `stride` apart) transposed: its
    /// column `k` to `dst[k][0..8]`.
    ///
    /// # Safety
    /// AVX2; `src` holds the block's eight rows of eight, each `dst[k]`
    /// eight values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn block8(src: *const f32, stride: usize, dst: [*mut f32; 8]) {
        // SAFETY: the caller upholds this function's contract.
        unsafe {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * stride)));
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let out = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (d, v) in dst.into_iter().zip(out) {
                _mm256_storeu_ps(d, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path puts column `col + k` of the source into row `k`, for
    /// row counts around the 8-row blocks and a stride past the columns.
    #[test]
    fn columns_become_rows() {
        for isa in Isa::available() {
            for rows in [1, 7, 8, 9, 16, 23] {
                let stride = 13;
                let src: Vec<f32> = (0..rows * stride).map(|i| i as f32).collect();
                let mut out = vec![vec![f32::NAN; rows]; 8];
                let [a, b, c, d, e, f, g, h] = &mut out[..] else {
                    unreachable!()
                };
                columns_to_rows8(isa, &src, stride, 3, [a, b, c, d, e, f, g, h]);
                for (k, row) in out.iter().enumerate() {
                    let want: Vec<f32> = (0..rows).map(|r| (r * stride + 3 + k) as f32).collect();
                    assert_eq!(row, &want, "{isa:?} rows {rows} column {k}");
                }
            }
        }
    }
}
