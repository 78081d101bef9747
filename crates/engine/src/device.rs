//! Device selection from strings such as `cpu`, `cuda` or `cuda:1`.

use crate::EngineError;
use candle_core::Device;
use std::str::FromStr;

/// A parsed device request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// NVIDIA GPU with this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = EngineError;

    fn from_str(given: &str) -> Result<Self, EngineError> {
        let unknown = || EngineError::UnknownDevice {
            given: given.to_string(),
        };
        match given {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => given
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(unknown),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device: a typed error when CUDA is not compiled in or no GPU answers.
    pub fn open(self) -> Result<Device, EngineError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => open_cuda(ordinal, &self.to_string()),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize, given: &str) -> Result<Device, EngineError> {
    // cudarc panics rather than erroring when the driver library is absent; keep
    // that panic from escaping as one.
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    match opened {
        Ok(result) => result.map_err(|source| EngineError::DeviceUnavailable {
            given: given.to_string(),
            source: Box::new(wick_ir::plain_candle_error(source)),
        }),
        Err(_) => Err(EngineError::DeviceUnavailable {
            given: given.to_string(),
            source: Box::new(candle_core::Error::Msg("the CUDA driver could not be loaded".into())),
        }),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize, given: &str) -> Result<Device, EngineError> {
    Err(EngineError::CudaNotCompiled {
        given: given.to_string(),
    })
}

/// Parses and opens a device string in one step.
pub fn parse_device(given: &str) -> Result<Device, EngineError> {
    given.parse::<DeviceSpec>()?.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device strings parse to the right spec; junk is a typed error.
    #[test]
    fn parses_device_strings() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", ""] {
            assert!(
                matches!(bad.parse::<DeviceSpec>(), Err(EngineError::UnknownDevice { .. })),
                "{bad}"
            );
        }
    }

    /// Without the `cuda` feature, asking for CUDA is an error that says how to get it.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = parse_device("cuda").unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }
}
