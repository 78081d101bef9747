//! A few columns of a panel product: `M = U · V` for `U` packed in 8-row
//! panels ([`super::pack_panels`]) and columns `cols` of a strided `V`,
//! with a panel's 8 rows in one vector. For the columns a whole
//! micro-tile would run past (the last `H·W mod 16` of a 1×1 conv's
//! plane): a micro-tile computes 16 columns whatever the count, so a 7×7
//! plane's last column cost a third of its 48 others. Zen 4, one thread,
//! the last column of a 7×7 plane: 160 x 960 weights 47 us as a tile
//! through scratch, 8.7 us here; 1280 x 320 114 / 26.5 us.
//!
//! Up to four columns run at once (a 14×14 plane has four past its tiles),
//! each load of weights serving all of them; on AVX-512 the 8-wide kernel
//! is compiled with VL for 32 registers, four panels at once. Against one
//! column at a time, the Intel Xeon VM (AVX-512, 2 threads), the 1×1 conv
//! alone, A B B A medians: MobileNetV2's 576 -> 96 on 14×14 at batch 10
//! 0.83×, ResNet50's 1024 -> 256 on 14×14 at batch 1 0.94×, 160 -> 960
//! and 960 -> 160 on 7×7 at batch 10 0.93× and 0.96×, 2048 -> 512 on 7×7
//! at batch 1 0.98× (means of the runs' medians).

use super::{Isa, Strided, PANEL_ROWS};
use std::ops::Range;

/// `m[r·ms + c - cols.start] = Σ_d U[r][d] · v[d][c]` for every row of
/// the `panels` panels of `u` (`panels · depth · 8` values) and each column
/// `c` of `cols`; `m` is `[panels · 8, cols.len()]` with rows `ms` apart
/// (`ms >= cols.len()`; the values between the rows untouched).
#[allow(clippy::too_many_arguments)]
pub(crate) fn panel_columns(
    isa: Isa,
    u: &[f32],
    panels: usize,
    depth: usize,
    v: Strided,
    cols: Range<usize>,
    m: &mut [f32],
    ms: usize,
) {
    let n = cols.len();
    let rows = panels * PANEL_ROWS;
    // Checked: the kernels index within these spans only.
    let v_span = depth
        .checked_sub(1)
        .map_or(Some(0), |d| d.checked_mul(v.stride)?.checked_add(cols.end));
    let m_span = rows
        .checked_sub(1)
        .map_or(Some(0), |r| r.checked_mul(ms)?.checked_add(n));
    assert!(
        ms >= n
            && rows.checked_mul(depth).is_some_and(|len| u.len() >= len)
            && v_span.is_some_and(|span| v.data.len() >= span)
            && m_span.is_some_and(|span| m.len() >= span)
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the spans were checked above; AVX-512F with AVX2 and FMA
        // (`Isa::available`), and VL checked here.
        Isa::Avx512 if std::arch::is_x86_feature_detected!("avx512vl") => unsafe {
            x86::columns_avx512(u, panels, depth, v, cols, m, ms)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the spans were checked above; every SIMD path has AVX2
        // and FMA (`Isa::available` checks them for AVX-512 too).
        Isa::Avx512 | Isa::Avx2Fma => unsafe { x86::columns_avx2(u, panels, depth, v, cols, m, ms) },
        _ => {
            for (k, c) in cols.enumerate() {
                for row in 0..rows {
                    let (panel, r) = (row / PANEL_ROWS, row % PANEL_ROWS);
                    let weights = &u[panel * depth * PANEL_ROWS..][..depth * PANEL_ROWS];
                    m[row * ms + k] = (0..depth)
                        .map(|d| weights[d * PANEL_ROWS + r] * v.data[d * v.stride + c])
                        .sum();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Strided, PANEL_ROWS};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Columns whose sums run at once: each load of a panel's weights
    /// serves this many columns (one column at a time, each panel's weights
    /// passed once per column, one load per multiply-add).
    const COLUMNS: usize = 4;

    /// Defines `$name`, the kernel of [`super::panel_columns`] compiled for
    /// `$feature`, with `$group` panels' sums at once: `COLUMNS · $group`
    /// accumulators, and per depth `$group` loads and `COLUMNS` broadcasts
    /// for as many multiply-adds.
    macro_rules! columns_kernel {
        ($name:ident, $block:ident, $feature:literal, $group:expr) => {
            /// # Safety
            /// The CPU has the features named; `u` has `panels · depth · 8`
            /// values, `v` reaches `(depth - 1) · stride + cols.end`, `m`
            /// has `(panels · 8 - 1) · ms + cols.len()`.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                u: &[f32],
                panels: usize,
                depth: usize,
                v: Strided,
                cols: Range<usize>,
                m: &mut [f32],
                ms: usize,
            ) {
                const GROUP: usize = $group;
                let n = cols.len();
                let mut k = 0;
                while k < n {
                    let count = COLUMNS.min(n - k);
                    let mut panel = 0;
                    while panel < panels {
                        let whole = panels - panel >= GROUP;
                        let at = Block {
                            u,
                            depth,
                            v,
                            column: cols.start + k,
                            m: &mut *m,
                            ms,
                            k,
                            panel,
                        };
                        // SAFETY: `count` columns from `k` and the panels
                        // from `panel` lie inside the spans of the contract.
                        unsafe {
                            match (count, whole) {
                                (4, true) => $block::<4, GROUP>(at),
                                (3, true) => $block::<3, GROUP>(at),
                                (2, true) => $block::<2, GROUP>(at),
                                (1, true) => $block::<1, GROUP>(at),
                                (4, false) => $block::<4, 1>(at),
                                (3, false) => $block::<3, 1>(at),
                                (2, false) => $block::<2, 1>(at),
                                _ => $block::<1, 1>(at),
                            }
                        }
                        panel += if whole { GROUP } else { 1 };
                    }
                    k += count;
                }
            }

            /// The `C × G` block's sums over the whole depth, then stored.
            ///
            /// # Safety
            /// The CPU has the features named; panels `panel..panel + G`
            /// lie inside `u` (`depth · 8` values each), `v` reaches
            /// `(depth - 1) · stride + column + C`, and `m` holds rows
            /// `(panel + G) · 8` of `n` with `k + C <= n`.
            #[target_feature(enable = $feature)]
            unsafe fn $block<const C: usize, const G: usize>(b: Block) {
                let depth = b.depth;
                // SAFETY: within the spans of the contract above.
                unsafe {
                    let first = b.u.as_ptr().add(b.panel * depth * PANEL_ROWS);
                    let x = b.v.data.as_ptr().add(b.column);
                    let mut acc = [[_mm256_setzero_ps(); G]; C];
                    for d in 0..depth {
                        let w: [__m256; G] =
                            std::array::from_fn(|q| _mm256_loadu_ps(first.add((q * depth + d) * PANEL_ROWS)));
                        let row = x.add(d * b.v.stride);
                        for (j, acc) in acc.iter_mut().enumerate() {
                            let s = _mm256_broadcast_ss(&*row.add(j));
                            for (acc, &w) in acc.iter_mut().zip(&w) {
                                *acc = _mm256_fmadd_ps(w, s, *acc);
                            }
                        }
                    }
                    let mp = b.m.as_mut_ptr();
                    for (j, acc) in acc.iter().enumerate() {
                        for (q, &acc) in acc.iter().enumerate() {
                            let mut sums = [0f32; PANEL_ROWS];
                            _mm256_storeu_ps(sums.as_mut_ptr(), acc);
                            for (r, &s) in sums.iter().enumerate() {
                                *mp.add(((b.panel + q) * PANEL_ROWS + r) * b.ms + b.k + j) = s;
                            }
                        }
                    }
                }
            }
        };
    }

    // AVX2's 16 registers: 12 sums, 3 weights, a broadcast.
    columns_kernel!(columns_avx2, block_avx2, "avx2,fma", 3);
    // AVX-512VL's 32 (the same 8-wide vectors): 16 sums, 4 weights.
    columns_kernel!(columns_avx512, block_avx512, "avx2,fma,avx512f,avx512vl", 4);

    /// Where one block of sums goes: columns `column..column + C` of `v`
    /// (output columns `k..k + C` of `m`, rows `ms` apart) by panels
    /// `panel..panel + G`.
    struct Block<'a> {
        u: &'a [f32],
        depth: usize,
        v: Strided<'a>,
        column: usize,
        m: &'a mut [f32],
        ms: usize,
        k: usize,
        panel: usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::pack_panels;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        /// Every path equals a plain f64 product: panel counts off the
        /// group of 4, depths from 0, column ranges inside a strided `v`.
        #[test]
        fn paths_match_plain_product(
            rows in 1usize..60,
            depth in 0usize..70,
            [start, count, pad] in [0usize..20, 1usize..17, 0usize..5],
            m_pad in 0usize..4,
            seed in any::<u64>(),
        ) {
            let mut next = crate::test_util::uniform(seed);
            let panels = rows.div_ceil(PANEL_ROWS);
            let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
            let mut u = vec![0.0; panels * PANEL_ROWS * depth];
            pack_panels(&plain, rows, depth, &mut u);
            let stride = start + count + pad;
            let data: Vec<f32> = (0..depth.max(1) * stride).map(|_| next()).collect();
            let v = Strided { data: &data, stride };
            let cols = start..start + count;
            for isa in Isa::available() {
                // Rows `ms` apart, the gaps between them left as they were.
                let ms = count + m_pad;
                let mut m = vec![f32::NAN; (panels * PANEL_ROWS - 1) * ms + count];
                panel_columns(isa, &u, panels, depth, v, cols.clone(), &mut m, ms);
                for r in 0..panels * PANEL_ROWS {
                    for (k, c) in cols.clone().enumerate() {
                        let want: f64 = match r < rows {
                            true => (0..depth).map(|d| f64::from(plain[r * depth + d]) * f64::from(data[d * stride + c])).sum(),
                            false => 0.0,
                        };
                        let got = f64::from(m[r * ms + k]);
                        prop_assert!((got - want).abs() <= 1e-5 * (depth as f64 + 1.0), "{:?} [{}][{}]: {} vs {}", isa, r, c, got, want);
                    }
                    if r + 1 < panels * PANEL_ROWS {
                        prop_assert!(m[r * ms + count..(r + 1) * ms].iter().all(|x| x.is_nan()), "{:?} wrote a gap", isa);
                    }
                }
            }
        }
    }
}
