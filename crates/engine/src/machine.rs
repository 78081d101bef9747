//! The CPU a model is compiled for: which instruction-set path its kernels
//! take ([`CpuPath`]: the best the CPU has, or the one `WICK_ISA` or
//! [`crate::Engine::with_cpu_path`] asks for) and the cache sizes its block
//! sizes are derived from ([`CacheSizes`]), and whether its AVX-512 FMAs
//! run at twice AVX2's rate ([`Machine::wide_fma`]).

use crate::caches::CacheSizes;
use crate::cpu::gemm::{DepthChunks, Isa, PANEL_ROWS, WIDE_TILE};
use crate::cpu::peak;
use crate::EngineError;
use std::str::FromStr;
use std::sync::OnceLock;

/// The environment variable that forces an instruction-set path.
pub const ISA_ENV: &str = "WICK_ISA";

/// The most L3 a kernel counts on per thread before it streams its output
/// ([`Machine::stream_bytes`]): a VM cannot see how many cores share the
/// L3 that sysfs reports. 16 MiB leaves Zen's bound (half its 32 MiB L3,
/// 16 MiB, below this on two threads) where it was; on the Intel Xeon VM
/// (2 threads: 32 MiB where 8 MiB a thread gave 16) MobileNetV2's 32 -> 16
/// on 112×112 at batch 10 (16 MB in, 8 MB out) took 0.64 ms unstreamed
/// against 1.08 streamed, its reader finding the output in cache. Whole
/// forwards at batch 10, profiles of the two builds alternating, medians
/// of three rounds: MobileNetV2 0.96× the time, MobileNetV3-Large 0.97×,
/// EfficientNet-B0 0.985×, ResNet50 0.985×; AVX2 forced MobileNetV2
/// 0.97×. (With no bound at all, a run-time switch: 0.97×, 0.97×, 0.97×
/// and 1.0×.)
const STREAM_BYTES_PER_THREAD: usize = 16 << 20;

/// An instruction-set path of wick's CPU kernels, as a user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuPath {
    /// AVX-512F (x86-64).
    Avx512,
    /// AVX2 and FMA (x86-64).
    Avx2,
    /// Portable Rust, any CPU.
    Scalar,
}

impl CpuPath {
    /// Every path, fastest first.
    pub const ALL: [CpuPath; 3] = [CpuPath::Avx512, CpuPath::Avx2, CpuPath::Scalar];

    /// The name `WICK_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            CpuPath::Avx512 => "avx512",
            CpuPath::Avx2 => "avx2",
            CpuPath::Scalar => "scalar",
        }
    }

    /// The paths this CPU supports, fastest first (scalar always).
    pub fn available() -> Vec<CpuPath> {
        Isa::available().into_iter().map(Isa::path).collect()
    }

    /// The fastest path this CPU supports.
    pub fn best() -> CpuPath {
        Isa::detect().path()
    }

    /// The kernels' path for this request: a typed error when the CPU lacks it.
    pub(crate) fn isa(self) -> Result<Isa, EngineError> {
        Isa::available()
            .into_iter()
            .find(|&isa| isa.path() == self)
            .ok_or_else(|| EngineError::CpuPathUnavailable {
                path: self,
                available: CpuPath::available(),
            })
    }

    /// The path an [`crate::Engine`] without [`crate::Engine::with_cpu_path`]
    /// compiles for: `WICK_ISA`'s when set (a typed error when unknown or
    /// unavailable), the best one otherwise.
    pub fn selected() -> Result<CpuPath, EngineError> {
        let path = CpuPath::from_env()?.unwrap_or_else(CpuPath::best);
        path.isa()?;
        Ok(path)
    }

    /// Measured fp32 FMA peak of this path, in FLOP/s, with `threads`
    /// threads (each on its own chains) for about `duration`: the roofline
    /// the kernels are measured against. A typed error when the CPU lacks
    /// the path.
    pub fn fma_peak(self, threads: usize, duration: std::time::Duration) -> Result<f64, EngineError> {
        let isa = self.isa()?;
        let rate = peak::on_threads(threads, || Some(peak::fma_peak(isa, duration)));
        Ok(rate.unwrap_or(0.0))
    }

    /// Bytes per second `threads` threads read together on this path, each
    /// summing its own buffer of about `bytes` over and over for about
    /// `duration`: the caches' and memory's side of the roofline. A typed
    /// error when the CPU lacks the path or a buffer cannot be allocated.
    pub fn read_rate(self, threads: usize, bytes: usize, duration: std::time::Duration) -> Result<f64, EngineError> {
        let isa = self.isa()?;
        peak::on_threads(threads, || peak::read_rate(isa, bytes, duration))
            .ok_or(EngineError::ProbeAllocation { bytes })
    }

    /// Measured fp32 rate of the panel micro-kernel on this path (the
    /// product under the Winograd, direct and 1×1 convs, without an
    /// epilogue), in FLOP/s, with `threads` threads each multiplying its own
    /// `[rows, depth] × [depth, cols]` operands (`shape`; rows rounded up to
    /// a multiple of 8, columns to 16) over and over for about `duration`:
    /// the kernel's side of the roofline, beside [`Self::fma_peak`]. A
    /// typed error when the CPU lacks the path or the operands cannot be
    /// allocated.
    pub fn panel_rate(
        self,
        threads: usize,
        shape: [usize; 3],
        duration: std::time::Duration,
    ) -> Result<f64, EngineError> {
        let isa = self.isa()?;
        peak::on_threads(threads, || peak::panel_rate(isa, shape, duration)).ok_or_else(|| {
            // What one thread's three operands asked for (saturated: a
            // size past `usize` is what could not be allocated).
            let [rows, depth, cols] = shape.map(|n| n.max(1));
            let floats = rows
                .saturating_mul(depth)
                .saturating_add(depth.saturating_mul(cols))
                .saturating_add(rows.saturating_mul(cols));
            EngineError::ProbeAllocation {
                bytes: floats.saturating_mul(4),
            }
        })
    }

    /// The path `WICK_ISA` asks for, if it is set.
    pub fn from_env() -> Result<Option<CpuPath>, EngineError> {
        parse_env(ISA_ENV)
    }
}

/// `true` for `on`, `false` for `off` (surrounding blanks ignored), `None`
/// for anything else: the engine's on/off switches read this way.
pub(crate) fn on_off(given: &str) -> Option<bool> {
    match given.trim() {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// The value of environment variable `name` parsed as a `T`, if it is
/// set: `T`'s typed error otherwise, also for text that is not Unicode
/// (parsed lossily, so the error shows what was given).
pub(crate) fn parse_env<T: FromStr<Err = EngineError>>(name: &str) -> Result<Option<T>, EngineError> {
    match std::env::var(name) {
        Ok(value) => value.parse().map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(value)) => value.to_string_lossy().parse().map(Some),
    }
}

impl FromStr for CpuPath {
    type Err = EngineError;

    fn from_str(given: &str) -> Result<Self, EngineError> {
        let unknown = || EngineError::UnknownCpuPath { given: given.into() };
        CpuPath::ALL
            .into_iter()
            .find(|path| path.name() == given)
            .ok_or_else(unknown)
    }
}

impl std::fmt::Display for CpuPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the CPU kernels of one compiled model are built for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Machine {
    /// The instruction-set path.
    pub(crate) isa: Isa,
    /// The caches block sizes are derived from.
    pub(crate) caches: CacheSizes,
    /// Whether the path's FMAs do at least [`WIDE_FMA_RATIO`] times the
    /// work of AVX2's per second on one thread: AVX-512 on cores with two
    /// 512-bit FMA units (Intel Xeon), not where each 512-bit op runs as
    /// two halves (AMD Zen 4) or on the AVX2 and scalar paths. Measured
    /// once per process ([`wide_fma`]). Where it holds, compute is cheap
    /// against memory and the conv policy takes fewer packed weights over
    /// fewer multiplies ([`crate::cpu::conv_algorithm`]); where it does
    /// not, the direct conv reads input phases rather than im2col for
    /// convs of few outputs on AVX-512 too (`cpu/conv/direct/phased/`).
    pub(crate) wide_fma: bool,
}

/// Least ratio of the AVX-512 path's FMA rate to AVX2's that counts as
/// wide: two 512-bit units measure about 2 (1.86 on the Intel Xeon VM:
/// 246 against 132 GFLOP/s a thread), one unit or split 512-bit ops about 1.
pub(crate) const WIDE_FMA_RATIO: f64 = 1.5;

/// Whether `isa`'s FMAs are wide ([`Machine::wide_fma`]): only AVX-512 can
/// be; its rate against AVX2's is measured on the first call (a few
/// milliseconds) and kept for the process.
fn wide_fma(isa: Isa) -> bool {
    static RATIO: OnceLock<f64> = OnceLock::new();
    match isa {
        Isa::Avx512 => {
            let ratio = *RATIO.get_or_init(|| {
                // AVX-512 is only handed out with AVX2 and FMA too.
                let ratio = crate::cpu::peak::fma_ratio(Isa::Avx512, Isa::Avx2Fma);
                tracing::debug!(ratio, wide = ratio >= WIDE_FMA_RATIO, "fma rate avx512 / avx2");
                ratio
            });
            ratio >= WIDE_FMA_RATIO
        }
        _ => false,
    }
}

impl Machine {
    /// `path` (or `WICK_ISA`, or the best path) and `caches` (or the
    /// detected ones with `WICK_CACHES`' in their place).
    pub(crate) fn resolve(path: Option<CpuPath>, caches: Option<CacheSizes>) -> Result<Machine, EngineError> {
        let path = match path {
            Some(path) => path,
            None => CpuPath::selected()?,
        };
        let isa = path.isa()?;
        // Checked already: by `Engine::with_caches`, or by `selected`.
        let caches = match caches {
            Some(caches) => caches,
            None => CacheSizes::selected()?,
        };
        let machine = Machine {
            isa,
            caches,
            wide_fma: wide_fma(isa),
        };
        tracing::debug!(
            path = %path,
            l1d_kib = caches.l1d >> 10,
            l2_kib = caches.l2 >> 10,
            l3_kib = caches.l3 >> 10,
            caches = %caches.source,
            "cpu machine"
        );
        Ok(machine)
    }

    /// `isa` (from [`Isa::available`]) and the detected caches (tests).
    #[cfg(test)]
    pub(crate) fn with_isa(isa: Isa) -> Machine {
        Machine {
            isa,
            caches: CacheSizes::detect(),
            wide_fma: wide_fma(isa),
        }
    }

    /// `isa` with FMAs wide or not, on the fallback caches (tests of the
    /// conv policy, which weighs only those two).
    #[cfg(test)]
    pub(crate) fn with_fma(isa: Isa, wide_fma: bool) -> Machine {
        Machine {
            isa,
            caches: CacheSizes::FALLBACK,
            wide_fma,
        }
    }

    /// Scratch bytes one block of a conv aims to fit in: the L2 (each core's own).
    pub(crate) fn block_bytes(&self) -> usize {
        self.caches.l2
    }

    /// How an AVX-512 panel product `depth` deep with `rows` rows, on a
    /// row-major `v` (the direct conv's im2col columns), is cut
    /// ([`DepthChunks`]): whole (`None`) where a wide micro-tile's slice
    /// of `v` (`depth` rows of [`WIDE_TILE`] values) takes at most a third
    /// of the L2; deeper, in chunks whose slice takes half the L1 (evened
    /// out, multiples of 8) and blocks of rows whose chunk of the weights
    /// takes a quarter of the L2. Whole, every 8-row tile reads the slice
    /// from top to bottom between two weight panels streaming through the
    /// L2, and a slice past a third of it no longer stays there: ResNet50's
    /// layer4.0.conv2 at batch 10 (3×3 stride 2, 4608 deep: an 864 KiB
    /// slice in a 2 MiB L2) ran at 35% of the FMA peak, 18.0 ms against
    /// ORT's 8.7 on the Intel Xeon VM, 9.3-9.7 ms in chunks (alone); its
    /// 2304-deep layer3.0.conv2 (a fifth of the L2) level chunked or not,
    /// and its 1024-deep downsample 1.13× slower chunked. (128-deep chunks
    /// against 192: the model at batch 10 1.015× with 192.) Other paths:
    /// `None` (AVX2 cuts its products itself: [`crate::cpu::gemm::chunks_depth`]).
    pub(crate) fn depth_chunks(&self, depth: usize, rows: usize) -> Option<DepthChunks> {
        const F32: usize = std::mem::size_of::<f32>();
        let step = WIDE_TILE * F32;
        if self.isa != Isa::Avx512 || depth.saturating_mul(step) <= self.caches.l2 / 3 {
            return None;
        }
        let most = (self.caches.l1d / 2 / step / PANEL_ROWS).max(1) * PANEL_ROWS;
        let chunk = depth.div_ceil(depth.div_ceil(most)).next_multiple_of(PANEL_ROWS);
        let block = (self.caches.l2 / 4 / (chunk * F32) / PANEL_ROWS).max(1) * PANEL_ROWS;
        Some(DepthChunks {
            depth: chunk,
            rows: block.min(rows.next_multiple_of(PANEL_ROWS)).max(PANEL_ROWS),
        })
    }

    /// Bytes a kernel's operands and output can take with its output still
    /// in cache for the next step: half the L3 (shared with the other
    /// cores, and on AMD a victim cache that holds what the L2s evict),
    /// else the L2. (The whole L3 left MobileNetV3's 16 -> 16 + residual
    /// conv on 112 x 112 planes at batch 10, 24 MB, unstreamed at
    /// 1.0-2.0 ms; with half, streamed, 0.5-0.8 ms alone, 2.0 -> 1.2 ms
    /// in the model on Zen 4.) The batch tiling's bound; the streaming
    /// decision takes [`Self::stream_bytes`], which caps it per thread.
    pub(crate) fn cached_bytes(&self) -> usize {
        match self.caches.l3 {
            0 => self.caches.l2,
            l3 => l3 / 2,
        }
    }

    /// Bytes a kernel's operands and output can take before its output is
    /// written with streaming stores (past the caches): [`Self::cached_bytes`],
    /// at most [`STREAM_BYTES_PER_THREAD`] per thread of the pool. sysfs
    /// gives the size of the L3 a core sits behind, shared with every core
    /// behind it, on a VM with cores it cannot see: 300 MiB (the socket's)
    /// on the 2-vCPU Intel Xeon VM measured here, whose reads slow from L3
    /// to memory speed between 16 and 64 MiB. There half that L3 left
    /// MobileNetV2's 16 -> 96 expansion on 112 x 112 planes at batch 10
    /// (48 MB out) unstreamed at 9.9 ms against 4.0 ms streamed; with a
    /// bound of 8 MiB a thread, at batch 10, MobileNetV2 took 0.80-0.81x
    /// the time, MobileNetV3-Large 0.94-0.96x, EfficientNet-B0 0.94-0.95x,
    /// ResNet50 0.96-0.99x (one model per setting in one process, forwards
    /// alternating, both orders; that expansion now runs inside its
    /// depthwise conv). 16 MiB a thread since (see the constant). Zen's
    /// 32 MiB L3 halves to 16 MiB on two threads, under the bound. The
    /// batch tiling keeps
    /// [`Self::cached_bytes`]: with this bound it tiled ResNet50 at batch
    /// 10 down to layer3, whose F(4x4) convs, their weights streamed once
    /// per group of images, took 1.8x the time.
    pub(crate) fn stream_bytes(&self) -> usize {
        let threads = rayon::current_num_threads().max(1);
        self.cached_bytes().min(STREAM_BYTES_PER_THREAD.saturating_mul(threads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streaming bound is half the L3, at most 16 MiB per pool thread:
    /// a 300 MiB socket L3 seen from two threads counts as 32 MiB, Zen's
    /// 32 MiB L3 keeps its half, a small L3 its half, no L3 the L2.
    #[test]
    fn stream_bytes_per_thread() {
        let on_two = |l3: usize| {
            let machine = Machine {
                isa: Isa::Scalar,
                caches: CacheSizes {
                    l1d: 48 << 10,
                    l2: 2 << 20,
                    l3,
                    source: crate::CacheSource::Sysfs,
                },
                wide_fma: false,
            };
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            (pool.install(|| machine.stream_bytes()), machine.cached_bytes())
        };
        assert_eq!(on_two(300 << 20), (32 << 20, 150 << 20));
        assert_eq!(on_two(32 << 20), (16 << 20, 16 << 20));
        assert_eq!(on_two(8 << 20), (4 << 20, 4 << 20));
        assert_eq!(on_two(0), (2 << 20, 2 << 20));
    }

    /// Deep AVX-512 products are cut where a wide tile's slice of `v`
    /// passes a third of the L2: on the Intel Xeon's caches (48 KiB L1d,
    /// 2 MiB L2) ResNet50's 4608-deep product in chunks of 128 (half the
    /// L1 in 48-column rows) over all 512 rows, its 2304-deep one whole;
    /// on Zen 4's (32 KiB, 1 MiB) the 2304-deep one in 29 even chunks of
    /// 80; 1152 whole on both; AVX2 and scalar products never (AVX2 cuts
    /// its own); tiny caches give chunks of 8 over the rows rounded up to
    /// a panel.
    #[test]
    fn depth_chunks_from_the_caches() {
        let on = |isa: Isa, l1d: usize, l2: usize| Machine {
            isa,
            caches: CacheSizes {
                l1d,
                l2,
                l3: 32 << 20,
                source: crate::CacheSource::Sysfs,
            },
            wide_fma: false,
        };
        let chunks = |depth, rows| Some(DepthChunks { depth, rows });
        let intel = on(Isa::Avx512, 48 << 10, 2 << 20);
        assert_eq!(intel.depth_chunks(4608, 512), chunks(128, 512));
        assert_eq!(intel.depth_chunks(4608, 2000), chunks(128, 1024));
        assert_eq!(intel.depth_chunks(2304, 512), None);
        let zen4 = on(Isa::Avx512, 32 << 10, 1 << 20);
        assert_eq!(zen4.depth_chunks(2304, 256), chunks(80, 256));
        assert_eq!(zen4.depth_chunks(2304, 1020), chunks(80, 816));
        assert_eq!(zen4.depth_chunks(1152, 256), None);
        for isa in [Isa::Avx2Fma, Isa::Scalar] {
            assert_eq!(on(isa, 32 << 10, 512 << 10).depth_chunks(4608, 512), None);
        }
        assert_eq!(on(Isa::Avx512, 4 << 10, 64 << 10).depth_chunks(1000, 20), chunks(8, 24));
        assert_eq!(intel.depth_chunks(usize::MAX, 8), chunks(128, 8));
    }

    /// Path names parse back; unknown names are a typed error naming them.
    #[test]
    fn path_names() {
        for path in CpuPath::ALL {
            assert_eq!(path.name().parse::<CpuPath>().unwrap(), path);
        }
        let err = "sse2".parse::<CpuPath>().unwrap_err();
        assert!(err.to_string().contains("`sse2`") && err.to_string().contains("avx512, avx2, scalar"));
    }

    /// Every path the CPU has resolves; scalar always does; the best is the first.
    #[test]
    fn available_paths_resolve() {
        let available = CpuPath::available();
        assert_eq!(available[0], CpuPath::best());
        assert_eq!(*available.last().unwrap(), CpuPath::Scalar);
        for path in CpuPath::ALL {
            assert_eq!(path.isa().is_ok(), available.contains(&path), "{path}");
        }
    }
}
