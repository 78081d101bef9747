//! The data cache sizes the CPU kernels' blocks are derived from: read
//! from Linux sysfs, a documented fallback where the machine does not
//! say, and the sizes `WICK_CACHES` or [`crate::Engine::with_caches`] give
//! in their place (a VM that reports its socket's cache, or one machine
//! compiling a model as another class of machine would).

use crate::EngineError;
use std::ops::RangeInclusive;
use std::sync::OnceLock;

/// The environment variable that gives cache sizes in place of the
/// detected ones: `l1d=32K,l2=512K,l3=32M`, any of the three keys.
pub const CACHES_ENV: &str = "WICK_CACHES";

/// The L1d sizes wick accepts (4 KiB to 1 MiB).
pub const L1D_RANGE: RangeInclusive<usize> = (4 << 10)..=(1 << 20);
/// The L2 sizes wick accepts (64 KiB to 256 MiB).
pub const L2_RANGE: RangeInclusive<usize> = (64 << 10)..=(256 << 20);
/// The L3 sizes wick accepts besides 0, no L3 (1 MiB to 16 GiB).
pub const L3_RANGE: RangeInclusive<usize> = (1 << 20)..=(16 << 30);

/// Where a [`CacheSizes`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheSource {
    /// Read from Linux sysfs.
    Sysfs,
    /// [`CacheSizes::FALLBACK`]: the machine did not say.
    Fallback,
    /// Given: `WICK_CACHES` (over the detected sizes) or
    /// [`crate::Engine::with_caches`].
    Given,
}

impl CacheSource {
    /// How `bench` and `peak` name it: `sysfs`, `fallback`, `given`.
    pub fn name(self) -> &'static str {
        match self {
            CacheSource::Sysfs => "sysfs",
            CacheSource::Fallback => "fallback",
            CacheSource::Given => "given",
        }
    }
}

impl std::fmt::Display for CacheSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Data cache sizes in bytes, per core (L1d, L2) and per package (L3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSizes {
    /// Level-1 data cache.
    pub l1d: usize,
    /// Level-2 cache.
    pub l2: usize,
    /// Level-3 cache (0 when there is none).
    pub l3: usize,
    /// Where the sizes came from.
    pub source: CacheSource,
}

impl CacheSizes {
    /// What the kernels assume where the machine does not say (no Linux
    /// sysfs, or a size outside its range, [`L1D_RANGE`] ...): 32 KiB L1d,
    /// 512 KiB L2 and 8 MiB L3, the smallest of the x86-64 server cores
    /// seen here (Zen 3: 32 KiB / 512 KiB / 32 MiB), so blocks sized from
    /// them still fit a bigger cache.
    pub const FALLBACK: CacheSizes = CacheSizes {
        l1d: 32 << 10,
        l2: 512 << 10,
        l3: 8 << 20,
        source: CacheSource::Fallback,
    };

    /// Sizes given by the caller ([`CacheSource::Given`]), checked against
    /// [`L1D_RANGE`], [`L2_RANGE`] and [`L3_RANGE`] (or 0 for no L3): a
    /// typed error naming the first one outside.
    pub fn given(l1d: usize, l2: usize, l3: usize) -> Result<CacheSizes, EngineError> {
        let caches = CacheSizes {
            l1d,
            l2,
            l3,
            source: CacheSource::Given,
        };
        caches.check()?;
        Ok(caches)
    }

    /// `Ok` when every size is in its range (any source: the fields are
    /// public); otherwise a typed error naming the first one that is not.
    pub fn check(&self) -> Result<(), EngineError> {
        let outside = |level: &'static str, size: usize, range: &RangeInclusive<usize>| EngineError::InvalidCacheSize {
            level,
            size,
            min: *range.start(),
            max: *range.end(),
        };
        if !L1D_RANGE.contains(&self.l1d) {
            return Err(outside("l1d", self.l1d, &L1D_RANGE));
        }
        if !L2_RANGE.contains(&self.l2) {
            return Err(outside("l2", self.l2, &L2_RANGE));
        }
        if self.l3 != 0 && !L3_RANGE.contains(&self.l3) {
            return Err(outside("l3", self.l3, &L3_RANGE));
        }
        Ok(())
    }

    /// The caches of CPU 0, read once from Linux sysfs
    /// (`/sys/devices/system/cpu/cpu0/cache/index*/{level,type,size}`);
    /// [`CacheSizes::FALLBACK`] where that is missing, unreadable or out
    /// of range.
    pub fn detect() -> CacheSizes {
        static DETECTED: OnceLock<CacheSizes> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let caches = read_sysfs("/sys/devices/system/cpu/cpu0/cache").unwrap_or(CacheSizes::FALLBACK);
            tracing::debug!(
                l1d_kib = caches.l1d >> 10,
                l2_kib = caches.l2 >> 10,
                l3_kib = caches.l3 >> 10,
                source = %caches.source,
                "cpu caches detected"
            );
            caches
        })
    }

    /// The caches an [`crate::Engine`] without
    /// [`crate::Engine::with_caches`] sizes its kernels for: the detected
    /// ones, with the sizes `WICK_CACHES` names in their place when it is
    /// set and not blank (a typed error when it does not parse or a size
    /// is out of range).
    pub fn selected() -> Result<CacheSizes, EngineError> {
        let detected = CacheSizes::detect();
        match std::env::var(CACHES_ENV) {
            Ok(given) if given.trim().is_empty() => Ok(detected),
            Ok(given) => detected.overridden(&given),
            Err(std::env::VarError::NotPresent) => Ok(detected),
            Err(std::env::VarError::NotUnicode(given)) => detected.overridden(&given.to_string_lossy()),
        }
    }

    /// `self` with the sizes `given` names in their place, as `WICK_CACHES`
    /// takes them: comma-separated `key=size` pairs, keys `l1d`, `l2` and
    /// `l3` (each at most once; the others keep `self`'s), sizes in bytes
    /// or with `K`, `M` or `G` (`l3=0`: no L3). Blanks around pairs are
    /// ignored. A typed error names what does not parse or is out of range.
    pub fn overridden(self, given: &str) -> Result<CacheSizes, EngineError> {
        let invalid = |reason: String| EngineError::InvalidCacheSizes {
            given: given.into(),
            reason,
        };
        let mut caches = CacheSizes {
            source: CacheSource::Given,
            ..self
        };
        let mut seen = [false; 3];
        for pair in given.split(',').map(str::trim) {
            let Some((key, size)) = pair.split_once('=') else {
                return Err(invalid(format!("`{pair}` is not key=size")));
            };
            let (key, size) = (key.trim(), size.trim());
            let (index, slot) = match key {
                "l1d" => (0, &mut caches.l1d),
                "l2" => (1, &mut caches.l2),
                "l3" => (2, &mut caches.l3),
                other => return Err(invalid(format!("unknown cache `{other}` (keys: l1d, l2, l3)"))),
            };
            if std::mem::replace(&mut seen[index], true) {
                return Err(invalid(format!("`{key}` given twice")));
            }
            *slot = parse_size(size)
                .ok_or_else(|| invalid(format!("`{size}` is not a size (bytes, or with K, M or G)")))?;
        }
        caches.check()?;
        Ok(caches)
    }
}

/// Reads `index*/` below `dir`; `None` unless L1d and L2 are both found
/// and every size is in its range.
fn read_sysfs(dir: &str) -> Option<CacheSizes> {
    let mut caches = CacheSizes {
        l1d: 0,
        l2: 0,
        l3: 0,
        source: CacheSource::Sysfs,
    };
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size")) else {
            continue;
        };
        let Some(size) = parse_size(size.trim()) else {
            continue;
        };
        match (level.trim(), kind.trim()) {
            ("1", "Data" | "Unified") => caches.l1d = size,
            ("2", "Data" | "Unified") => caches.l2 = size,
            ("3", "Data" | "Unified") => caches.l3 = size,
            _ => {}
        }
    }
    caches.check().is_ok().then_some(caches)
}

/// `32K`, `1024K`, `32M` or a plain byte count, as sysfs writes sizes
/// (and `G`).
fn parse_size(text: &str) -> Option<usize> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let value: usize = digits.parse().ok()?;
    let unit = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    value.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZEN4: CacheSizes = CacheSizes {
        l1d: 32 << 10,
        l2: 1 << 20,
        l3: 32 << 20,
        source: CacheSource::Sysfs,
    };

    /// sysfs sizes in K, M, G or bytes; junk is `None`.
    #[test]
    fn sysfs_sizes() {
        assert_eq!(parse_size("32K"), Some(32 << 10));
        assert_eq!(parse_size("1024K"), Some(1 << 20));
        assert_eq!(parse_size("32M"), Some(32 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("-1K"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
        assert_eq!(parse_size("17179869184G"), None);
    }

    /// A sysfs-like directory is read; one without L2, or with a size out
    /// of range, falls back.
    #[test]
    fn sysfs_directory() {
        let write = |entries: &[(&str, &str, &str)]| {
            let dir = tempfile::tempdir().unwrap();
            for (i, (level, kind, size)) in entries.iter().enumerate() {
                let index = dir.path().join(format!("index{i}"));
                std::fs::create_dir(&index).unwrap();
                std::fs::write(index.join("level"), format!("{level}\n")).unwrap();
                std::fs::write(index.join("type"), format!("{kind}\n")).unwrap();
                std::fs::write(index.join("size"), format!("{size}\n")).unwrap();
            }
            dir
        };
        let dir = write(&[
            ("1", "Data", "48K"),
            ("1", "Instruction", "32K"),
            ("2", "Unified", "2048K"),
            ("3", "Unified", "36M"),
        ]);
        let caches = read_sysfs(dir.path().to_str().unwrap()).unwrap();
        assert_eq!((caches.l1d, caches.l2, caches.l3), (48 << 10, 2 << 20, 36 << 20));
        assert_eq!(caches.source, CacheSource::Sysfs);
        assert!(read_sysfs("/nonexistent").is_none());
        let no_l2 = write(&[("1", "Data", "48K"), ("3", "Unified", "36M")]);
        assert!(read_sysfs(no_l2.path().to_str().unwrap()).is_none());
        let huge_l2 = write(&[("1", "Data", "48K"), ("2", "Unified", "4G")]);
        assert!(read_sysfs(huge_l2.path().to_str().unwrap()).is_none());
    }

    /// `WICK_CACHES`' form replaces the sizes it names and keeps the others.
    #[test]
    fn overrides_replace_what_they_name() {
        let zen3 = ZEN4.overridden("l2=512K").unwrap();
        assert_eq!((zen3.l1d, zen3.l2, zen3.l3), (32 << 10, 512 << 10, 32 << 20));
        assert_eq!(zen3.source, CacheSource::Given);
        let all = ZEN4.overridden(" l1d=48K , l2=2M,l3=0 ").unwrap();
        assert_eq!((all.l1d, all.l2, all.l3), (48 << 10, 2 << 20, 0));
        let bytes = ZEN4.overridden("l3=1073741824").unwrap();
        assert_eq!(bytes.l3, 1 << 30);
    }

    /// Malformed text and sizes out of range are typed errors that say what
    /// was given and what is expected.
    #[test]
    fn bad_overrides_are_named() {
        for (given, expected) in [
            ("", "`` is not key=size"),
            ("l2", "`l2` is not key=size"),
            ("l4=1M", "unknown cache `l4`"),
            ("l2=1M,l2=2M", "`l2` given twice"),
            ("l2=12Q", "`12Q` is not a size"),
            ("l2=", "`` is not a size"),
            ("l2=99999999999999999999G", "is not a size"),
            ("l2=1K", "l2 of 1024 bytes"),
            ("l1d=2M", "l1d of 2097152 bytes"),
            ("l3=512K", "l3 of 524288 bytes"),
            ("l2=1G", "l2 of 1073741824 bytes"),
        ] {
            let err = ZEN4.overridden(given).unwrap_err().to_string();
            assert!(err.contains(expected), "{given}: {err}");
        }
        let err = CacheSizes::given(32 << 10, 1 << 10, 0).unwrap_err().to_string();
        assert!(err.contains("l2 of 1024 bytes") && err.contains("65536"), "{err}");
        assert!(CacheSizes::given(32 << 10, 512 << 10, 0).is_ok());
        assert!(CacheSizes::FALLBACK.check().is_ok());
    }
}
