"""Shared fixtures: the test-model zoo exported once per session.

Exporting is the slow part of these tests, so every model is exported to a `.pt2` and imported
through `splitc.frontend.import_model` at most once per session, lazily (a test run that needs only
one model pays for one). Tests must not modify the graphs they get beyond the TIER tags that
`assign_tiers` rewrites in full every time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import models


class Zoo:
    """Lazily exported and imported test models, keyed by factory name (see tests.models.ZOO)."""

    names = tuple(models.ZOO)

    def __init__(self, directory: Path):
        self.directory = directory
        self._modules: dict[str, torch.nn.Module] = {}
        self._paths: dict[str, Path] = {}
        self._imported: dict[str, tuple] = {}

    def module(self, name: str) -> torch.nn.Module:
        if name not in self._modules:
            self._modules[name] = models.ZOO[name]()
        return self._modules[name]

    def inputs(self, name: str) -> tuple[torch.Tensor, ...]:
        return models.ZOO[name].example_inputs()

    def path(self, name: str) -> Path:
        if name not in self._paths:
            self._paths[name] = models.save_pt2(self.module(name), self.inputs(name), self.directory / f"{name}.pt2")
        return self._paths[name]

    def loaded(self, name: str):
        return self._import(name)[0]

    def graph(self, name: str):
        return self._import(name)[1]

    def _import(self, name: str):
        if name not in self._imported:
            from splitc.frontend import import_model

            self._imported[name] = import_model(self.path(name))
        return self._imported[name]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def resnet_graph(zoo):
    return zoo.graph("resnet_like")


@pytest.fixture(scope="session")
def multi_io_graph(zoo):
    return zoo.graph("multi_io")


@pytest.fixture(params=Zoo.names)
def zoo_name(request) -> str:
    """Parametrises a test over every model of the zoo."""
    return request.param

