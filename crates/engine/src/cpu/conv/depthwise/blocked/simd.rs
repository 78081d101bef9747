//! The blocked depthwise conv's SIMD bodies (AVX-512 and AVX2, x86-64
//! only): the sums of a band ([`super::compute`]) and the register
//! transposes of its copies in and out ([`super::pack`], [`super::unpack`]).

use super::{Geometry, Kernel};
use crate::cpu::data::CACHE_LINE_FLOATS;
use crate::cpu::epilogue::vector_activation;
use crate::cpu::prefetch;
use std::arch::x86_64::*;
use std::ops::Range;
use wick_ir::Activation;

/// Values ahead of its loads that the pack prefetches in each of a
/// block's 16 (8) planes: a band is a few KiB of each plane, too short a
/// run for the hardware prefetchers to follow 16 streams far. Intel Xeon
/// VM (AVX-512, 2 threads), per node, A B B A: MobileNetV2 at batch 10
/// 112×112 -> 56×56 0.89×, 56×56 0.94×, 56×56 -> 28×28 0.92×, 28×28 0.95×
/// (the forward 0.977×); at batch 1 its 28×28 convs 0.92-0.94×, the
/// forward 0.982×. 256 values ahead: no better (1.011× against 128).
const PREFETCH_AHEAD: usize = 128;

/// Defines `$name::<T, SW>`: the block's sums `T` output columns at a time,
/// one vector of `$lanes` channels per output position, over every tap.
macro_rules! blocked_body {
    ($name:ident, $feature:literal, $lanes:expr,
     $zero:ident, $load:ident, $store:ident, $set1:ident, $fmadd:ident,
     $add:ident, $mul:ident, $max:ident, $min:ident, $sigmoid:path) => {
        /// # Safety
        /// The CPU has the path's features; `k`'s operands hold the lengths
        /// of its geometry (with `lanes == $lanes`), `out_width` is a
        /// multiple of `T`, and every input position
        /// `(oy·sh + ky·dh, ox·sw + kx·dw)` lies inside the padded block.
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn $name<const T: usize, const SW: usize>(k: Kernel) {
            const LANES: usize = $lanes;
            let g = k.g;
            // A constant column stride where given (its loads' offsets
            // then immediates), the geometry's otherwise.
            let [sh, sw] = [g.stride[0], if SW == 0 { g.stride[1] } else { SW }];
            let [dh, dw] = g.dilation;
            // SAFETY: reads within the padded block and writes within the
            // output block, as the caller's contract states.
            unsafe {
                let (input, weight) = (k.input.as_ptr(), k.weight.as_ptr());
                let output = k.output.as_mut_ptr();
                let bias = $load(k.bias.as_ptr());
                for oy in 0..k.rows {
                    for ox in (0..g.out_width).step_by(T) {
                        let mut acc = [$zero(); T];
                        for ky in 0..g.kernel[0] {
                            let row = input.add(((oy * sh + ky * dh) * g.padded_width + ox * sw) * LANES);
                            let taps = weight.add(ky * g.kernel[1] * LANES);
                            for kx in 0..g.kernel[1] {
                                let w = $load(taps.add(kx * LANES));
                                let at = row.add(kx * dw * LANES);
                                for (t, acc) in acc.iter_mut().enumerate() {
                                    *acc = $fmadd($load(at.add(t * sw * LANES)), w, *acc);
                                }
                            }
                        }
                        let dst = output.add((oy * g.out_width + ox) * LANES);
                        for (t, &acc) in acc.iter().enumerate() {
                            let v = match k.fused {
                                true => {
                                    let v = $add(acc, bias);
                                    vector_activation!(k.activation, v, $set1, $zero, $add, $mul, $max, $min, $sigmoid)
                                }
                                false => acc,
                            };
                            $store(dst.add(t * LANES), v);
                        }
                    }
                }
            }
        }
    };
}

/// Defines `$pack` and `$unpack`, [`super::pack`] and [`super::unpack`] for the whole
/// groups of `$lanes` positions: `$lanes` channels' runs of positions
/// loaded as rows, transposed into one vector per position (and back).
/// Both return how many positions they covered.
macro_rules! transposed_copies {
    ($pack:ident, $unpack:ident, $feature:literal, $vector:ty, $lanes:expr,
     $zero:ident, $load:ident, $store:ident, $transpose:ident) => {
        /// # Safety
        /// The CPU has the path's features; `g.lanes == $lanes`, `count <=
        /// $lanes`, `planes` holds `count` planes `[H, W]`, `span` is a
        /// run of whole input rows, and `padded` holds a band of `g` whose
        /// scratch rows from `r0` on take them. Returns how many of
        /// `span`'s positions it copied (whole groups of `$lanes`).
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn $pack(
            g: &Geometry,
            planes: &[f32],
            count: usize,
            padded: &mut [f32],
            span: Range<usize>,
            r0: usize,
        ) -> usize {
            const LANES: usize = $lanes;
            let [height, width] = g.size;
            let positions = height * width;
            let whole = span.len() / LANES * LANES;
            // SAFETY: rows `c < count` read `LANES` values from `q + LANES
            // <= span.end <= positions` of plane `c`; each position's
            // vector goes to its interior place in the band.
            unsafe {
                let (src, dst) = (planes.as_ptr(), padded.as_mut_ptr());
                let (mut y, mut x) = (r0, 0);
                for q in (span.start..span.start + whole).step_by(LANES) {
                    // A full block loads every row without a check per lane.
                    let rows: [$vector; LANES] = match count == LANES {
                        true => std::array::from_fn(|c| {
                            let at = src.add(c * positions + q);
                            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_AHEAD) as *const i8);
                            $load(at)
                        }),
                        false => std::array::from_fn(|c| match c < count {
                            true => $load(src.add(c * positions + q)),
                            false => $zero(),
                        }),
                    };
                    for v in $transpose(rows) {
                        $store(dst.add(g.at(y, x)), v);
                        x += 1;
                        if x == width {
                            (y, x) = (y + 1, 0);
                        }
                    }
                }
            }
            whole
        }

        /// # Safety
        /// The CPU has the path's features; `g.lanes == $lanes`, `outs`
        /// has at most `$lanes` slices of `len` values, whole output rows
        /// whose sums `sums` holds (a band of `g`). Returns how many of the
        /// `len` positions it copied (whole groups of `$lanes`).
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn $unpack(g: &Geometry, sums: &[f32], outs: &mut [&mut [f32]], len: usize) -> usize {
            const LANES: usize = $lanes;
            let width = g.out[1];
            let whole = len / LANES * LANES;
            // SAFETY: each position's vector is inside the band's sums;
            // slice `c` takes `LANES` values from `q + LANES <= len`.
            unsafe {
                let src = sums.as_ptr();
                // The next line of each plane asked for ahead of its
                // stores (the other thread may hold it: [`prefetch`]).
                let hint = prefetch::available();
                // A full block with rows of whole tiles (7, 14, 28, 56 wide):
                // the positions' sums are consecutive and every lane has a
                // plane, so neither loop branches (the general form's
                // row walk and per-plane checks were most of its time).
                if let (true, Ok(full)) = (
                    g.out_width == width,
                    <&mut [&mut [f32]; LANES]>::try_from(&mut *outs),
                ) {
                    let planes: [*mut f32; LANES] = std::array::from_fn(|c| full[c].as_mut_ptr());
                    for q in (0..whole).step_by(LANES) {
                        if hint && q % CACHE_LINE_FLOATS == 0 && q + CACHE_LINE_FLOATS < len {
                            for plane in &planes {
                                prefetch::write_line(true, plane.wrapping_add(q + CACHE_LINE_FLOATS));
                            }
                        }
                        let columns: [$vector; LANES] = std::array::from_fn(|i| $load(src.add((q + i) * LANES)));
                        for (plane, v) in planes.iter().zip($transpose(columns)) {
                            $store(plane.add(q), v);
                        }
                    }
                    return whole;
                }
                let (mut y, mut x) = (0, 0);
                for q in (0..whole).step_by(LANES) {
                    if hint && q % CACHE_LINE_FLOATS == 0 && q + CACHE_LINE_FLOATS < len {
                        for out in outs.iter() {
                            prefetch::write_line(true, out.as_ptr().wrapping_add(q + CACHE_LINE_FLOATS));
                        }
                    }
                    let columns: [$vector; LANES] = std::array::from_fn(|_| {
                        let v = $load(src.add((y * g.out_width + x) * LANES));
                        x += 1;
                        if x == width {
                            (y, x) = (y + 1, 0);
                        }
                        v
                    });
                    for (out, v) in outs.iter_mut().zip($transpose(columns)) {
                        $store(out.as_mut_ptr().add(q), v);
                    }
                }
            }
            whole
        }
    };
}

#[rustfmt::skip]
blocked_body!(blocked_avx512, "avx512f", 16,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps,
    _mm512_add_ps, _mm512_mul_ps, _mm512_max_ps, _mm512_min_ps,
    crate::cpu::activation::sigmoid_avx512);
#[rustfmt::skip]
blocked_body!(blocked_avx2, "avx2,fma", 8,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps,
    _mm256_add_ps, _mm256_mul_ps, _mm256_max_ps, _mm256_min_ps,
    crate::cpu::activation::sigmoid_avx2);

transposed_copies!(
    pack_avx512,
    unpack_avx512,
    "avx512f",
    __m512,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    transpose16
);
transposed_copies!(
    pack_avx2,
    unpack_avx2,
    "avx2,fma",
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    transpose8
);

/// The 16 × 16 transpose of `r` (row `i` lane `j` -> row `j` lane `i`):
/// pairs of rows interleaved by 32 then 64 bits (4 × 4 blocks
/// transposed within each 128-bit lane), then the 128-bit lanes gathered.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4g + k], 128-bit lane l: column 4l + k of rows 4g..4g + 4.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, k) = (i / 4, i % 4);
        let (a, b) = (
            _mm512_castps_pd(t[4 * g + k / 2]),
            _mm512_castps_pd(t[4 * g + 2 + k / 2]),
        );
        _mm512_castpd_ps(if k % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    let mut out = [_mm512_setzero_ps(); 16];
    for k in 0..4 {
        let lo_a = _mm512_shuffle_f32x4::<0x44>(u[k], u[4 + k]);
        let hi_a = _mm512_shuffle_f32x4::<0xEE>(u[k], u[4 + k]);
        let lo_b = _mm512_shuffle_f32x4::<0x44>(u[8 + k], u[12 + k]);
        let hi_b = _mm512_shuffle_f32x4::<0xEE>(u[8 + k], u[12 + k]);
        out[k] = _mm512_shuffle_f32x4::<0x88>(lo_a, lo_b);
        out[4 + k] = _mm512_shuffle_f32x4::<0xDD>(lo_a, lo_b);
        out[8 + k] = _mm512_shuffle_f32x4::<0x88>(hi_a, hi_b);
        out[12 + k] = _mm512_shuffle_f32x4::<0xDD>(hi_a, hi_b);
    }
    out
}

/// The 8 × 8 transpose of `r`, as [`transpose16`] on AVX2.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    // u[4g + k], 128-bit lane l: column 4l + k of rows 4g..4g + 4.
    let u: [__m256; 8] = std::array::from_fn(|i| {
        let (g, k) = (i / 4, i % 4);
        let (a, b) = (
            _mm256_castps_pd(t[4 * g + k / 2]),
            _mm256_castps_pd(t[4 * g + 2 + k / 2]),
        );
        _mm256_castpd_ps(if k % 2 == 0 {
            _mm256_unpacklo_pd(a, b)
        } else {
            _mm256_unpackhi_pd(a, b)
        })
    });
    std::array::from_fn(|j| {
        let (l, k) = (j / 4, j % 4);
        if l == 0 {
            _mm256_permute2f128_ps::<0x20>(u[k], u[4 + k])
        } else {
            _mm256_permute2f128_ps::<0x31>(u[k], u[4 + k])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::Isa;

    /// Both transposes against the plain one, on every path the CPU has.
    #[test]
    fn transposes() {
        let value = |i: usize, j: usize| (i * 100 + j) as f32;
        for isa in Isa::available() {
            match isa {
                // SAFETY: the path's features are present (`Isa::available`).
                Isa::Avx512 => unsafe {
                    let rows: [__m512; 16] = std::array::from_fn(|i| {
                        let row: [f32; 16] = std::array::from_fn(|j| value(i, j));
                        _mm512_loadu_ps(row.as_ptr())
                    });
                    for (j, v) in transpose16(rows).into_iter().enumerate() {
                        let mut got = [0f32; 16];
                        _mm512_storeu_ps(got.as_mut_ptr(), v);
                        assert_eq!(got, std::array::from_fn(|i| value(i, j)), "avx512 row {j}");
                    }
                },
                // SAFETY: as above.
                Isa::Avx2Fma => unsafe {
                    let rows: [__m256; 8] = std::array::from_fn(|i| {
                        let row: [f32; 8] = std::array::from_fn(|j| value(i, j));
                        _mm256_loadu_ps(row.as_ptr())
                    });
                    for (j, v) in transpose8(rows).into_iter().enumerate() {
                        let mut got = [0f32; 8];
                        _mm256_storeu_ps(got.as_mut_ptr(), v);
                        assert_eq!(got, std::array::from_fn(|i| value(i, j)), "avx2 row {j}");
                    }
                },
                _ => {}
            }
        }
    }
}
