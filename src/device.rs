//! The device a command runs on, as the user asked for it.
use anyhow::{bail, Result};
use tch::Device;

use crate::config::DeviceChoice;

/// Picks the device named by `choice`; `key` is where the user set it
/// (`training.device`, `--device`), named in the error when it cannot be had.
pub fn select_device(choice: DeviceChoice, key: &str) -> Result<Device> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Auto => Device::cuda_if_available(),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
        DeviceChoice::Cuda => bail!("{key} = cuda but no CUDA device is visible (nvidia-smi -L, CUDA_VISIBLE_DEVICES)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_gpu_is_blamed_on_the_setting_that_asked_for_it() {
        if tch::Cuda::is_available() {
            return;
        }
        let e = select_device(DeviceChoice::Cuda, "--device").unwrap_err().to_string();
        assert!(e.starts_with("--device = cuda"), "{e}");
        assert_eq!(select_device(DeviceChoice::Cpu, "--device").unwrap(), Device::Cpu);
    }
}
