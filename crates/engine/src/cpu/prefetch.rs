//! Write prefetches: asking for a cache line's ownership before a kernel
//! stores into it, so that the store does not wait for it; and read
//! prefetches for loads whose addresses the hardware prefetchers cannot
//! foresee ([`read_span`]).
//!
//! A forward's activations are written by one core and read by the other
//! (the kernels split their work differently: a depthwise conv by channel
//! blocks, the 1×1 conv after it by columns), so the lines a kernel
//! stores into are often held by the other core, and each store waits for
//! that core to give the line up. `prefetchw` starts that exchange a line
//! ahead of the stores, while the kernel still computes. MobileNetV2's
//! expanded depthwise convs at batch 1 on the Intel Xeon VM (2 threads)
//! ran 1.13-1.39× slower per task on two threads than on one, most of
//! that in copying their sums back into the output planes (2.7× the CPU
//! time there on two threads); with the copy's lines prefetched for
//! writing, whole forwards took 0.94× the time (EfficientNet-B0 0.96×),
//! one thread ~0.99×. The plane-wise depthwise segments (the 112×112
//! stage) likewise, the next group of segments' lines: MobileNetV2's
//! features.1 depthwise 0.89×, EfficientNet-B0's 0.95×. (Tried and level:
//! the 1×1 conv's micro-tiles asking for their output lines as they start,
//! ResNet18's Winograd output transforms for theirs.)

use std::sync::OnceLock;

/// Whether this CPU has `prefetchw` (CPUID leaf 0x8000_0001, ECX bit 8:
/// `PRFCHW`, "3dnowprefetch" in `/proc/cpuinfo`); checked once. Where it
/// lacks it, [`write_line`] is never asked to run the instruction.
pub(crate) fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid;
    // Leaf 0x8000_0000 reports the highest extended leaf: 0x8000_0001 is
    // only read where it exists.
    let top = __cpuid(0x8000_0000).eax;
    let ecx = (top >= 0x8000_0001).then(|| __cpuid(0x8000_0001).ecx);
    let has = ecx.is_some_and(|ecx| ecx & (1 << 8) != 0);
    tracing::debug!(top_extended_leaf = top, prefetchw = has, "write prefetch");
    has
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// Asks for ownership of the cache line holding `at`, ahead of a store
/// there, when `on` ([`available`], checked by the caller once per loop).
/// A hint: it never faults and reads or writes nothing, whatever `at` is
/// (a pointer past the buffer's end, formed with wrapping arithmetic,
/// included).
#[inline(always)]
pub(crate) fn write_line(on: bool, at: *const f32) {
    #[cfg(target_arch = "x86_64")]
    if on {
        // SAFETY: `prefetchw` is a hint: it accesses no memory
        // architecturally and never faults; `on` says the CPU has it.
        unsafe { std::arch::asm!("prefetchw [{0}]", in(reg) at, options(nostack, preserves_flags, readonly)) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (on, at);
}

/// Asks for the cache line holding `at` to be brought into the L1 for
/// reading, ahead of a load there. A hint, as [`write_line`]: it never
/// faults and reads or writes nothing, whatever the address (SSE's
/// `prefetcht0`, which every x86-64 CPU has).
#[inline(always)]
pub(crate) fn read_line(at: *const f32) {
    // SAFETY: a prefetch is a hint: it accesses no memory architecturally
    // and never faults.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// [`read_line`] for every cache line holding the `len` values from `at`.
#[inline(always)]
pub(crate) fn read_span(at: *const f32, len: usize) {
    for k in (0..len).step_by(crate::cpu::data::CACHE_LINE_FLOATS) {
        read_line(at.wrapping_add(k));
    }
    // The last value's line, where the steps from an unaligned `at` end before it.
    if let Some(last) = len.checked_sub(1) {
        read_line(at.wrapping_add(last));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hint runs on any address, in or far out of bounds, and changes
    /// no value.
    #[test]
    fn hints_never_fault_or_write() {
        let values = vec![1.5f32; 64];
        let on = available();
        for at in [
            values.as_ptr(),
            values.as_ptr().wrapping_add(64),
            values.as_ptr().wrapping_add(1 << 40),
            std::ptr::null(),
        ] {
            write_line(on, at);
            read_span(at, 40);
        }
        assert!(values.iter().all(|&v| v == 1.5));
    }

    /// Every x86-64 CPU this project has met (AMD Zen 3 and 4, Intel Xeon
    /// Sapphire and Emerald Rapids) has `prefetchw`; where the CPU says
    /// so in `/proc/cpuinfo`, the detection agrees.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn detection_agrees_with_the_kernel() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            panic!("no /proc/cpuinfo on Linux")
        };
        let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or_default();
        let listed = flags.split_whitespace().any(|f| f == "3dnowprefetch");
        assert_eq!(available(), listed, "CPUID and /proc/cpuinfo disagree on prefetchw");
    }
}
