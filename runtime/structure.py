"""The model's own input and output structure (dicts, tuples, lists, keyword arguments) as plain
JSON, and the two walks the runtime needs: nested inputs -> flat tensors, flat outputs -> nested.

A tree is a JSON object: {"type": "leaf", "index": i} names the i-th flat tensor (the order of the
manifest's inputs or outputs); {"type": "tuple"|"list", "children": [...]};
{"type": "dict", "keys": [...], "children": [...]}; {"type": "none"} for a None in the structure.
The input tree is {"type": "tuple", "children": [args, kwargs]}, as Python calls a function.
Stdlib only: a device runs this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

from splitc.core.errors import InputError

LEAF, TUPLE, LIST, DICT, NONE = "leaf", "tuple", "list", "dict", "none"


def leaf_paths(tree: Mapping[str, Any], prefix: str = "") -> dict[int, str]:
    """Flat index -> dotted path (`d.img`, `aux.0`) of every leaf below `tree`."""
    kind = tree["type"]
    if kind == LEAF:
        return {int(tree["index"]): prefix}
    keys = tree.get("keys") or range(len(tree.get("children") or ()))
    paths: dict[int, str] = {}
    for key, child in zip(keys, tree.get("children") or ()):
        paths.update(leaf_paths(child, f"{prefix}.{key}" if prefix else str(key)))
    return paths


def unflatten(tree: Mapping[str, Any], leaf: Callable[[int], Any]) -> Any:
    """The nested value of `tree` with each leaf i replaced by `leaf(i)`."""
    kind = tree["type"]
    if kind == LEAF:
        return leaf(int(tree["index"]))
    if kind == NONE:
        return None
    children = [unflatten(child, leaf) for child in tree.get("children") or ()]
    if kind == DICT:
        return dict(zip(tree["keys"], children))
    return tuple(children) if kind == TUPLE else children


def flatten_into(tree: Mapping[str, Any], value: Any, out: dict[int, Any], where: str) -> None:
    """Walk `value` along `tree`, writing each leaf's value to out[index]; refuse a different structure."""
    kind = tree["type"]
    if kind == LEAF:
        out[int(tree["index"])] = value
        return
    if kind == NONE:
        return
    children = tree.get("children") or ()
    if kind == DICT:
        if not isinstance(value, Mapping):
            raise InputError(f"input {where or 'arguments'} must be a dict with keys {', '.join(map(str, tree['keys']))}, got {type(value).__name__}")
        missing = [k for k in tree["keys"] if k not in value]
        if missing:
            raise InputError(f"input {where or 'arguments'} lacks key(s) {', '.join(map(str, missing))}")
        for key, child in zip(tree["keys"], children):
            flatten_into(child, value[key], out, f"{where}.{key}" if where else str(key))
        return
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != len(children):
        raise InputError(f"input {where or 'arguments'} must be a {kind} of {len(children)}, got {type(value).__name__}")
    for i, (child, item) in enumerate(zip(children, value)):
        flatten_into(child, item, out, f"{where}.{i}" if where else str(i))


def top_level_arguments(input_tree: Mapping[str, Any], arg_names: Sequence[str]) -> dict[str, Mapping[str, Any]]:
    """Argument name -> its subtree: positional ones by the names the manifest gives them, keyword
    ones by their keywords."""
    args, kwargs = input_tree["children"]
    named = dict(zip(arg_names, args.get("children") or ()))
    named.update(zip(kwargs.get("keys") or (), kwargs.get("children") or ()))
    return named


def flat_by_name(inputs: Any, names: Sequence[str], paths: Sequence[str], signature: Mapping[str, Any] | None) -> Any:
    """The caller's inputs keyed by flat tensor name where they came by path (`d.img`) or nested
    (`{"d": {"img": x}}`, `[{"img": x}]`); anything else is passed on unchanged for the usual checks.
    `names` and `paths` are the manifest's inputs, in flat order."""
    by_path = {p: n for n, p in zip(names, paths) if p}
    if signature is None:
        if isinstance(inputs, Mapping):
            return {by_path.get(k, k): v for k, v in inputs.items()}
        return inputs
    arguments = top_level_arguments(signature["inputs"], signature.get("arguments") or ())
    if isinstance(inputs, Mapping):
        flat: dict[str, Any] = {}
        for key, value in inputs.items():
            if key in by_path:
                flat[by_path[key]] = value
            elif key in arguments and key not in names:
                leaves: dict[int, Any] = {}
                flatten_into(arguments[key], value, leaves, key)
                flat.update({names[i]: v for i, v in leaves.items()})
            else:
                flat[key] = value
        return flat
    positional = signature["inputs"]["children"][0]
    structured = any(isinstance(v, (Mapping, list, tuple)) for v in inputs)
    if structured and len(inputs) == len(positional.get("children") or ()):
        leaves = {}
        flatten_into(positional, tuple(inputs), leaves, "")
        return {names[i]: v for i, v in leaves.items()}
    return inputs
