"""The baseline `lstmd bench --compare naive` measures against: the per-event server a user would otherwise write.

One JSON message per event over ZeroMQ REQ/REP, `nn.LSTMCell` once per event (one cell per layer), a dict of
(h, c) per stream id, an `nn.Linear` head, gradients off. Deliberately ordinary, not sabotaged: no per-event
allocation beyond what this code naturally does, one torch thread like the daemon, the same model shape.

Run: `python -m lstmd.clients.naive_server --endpoint tcp://127.0.0.1:* --input-size 8 --hidden-size 64`;
it prints the bound endpoint on its first stdout line. A request is `{"stream": id, "x": [floats]}`, the
reply `{"y": [floats]}`; `{"cmd": "stop"}` ends it.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import zmq
from torch import nn


class NaiveLSTMServer:
    """A dict of per-stream states and an LSTMCell stack, one event at a time."""

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, output_size: int = 1, seed: int = 0
    ) -> None:
        torch.manual_seed(seed)
        # The daemon's default too (serve.cpu_threads = 1): the ratio measures the design, not a thread knob.
        torch.set_num_threads(1)
        self.cells = [
            nn.LSTMCell(input_size if layer == 0 else hidden_size, hidden_size) for layer in range(num_layers)
        ]
        self.head = nn.Linear(hidden_size, output_size)
        self.states: dict[object, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @torch.no_grad()
    def predict(self, stream: object, x: list[float]) -> list[float]:
        state = self.states.get(stream)
        inp = torch.tensor([x], dtype=torch.float32)
        new_state = []
        for layer, cell in enumerate(self.cells):
            h, c = cell(inp, None if state is None else state[layer])
            new_state.append((h, c))
            inp = h
        self.states[stream] = new_state
        return self.head(inp)[0].tolist()


def serve(endpoint: str, server: NaiveLSTMServer, out=sys.stdout) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.bind(endpoint)
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), file=out, flush=True)
    try:
        while True:
            request = json.loads(sock.recv())
            if request.get("cmd") == "stop":
                sock.send(b'{"ok": true}')
                return
            y = server.predict(request["stream"], request["x"])
            sock.send(json.dumps({"y": y}).encode())
    finally:
        sock.close(linger=0)
        ctx.term()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:*")
    parser.add_argument("--input-size", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--output-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    server = NaiveLSTMServer(args.input_size, args.hidden_size, args.num_layers, args.output_size, args.seed)
    serve(args.endpoint, server)


if __name__ == "__main__":
    main()
