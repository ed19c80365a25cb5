"""The exported program's input and output structure as plain JSON (runtime/structure.py), with
each flat tensor's path: `d.img` for the `img` entry of a dict argument `d`, `extra` for a keyword
argument, `aux.0` for the first element of a returned tuple under key `aux`."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from splitc.runtime.structure import DICT, LEAF, LIST, NONE, TUPLE, leaf_paths


class UnsupportedStructure(ValueError):
    """A pytree node type with no JSON form (a namedtuple, a dataclass, a custom container)."""


def tree_json(spec: pytree.TreeSpec, start: int = 0) -> tuple[dict[str, Any], int]:
    """`spec` as runtime/structure.py's JSON; leaves numbered from `start`. Returns (tree, next index)."""
    if spec.is_leaf():
        return {"type": LEAF, "index": start}, start + 1
    kinds = {tuple: TUPLE, list: LIST, dict: DICT, type(None): NONE}
    if spec.type not in kinds:
        raise UnsupportedStructure(f"{getattr(spec.type, '__name__', spec.type)} has no plain JSON form")
    children = []
    for child in spec.children():
        tree, start = tree_json(child, start)
        children.append(tree)
    node: dict[str, Any] = {"type": kinds[spec.type]}
    if spec.type is dict:
        if not all(isinstance(k, (str, int)) for k in spec.context):
            raise UnsupportedStructure("dict keys other than strings and integers have no plain JSON form")
        node["keys"] = list(spec.context)
    if children or spec.type is not type(None):
        node["children"] = children
    return node, start


def argument_names(input_tree: dict[str, Any], placeholder_names: list[str]) -> list[str]:
    """The names of the positional arguments. torch.export names a placeholder after the argument
    and its path inside it (`d_img` for d["img"]), so stripping the path's suffix from the first
    leaf's name gives the argument's name back; `arg<i>` where it does not."""
    args = input_tree["children"][0]
    names = []
    for i, arg in enumerate(args["children"]):
        paths = leaf_paths(arg)
        if not paths:
            names.append(f"arg{i}")
            continue
        first = min(paths)
        suffix = "_" + paths[first].replace(".", "_") if paths[first] else ""
        name = placeholder_names[first] if first < len(placeholder_names) else ""
        base = name[: len(name) - len(suffix)] if suffix and name.endswith(suffix) else (name if not suffix else "")
        names.append(base if base.isidentifier() else f"arg{i}")
    return names


def signature(program: torch.export.ExportedProgram, placeholder_names: list[str]) -> dict[str, Any] | None:
    """{"inputs": tree, "outputs": tree, "arguments": [positional names], "input_paths": [...],
    "output_paths": [...]}; None for a structure without a JSON form (flat names still work)."""
    call_spec = program.call_spec
    if call_spec.in_spec is None or call_spec.out_spec is None:
        return None
    try:
        inputs, _ = tree_json(call_spec.in_spec)
        outputs, _ = tree_json(call_spec.out_spec)
    except UnsupportedStructure:
        return None
    arguments = argument_names(inputs, placeholder_names)
    args, kwargs = inputs["children"]
    input_paths: dict[int, str] = {}
    for name, arg in zip(arguments, args["children"]):
        input_paths.update({i: f"{name}.{p}" if p else name for i, p in leaf_paths(arg).items()})
    input_paths.update(leaf_paths(kwargs))
    output_paths = leaf_paths(outputs)
    return {
        "inputs": inputs,
        "outputs": outputs,
        "arguments": arguments,
        "input_paths": [input_paths[i] for i in sorted(input_paths)],
        "output_paths": [output_paths[i] for i in sorted(output_paths)],
    }


def named_by_path(specs, paths) -> tuple:
    """`specs` with each one's path (by flat position); specs past the paths (inputs a pass added,
    such as noise) keep none."""
    from dataclasses import replace

    return tuple(replace(spec, path=paths[i]) if i < len(paths) and paths[i] else spec for i, spec in enumerate(specs))
