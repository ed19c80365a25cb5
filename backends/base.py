"""The backend interface: what every backend takes and gives back.

A backend compiles one partition for one target into files in a work directory and says what each
file is (runtime id, role, ISA). Loading is the runtime's job (splitc.runtime.executors), so a device
never imports a backend. Which backends exist, and what each can do, is backends/registry.py.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch.fx as fx

from splitc.passes.partition import Partition


@dataclass
class CompiledArtifact:
    path: Path          # a file inside the work directory
    runtime: str        # splitc.core.manifest.RUNTIME_*
    role: str           # splitc.core.manifest.ROLE_*
    arch: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompiledPartition:
    artifacts: list[CompiledArtifact]
    engine: dict[str, Any] = field(default_factory=dict)  # build status a backend wants recorded
    notes: list[str] = field(default_factory=list)        # what a user should know (deferred engine, ...)


class Backend(Protocol):
    id: str

    def supports(self, node: fx.Node) -> bool:
        """Whether this backend can take the operator of `node` (an operator-support predicate)."""

    def compile(self, partition: Partition, workdir: Path) -> CompiledPartition:
        """Compile `partition` for `partition.target` into files under `workdir`; never mutate it."""


def op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return str(getattr(node.target, "__name__", node.target))
