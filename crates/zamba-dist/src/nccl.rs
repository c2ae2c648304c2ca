//! NCCL on CUDA devices, through cudarc: one communicator per process (`ncclCommInitRank` from a
//! unique id rank 0 publishes through the rendezvous store), collectives in place on the
//! device memory of Burn's CUDA tensors, on a stream of our own.
//!
//! CubeCL gives every thread its own CUDA stream and orders work across them with events: a
//! buffer written on one thread's stream and used on another's makes the second wait for the
//! first's event. It does not expose the streams themselves, so NCCL cannot wait on them on the
//! device. Each collective instead goes: resolve the buffers on the calling thread's stream (the
//! event waits for their producers are queued there) → wait on the host for that stream alone →
//! NCCL on our stream → poll it until done. On the communication thread that overlaps the
//! reduction with the backward, the wait is for that thread's stream only — the buckets'
//! producers — while the backward's own stream goes on. The poll has the group's deadline: past
//! it the communicator is aborted, and the heartbeats say which ranks are at fault. A call that hangs inside NCCL's host code (not on the stream) cannot be
//! interrupted: a watchdog thread then ends the process with a message. Barrier and
//! `broadcast_bytes` (small host messages) go through the store.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::backend::Cube;
use burn::tensor::{DType, Device, Tensor};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl_runtime::runtime::Runtime;
use cudarc::driver::{CudaContext, CudaStream, sys as cu};
use cudarc::nccl::{result as nccl, sys};

use crate::heartbeat::{Heartbeat, find_culprits, interval_for};
use crate::rendezvous::Rendezvous;
use crate::store::StoreClient;
use crate::{Communicator, DistError, Interrupt, ReduceOp};

/// The CUDA compute server, whose storage resources carry device pointers.
type CudaServer = <CudaRuntime as Runtime>::Server;

const ID_KEY: &str = "nccl/unique-id";

/// One rank's NCCL communicator.
pub struct NcclCommunicator {
    rank: usize,
    world: usize,
    device_index: usize,
    timeout: Duration,
    comm: RawComm,
    stream: Arc<CudaStream>,
    context: Arc<CudaContext>,
    rendezvous: Mutex<Rendezvous>,
    /// Ends a wait for the GPU early (a signal): the communicator is then aborted.
    interrupt: Interrupt,
    heartbeat: Heartbeat,
    watchdog: Watchdog,
    /// Store-backed operations (barrier, broadcast_bytes) so far: they name their keys.
    store_ops: AtomicU64,
    fault: Mutex<Option<DistError>>,
    /// Held through each NCCL call: one thread at a time uses the NCCL communicator.
    calls: Mutex<()>,
}

/// The NCCL communicator handle (a raw pointer).
struct RawComm(sys::ncclComm_t);
// SAFETY: NCCL lets a communicator be used from any thread, one call at a time. Its owner,
// `NcclCommunicator`, makes every call holding its `calls` lock.
unsafe impl Send for RawComm {}
// SAFETY: as above: shared references reach the handle only through calls that hold the lock.
unsafe impl Sync for RawComm {}

/// `mutex` locked; a panic while it was held leaves the group failed, not the data torn.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn nccl_error(what: &str, e: nccl::NcclError) -> DistError {
    // SAFETY: ncclGetErrorString returns a static C string for any result code.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(e.0)) };
    DistError::Backend {
        op: what.to_string(),
        detail: format!(
            "NCCL: {} ({:?}); NCCL_DEBUG=INFO says more",
            text.to_string_lossy(),
            e.0
        ),
    }
}

fn cuda_error(what: &str, e: impl std::fmt::Debug) -> DistError {
    DistError::Backend {
        op: what.to_string(),
        detail: format!("CUDA: {e:?}"),
    }
}

impl NcclCommunicator {
    pub(crate) fn new(
        rendezvous: Rendezvous,
        device_index: usize,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        // SAFETY: only tries to open the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(DistError::Invalid(
                "NCCL's shared library (libnccl.so.2) was not found: install NCCL (the libnccl2 package, or the \
                 nvidia-nccl-cu12 wheel) and put its directory on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let (rank, world) = (rendezvous.rank, rendezvous.world);
        let context = CudaContext::new(device_index)
            .map_err(|e| cuda_error(&format!("opening CUDA device {device_index}"), e))?;
        context
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the CUDA context", e))?;
        let stream = context
            .new_stream()
            .map_err(|e| cuda_error("creating a CUDA stream", e))?;
        let mut rendezvous = rendezvous;
        let interrupt = rendezvous.interrupt.clone();
        let id = exchange_unique_id(&mut rendezvous.store, rank, timeout)?;
        let watchdog = Watchdog::start(rank);
        let heartbeat_store = StoreClient::connect(&rendezvous.master, &rendezvous.token, timeout)?;
        let heartbeat = Heartbeat::start(heartbeat_store, rank, interval_for(timeout));
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        watchdog.arm(Instant::now() + timeout, "ncclCommInitRank".into());
        // SAFETY: `comm` is a valid out-pointer; every rank calls this with the same id.
        let init = unsafe { nccl::comm_init_rank(&mut comm, world as i32, id, rank as i32) };
        watchdog.disarm();
        init.map_err(|e| nccl_error("ncclCommInitRank", e))?;
        Ok(Self {
            rank,
            world,
            device_index,
            timeout,
            comm: RawComm(comm),
            stream,
            context,
            rendezvous: Mutex::new(rendezvous),
            interrupt,
            heartbeat,
            watchdog,
            store_ops: AtomicU64::new(0),
            fault: Mutex::new(None),
            calls: Mutex::new(()),
        })
    }

    fn check_fault(&self) -> Result<(), DistError> {
        match &*lock(&self.fault) {
            Some(fault) => Err(fault.clone()),
            None => Ok(()),
        }
    }

    fn fail(&self, error: DistError) -> DistError {
        lock(&self.fault).get_or_insert(error.clone());
        error
    }

    /// Number of this collective; published by the heartbeat.
    fn enter(&self) -> u64 {
        self.heartbeat.progress.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Runs one NCCL collective from `input` into a tensor of `out_len` elements (in place when
    /// the sizes match and no one else holds the input's buffer).
    fn device_collective(
        &self,
        name: &str,
        input: Tensor<1>,
        out_len: usize,
        launch: impl FnOnce(
            u64,
            u64,
            usize,
            sys::ncclDataType_t,
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<Tensor<1>, DistError> {
        let _one_call_at_a_time = lock(&self.calls);
        self.check_fault()?;
        let index = self.enter();
        let label = format!("{name} #{index}");
        // The calling thread may be a communication thread, not the one that made the context.
        self.context
            .bind_to_thread()
            .map_err(|e| cuda_error(&label, e))?;
        let device = input.device();
        if device != Device::cuda(self.device_index) {
            return Err(DistError::Invalid(format!(
                "{label}: the tensor is on {device:?}, this rank's NCCL communicator is on CUDA device {}",
                self.device_index
            )));
        }
        let (dtype, nccl_dtype) = match input.dtype() {
            DType::F32 => (DType::F32, sys::ncclDataType_t::ncclFloat32),
            DType::BF16 => (DType::BF16, sys::ncclDataType_t::ncclBfloat16),
            other => {
                return Err(DistError::Invalid(format!(
                    "{label}: tensors must be f32 or bf16, got {other:?}"
                )));
            }
        };
        let count = input.dims()[0];
        let src = contiguous(primitive(input, &label)?);
        let dst = if out_len == count && src.can_mut() {
            src.clone()
        } else {
            primitive(Tensor::<1>::empty([out_len], (&device, dtype)), &label)?
        };
        let src_resource = src
            .client
            .get_resource::<CudaServer>(src.handle.clone())
            .map_err(|e| cuda_error(&label, e))?;
        let dst_resource = dst
            .client
            .get_resource::<CudaServer>(dst.handle.clone())
            .map_err(|e| cuda_error(&label, e))?;
        // Last, so that it covers what is queued above: the copy into `src`, and the waits on
        // other threads' streams that resolving the two buffers queued on this one.
        device.sync().map_err(|e| cuda_error(&label, e))?;
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let deadline = Instant::now() + self.timeout;
        self.watchdog.arm(
            deadline + self.timeout / 2 + Duration::from_secs(5),
            label.clone(),
        );
        let launched = launch(
            src_resource.resource().ptr,
            dst_resource.resource().ptr,
            count,
            nccl_dtype,
            self.comm.0,
            stream,
        );
        let waited = launched
            .map_err(|e| nccl_error(&label, e))
            .and_then(|_| self.wait_for_stream(&label, index, deadline));
        self.watchdog.disarm();
        drop((src_resource, dst_resource));
        waited.map_err(|e| self.fail(e))?;
        Ok(Tensor::from_primitive::<Cube>(dst))
    }

    /// Polls our stream until the collective is done, NCCL reports an error, or the deadline
    /// passes (then the communicator is aborted and the culprits named).
    fn wait_for_stream(&self, label: &str, index: u64, deadline: Instant) -> Result<(), DistError> {
        let mut spins = 0u32;
        loop {
            // SAFETY: our stream is alive for as long as `self`.
            match unsafe { cu::cuStreamQuery(self.stream.cu_stream()) } {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(cuda_error(label, other)),
            }
            let mut async_error = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out-pointer.
            unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut async_error) };
            if !matches!(
                async_error,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            ) {
                self.abort();
                return Err(nccl_error(label, nccl::NcclError(async_error)));
            }
            if Instant::now() >= deadline {
                self.abort();
                return Err(self.blame(label, index));
            }
            if let Some(reason) = self.interrupt.reason() {
                self.abort();
                return Err(DistError::Interrupted {
                    op: label.to_string(),
                    reason,
                });
            }
            spins += 1;
            if spins < 100 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    fn abort(&self) {
        // SAFETY: aborting a live communicator; it is never used again (the group is failed).
        let _ = unsafe { nccl::comm_abort(self.comm.0) };
    }

    /// The error for a collective that timed out, naming the ranks the heartbeats point at.
    fn blame(&self, label: &str, index: u64) -> DistError {
        let mut rendezvous = lock(&self.rendezvous);
        match find_culprits(
            &mut rendezvous.store,
            self.world,
            index,
            self.heartbeat.interval,
        ) {
            Ok(ranks) if !ranks.is_empty() => DistError::timeout(label, self.timeout, ranks),
            Ok(_) => DistError::Backend {
                op: label.to_string(),
                detail: format!(
                    "every rank reached this collective and is alive, but NCCL did not finish it within {} s: \
                     a network or NCCL failure (NCCL_DEBUG=INFO, NCCL_SOCKET_IFNAME, NCCL_IB_HCA)",
                    self.timeout.as_secs_f64()
                ),
            },
            Err(e) => e,
        }
    }

    /// A store-backed collective: writes this rank's `value` (if any) under a fresh key, then
    /// waits until every rank has arrived. Keys two operations old are deleted by rank 0: every
    /// rank has passed them.
    fn store_collective(&self, name: &str, value: Option<&[u8]>) -> Result<u64, DistError> {
        self.check_fault()?;
        let index = self.enter();
        let label = format!("{name} #{index}");
        let op = self.store_ops.fetch_add(1, Ordering::SeqCst);
        let mut guard = lock(&self.rendezvous);
        let store = &mut guard.store;
        let result = (|| {
            if let Some(value) = value {
                store.set(&format!("op/{op}/value"), value)?;
            }
            store.set(&format!("op/{op}/arrived/{}", self.rank), b"")?;
            let keys: Vec<String> = (0..self.world)
                .map(|r| format!("op/{op}/arrived/{r}"))
                .collect();
            let missing = store.wait(&keys, self.timeout)?;
            if !missing.is_empty() {
                let ranks = missing
                    .iter()
                    .filter_map(|k| k.rsplit('/').next()?.parse().ok())
                    .collect();
                return Err(DistError::timeout(&label, self.timeout, ranks));
            }
            if self.rank == 0 && op >= 2 {
                let old = op - 2;
                let mut keys: Vec<String> = (0..self.world)
                    .map(|r| format!("op/{old}/arrived/{r}"))
                    .collect();
                keys.push(format!("op/{old}/value"));
                store.delete(&keys)?;
            }
            Ok(op)
        })();
        result.map_err(|e| self.fail(e))
    }
}

fn primitive(tensor: Tensor<1>, label: &str) -> Result<CubeTensor, DistError> {
    tensor.try_into_primitive::<Cube>().map_err(|e| {
        DistError::Invalid(format!(
            "{label}: the tensor is not a plain CUDA tensor ({e:?}); pass a detached (non-autodiff) tensor"
        ))
    })
}

fn contiguous(tensor: CubeTensor) -> CubeTensor {
    burn_cubecl::kernel::into_contiguous(tensor)
}

fn exchange_unique_id(
    store: &mut StoreClient,
    rank: usize,
    timeout: Duration,
) -> Result<sys::ncclUniqueId, DistError> {
    if rank == 0 {
        let id = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
        let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        store.set(ID_KEY, &bytes)?;
        return Ok(id);
    }
    let bytes = store.get(ID_KEY, timeout)?.ok_or_else(|| {
        DistError::timeout("waiting for rank 0's NCCL unique id", timeout, vec![0])
    })?;
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    if bytes.len() != id.internal.len() {
        return Err(DistError::Invalid(format!(
            "the NCCL unique id in the store has {} bytes, not 128",
            bytes.len()
        )));
    }
    for (dst, &src) in id.internal.iter_mut().zip(&bytes) {
        *dst = src as std::ffi::c_char;
    }
    Ok(id)
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&self, tensor: Tensor<1>, op: ReduceOp) -> Result<Tensor<1>, DistError> {
        let len = tensor.dims()[0];
        self.device_collective(
            "all_reduce",
            tensor,
            len,
            |src, dst, count, dtype, comm, stream| unsafe {
                // SAFETY: src and dst hold `count` elements on this rank's device and outlive the call.
                nccl::all_reduce(
                    src as *const _,
                    dst as *mut _,
                    count,
                    dtype,
                    nccl_op(op),
                    comm,
                    stream,
                )
            },
        )
    }

    fn reduce_scatter(&self, tensor: Tensor<1>, op: ReduceOp) -> Result<Tensor<1>, DistError> {
        let len = tensor.dims()[0];
        if len % self.world != 0 {
            return Err(DistError::Invalid(format!(
                "reduce_scatter: the tensor's length {len} is not a multiple of the world size {}",
                self.world
            )));
        }
        let world = self.world;
        self.device_collective(
            "reduce_scatter",
            tensor,
            len / world,
            |src, dst, count, dtype, comm, stream| unsafe {
                // SAFETY: src holds `count` elements, dst `count / world`.
                nccl::reduce_scatter(
                    src as *const _,
                    dst as *mut _,
                    count / world,
                    dtype,
                    nccl_op(op),
                    comm,
                    stream,
                )
            },
        )
    }

    fn all_gather(&self, shard: Tensor<1>) -> Result<Tensor<1>, DistError> {
        let len = shard.dims()[0];
        self.device_collective(
            "all_gather",
            shard,
            len * self.world,
            |src, dst, count, dtype, comm, stream| unsafe {
                // SAFETY: src holds `count` elements, dst `count * world`.
                nccl::all_gather(src as *const _, dst as *mut _, count, dtype, comm, stream)
            },
        )
    }

    fn broadcast(&self, tensor: Tensor<1>, root: usize) -> Result<Tensor<1>, DistError> {
        if root >= self.world {
            return Err(DistError::Invalid(format!(
                "broadcast: root {root} is not a rank of a world of {}",
                self.world
            )));
        }
        let len = tensor.dims()[0];
        self.device_collective(
            "broadcast",
            tensor,
            len,
            |src, dst, count, dtype, comm, stream| unsafe {
                // SAFETY: src and dst hold `count` elements.
                nccl::broadcast(
                    src as *const _,
                    dst as *mut _,
                    count,
                    dtype,
                    root as i32,
                    comm,
                    stream,
                )
            },
        )
    }

    fn broadcast_bytes(&self, bytes: Option<Vec<u8>>, root: usize) -> Result<Vec<u8>, DistError> {
        if root >= self.world {
            return Err(DistError::Invalid(format!(
                "broadcast_bytes: root {root} is not a rank of a world of {}",
                self.world
            )));
        }
        let value = match (self.rank == root, bytes) {
            (true, Some(b)) => Some(b),
            (true, None) => {
                return Err(DistError::Invalid(
                    "broadcast_bytes: the root must pass Some(bytes)".into(),
                ));
            }
            (false, _) => None,
        };
        let op = self.store_collective("broadcast_bytes", value.as_deref())?;
        if let Some(value) = value {
            return Ok(value);
        }
        let mut rendezvous = lock(&self.rendezvous);
        rendezvous
            .store
            .get(&format!("op/{op}/value"), Duration::ZERO)?
            .ok_or_else(|| DistError::Invalid(format!("broadcast_bytes: rank {root} sent nothing")))
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.store_collective("barrier", None).map(|_| ())
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        if lock(&self.fault).is_none() {
            let _ = self.stream.synchronize();
            // SAFETY: no collective is in flight; the communicator is not used again.
            let _ = unsafe { nccl::comm_destroy(self.comm.0) };
        }
    }
}

/// Ends the process when a collective stays inside an NCCL call past its deadline: the one
/// hang a polling loop cannot see.
struct Watchdog {
    armed: Arc<(Mutex<Option<(Instant, String)>>, Condvar)>,
}

impl Watchdog {
    fn start(rank: usize) -> Self {
        let armed: Arc<(Mutex<Option<(Instant, String)>>, Condvar)> = Arc::default();
        let shared = Arc::downgrade(&armed);
        let _ = std::thread::Builder::new().name("zamba-dist-watchdog".into()).spawn(move || {
            loop {
                let Some(shared) = shared.upgrade() else { return };
                let (lock, wake) = &*shared;
                let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
                let armed = guard.as_ref().map(|(deadline, what)| (*deadline, what.clone()));
                let wait = match armed {
                    Some((deadline, what)) if Instant::now() >= deadline => {
                        eprintln!(
                            "zamba-dist: rank {rank}: {what} is stuck inside NCCL past its time-out; ending the process (exit status 1)"
                        );
                        std::process::exit(1);
                    }
                    Some((deadline, _)) => deadline.saturating_duration_since(Instant::now()),
                    None => Duration::from_secs(1),
                };
                let guard = wake.wait_timeout(guard, wait).unwrap_or_else(|p| p.into_inner()).0;
                drop(guard);
            }
        });
        Self { armed }
    }

    fn arm(&self, deadline: Instant, what: String) {
        *self.armed.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((deadline, what));
        self.armed.1.notify_all();
    }

    fn disarm(&self) {
        *self.armed.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.armed.1.notify_all();
    }
}

/// An NCCL communicator for `info`'s rank on CUDA device `device_index`, whatever the world
/// size (a world of one too, which [`init`](crate::init) would serve without NCCL): for GPU
/// checks and benchmarks.
pub fn connect_nccl(
    info: &crate::RendezvousInfo,
    device_index: usize,
    opts: &crate::DistOptions,
) -> Result<NcclCommunicator, DistError> {
    let rendezvous = Rendezvous::join(info, opts)?;
    NcclCommunicator::new(rendezvous, device_index, opts.timeout)
}

/// Total memory of CUDA device `index` in bytes; `None` where the driver or the device is
/// missing.
pub fn cuda_device_memory(index: usize) -> Option<u64> {
    // SAFETY: only tries to open the library.
    if !unsafe { cu::is_culib_present() } {
        return None;
    }
    let context = CudaContext::new(index).ok()?;
    context.total_mem().ok().map(|bytes| bytes as u64)
}
