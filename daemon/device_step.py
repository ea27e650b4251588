"""The serving step on a CUDA device: staged copies, bucketed batch sizes, and the step captured in CUDA graphs.

The CPU tests (tests/test_engine_cuda.py) run this class on the CPU, where the copies are plain copies and
nothing is captured; its `cuda`-marked tests (graph replay against the uncaptured step, the daemon on cuda) ran
on an H200 in scripts/gpu-check (2026-11-28, docs/benchmarks.md "GPU").

Per wave of n events (daemon/engine.py hands it over on CUDA devices only; the CPU path does not come here):
1. The host writes slots, features and reset flags into one pinned staging buffer, laid out for the wave's bucket
   (the next power of two >= n, at least 16: `bucket_for`). Rows n..bucket are padding: their slot is the scratch
   slot (one row past the state store's capacity, in tables this class owns) and their reset flag is set, so they
   read zeros, never what another padding row wrote, and write only the scratch row.
2. On a dedicated stream: one host→device copy of that buffer, then the step for the bucket: gather → L cells →
   scatter → head (and a classifier's softmax; forecast models are refused), replayed from a CUDA graph
   captured the first time the bucket is seen (`serve.cuda_graphs = false`: launched eagerly), then one
   device→host copy of the n predictions into a pinned buffer, and an event.
3. `result()` waits for that event: the only synchronisation of a wave, the one that hands predictions back.
With graphs nothing is allocated per wave (the graphs own their intermediates; without them the caching
allocator hands out the same blocks again), except the small numpy array of predictions handed back. Two
staging buffers alternate, so a caller may fill wave k+1 while wave k runs (submit / result).

The graphs read weights from tensors this class owns: publishing a model copies its tensors into them (on the
same stream, between waves); the Triton backend's transposed layouts are refreshed in place too.

The state store's tables are replaced by views of tables with that one extra row (store.h = full[:, :S]); all
other code reads and writes them through the views as before. For L > 1 the views are not contiguous, which only
the kernels care about, and they are given the full tables.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from lstmd.daemon.model import ServingModel
from lstmd.daemon.state_store import StateStore
from lstmd.kernels import reference

MIN_BUCKET = 16  # tl.dot's smallest M: no bucket is below one row block
MAX_BUCKET = 16384  # serve.max_batch's default; a larger wave goes through in chunks of this size


def bucket_for(n: int) -> int:
    """Rows a wave of n events (1 <= n <= MAX_BUCKET) is padded to: powers of two from 16, so at most 11 graphs."""
    if not 1 <= n <= MAX_BUCKET:
        raise ValueError(f"a wave of {n} events: expected 1 to {MAX_BUCKET} (larger waves go in chunks)")
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def staging_views(buffer: torch.Tensor, bucket: int, input_size: int):
    """(slots int64 [bucket], x float32 [bucket, I], reset bool [bucket]) packed at the start of a uint8 buffer, in
    that order, so one copy of staging_bytes(bucket, I) moves all three. Buckets are powers of two >= 16, so x starts
    on a 128-byte boundary."""
    x_at = 8 * bucket
    reset_at = x_at + 4 * bucket * input_size
    slots = buffer[:x_at].view(torch.int64)
    x = buffer[x_at:reset_at].view(torch.float32).view(bucket, input_size)
    reset = buffer[reset_at : reset_at + bucket].view(torch.bool)
    return slots, x, reset


def staging_bytes(bucket: int, input_size: int) -> int:
    return bucket * (8 + 4 * input_size + 1)


def fill_staging(host: tuple, features: np.ndarray, slots: np.ndarray, fresh: np.ndarray, scratch: int) -> None:
    """Write one wave into host staging views (numpy), padding rows n..bucket to the scratch slot with reset set.
    Padding rows' features are left as they are: whatever they hold, their results go to the scratch row only."""
    h_slots, h_x, h_reset = host
    n = slots.shape[0]
    h_slots[:n] = slots
    h_slots[n:] = scratch
    h_x[:n] = features
    h_reset[:n] = fresh
    h_reset[n:] = True


class _Static:
    """The weights the step reads, owned here (and captured by the graphs): a published model is copied in."""

    def __init__(self, model: ServingModel) -> None:
        self.model = ServingModel(model.spec, {k: v.clone() for k, v in model.tensors.items()}, model.version)

    def fits(self, model: ServingModel) -> bool:
        """Whether `model` can be copied in: same sizes and task."""
        return model.spec == self.model.spec

    def load(self, model: ServingModel) -> None:
        """Copy a model that fits() into these tensors, on the current stream."""
        for name, tensor in model.tensors.items():
            self.model.tensors[name].copy_(tensor, non_blocking=True)


class DeviceStep:
    """The serving step with staged copies and (on CUDA, `cuda_graphs`) one captured graph per bucket."""

    def __init__(
        self,
        model: ServingModel,  # on `device`
        store: StateStore,
        kernel_backend: str,  # "triton" or "torch": lstm_step_'s backend
        device: torch.device,
        cuda_graphs: bool,
    ) -> None:
        if model.spec.task == "forecast":  # per-stream adaptation (daemon/normalization.py) is not in the graph
            raise ValueError("DeviceStep serves regression and classification models; forecast models step "
                             "through the engine's general path")
        self.device = device
        self.cuda = device.type == "cuda"
        self.graphs_enabled = cuda_graphs and self.cuda
        self.backend = kernel_backend
        spec = model.spec
        self.input_size, self.hidden = spec.input_size, spec.hidden_size
        self.store = store
        L, S, H = store.h.shape
        self.scratch = S
        # Tables with one more row, the scratch slot; the store keeps working through views of their first S rows.
        self.h = torch.zeros(L, S + 1, H, device=device)
        self.c = torch.zeros(L, S + 1, H, device=device)
        self.h[:, :S] = store.h
        self.c[:, :S] = store.c
        store.h, store.c = self.h[:, :S], self.c[:, :S]
        self.static = _Static(model)
        self._loaded = model
        self._weights = None
        if kernel_backend == "triton":
            from lstmd.kernels import triton_lstm

            self._weights = triton_lstm.prepare_step_weights(self.static.model.params)
        nbytes = staging_bytes(MAX_BUCKET, spec.input_size)
        pin = self.cuda  # page-locked, so the copies are asynchronous DMA
        self._host = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._host_preds = [torch.zeros(MAX_BUCKET, spec.output_size, pin_memory=pin) for _ in range(2)]
        self._staging = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._y = torch.zeros(MAX_BUCKET, H, device=device)
        self._out = torch.zeros(MAX_BUCKET, spec.output_size, device=device)
        self._host_views: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        self._next = 0  # which host buffer the next wave fills
        self._pending: list[PendingStep | None] = [None, None]
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.cuda:
            self._stream = torch.cuda.Stream(device)
            self._copied = [torch.cuda.Event() for _ in range(2)]  # the host→device copy of buffer k has finished
            self._done = [torch.cuda.Event() for _ in range(2)]  # wave k's predictions are in host memory
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every bucket's graph
            self._prepare_buckets()

    def _prepare_buckets(self) -> None:
        """Run (compiling the Triton kernels) and, with graphs on, capture every bucket now, before the daemon
        serves: a bucket first seen mid-run costs its compile and capture while events wait (the first GPU run's
        open-loop p99 of 2.2 s, docs/benchmarks.md "GPU"). Every row is padding (scratch slot, reset), so only the
        scratch row is written."""
        with torch.cuda.stream(self._stream), torch.inference_mode():
            bucket = MIN_BUCKET
            while bucket <= MAX_BUCKET:
                slots, _x, reset = staging_views(self._staging, bucket, self.input_size)
                slots.fill_(self.scratch)
                reset.fill_(True)
                self._run(bucket)
                bucket *= 2
        self._stream.synchronize()

    def step(self, model: ServingModel, features: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        """Advance `slots` (distinct) one event each; predictions [n, O] float32. Waves over MAX_BUCKET go in chunks
        (their slots are distinct, so the chunks are independent), two in flight: the host stages chunk k+1 while
        the device runs chunk k, and waits once per chunk instead of once per chunk plus a round trip. The loop's
        batches stay within serve.max_batch (16,384 by default, one bucket) unless one message is larger."""
        n = slots.shape[0]
        if n <= MAX_BUCKET:
            return self.submit(model, features, slots, fresh).result()
        parts, pending = [], []
        for i in range(0, n, MAX_BUCKET):
            if len(pending) == 2:
                parts.append(pending.pop(0).result())
            chunk = slice(i, i + MAX_BUCKET)
            pending.append(self.submit(model, features[chunk], slots[chunk], fresh[chunk]))
        parts += [p.result() for p in pending]
        return np.concatenate(parts)

    def submit(self, model: ServingModel, features: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> PendingStep:
        """Stage and enqueue one wave (1..MAX_BUCKET events); the returned handle's result() hands back the
        predictions. At most two waves may be pending; state tables must not be read before their result()."""
        n = slots.shape[0]
        bucket = bucket_for(n)
        if self.store.h.data_ptr() != self.h.data_ptr() or self.store.c.data_ptr() != self.c.data_ptr():
            raise RuntimeError("the state store's tables were replaced; the device step serves from its own tables")
        k = self._next
        if self._pending[k] is not None:
            raise RuntimeError("two waves are pending already: call result() on the older one first")
        if self.cuda:
            self._copied[k].synchronize()  # the previous copy out of this buffer has finished (normally long ago)
        host = self._host_views.get((k, bucket))
        if host is None:  # numpy views of the pinned buffer, made once per buffer and bucket
            host = self._host_views[k, bucket] = tuple(
                t.numpy() for t in staging_views(self._host[k], bucket, self.input_size)
            )
        fill_staging(host, features, slots, fresh, self.scratch)
        nbytes = staging_bytes(bucket, self.input_size)
        with torch.cuda.stream(self._stream) if self.cuda else nullcontext(), torch.inference_mode():
            if self.cuda:
                # Work the loop, snapshots or restores enqueued on the default stream (table writes, a published
                # model's tensors) comes first; no host synchronisation.
                self._stream.wait_stream(torch.cuda.default_stream(self.device))
            if model is not self._loaded:
                self._publish(model)
            self._staging[:nbytes].copy_(self._host[k][:nbytes], non_blocking=True)
            if self.cuda:
                self._copied[k].record(self._stream)
            self._run(bucket)
            self._host_preds[k][:n].copy_(self._out[:n], non_blocking=True)
            if self.cuda:
                self._done[k].record(self._stream)
        pending = PendingStep(self, k, n)
        self._pending[k] = pending
        self._next = 1 - k
        return pending

    def _publish(self, model: ServingModel) -> None:
        """Serve `model` from the next wave: copied into the captured tensors, or, should it not fit them, into
        new ones, the graphs captured again."""
        if self.static.fits(model):
            self.static.load(model)
        else:
            self.static = _Static(model)
            self._graphs.clear()
            if self._weights is not None:
                from lstmd.kernels import triton_lstm

                self._weights = triton_lstm.prepare_step_weights(self.static.model.params)
        if self._weights is not None:
            from lstmd.kernels import triton_lstm

            triton_lstm.load_step_weights(self._weights, self.static.model.params)
        self._loaded = model
        if self.graphs_enabled and not self._graphs:  # new tensors (another dtype): every bucket again, now
            self._prepare_buckets()

    def _run(self, bucket: int) -> None:
        """The bucket's step: replayed from its graph, or launched (and, with graphs on, captured for next time).

        On CUDA every bucket was run (and captured) once at construction (_prepare_buckets); a bucket first seen
        here would pay for Triton's compile and the capture, which synchronises the device and collects garbage
        (torch.cuda.graph does)."""
        graph = self._graphs.get(bucket)
        if graph is not None:
            graph.replay()
            return
        self.compute(bucket)  # eager: the first run also compiles the Triton kernels, outside any capture
        if self.graphs_enabled:
            graph = torch.cuda.CUDAGraph()
            # thread_local: the trainer thread may use the device while this thread captures.
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                self.compute(bucket)
            self._graphs[bucket] = graph

    def compute(self, bucket: int) -> None:
        """gather → L cells → scatter → head over the staged bucket, into self._out[:bucket]. No host
        synchronisation and no shape that depends on data, so a CUDA graph can capture it."""
        slots, x, reset = staging_views(self._staging, bucket, self.input_size)
        model = self.static.model
        inputs = x
        if self._weights is not None:
            from lstmd.kernels import triton_lstm

            y = triton_lstm.launch_step(
                inputs, slots, self.h, self.c, self._weights, reset, self._y[:bucket],
                triton_lstm.plan_step(bucket, self.hidden),
            )  # fmt: skip
        else:
            y = reference.lstm_step_(inputs, slots, self.h, self.c, model.params, reset)
        weight, bias = model.head
        out = torch.addmm(bias, y, weight.t())
        if model.spec.task == "classification":
            out = out.softmax(-1)
        self._out[:bucket].copy_(out)


    def collect(self, pending: PendingStep, k: int, n: int) -> np.ndarray:
        """The predictions of the wave `pending` submitted into buffer k (n rows): wait for it, free the buffer."""
        if self._pending[k] is not pending:
            raise RuntimeError("this wave's result was already taken")
        if self.cuda:
            self._done[k].synchronize()
        self._pending[k] = None
        return self._host_preds[k][:n].numpy().copy()


class PendingStep:
    """A submitted wave; result() waits for its predictions (the one synchronisation of a wave)."""

    def __init__(self, owner: DeviceStep, k: int, n: int) -> None:
        self._owner, self._k, self._n = owner, k, n

    def result(self) -> np.ndarray:
        return self._owner.collect(self, self._k, self._n)
