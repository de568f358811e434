//! Collectives through libtorch's own c10d: a TCPStore for rendezvous, a Gloo
//! process group on CPU and an NCCL one on GPUs, reached through a small C++
//! shim (`csrc/c10d_shim.cpp`). NCCL is there only when the trainer was built
//! against the full CUDA libtorch ([`nccl_built`]).
//!
//! One process group spans every rank; point-to-point send/recv on it serves
//! the dynamic groups of each step plan without a communicator per group.
//!
//! Expected flow: rank 0 opens the store as server ([`Store::open`] with
//! `is_server`), the others as clients at the same address; every rank then
//! builds a [`ProcessGroup`] on its store. Guarantees: every C++ error comes
//! back as a [`CommError`]; every operation is bounded by the group's timeout,
//! so a dead peer is an error, never a hang. Caveat: after a failed operation
//! treat the group as broken (c10d re-raises the failure on later waits) and
//! build a new one.

// The shim is a C ABI; every unsafe block below passes pointers that the
// wrappers own and keep alive for the call.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::time::Duration;

use tch::Tensor;

unsafe extern "C" {
    fn weft_c10d_free_string(s: *mut c_char);
    fn weft_c10d_store_new(
        host: *const c_char,
        port: u16,
        world_size: c_int,
        is_server: c_int,
        timeout_s: f64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn weft_c10d_store_free(store: *mut c_void);
    fn weft_c10d_gloo_new(
        store: *mut c_void,
        rank: c_int,
        world_size: c_int,
        hostname: *const c_char,
        timeout_s: f64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn weft_c10d_has_nccl() -> c_int;
    fn weft_c10d_nccl_new(
        store: *mut c_void,
        rank: c_int,
        world_size: c_int,
        device: c_int,
        timeout_s: f64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn weft_c10d_group_free(group: *mut c_void);
    fn weft_c10d_allreduce_sum(
        group: *mut c_void,
        tensor: *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn weft_c10d_send(
        group: *mut c_void,
        tensor: *mut c_void,
        dst: c_int,
        tag: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn weft_c10d_recv(
        group: *mut c_void,
        tensor: *mut c_void,
        src: c_int,
        tag: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn weft_c10d_alltoall(
        group: *mut c_void,
        output: *mut c_void,
        input: *mut c_void,
        output_splits: *const i64,
        input_splits: *const i64,
        parts: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn weft_c10d_broadcast(
        group: *mut c_void,
        tensor: *mut c_void,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn weft_c10d_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
}

/// Whether this build has NCCL (it was built against the full CUDA libtorch).
pub fn nccl_built() -> bool {
    // SAFETY: a constant answer, no arguments.
    unsafe { weft_c10d_has_nccl() != 0 }
}

/// A failed communication step.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    #[error("rendezvous store at {address} failed: {message}")]
    Store { address: String, message: String },
    #[error("creating the process group (rank {rank} of {world}) failed: {message}")]
    Group {
        rank: u32,
        world: u32,
        message: String,
    },
    #[error("{operation} failed: {message}")]
    Operation {
        operation: &'static str,
        message: String,
    },
    #[error("{operation}: {reason}")]
    Invalid {
        operation: &'static str,
        reason: String,
    },
}

impl CommError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            CommError::Store { .. } => "rendezvous",
            CommError::Group { .. } => "process_group",
            CommError::Operation { .. } => "collective",
            CommError::Invalid { .. } => "collective_input",
        }
    }
}

/// Calls a shim function and turns its error string into a Rust `String`.
pub(crate) fn call(f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<(), String> {
    let mut err: *mut c_char = std::ptr::null_mut();
    let code = f(&mut err);
    if code == 0 {
        return Ok(());
    }
    if err.is_null() {
        return Err(format!("the C++ shim returned {code} without a message"));
    }
    // SAFETY: the shim strdup'd a NUL-terminated string and hands it over.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: freed exactly once, by the allocator that made it.
    unsafe { weft_c10d_free_string(err) };
    Err(message)
}

fn c_string(operation: &'static str, text: &str) -> Result<CString, CommError> {
    CString::new(text).map_err(|_| CommError::Invalid {
        operation,
        reason: format!("{text:?} contains a NUL byte"),
    })
}

/// The rendezvous key-value store (c10d's TCPStore).
#[derive(Debug)]
pub struct Store {
    handle: *mut c_void,
    address: String,
}

// SAFETY: c10d's TCPStore is internally synchronised; the handle is an owned box.
unsafe impl Send for Store {}

impl Store {
    /// Opens the store at `host:port`: as its server on rank 0 (waits until all
    /// `world_size` ranks have connected, up to `timeout`), as a client elsewhere.
    pub fn open(
        host: &str,
        port: u16,
        world_size: u32,
        is_server: bool,
        timeout: Duration,
    ) -> Result<Store, CommError> {
        let address = format!("{host}:{port}");
        let host_c = c_string("store", host)?;
        let mut handle: *mut c_void = std::ptr::null_mut();
        // SAFETY: host_c outlives the call; handle receives an owned box.
        call(|err| unsafe {
            weft_c10d_store_new(
                host_c.as_ptr(),
                port,
                world_size as c_int,
                c_int::from(is_server),
                timeout.as_secs_f64(),
                &mut handle,
                err,
            )
        })
        .map_err(|message| CommError::Store {
            address: address.clone(),
            message,
        })?;
        Ok(Store { handle, address })
    }

    pub fn address(&self) -> &str {
        &self.address
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: the handle came from weft_c10d_store_new and is freed once.
        unsafe { weft_c10d_store_free(self.handle) }
    }
}

/// One process group over every rank, on Gloo (host tensors; GPU tensors are
/// staged through host memory) or NCCL (tensors on this rank's GPU).
#[derive(Debug)]
pub struct ProcessGroup {
    handle: *mut c_void,
    rank: u32,
    world: u32,
    device: tch::Device,
}

// SAFETY: c10d backends are used from one thread at a time through &mut self.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// A Gloo group of `world` ranks in which this process is `rank`, meeting
    /// through `store`, talking over the interface of `hostname`; every
    /// operation fails after `timeout`.
    pub fn gloo(
        store: &Store,
        rank: u32,
        world: u32,
        hostname: &str,
        timeout: Duration,
    ) -> Result<ProcessGroup, CommError> {
        let host_c = c_string("process group", hostname)?;
        Self::create(rank, world, tch::Device::Cpu, |out, err| {
            // SAFETY: the store handle is alive (borrowed); host_c outlives the call.
            unsafe {
                weft_c10d_gloo_new(
                    store.handle,
                    rank as c_int,
                    world as c_int,
                    host_c.as_ptr(),
                    timeout.as_secs_f64(),
                    out,
                    err,
                )
            }
        })
    }

    /// An NCCL group of `world` ranks in which this process is `rank` and
    /// owns CUDA device `gpu`, meeting through `store`. NCCL's watchdog is
    /// told not to tear the process down and waits block, so an operation
    /// past `timeout` is an error like any other.
    pub fn nccl(
        store: &Store,
        rank: u32,
        world: u32,
        gpu: usize,
        timeout: Duration,
    ) -> Result<ProcessGroup, CommError> {
        let gpu_c = c_int::try_from(gpu).map_err(|_| CommError::Group {
            rank,
            world,
            message: format!("CUDA device index {gpu} is out of range"),
        })?;
        Self::create(rank, world, tch::Device::Cuda(gpu), |out, err| {
            // SAFETY: the store handle is alive (borrowed).
            unsafe {
                weft_c10d_nccl_new(
                    store.handle,
                    rank as c_int,
                    world as c_int,
                    gpu_c,
                    timeout.as_secs_f64(),
                    out,
                    err,
                )
            }
        })
    }

    /// A group of `world` ranks in which this process is `rank`, for tensors
    /// on `device`, made by the shim call `new` (which boxes the backend into
    /// its first argument).
    fn create(
        rank: u32,
        world: u32,
        device: tch::Device,
        new: impl FnOnce(*mut *mut c_void, *mut *mut c_char) -> c_int,
    ) -> Result<ProcessGroup, CommError> {
        let group_err = |message| CommError::Group {
            rank,
            world,
            message,
        };
        if rank >= world {
            return Err(group_err(format!(
                "rank {rank} is not below the world size {world}"
            )));
        }
        let mut handle: *mut c_void = std::ptr::null_mut();
        call(|err| new(&mut handle, err)).map_err(group_err)?;
        Ok(ProcessGroup {
            handle,
            rank,
            world,
            device,
        })
    }

    /// Where this group's tensors must live: the CPU for Gloo, this rank's
    /// GPU for NCCL.
    pub fn device(&self) -> tch::Device {
        self.device
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn world(&self) -> u32 {
        self.world
    }

    fn peer(&self, operation: &'static str, peer: u32) -> Result<c_int, CommError> {
        // c10d does not check peer ranks: an out-of-range one waits for the timeout.
        if peer >= self.world || peer == self.rank {
            return Err(CommError::Invalid {
                operation,
                reason: format!(
                    "peer {peer} is not another rank of the world of {} (this is rank {})",
                    self.world, self.rank
                ),
            });
        }
        Ok(peer as c_int)
    }

    /// The tensor c10d works on for `tensor`: the tensor itself (it must be
    /// contiguous), or, for a Gloo group and a GPU tensor, a host copy (an
    /// empty host buffer when the operation only `writes` it). Gloo moves
    /// host memory; staging through it lets several ranks share one GPU,
    /// which NCCL refuses. An NCCL group cannot reach a host tensor.
    fn on_backend(
        &self,
        operation: &'static str,
        tensor: &Tensor,
        writes: bool,
    ) -> Result<Tensor, CommError> {
        let invalid = |reason: String| CommError::Invalid { operation, reason };
        if tensor.device() == self.device {
            return if tensor.is_contiguous() {
                Ok(tensor.shallow_clone())
            } else {
                Err(invalid("the tensor is not contiguous".to_string()))
            };
        }
        if self.device != tch::Device::Cpu {
            return Err(invalid(format!(
                "the tensor is on {:?}, the NCCL group works on {:?}",
                tensor.device(),
                self.device
            )));
        }
        let host = if writes {
            Tensor::f_empty(tensor.size().as_slice(), (tensor.kind(), tch::Device::Cpu))
        } else {
            tensor
                .f_to_device(tch::Device::Cpu)
                .and_then(|t| t.f_contiguous())
        };
        host.map_err(|e| CommError::Operation {
            operation,
            message: format!("staging through host memory: {e}"),
        })
    }

    /// Writes a staged result back into the caller's tensor (nothing to do
    /// when c10d worked on the tensor itself).
    fn unstage(
        operation: &'static str,
        tensor: &mut Tensor,
        work: &Tensor,
    ) -> Result<(), CommError> {
        if tensor.device() == work.device() {
            return Ok(());
        }
        tensor.f_copy_(work).map_err(|e| CommError::Operation {
            operation,
            message: format!("copying back from host memory: {e}"),
        })
    }

    fn op(
        operation: &'static str,
        f: impl FnOnce(*mut *mut c_char) -> c_int,
    ) -> Result<(), CommError> {
        call(f).map_err(|message| CommError::Operation { operation, message })
    }

    /// Runs the shim call `f` on `tensor` in place (through a host buffer
    /// where it must be staged; `writes`: the call only writes it).
    fn in_place(
        &self,
        operation: &'static str,
        tensor: &mut Tensor,
        writes: bool,
        f: impl FnOnce(*mut c_void, *mut *mut c_char) -> c_int,
    ) -> Result<(), CommError> {
        let mut work = self.on_backend(operation, tensor, writes)?;
        let t = work.as_mut_ptr() as *mut c_void;
        Self::op(operation, |err| f(t, err))?;
        Self::unstage(operation, tensor, &work)
    }

    /// Sums `tensor` over all ranks, in place.
    pub fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<(), CommError> {
        let handle = self.handle;
        // SAFETY: the group and the tensor are alive and exclusively borrowed.
        self.in_place("all_reduce", tensor, false, |t, err| unsafe {
            weft_c10d_allreduce_sum(handle, t, err)
        })
    }

    /// Every rank's `value`, by rank. Each rank fills its own slot of an i64
    /// tensor on `device` and the slots are summed: one non-zero term each,
    /// so every value arrives whole whatever the world size.
    pub fn all_gather_u64(
        &mut self,
        value: u64,
        device: tch::Device,
    ) -> Result<Vec<u64>, CommError> {
        let failed = |e: tch::TchError| CommError::Operation {
            operation: "all_gather",
            message: e.to_string(),
        };
        let mut slots = vec![0i64; self.world as usize];
        // The bits of the value, as an i64 (a sum of one term cannot overflow).
        slots[self.rank as usize] = i64::from_ne_bytes(value.to_ne_bytes());
        let mut gathered = Tensor::from_slice(&slots)
            .f_to_device(device)
            .map_err(failed)?;
        self.all_reduce_sum(&mut gathered)?;
        let gathered = Vec::<i64>::try_from(&gathered).map_err(failed)?;
        Ok(gathered
            .into_iter()
            .map(|v| u64::from_ne_bytes(v.to_ne_bytes()))
            .collect())
    }

    /// Sends `tensor` to rank `dst`; blocks until it is sent.
    pub fn send(&mut self, tensor: &Tensor, dst: u32, tag: i32) -> Result<(), CommError> {
        let dst = self.peer("send", dst)?;
        let work = self.on_backend("send", tensor, false)?;
        let t = work.as_ptr() as *mut c_void;
        // SAFETY: c10d reads the tensor; it stays alive for the call.
        Self::op("send", |err| unsafe {
            weft_c10d_send(self.handle, t, dst, tag, err)
        })
    }

    /// Receives into `tensor` (of the sender's shape) from rank `src`.
    pub fn recv(&mut self, tensor: &mut Tensor, src: u32, tag: i32) -> Result<(), CommError> {
        let src = self.peer("recv", src)?;
        let handle = self.handle;
        // SAFETY: the tensor is exclusively borrowed and written in place.
        self.in_place("recv", tensor, true, |t, err| unsafe {
            weft_c10d_recv(handle, t, src, tag, err)
        })
    }

    /// All-to-all with uneven splits along dimension 0: rows
    /// `input_splits[r]` of `input` go to rank r, and `output_splits[r]` rows of
    /// `output` come from rank r.
    pub fn all_to_all(
        &mut self,
        output: &mut Tensor,
        input: &Tensor,
        output_splits: &[i64],
        input_splits: &[i64],
    ) -> Result<(), CommError> {
        let world = self.world as usize;
        if output_splits.len() != world || input_splits.len() != world {
            return Err(CommError::Invalid {
                operation: "all_to_all",
                reason: format!(
                    "{} output and {} input splits for a world of {world}",
                    output_splits.len(),
                    input_splits.len()
                ),
            });
        }
        let input_work = self.on_backend("all_to_all", input, false)?;
        let inp = input_work.as_ptr() as *mut c_void;
        let handle = self.handle;
        // SAFETY: both tensors and both split slices outlive the call.
        self.in_place("all_to_all", output, true, |out, err| unsafe {
            weft_c10d_alltoall(
                handle,
                out,
                inp,
                output_splits.as_ptr(),
                input_splits.as_ptr(),
                world as c_int,
                err,
            )
        })
    }

    /// Copies `tensor` from rank `root` to every rank, in place.
    pub fn broadcast(&mut self, tensor: &mut Tensor, root: u32) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::Invalid {
                operation: "broadcast",
                reason: format!("root {root} is not below the world size {}", self.world),
            });
        }
        let handle = self.handle;
        // SAFETY: the tensor is exclusively borrowed (the root's is read).
        self.in_place("broadcast", tensor, false, |t, err| unsafe {
            weft_c10d_broadcast(handle, t, root as c_int, err)
        })
    }

    /// Waits until every rank reaches the barrier.
    pub fn barrier(&mut self) -> Result<(), CommError> {
        // SAFETY: the group is alive.
        Self::op("barrier", |err| unsafe {
            weft_c10d_barrier(self.handle, err)
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from weft_c10d_gloo_new or weft_c10d_nccl_new
        // and is freed once.
        unsafe { weft_c10d_group_free(self.handle) }
    }
}
