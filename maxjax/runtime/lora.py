"""Resident LoRA adapters: a name -> slot table and the stacked, rank-padded arrays the programs read.

Slot 0 holds zeros (the base model); adapters take slots 1..max_loras. Every projection of every layer has
arrays for every slot (layout in ``maxjax.architectures.lora``), whatever modules an adapter targets, so all
adapters share one shape. Adding or removing an adapter rebuilds the arrays on the host and uploads them with
the same shapes and dtypes: the compiled programs run unchanged and nothing compiles.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from maxjax.context import check_lora_name
from maxjax.weights.lora import MODULE_SHAPES, LoraAdapter

# Runtime param key -> the PEFT modules whose outputs it concatenates (see llama.fuse_projections).
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "wqkv": ("q_proj", "k_proj", "v_proj"), "w_gate_up": ("gate_proj", "up_proj"),
    "wq": ("q_proj",), "wk": ("k_proj",), "wv": ("v_proj",), "wo": ("o_proj",),
    "w_gate": ("gate_proj",), "w_up": ("up_proj",), "w_down": ("down_proj",),
}


class LoraSlots:
    """The adapters resident on one engine, for layers whose weight keys are ``layer_keys``."""

    def __init__(self, cfg: Any, layer_keys: set[str], max_loras: int, max_rank: int, dtype: Any):
        self.cfg = cfg
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.projections = {key: modules for key, modules in PROJECTIONS.items() if key in layer_keys}
        self._adapters: list[LoraAdapter | None] = [None] * (max_loras + 1)  # slot 0 stays the base model

    @property
    def names(self) -> list[str]:
        return [a.name for a in self._adapters if a is not None]

    def slot_of(self, name: str | None) -> int:
        """The slot of a loaded adapter (0 for None, the base model); ValueError naming unknown ones."""
        if check_lora_name(name, self.names) is None:
            return 0
        return next(slot for slot, a in enumerate(self._adapters) if a is not None and a.name == name)

    def add(self, adapter: LoraAdapter) -> int:
        """Takes the lowest free slot for ``adapter``; ValueError when it cannot be served."""
        if adapter.name in self.names:
            raise ValueError(f"LoRA adapter {adapter.name!r} is already loaded; remove_lora it first")
        if adapter.rank > self.max_rank:
            raise ValueError(f"LoRA adapter {adapter.name!r} has rank {adapter.rank}, above the runtime's "
                             f"max_lora_rank ({self.max_rank})")
        free = [slot for slot, a in enumerate(self._adapters) if slot and a is None]
        if not free:
            raise ValueError(f"cannot load LoRA adapter {adapter.name!r}: all max_loras={self.max_loras} slots "
                             f"hold adapters ({self.names}); remove_lora one first")
        self._adapters[free[0]] = adapter
        return free[0]

    def remove(self, name: str) -> None:
        self._adapters[self.slot_of(name)] = None

    def _stacked(self, key: str) -> dict[str, Any]:
        """Host arrays of one projection for every layer: a [L, in, S, k*R], b: k x [L, S, R, out_i]."""
        modules = self.projections[key]
        L, S, R = self.cfg.num_layers, self.max_loras + 1, self.max_rank
        d_in = MODULE_SHAPES[modules[0]](self.cfg)[0]
        a = np.zeros((L, d_in, S, len(modules) * R), np.float32)
        bs = [np.zeros((L, S, R, MODULE_SHAPES[m](self.cfg)[1]), np.float32) for m in modules]
        for slot, adapter in enumerate(self._adapters):
            for piece, module in enumerate(modules):
                if adapter is None or module not in adapter.weights:
                    continue
                module_a, module_b = adapter.weights[module]  # [L, in, r], [L, r, out]
                r = module_a.shape[-1]
                a[:, :, slot, piece * R:piece * R + r] = module_a
                bs[piece][:, slot, :r] = module_b
        return {"a": a, "b": bs}

    def attach(self, params: dict) -> dict:
        """``params`` (unstacked layers) with each layer's ``"lora"`` arrays built from the resident adapters."""
        stacked = {key: self._stacked(key) for key in self.projections}
        put = lambda array: jax.device_put(array.astype(self.dtype))  # noqa: E731 (a fresh copy: never aliased)
        layers = [dict(layer, lora={key: {"a": put(s["a"][i]), "b": tuple(put(b[i]) for b in s["b"])}
                                    for key, s in stacked.items()})
                  for i, layer in enumerate(params["layers"])]
        return dict(params, layers=layers)
