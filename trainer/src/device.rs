//! Where a worker computes: the CPU, with Gloo collectives, or a CUDA GPU
//! per rank, with NCCL collectives (or Gloo through host memory, where ranks
//! share GPUs: NCCL wants a GPU of its own for every rank).
//!
//! Everything else is the same code on both: tensors follow the model's
//! device, and the collectives take tensors on the process group's device.
//! A GPU run needs the trainer built against the full CUDA libtorch
//! (`WEFT_TORCH_FULL=1 scripts/setup`), which brings NCCL; asking a CPU-only
//! build for CUDA is an error that says so, before any rank meets another.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::comm::{CommError, ProcessGroup, Store, nccl_built};
use crate::model::Precision;

/// Why a device cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?} is not one of auto, cpu, cuda")]
    Unknown(String),
    #[error(
        "--device cuda: this weft-trainer was built for CPU only (its libtorch is the CPU set, without NCCL); on a GPU machine run `WEFT_TORCH_FULL=1 scripts/setup` and build again"
    )]
    NotBuilt,
    #[error("--device cuda: libtorch sees no CUDA device on this machine")]
    NoGpu,
    #[error("collectives {0:?} are not one of auto, gloo, nccl")]
    UnknownCollectives(String),
    #[error("--collectives nccl needs --device cuda: NCCL moves GPU memory only")]
    NcclOnCpu,
}

impl DeviceError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            DeviceError::Unknown(_)
            | DeviceError::UnknownCollectives(_)
            | DeviceError::NcclOnCpu => "device_input",
            DeviceError::NotBuilt | DeviceError::NoGpu => "device_unavailable",
        }
    }
}

/// The kind of device every rank of a run computes on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDevice {
    #[default]
    Cpu,
    /// One GPU per rank: the rank's local index among the ranks of its
    /// machine (or pod), modulo the GPUs libtorch sees.
    Cuda,
}

impl ComputeDevice {
    /// `cpu` or `cuda`.
    pub fn parse(text: &str) -> Result<ComputeDevice, DeviceError> {
        match text {
            "cpu" => Ok(ComputeDevice::Cpu),
            "cuda" => Ok(ComputeDevice::Cuda),
            other => Err(DeviceError::Unknown(other.to_string())),
        }
    }

    /// `auto`: CUDA where this build can run on a GPU that libtorch sees,
    /// else the CPU; or `cpu`, `cuda` as [`ComputeDevice::parse`].
    pub fn choose(text: &str) -> Result<ComputeDevice, DeviceError> {
        if text == "auto" {
            let gpu = ComputeDevice::Cuda.check().is_ok();
            return Ok(if gpu {
                ComputeDevice::Cuda
            } else {
                ComputeDevice::Cpu
            });
        }
        ComputeDevice::parse(text)
    }

    pub fn name(self) -> &'static str {
        match self {
            ComputeDevice::Cpu => "cpu",
            ComputeDevice::Cuda => "cuda",
        }
    }

    /// The number format a run takes unless told otherwise: fp32 on CPU
    /// (where bf16 products are slower, not faster), bf16 mixed precision on
    /// GPUs (their tensor cores' format).
    pub fn default_precision(self) -> Precision {
        match self {
            ComputeDevice::Cpu => Precision::Fp32,
            ComputeDevice::Cuda => Precision::Bf16,
        }
    }

    /// Checks that this build and machine can run on the device at all.
    pub fn check(self) -> Result<(), DeviceError> {
        match self {
            ComputeDevice::Cpu => Ok(()),
            ComputeDevice::Cuda if !nccl_built() => Err(DeviceError::NotBuilt),
            ComputeDevice::Cuda if tch::Cuda::device_count() < 1 => Err(DeviceError::NoGpu),
            ComputeDevice::Cuda => Ok(()),
        }
    }

    /// The torch device of the rank whose index among its machine's ranks
    /// is `local_rank`.
    pub fn of_rank(self, local_rank: u32) -> Result<tch::Device, DeviceError> {
        self.check()?;
        match self {
            ComputeDevice::Cpu => Ok(tch::Device::Cpu),
            ComputeDevice::Cuda => {
                let gpus = tch::Cuda::device_count().max(1) as usize;
                Ok(tch::Device::Cuda(local_rank as usize % gpus))
            }
        }
    }
}

/// The library that carries the collectives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Collectives {
    /// Gloo: host memory (GPU tensors are staged through it).
    #[default]
    Gloo,
    /// NCCL: GPU memory, one GPU per rank.
    Nccl,
}

impl Collectives {
    /// `gloo`, `nccl`, or `auto`: NCCL when the ranks compute on GPUs and
    /// each of the `local_ranks` ranks of this machine has a GPU of its own,
    /// else Gloo.
    pub fn choose(
        text: &str,
        device: ComputeDevice,
        local_ranks: u32,
    ) -> Result<Collectives, DeviceError> {
        let chosen = match text {
            "gloo" => Collectives::Gloo,
            "nccl" => Collectives::Nccl,
            "auto" => {
                let own_gpus = device == ComputeDevice::Cuda
                    && i64::from(local_ranks) <= tch::Cuda::device_count();
                if own_gpus {
                    Collectives::Nccl
                } else {
                    Collectives::Gloo
                }
            }
            other => return Err(DeviceError::UnknownCollectives(other.to_string())),
        };
        if chosen == Collectives::Nccl && device != ComputeDevice::Cuda {
            return Err(DeviceError::NcclOnCpu);
        }
        Ok(chosen)
    }

    pub fn name(self) -> &'static str {
        match self {
            Collectives::Gloo => "gloo",
            Collectives::Nccl => "nccl",
        }
    }
}

/// The process group of `rank` over `collectives`, for tensors on `device`:
/// Gloo talks over the interface of `bind_host`; NCCL uses `device`'s GPU.
pub fn open_group(
    device: tch::Device,
    collectives: Collectives,
    store: &Store,
    rank: u32,
    world: u32,
    bind_host: &str,
    timeout: Duration,
) -> Result<ProcessGroup, CommError> {
    match (collectives, device) {
        (Collectives::Nccl, tch::Device::Cuda(gpu)) => {
            ProcessGroup::nccl(store, rank, world, gpu, timeout)
        }
        (Collectives::Nccl, other) => Err(CommError::Group {
            rank,
            world,
            message: format!("NCCL needs a CUDA device, this rank computes on {other:?}"),
        }),
        (Collectives::Gloo, _) => ProcessGroup::gloo(store, rank, world, bind_host, timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_name_themselves() {
        for device in [ComputeDevice::Cpu, ComputeDevice::Cuda] {
            assert_eq!(ComputeDevice::parse(device.name()), Ok(device));
        }
        let err = ComputeDevice::parse("tpu").unwrap_err();
        assert_eq!(err.category(), "device_input");
        assert!(err.to_string().contains("\"tpu\""));
        assert!(ComputeDevice::choose("gpu").is_err());
        let auto = ComputeDevice::choose("auto").unwrap();
        assert_eq!(
            auto == ComputeDevice::Cuda,
            ComputeDevice::Cuda.check().is_ok()
        );
        assert_eq!(ComputeDevice::Cpu.default_precision(), Precision::Fp32);
        assert_eq!(ComputeDevice::Cuda.default_precision(), Precision::Bf16);
    }

    #[test]
    fn collectives_follow_the_device_and_refuse_nccl_on_the_cpu() {
        let cpu = ComputeDevice::Cpu;
        assert_eq!(Collectives::choose("auto", cpu, 4), Ok(Collectives::Gloo));
        assert_eq!(Collectives::choose("gloo", cpu, 4), Ok(Collectives::Gloo));
        assert_eq!(
            Collectives::choose("nccl", cpu, 1),
            Err(DeviceError::NcclOnCpu)
        );
        let err = Collectives::choose("mpi", cpu, 1).unwrap_err();
        assert!(err.to_string().contains("\"mpi\""), "{err}");
        // More ranks than any machine has GPUs share them, over Gloo.
        assert_eq!(
            Collectives::choose("auto", ComputeDevice::Cuda, 1 << 20),
            Ok(Collectives::Gloo)
        );
        assert_eq!(
            Collectives::choose("nccl", ComputeDevice::Cuda, 1 << 20),
            Ok(Collectives::Nccl)
        );
        for c in [Collectives::Gloo, Collectives::Nccl] {
            assert_eq!(Collectives::choose(c.name(), ComputeDevice::Cuda, 1), Ok(c));
        }
    }

    #[test]
    fn cuda_is_refused_with_the_reason_where_it_cannot_run() {
        assert_eq!(ComputeDevice::Cpu.of_rank(3), Ok(tch::Device::Cpu));
        match ComputeDevice::Cuda.of_rank(0) {
            // A GPU machine with the full libtorch: each rank gets a GPU.
            Ok(device) => assert!(nccl_built() && device.is_cuda()),
            Err(DeviceError::NotBuilt) => assert!(!nccl_built()),
            Err(DeviceError::NoGpu) => assert!(nccl_built()),
            Err(other) => panic!("unexpected {other}"),
        }
    }
}
