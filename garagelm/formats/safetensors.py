"""Hugging Face model folders: config.json + one or several (sharded) .safetensors files.

Tensors are memory-mapped by the safetensors library (no pickle, no copy until used); a
missing shard, a broken index or a checkpoint without weights is a one-line error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from garagelm.errors import GarageError


class HFFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise GarageError(f"{self.path}: no config.json; a Hugging Face model folder needs one")
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text())
        except ValueError as e:
            raise GarageError(f"{cfg}: not valid JSON ({e})") from None
        self._where = self._index()

    def _index(self) -> dict[str, Path]:
        """tensor name -> the shard that holds it."""
        from safetensors import safe_open

        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise GarageError(f"{index}: unreadable shard index ({e})") from None
            where = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in set(where.values()):
                if not shard.is_file():
                    raise GarageError(f"{self.path}: shard {shard.name} is listed in the index but missing")
            return where
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            if list(self.path.glob("*.bin")):
                raise GarageError(
                    f"{self.path}: only pickle (.bin) weights, which garagelm never loads (they can run "
                    "code); convert them to safetensors first"
                )
            raise GarageError(f"{self.path}: no .safetensors weights")
        where = {}
        for f in files:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    where[name] = f
        return where

    @property
    def shards(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def shard_of(self, name: str) -> Path:
        """The file that holds tensor `name`."""
        return self._where[name]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, shard by shard."""
        from safetensors import safe_open

        by_shard: dict[Path, list[str]] = {}
        for name, shard in self._where.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            with safe_open(shard, framework="pt") as st:
                for name in names:
                    yield name, st.get_tensor(name)
