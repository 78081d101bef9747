//! The stem conv's micro-tile ([`super::stem`]): a few output pixels of
//! one convolution row × one block of output channels on the vector lanes,
//! each step broadcasting one input value per pixel (read in place from the
//! zero-padded rows, at any column stride) against the block's weight
//! vectors for one tap, `P · V` accumulators in registers across the whole
//! depth: AVX-512 6 pixels × 4 vectors (64 channels, 24 accumulators, 10
//! loads per 24 FMAs), AVX2 6 × 2 (16 channels, 12 accumulators).

use crate::cpu::gemm::Isa;

/// Most pixels a tile computes.
pub(crate) const MAX_PIXELS: usize = 6;

/// Output channels a tile computes on `isa`'s path (one block of the
/// packed weights).
pub(crate) fn block(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 64,
        Isa::Avx2Fma | Isa::Scalar => 16,
    }
}

/// Where a tile's input lies: `channels` planes `plane` values apart, each
/// `kh` rows of `cols` values from the tile's first row, `kw` taps a row;
/// the tile's pixels `step` values apart.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) channels: usize,
    pub(crate) plane: usize,
    pub(crate) cols: usize,
    pub(crate) kernel: [usize; 2],
    pub(crate) step: usize,
}

impl Window {
    /// The depth of the product: `channels · kh · kw`.
    pub(crate) fn depth(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// One past the furthest value `pixels` pixels read from their first,
    /// if it fits `usize`.
    fn reach(&self, pixels: usize) -> Option<usize> {
        let [kh, kw] = self.kernel;
        self.channels
            .checked_sub(1)?
            .checked_mul(self.plane)?
            .checked_add(kh.checked_sub(1)?.checked_mul(self.cols)?)?
            .checked_add(pixels.checked_sub(1)?.checked_mul(self.step)?)?
            .checked_add(kw)
    }
}

/// `out[x·stride + l] = Σ_d w[d·block + l] · data[at(x, d)]` for the
/// `pixels` pixels of a convolution row (`x < pixels`, `l < block(isa)`),
/// in tiles of at most [`MAX_PIXELS`] of equal width: `w` one block's
/// weights (`[depth][block]`), `data` from the row's first value, `at(x,
/// (c, ky, kx)) = c·plane + ky·cols + x·step + kx`. Panics when an
/// operand is short or the window is out of shape (checked arithmetic).
pub(crate) fn stem_row(isa: Isa, w: &[f32], data: &[f32], g: Window, pixels: usize, out: &mut [f32], stride: usize) {
    let block = block(isa);
    assert!((1..=2).contains(&g.step), "stem tile step {}", g.step);
    if pixels == 0 {
        return;
    }
    assert!(
        g.depth().checked_mul(block).is_some_and(|n| w.len() >= n),
        "stem weights short"
    );
    assert!(
        g.reach(pixels).is_some_and(|n| data.len() >= n),
        "stem row past its input"
    );
    let span = (pixels - 1).checked_mul(stride).and_then(|n| n.checked_add(block));
    assert!(
        span.is_some_and(|n| out.len() >= n) && stride >= block,
        "stem row past its output"
    );
    let count = pixels.div_ceil(MAX_PIXELS);
    let mut x = 0;
    for t in 0..count {
        let width = (pixels - x).div_ceil(count - t);
        let (data, out) = (&data[x * g.step..], &mut out[x * stride..]);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the tile's reads and writes lie within the row's
            // (checked above); `Isa::Avx512` is only handed out with AVX-512F.
            Isa::Avx512 => unsafe {
                x86::avx512_dispatch(w.as_ptr(), data.as_ptr(), g, width, out.as_mut_ptr(), stride)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX2 + FMA.
            Isa::Avx2Fma => unsafe {
                x86::avx2_dispatch(w.as_ptr(), data.as_ptr(), g, width, out.as_mut_ptr(), stride)
            },
            _ => scalar(w, data, g, width, out, stride, block),
        }
        x += width;
    }
}

/// The portable tile, the same sums in the same order.
fn scalar(w: &[f32], data: &[f32], g: Window, pixels: usize, out: &mut [f32], stride: usize, block: usize) {
    let [kh, kw] = g.kernel;
    for i in 0..pixels {
        let acc = &mut out[i * stride..][..block];
        acc.fill(0.0);
        let mut d = 0;
        for c in 0..g.channels {
            for ky in 0..kh {
                let row = &data[c * g.plane + ky * g.cols + i * g.step..];
                for &value in &row[..kw] {
                    for (acc, &w) in acc.iter_mut().zip(&w[d * block..][..block]) {
                        *acc += value * w;
                    }
                    d += 1;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Window;
    use std::arch::x86_64::*;

    /// Defines `$name::<P, S>` (`P` pixels `S` values apart, `$v` vectors
    /// of `$lanes` lanes) and `$dispatch`, which picks it for a tile.
    macro_rules! stem_tile {
        ($name:ident, $dispatch:ident, $feature:literal, $v:literal, $lanes:literal, $zero:ident, $load:ident,
         $splat:ident, $fmadd:ident, $store:ident) => {
            /// # Safety
            /// The path's features; `w` holds the window's depth × the
            /// block, `data` the window's reach from the first pixel, `out`
            /// `pixels` rows of the block `stride` apart.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $dispatch(
                w: *const f32,
                data: *const f32,
                g: Window,
                pixels: usize,
                out: *mut f32,
                stride: usize,
            ) {
                // SAFETY: the caller upholds this function's contract.
                unsafe {
                    match (pixels, g.step) {
                        (1, 1) => $name::<1, 1>(w, data, g, out, stride),
                        (2, 1) => $name::<2, 1>(w, data, g, out, stride),
                        (3, 1) => $name::<3, 1>(w, data, g, out, stride),
                        (4, 1) => $name::<4, 1>(w, data, g, out, stride),
                        (5, 1) => $name::<5, 1>(w, data, g, out, stride),
                        (6, 1) => $name::<6, 1>(w, data, g, out, stride),
                        (1, 2) => $name::<1, 2>(w, data, g, out, stride),
                        (2, 2) => $name::<2, 2>(w, data, g, out, stride),
                        (3, 2) => $name::<3, 2>(w, data, g, out, stride),
                        (4, 2) => $name::<4, 2>(w, data, g, out, stride),
                        (5, 2) => $name::<5, 2>(w, data, g, out, stride),
                        (6, 2) => $name::<6, 2>(w, data, g, out, stride),
                        _ => unreachable!("stem tile of {pixels} pixels, step {}", g.step),
                    }
                }
            }

            /// # Safety
            /// As `$dispatch`, for `P` pixels `S` apart.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn $name<const P: usize, const S: usize>(
                w: *const f32,
                data: *const f32,
                g: Window,
                out: *mut f32,
                stride: usize,
            ) {
                let [kh, kw] = g.kernel;
                // SAFETY: the caller upholds this function's contract:
                // every read is `c·plane + ky·cols + i·S + kx` from `data`
                // and `d·block + v·lanes` from `w`.
                unsafe {
                    let mut acc = [[$zero(); $v]; P];
                    let mut wp = w;
                    for c in 0..g.channels {
                        for ky in 0..kh {
                            let row = data.add(c * g.plane + ky * g.cols);
                            for kx in 0..kw {
                                let mut wv = [$zero(); $v];
                                for (v, wv) in wv.iter_mut().enumerate() {
                                    *wv = $load(wp.add(v * $lanes));
                                }
                                for (i, acc) in acc.iter_mut().enumerate() {
                                    let a = $splat(*row.add(i * S + kx));
                                    for (acc, &wv) in acc.iter_mut().zip(&wv) {
                                        *acc = $fmadd(a, wv, *acc);
                                    }
                                }
                                wp = wp.add($v * $lanes);
                            }
                        }
                    }
                    for (i, acc) in acc.iter().enumerate() {
                        for (v, &acc) in acc.iter().enumerate() {
                            $store(out.add(i * stride + v * $lanes), acc);
                        }
                    }
                }
            }
        };
    }

    #[rustfmt::skip]
    stem_tile!(avx512, avx512_dispatch, "avx512f", 4, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps,
        _mm512_fmadd_ps, _mm512_storeu_ps);
    #[rustfmt::skip]
    stem_tile!(avx2, avx2_dispatch, "avx2,fma", 2, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps,
        _mm256_fmadd_ps, _mm256_storeu_ps);
}
