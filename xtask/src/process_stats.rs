//! Process statistics from `/proc` (Linux): peak resident memory and page faults.

/// Peak resident set size of this process in bytes (`VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Minor page faults of this process so far, if known.
pub fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state ppid pgrp session tty tpgid flags minflt ...
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(7)?.parse().ok()
}

/// The CPU model name, if known.
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split(':').nth(1)?.trim().to_string())
}

#[cfg(test)]
mod tests {
    /// The /proc readers return plausible values on Linux.
    #[test]
    fn reads_proc() {
        assert!(super::peak_rss_bytes().unwrap() > 1024 * 1024);
        let before = super::minor_faults().unwrap();
        let v = vec![1u8; 64 << 20];
        assert!(v.iter().map(|&b| b as u64).sum::<u64>() > 0);
        assert!(super::minor_faults().unwrap() > before);
    }
}
