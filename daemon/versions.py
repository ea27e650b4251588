"""The bounded history of published model versions, for `lstmd model versions` and `lstmd model rollback`.

Owned by the serving loop (it records every swap: the initial model, trainer publishes, imports, rollbacks).
Each entry keeps a CPU copy of the weights, so a rollback serves exactly the tensors that were published.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from lstmd.daemon.model import ServingModel


@dataclass
class VersionEntry:
    model: ServingModel  # on the CPU
    source: str  # initial | train | import | rollback of N | restore
    published: float = field(default_factory=time.time)  # unix seconds
    info: dict = field(default_factory=dict)  # e.g. holdout losses of a trained version

    def describe(self, serving: int) -> dict:
        return {
            "version": self.model.version,
            "source": self.source,
            "published": round(self.published, 3),
            "serving": self.model.version == serving,
            **self.info,
        }


class ModelHistory:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the version history must hold at least one version, got {limit}")
        self.limit = limit
        self.entries: OrderedDict[int, VersionEntry] = OrderedDict()

    def add(self, model: ServingModel, source: str, **info) -> None:
        self.entries[model.version] = VersionEntry(model.to(torch.device("cpu")), source, info=info)
        self.entries.move_to_end(model.version)
        while len(self.entries) > self.limit:
            self.entries.popitem(last=False)

    def listing(self, serving: int) -> list[dict]:
        return [entry.describe(serving) for entry in reversed(self.entries.values())]

    def get(self, version: int) -> ServingModel | None:
        entry = self.entries.get(version)
        return None if entry is None else entry.model

    def previous(self, serving: int) -> int | None:
        """The version published just before `serving` (what a bare `rollback` returns to)."""
        versions = list(self.entries)
        if serving not in versions:
            return versions[-1] if versions else None
        i = versions.index(serving)
        return versions[i - 1] if i > 0 else None

    # ---- snapshots ----------------------------------------------------------------------------------------

    def snapshot_tensors(self) -> dict[str, torch.Tensor]:
        """Every kept version as flat tensors `<n>.<name>`, plus a JSON index (`index`) as a uint8 tensor."""
        out: dict[str, torch.Tensor] = {}
        index = []
        for version, entry in self.entries.items():
            for name, tensor in entry.model.tensors.items():
                out[f"{version}.{name}"] = tensor.clone()
            norm = entry.model.normalization
            index.append(
                {
                    "version": version,
                    "source": entry.source,
                    "published": entry.published,
                    "info": entry.info,
                    "normalization": None if norm is None else norm.to_json(),
                }
            )
        out["index"] = torch.frombuffer(bytearray(json.dumps(index).encode()), dtype=torch.uint8)
        return out

    def restore_tensors(self, tensors: dict[str, torch.Tensor], spec) -> None:
        from lstmd.daemon.normalization import ForecastNormalization

        index = json.loads(bytes(tensors["index"].numpy()).decode())
        self.entries.clear()
        for item in index:
            version = item["version"]
            prefix = f"{version}."
            weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            norm = item["normalization"]
            model = ServingModel(
                spec, weights, version, None if norm is None else ForecastNormalization.from_json(norm)
            )
            self.entries[version] = VersionEntry(model, item["source"], item["published"], item["info"])
