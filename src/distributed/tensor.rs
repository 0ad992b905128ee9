//! Checks and raw views of the tensors handed to the host-side backends.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[cfg(not(target_endian = "little"))]
compile_error!("the tcp wire format assumes a little-endian host");

/// The element types the communicators reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    Bf16,
}

impl Elem {
    pub fn of(t: &Tensor, rank: usize) -> Result<Self> {
        match t.kind() {
            Kind::Float => Ok(Elem::F32),
            Kind::BFloat16 => Ok(Elem::Bf16),
            k => bail!("rank {rank}: all_reduce_sum supports f32 and bf16 tensors, got {k:?}"),
        }
    }
}

/// Runs `f` on a contiguous CPU tensor holding `t`'s values, then copies the
/// result back when `t` lives elsewhere (a CUDA tensor goes through the host).
pub fn on_host(t: &mut Tensor, rank: usize, f: impl FnOnce(&mut Tensor) -> Result<()>) -> Result<()> {
    if !t.is_contiguous() {
        bail!("rank {rank}: all_reduce_sum needs a contiguous tensor");
    }
    if t.device() == tch::Device::Cpu {
        return f(t);
    }
    let mut host = t.to_device(tch::Device::Cpu);
    f(&mut host)?;
    t.copy_(&host);
    Ok(())
}

/// The f32 elements of a contiguous CPU f32 tensor.
///
/// # Safety
/// The caller must not create another view of `t`'s storage while the slice lives.
pub unsafe fn f32_slice(t: &mut Tensor) -> &mut [f32] {
    debug_assert!(t.kind() == Kind::Float && t.is_contiguous() && t.device() == tch::Device::Cpu);
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n)
}

pub use mlm_kernels::bf16::{from_f32 as f32_to_bf16, to_f32 as bf16_to_f32};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_libtorch() {
        let xs: Vec<f32> = vec![0.0, -0.0, 1.0, 1.003_906_2, 1.011_718_8, 3.25, -2.75, 1e30, -1e-30, 65504.0, 1.0e-40];
        let t = Tensor::from_slice(&xs).to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let want: Vec<f32> = Vec::<f32>::try_from(&t).unwrap();
        for (x, w) in xs.iter().zip(want) {
            assert_eq!(bf16_to_f32(f32_to_bf16(*x)).to_bits(), w.to_bits(), "{x}");
        }
    }
}
