"""The files of a run: atomic writes, strict JSON, and per-run checkpoints.

A checkpoint is written at the end of an epoch (at most one a second, so that tiny
datasets whose epochs last milliseconds do not spend their time writing files; and
always when the run ends): the tensors (model state and optimizer buffers) in a
safetensors file, everything else (the resolved configuration, step, epoch, metrics so
far) in a JSON file written after it that names it. Both writes are atomic (temporary
file, fsync, rename). Where a checkpoint was written does not change any number: a
resumed run recomputes the same batches from the epoch after it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RUNTIME_KEY", "CheckpointError", "Checkpointer", "atomic_write", "to_json"]

def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one,
    never a mix: a temporary file in the same directory, fsync, then rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def to_json(obj: Any, indent: int | None = 1) -> str:
    """JSON with NaN/inf written as null (strict JSON has no NaN)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


class CheckpointError(ValueError):
    """A checkpoint is damaged or belongs to another configuration."""


# Keys of the configuration that may change between a run and its resumption.
RUNTIME_KEY = "runtime"


def _comparable(config: dict[str, Any]) -> Any:
    return json.loads(to_json({k: v for k, v in config.items() if k != RUNTIME_KEY}))


class Checkpointer:
    """Per-run checkpoint files ``<tag>.json`` and ``<tag>-e<epoch>.safetensors`` in a
    directory. The JSON, written last, names the tensor file it belongs to, so a crash
    between the two writes leaves the previous consistent pair."""

    def __init__(
        self, directory: Path, tag: str, config: dict[str, Any], min_interval_s: float = 1.0
    ) -> None:
        self.directory = Path(directory)
        self.tag = tag
        self.config = config
        self.min_interval_s = min_interval_s
        self._last_save = time.monotonic()

    def due(self) -> bool:
        """Whether an end-of-epoch checkpoint should be written now: at least
        ``min_interval_s`` seconds since the last one (or since this run started), so
        that datasets with millisecond epochs do not spend their time writing files."""
        return time.monotonic() - self._last_save >= self.min_interval_s

    @property
    def json_path(self) -> Path:
        return self.directory / f"{self.tag}.json"

    def save(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        from safetensors.torch import save as save_tensors

        self.directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {
            f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()
        }
        optim_state = optimizer.state_dict()
        for index, entries in optim_state["state"].items():
            for key, value in entries.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
        name = f"{self.tag}-e{state['epoch']:05d}.safetensors"
        atomic_write(self.directory / name, save_tensors(tensors))
        old = self._current_tensor_file()
        payload = {"config": self.config, "tensors": name, **state}
        atomic_write(self.json_path, to_json(payload, indent=None).encode())
        self._last_save = time.monotonic()
        if old is not None and old != name:
            (self.directory / old).unlink(missing_ok=True)

    def finished_record(self) -> dict[str, Any] | None:
        """The run's record if its checkpoint says the run finished, else None (no
        tensors are read): what an interrupt right after the last save must not lose."""
        try:
            state = json.loads(self.json_path.read_text())
            record = state["record"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(record, dict) or record.get("done") is not True:
            return None
        if _comparable(state.get("config", {})) != _comparable(self.config):
            return None
        return record

    def _current_tensor_file(self) -> str | None:
        if not self.json_path.is_file():
            return None
        try:
            return str(json.loads(self.json_path.read_text())["tensors"])
        except (ValueError, KeyError):
            return None

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The saved state (after loading the tensors into ``model``/``optimizer``), or
        None if there is no checkpoint. Raises CheckpointError if the checkpoint belongs
        to another configuration (``config`` without its ``runtime`` entry) or is damaged."""
        from safetensors.torch import load_file

        if not self.json_path.is_file():
            return None
        try:
            state = json.loads(self.json_path.read_text())
        except ValueError as err:
            raise CheckpointError(f"{self.json_path}: damaged checkpoint ({err})") from None
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise CheckpointError(f"{self.json_path}: damaged checkpoint (no configuration)")
        if _comparable(state["config"]) != _comparable(self.config):
            raise CheckpointError(
                f"{self.json_path}: checkpoint of a different configuration than config.json"
            )
        tensor_path = self.directory / str(state.get("tensors"))
        try:
            tensors = load_file(str(tensor_path))
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{tensor_path}: damaged or missing checkpoint tensors ({err})"
            ) from None
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(model_state)
        optim_state = optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state["state"].setdefault(int(index), {})[name] = value
        optimizer.load_state_dict(optim_state)
        return dict(state)
