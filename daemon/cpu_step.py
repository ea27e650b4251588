"""The serving step on the CPU: `lstm_step_`'s contract, specialised for the daemon's hot path.

Same arithmetic as the reference backend (`lstmd.kernels.reference`, torch.nn.LSTM layout and gate order), but
with weights prepared once per model instead of once per call, the batch processed in cache-sized chunks, and
every intermediate written into preallocated buffers:

- gates in the internal order (i, f, o, g), with the rows of i, f, o halved, so one `tanh_` over all 4H
  columns gives tanh(g) and, through sigmoid(z) = 0.5 * tanh(z / 2) + 0.5, the three sigmoids (torch's CPU
  `tanh_` ran 2x faster than `sigmoid_` here); agrees with the reference to ~3e-7;
- rows in chunks of about 1 MiB of gates (1024 rows at H=64): 1.1 → 1.2 Mev/s at 10,000 rows, where the
  whole-batch version fell to 0.65 Mev/s once the gates left the cache (2-core Xeon, 1 thread);
- gather with `index_select(out=)`, scatter with `index_put_` (40 µs vs `index_copy_` 63 µs per 1024 x 64).

Measured on this 2-core CPU at H=64, I=8, one thread: reference 0.38-0.50 Mev/s at B=4096-10000, this
0.85-1.3 Mev/s (docs/benchmarks.md, "End to end").

Shapes: B events in the batch, S state-table rows, L layers, H hidden, I input.
"""

from __future__ import annotations

import torch

# Rows per chunk: gates of about 1 MiB (4H float32 per row) stay in L2; 512-1024 rows at H=64 were best in a
# sweep of 256/512/1024/all on this machine.
_GATE_BYTES_PER_CHUNK = 1 << 20


class CpuStep:
    """Advance rows of the state tables one step, in place; the weights are prepared per model."""

    def __init__(self) -> None:
        self._model = None
        self._layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._chunk = 0
        self._buffers: dict[str, torch.Tensor] = {}

    def _prepare(self, model) -> None:
        params = model.params
        H = params[0][1].shape[1]
        order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
        scale = torch.ones(4 * H)
        scale[: 3 * H] = 0.5  # sigmoid(z) = 0.5 * tanh(z / 2) + 0.5
        layers = []
        for w_ih, w_hh, b_ih, b_hh in params:
            w_in_t = (w_ih.float()[order] * scale[:, None]).t().contiguous()  # [I_l, 4H]
            w_h_t = (w_hh.float()[order] * scale[:, None]).t().contiguous()  # [H, 4H]
            bias = ((b_ih.float() + b_hh.float())[order] * scale).contiguous()  # [4H]
            layers.append((w_in_t, w_h_t, bias))
        self._layers = layers
        self._chunk = max(64, _GATE_BYTES_PER_CHUNK // (16 * H))
        rows = self._chunk
        self._buffers = {
            "gates": torch.empty(rows, 4 * H),
            "h": torch.empty(rows, H),
            "c": torch.empty(rows, H),
            "inp": torch.empty(rows, H),
        }
        self._model = model

    def __call__(
        self,
        model,  # ServingModel: prepared again when a new one is published
        x: torch.Tensor,  # [B, I] float32
        slots: torch.Tensor,  # [B] int64, distinct rows (guaranteed by the state store and the waves)
        h: torch.Tensor,  # [L, S, H] updated in place at `slots`
        c: torch.Tensor,  # [L, S, H] updated in place at `slots`
        reset: torch.Tensor | None = None,  # [B] bool: start those rows from zero
    ) -> torch.Tensor:  # [B, H]: the last layer's new h
        if model is not self._model:
            self._prepare(model)
        B, H = x.shape[0], h.shape[2]
        out = torch.empty(B, H)
        buf = self._buffers
        last = len(self._layers) - 1
        for start in range(0, B, self._chunk):
            end = min(B, start + self._chunk)
            n = end - start
            rows = slots[start:end]
            gates, h_old, c_old = buf["gates"][:n], buf["h"][:n], buf["c"][:n]
            zero = None if reset is None else reset[start:end].unsqueeze(1)
            inp = x[start:end]
            for layer, (w_in_t, w_h_t, bias) in enumerate(self._layers):
                torch.index_select(h[layer], 0, rows, out=h_old)
                torch.index_select(c[layer], 0, rows, out=c_old)
                if zero is not None:
                    # masked_fill, not a multiply: a reset row may hold NaN (a dead stream), and 0 * NaN = NaN.
                    h_old.masked_fill_(zero, 0.0)
                    c_old.masked_fill_(zero, 0.0)
                torch.addmm(bias, inp, w_in_t, out=gates)
                gates.addmm_(h_old, w_h_t)
                gates.tanh_()
                gates[:, : 3 * H].mul_(0.5).add_(0.5)  # i, f, o: sigmoids
                i, f, o, g = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H : 3 * H], gates[:, 3 * H :]
                c_old.mul_(f).addcmul_(i, g)  # c' = f * c + i * tanh(g)
                h_new = out[start:end] if layer == last else buf["inp"][:n]
                torch.tanh(c_old, out=h_new)
                h_new.mul_(o)  # h' = o * tanh(c')
                h[layer].index_put_((rows,), h_new)
                c[layer].index_put_((rows,), c_old)
                inp = h_new
        return out
