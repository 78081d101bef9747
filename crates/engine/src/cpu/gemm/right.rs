//! The right operand `V` `[depth, cols]` of a panel product: row-major
//! with its rows a stride apart (an NCHW plane read in place), or packed
//! by [`pack_tiles`] into the micro-tiles' column slices (`depth` rows of
//! a tile's width each, 48 columns on AVX-512, 16 on AVX2), so that a
//! tile reads one contiguous run instead of `depth` rows a plane apart
//! (too many streams for the hardware prefetchers, and on planes of 14×14
//! or 7×7 pixels most vector loads split across two cache lines).

use super::{Isa, Strided, PANEL_GRANULE, PANEL_TILES, WIDE_TILE};
use crate::cpu::parallel::for_each;

/// The columns of one packed slice on `isa`'s path: its micro-tile's width.
pub(crate) fn tile_width(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => WIDE_TILE,
        _ => PANEL_GRANULE,
    }
}

/// Where a panel product's right operand `V` `[depth, cols]` lies.
#[derive(Clone, Copy)]
pub(crate) enum Right<'a> {
    /// Row-major, rows `stride` apart.
    Rows(Strided<'a>),
    /// Packed by [`pack_tiles`] in slices `width` columns wide.
    Tiles { data: &'a [f32], width: usize },
}

impl<'a> From<Strided<'a>> for Right<'a> {
    fn from(v: Strided<'a>) -> Self {
        Right::Rows(v)
    }
}

impl<'a> Right<'a> {
    /// The values, and how a `[depth, cols]` operand lies in them.
    pub(super) fn parts(self, depth: usize, cols: usize) -> (&'a [f32], RightLayout) {
        match self {
            Right::Rows(v) => (
                v.data,
                RightLayout {
                    stride: v.stride,
                    tiled: false,
                    depth,
                    cols,
                    pack: std::ptr::null_mut(),
                },
            ),
            Right::Tiles { data, width } => (
                data,
                RightLayout {
                    stride: width,
                    tiled: true,
                    depth,
                    cols,
                    pack: std::ptr::null_mut(),
                },
            ),
        }
    }

    /// Whether the values hold a `[depth, cols]` operand for `isa`'s
    /// product: `(depth - 1)·stride + cols` values row-major (with `stride
    /// >= cols`), `depth·cols` packed in slices of `isa`'s tile width.
    pub(super) fn holds(self, isa: Isa, depth: usize, cols: usize) -> bool {
        let needed = match self {
            Right::Rows(v) if v.stride < cols => None,
            Right::Tiles { width, .. } if width != tile_width(isa) => None,
            Right::Rows(v) => match depth {
                0 => Some(0),
                d => (d - 1).checked_mul(v.stride).and_then(|n| n.checked_add(cols)),
            },
            Right::Tiles { .. } => depth.checked_mul(cols),
        };
        let len = self.parts(depth, cols).0.len();
        needed.is_some_and(|n| len >= n)
    }
}

/// How a `[depth, cols]` right operand lies in its values (see [`Right`]).
#[derive(Clone, Copy)]
pub(super) struct RightLayout {
    /// The row stride of a row-major operand, the slices' width of a
    /// packed one.
    stride: usize,
    /// Whether the operand is packed.
    tiled: bool,
    depth: usize,
    cols: usize,
    /// Where the product copies a row-major operand's column slices as it
    /// reads them (one slice at a time), or null.
    pack: *mut f32,
}

impl RightLayout {
    /// For a micro-tile starting at column `col` (a multiple of its width
    /// below `cols`): the offset of `V[0][col]` and the distance between
    /// the tile's rows (a packed slice's width: on AVX-512 the last one
    /// is 16 or 32 wide where the columns are not whole slices of 48).
    #[inline]
    pub(super) fn at(self, col: usize) -> (usize, usize) {
        match self.tiled {
            // A packed operand's width is its path's tile width (checked
            // by `Right::holds`), never 0.
            true => {
                let (width, slice) = (self.stride, col / self.stride * self.stride);
                (slice * self.depth + col - slice, width.min(self.cols - slice))
            }
            false => (col, self.stride),
        }
    }

    /// This row-major layout, its slices copied into `pack` as the product
    /// reads them ([`super::panel_gemm_shared_packing`]).
    pub(super) fn packing_into(self, pack: *mut f32) -> Self {
        debug_assert!(!self.tiled, "a packed operand packed again");
        RightLayout { pack, ..self }
    }

    /// Where the product copies the operand's slices as it reads them
    /// (null: it does not).
    #[inline]
    pub(super) fn pack(self) -> *mut f32 {
        self.pack
    }

    /// Whether the operand is row-major (its rows far apart, worth
    /// prefetching ahead), not packed.
    #[inline]
    pub(super) fn row_major(self) -> bool {
        !self.tiled
    }
}

/// Packs `v` (`size` = `[depth, cols]`, rows `v.stride` apart, `cols` a
/// multiple of [`PANEL_GRANULE`]) for `isa`'s product into `tiles` (`depth·cols`
/// values): slice `s` of `w` = [`tile_width`] columns (on AVX-512 the
/// last, where the columns are not whole slices, 16 or 32) holds `depth`
/// rows of its columns,
/// one after the other, from `tiles[w·s·depth]` on; with a `scale` (one
/// factor per row of `v`: a squeeze-and-excitation's per channel), row
/// `d` multiplied by `scale[d]` on its way (the product then reads the
/// scaled operand without another copy of it).
///
/// # Panics
/// If `cols` is not a multiple of the granule or the buffers are too short
/// (the callers size them from the same shape), or `scale` has fewer than
/// `depth` factors.
pub(crate) fn pack_tiles<'a>(isa: Isa, v: Strided, size: [usize; 2], tiles: &'a mut [f32], scale: Scale) -> Right<'a> {
    pack(isa, v, size, tiles, scale, false)
}

/// An optional factor per row of a packed operand ([`pack_tiles`]).
pub(crate) type Scale<'a> = Option<&'a [f32]>;

/// [`pack_tiles`] with its slices spread over rayon's threads: for an
/// operand that several tasks read (a 1×1 conv's input, which each of its
/// runs of output channels would otherwise pack for itself), packed once
/// before they start.
///
/// # Panics
/// As [`pack_tiles`].
pub(crate) fn pack_tiles_parallel<'a>(
    isa: Isa,
    v: Strided,
    size: [usize; 2],
    tiles: &'a mut [f32],
    scale: Scale,
) -> Right<'a> {
    pack(isa, v, size, tiles, scale, true)
}

/// [`pack_tiles`], its slices one after the other or (`parallel`) spread
/// over rayon's threads.
fn pack<'a>(
    isa: Isa,
    v: Strided,
    [depth, cols]: [usize; 2],
    tiles: &'a mut [f32],
    scale: Scale,
    parallel: bool,
) -> Right<'a> {
    assert!(cols.is_multiple_of(PANEL_GRANULE) && Right::Rows(v).holds(isa, depth, cols));
    assert!(
        scale.is_none_or(|s| s.len() >= depth),
        "a scale of fewer than {depth} factors"
    );
    let width = tile_width(isa);
    let tiles = &mut tiles[..depth * cols];
    if depth > 0 {
        let slice = |(k, slice): (usize, &mut [f32])| pack_slice(v, depth, k * width, slice, scale);
        match parallel {
            true => for_each(tiles.chunks_mut(depth * width).enumerate(), slice),
            false => tiles.chunks_mut(depth * width).enumerate().for_each(slice),
        }
    }
    Right::Tiles { data: tiles, width }
}

/// One slice of [`pack_tiles`] (`depth` > 0 rows): `v`'s columns from
/// `first` on, as many per row as `slice` holds (a whole tile or, last,
/// one or two granules), each row times its factor if scaled.
fn pack_slice(v: Strided, depth: usize, first: usize, slice: &mut [f32], scale: Scale) {
    let from = &v.data[first..];
    match slice.len() / depth {
        WIDE_TILE => copy_rows::<WIDE_TILE>(from, v.stride, slice, scale),
        PANEL_TILES => copy_rows::<PANEL_TILES>(from, v.stride, slice, scale),
        _ => copy_rows::<PANEL_GRANULE>(from, v.stride, slice, scale),
    }
}

/// `to`'s rows of `W` values from `from`'s, `stride` apart (a width known
/// at compile time: vector moves rather than a `memcpy` call per row),
/// row `d` times `scale[d]` if scaled.
fn copy_rows<const W: usize>(from: &[f32], stride: usize, to: &mut [f32], scale: Scale) {
    match scale {
        None => {
            for (d, to) in to.chunks_exact_mut(W).enumerate() {
                to.copy_from_slice(&from[d * stride..][..W]);
            }
        }
        Some(scale) => scale_rows(from, stride, W, to, scale),
    }
}

/// `to`'s rows of `width` values (as many as `to` and `scale` hold):
/// `from`'s rows, `stride` apart, row `d` times `scale[d]` (the same f32
/// products as an unfused per-channel `mul`). A 1×1 conv's input planes
/// scaled whole (`width` = `stride` = the plane), a few of their columns,
/// or a tile's slice of them.
#[inline]
pub(crate) fn scale_rows(from: &[f32], stride: usize, width: usize, to: &mut [f32], scale: &[f32]) {
    for ((d, to), &s) in to.chunks_exact_mut(width.max(1)).enumerate().zip(scale) {
        for (to, &x) in to.iter_mut().zip(&from[d * stride..][..width]) {
            *to = x * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::{pack_panels, panel_gemm_strided, Isa, PANEL_ROWS};

    /// Every value lands where [`RightLayout::at`] says its tile reads it,
    /// for 16-, 32- and odd-granule widths, on every path's slices, and
    /// only there (every value of the packed buffer written once); packed
    /// in parallel, the same buffer; scaled, each row times its factor.
    #[test]
    fn tiles_lie_where_the_layout_says() {
        for (depth, cols, stride) in [(3, 16, 16), (5, 32, 40), (4, 80, 83), (1, 48, 48), (2, 112, 115)] {
            let v: Vec<f32> = (0..(depth - 1) * stride + cols).map(|i| i as f32).collect();
            for isa in [Isa::Avx512, Isa::Avx2Fma, Isa::Scalar] {
                let mut tiles = vec![f32::NAN; depth * cols];
                let (_, layout) =
                    pack_tiles(isa, Strided { data: &v, stride }, [depth, cols], &mut tiles, None).parts(depth, cols);
                let mut seen = vec![0; depth * cols];
                let width = tile_width(isa);
                for col in (0..cols).step_by(width) {
                    let (at, row) = layout.at(col);
                    for d in 0..depth {
                        for j in 0..width.min(cols - col) {
                            assert_eq!(
                                tiles[at + d * row + j],
                                v[d * stride + col + j],
                                "{isa:?} {depth}x{cols} d={d} c={}",
                                col + j
                            );
                            seen[at + d * row + j] += 1;
                        }
                    }
                }
                assert!(seen.iter().all(|&n| n == 1), "{isa:?} {depth}x{cols}");
                // Packed in parallel: the same buffer, value for value.
                let mut parallel = vec![f32::NAN; depth * cols];
                let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
                pool.install(|| {
                    pack_tiles_parallel(isa, Strided { data: &v, stride }, [depth, cols], &mut parallel, None)
                });
                assert_eq!(parallel, tiles, "{isa:?} {depth}x{cols} in parallel");
                // Scaled, one after the other and in parallel: row d times
                // its factor, where the unscaled copy put it (`v[k] = k`,
                // so a value's row is `k / stride`).
                let scale: Vec<f32> = (0..depth).map(|d| 0.5 + d as f32).collect();
                let want: Vec<f32> = tiles.iter().map(|&k| k * scale[k as usize / stride]).collect();
                let mut scaled = vec![f32::NAN; depth * cols];
                pack_tiles(
                    isa,
                    Strided { data: &v, stride },
                    [depth, cols],
                    &mut scaled,
                    Some(&scale),
                );
                assert_eq!(scaled, want, "{isa:?} {depth}x{cols} scaled");
                let mut scaled_parallel = vec![f32::NAN; depth * cols];
                pool.install(|| {
                    let v = Strided { data: &v, stride };
                    pack_tiles_parallel(isa, v, [depth, cols], &mut scaled_parallel, Some(&scale))
                });
                assert_eq!(scaled_parallel, want, "{isa:?} {depth}x{cols} scaled in parallel");
            }
        }
    }

    /// A product on packed tiles writes the same values, bit for bit, as
    /// on the row-major operand (the same sums in the same order), on every
    /// path: a 16-column last slice, and depths past the AVX2 path's chunk.
    #[test]
    fn tiles_give_the_row_major_product() {
        for (depth, cols) in [(7, 16), (64, 48), (300, 96), (700, 80)] {
            let rows = 3 * PANEL_ROWS;
            let stride = cols + 5;
            let mut next = crate::test_util::uniform(depth as u64);
            let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
            let v: Vec<f32> = (0..(depth - 1) * stride + cols).map(|_| next()).collect();
            let mut packed = vec![0f32; rows * depth];
            pack_panels(&plain, rows, depth, &mut packed);
            let v = Strided { data: &v, stride };
            for isa in Isa::available() {
                let mut tiles = vec![0f32; depth * cols];
                let tiles = pack_tiles(isa, v, [depth, cols], &mut tiles, None);
                let product = |right: Right| {
                    let mut m = vec![0f32; rows * cols];
                    panel_gemm_strided(isa, &packed, right, &mut m, cols, [rows, depth, cols], None);
                    m
                };
                let (want, got) = (product(v.into()), product(tiles));
                assert!(
                    want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} {depth}x{cols}"
                );
            }
        }
    }

    /// A product without columns runs on every path whatever its
    /// operand's layout, a row-major one of stride 0 included (no slice
    /// width to divide by), and writes nothing.
    #[test]
    fn products_without_columns_run() {
        let (rows, depth) = (2 * PANEL_ROWS, 5);
        let packed = vec![1f32; rows * depth];
        for isa in Isa::available() {
            let mut m: Vec<f32> = Vec::new();
            let rows_major = Right::Rows(Strided { data: &[], stride: 0 });
            let tiles = Right::Tiles {
                data: &[],
                width: tile_width(isa),
            };
            for right in [rows_major, tiles] {
                panel_gemm_strided(isa, &packed, right, &mut m, 0, [rows, depth, 0], None);
            }
        }
    }

    /// Short buffers, strides below the width and slices of another
    /// path's width are refused.
    #[test]
    fn holds_checks_the_span() {
        let data = [0f32; 64];
        let (avx2, avx512) = (Isa::Avx2Fma, Isa::Avx512);
        let tiles = |width| Right::Tiles { data: &data, width };
        assert!(tiles(16).holds(avx2, 4, 16) && !tiles(16).holds(avx2, 5, 16));
        assert!(tiles(48).holds(avx512, 1, 48) && !tiles(48).holds(avx512, 2, 48));
        assert!(!tiles(32).holds(avx512, 2, 32) && !tiles(16).holds(avx512, 2, 32) && !tiles(32).holds(avx2, 2, 32));
        assert!(!tiles(16).holds(avx2, usize::MAX, 16));
        let rows = |stride| Right::Rows(Strided { data: &data, stride });
        assert!(rows(16).holds(avx2, 4, 16) && rows(24).holds(avx2, 2, 16));
        assert!(!rows(24).holds(avx2, 3, 32) && !rows(8).holds(avx2, 1, 16));
        assert!(!rows(usize::MAX).holds(avx2, 3, 16) && rows(usize::MAX).holds(avx2, 1, 16));
    }
}
