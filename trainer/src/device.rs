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
    #[error(
        "--device cuda: this weft-trainer was built for CPU only (its libtorch is the CPU set, without NCCL); on a GPU machine run `WEFT_TORCH_FULL=1 scripts/setup` and build again"
    )]
    NotBuilt,
    #[error("--device cuda: libtorch sees no CUDA device on this machine")]
    NoGpu,
    #[error("--collectives nccl needs --device cuda: NCCL moves GPU memory only")]
    NcclOnCpu,
    #[error(
        "--collectives nccl needs a GPU for every rank: {ranks} ranks on this machine, {gpus} GPUs; run at most {gpus} ranks here, or take --collectives gloo (or auto), with which ranks share GPUs"
    )]
    NcclSharedGpus { ranks: u32, gpus: u32 },
}

impl DeviceError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            DeviceError::NcclOnCpu | DeviceError::NcclSharedGpus { .. } => "device_input",
            DeviceError::NotBuilt | DeviceError::NoGpu => "device_unavailable",
        }
    }
}

/// Where the ranks compute, as a run asks (`--device`): a device, or
/// `auto` ([`ComputeDevice::choose`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA where this build can run on a GPU that libtorch sees, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl From<ComputeDevice> for DeviceChoice {
    fn from(device: ComputeDevice) -> DeviceChoice {
        match device {
            ComputeDevice::Cpu => DeviceChoice::Cpu,
            ComputeDevice::Cuda => DeviceChoice::Cuda,
        }
    }
}

/// The kind of device every rank of a run computes on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDevice {
    #[default]
    Cpu,
    /// One GPU per rank: the rank's local index among the ranks of its
    /// machine (or pod), modulo the GPUs libtorch sees.
    Cuda,
}

impl ComputeDevice {
    /// The device `choice` names; for `auto`, CUDA where this build can
    /// run on a GPU that libtorch sees, else the CPU. (A named device is
    /// checked where it is used: [`ComputeDevice::check`].)
    pub fn choose(choice: DeviceChoice) -> ComputeDevice {
        match choice {
            DeviceChoice::Cpu => ComputeDevice::Cpu,
            DeviceChoice::Cuda => ComputeDevice::Cuda,
            DeviceChoice::Auto if ComputeDevice::Cuda.check().is_ok() => ComputeDevice::Cuda,
            DeviceChoice::Auto => ComputeDevice::Cpu,
        }
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

/// The library of the collectives, as a run asks (`--collectives`): one,
/// or `auto` ([`Collectives::choose`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CollectivesChoice {
    /// NCCL on GPUs where every rank of a machine has one of its own, else Gloo.
    #[default]
    Auto,
    Gloo,
    Nccl,
}

impl From<Collectives> for CollectivesChoice {
    fn from(collectives: Collectives) -> CollectivesChoice {
        match collectives {
            Collectives::Gloo => CollectivesChoice::Gloo,
            Collectives::Nccl => CollectivesChoice::Nccl,
        }
    }
}

/// The library that carries the collectives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Collectives {
    /// Gloo: host memory (GPU tensors are staged through it).
    #[default]
    Gloo,
    /// NCCL: GPU memory, one GPU per rank.
    Nccl,
}

impl Collectives {
    /// The library `choice` names; for `auto`, NCCL when the ranks compute
    /// on GPUs and each of the `local_ranks` ranks of this machine has a GPU
    /// of its own, else Gloo. NCCL on the CPU is refused.
    pub fn choose(
        choice: CollectivesChoice,
        device: ComputeDevice,
        local_ranks: u32,
    ) -> Result<Collectives, DeviceError> {
        // GPUs are counted only where NCCL could be chosen.
        let gpus = if device == ComputeDevice::Cuda && choice != CollectivesChoice::Gloo {
            u32::try_from(tch::Cuda::device_count().max(0)).unwrap_or(u32::MAX)
        } else {
            0
        };
        Collectives::choose_among(choice, device, local_ranks, gpus)
    }

    /// [`Collectives::choose`] on a machine of `gpus` GPUs. NCCL asked for
    /// more ranks than there are GPUs is refused (two ranks of one NCCL
    /// group on one GPU fail inside NCCL); with none, the device's own check
    /// says so ([`ComputeDevice::check`]).
    fn choose_among(
        choice: CollectivesChoice,
        device: ComputeDevice,
        local_ranks: u32,
        gpus: u32,
    ) -> Result<Collectives, DeviceError> {
        let chosen = match choice {
            CollectivesChoice::Gloo => Collectives::Gloo,
            CollectivesChoice::Nccl => Collectives::Nccl,
            CollectivesChoice::Auto if device == ComputeDevice::Cuda && local_ranks <= gpus => {
                Collectives::Nccl
            }
            CollectivesChoice::Auto => Collectives::Gloo,
        };
        if chosen == Collectives::Nccl {
            if device != ComputeDevice::Cuda {
                return Err(DeviceError::NcclOnCpu);
            }
            if gpus > 0 && local_ranks > gpus {
                return Err(DeviceError::NcclSharedGpus {
                    ranks: local_ranks,
                    gpus,
                });
            }
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

    use crate::flag_name as flag;

    #[test]
    fn devices_are_chosen_and_name_themselves() {
        for device in [ComputeDevice::Cpu, ComputeDevice::Cuda] {
            assert_eq!(flag(&device), device.name());
            assert_eq!(ComputeDevice::choose(device.into()), device);
            assert_eq!(flag(&DeviceChoice::from(device)), device.name());
        }
        let auto = ComputeDevice::choose(DeviceChoice::Auto);
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
        use CollectivesChoice::{Auto, Gloo, Nccl};
        assert_eq!(Collectives::choose(Auto, cpu, 4), Ok(Collectives::Gloo));
        assert_eq!(Collectives::choose(Gloo, cpu, 4), Ok(Collectives::Gloo));
        let err = Collectives::choose(Nccl, cpu, 1).unwrap_err();
        assert_eq!(err, DeviceError::NcclOnCpu);
        assert_eq!(err.category(), "device_input");
        // More ranks than any machine has GPUs share them, over Gloo.
        assert_eq!(
            Collectives::choose(Auto, ComputeDevice::Cuda, 1 << 20),
            Ok(Collectives::Gloo)
        );
        // With no GPU, NCCL is left to the device's check to refuse.
        assert_eq!(
            Collectives::choose_among(Nccl, ComputeDevice::Cuda, 1 << 20, 0),
            Ok(Collectives::Nccl)
        );
        // On a machine of 4 GPUs: auto takes NCCL while every rank has a
        // GPU of its own, Gloo past that; NCCL asked for past that is
        // refused by name.
        let cuda = ComputeDevice::Cuda;
        assert_eq!(
            Collectives::choose_among(Auto, cuda, 4, 4),
            Ok(Collectives::Nccl)
        );
        assert_eq!(
            Collectives::choose_among(Auto, cuda, 5, 4),
            Ok(Collectives::Gloo)
        );
        assert_eq!(
            Collectives::choose_among(Nccl, cuda, 4, 4),
            Ok(Collectives::Nccl)
        );
        let err = Collectives::choose_among(Nccl, cuda, 8, 4).unwrap_err();
        assert_eq!(err, DeviceError::NcclSharedGpus { ranks: 8, gpus: 4 });
        assert_eq!(err.category(), "device_input");
        assert!(
            err.to_string().contains("8 ranks on this machine, 4 GPUs"),
            "{err}"
        );
        assert_eq!(
            Collectives::choose_among(Gloo, cuda, 8, 4),
            Ok(Collectives::Gloo)
        );
        for c in [Collectives::Gloo, Collectives::Nccl] {
            assert_eq!(flag(&c), c.name());
            assert_eq!(flag(&CollectivesChoice::from(c)), c.name());
            assert_eq!(Collectives::choose(c.into(), ComputeDevice::Cuda, 1), Ok(c));
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
