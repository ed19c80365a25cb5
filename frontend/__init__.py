"""Frontend: load a model, export it with torch.export, and annotate every node."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from splitc.core.errors import ModelLoadError, first_line
from splitc.frontend.annotate import annotate
from splitc.frontend.signature import signature
from splitc.frontend.loader import LoadedModel, load_model, parse_input_shapes, read_example_inputs
from splitc.core.graph import ModelGraph, is_tensor_node, tensor_spec

__all__ = ["LoadedModel", "ModelGraph", "annotate", "build_graph", "import_model", "load_model",
           "parse_input_shapes", "read_example_inputs"]


_EXPORT_ASSERTIONS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


def localize_sizes(graph: torch.fx.Graph) -> None:
    """Read each symbolic size next to the op that uses it. Export reads a dynamic dimension once,
    from the model input (`sym_size(x, 0)`), and a late op (the flatten before a classifier) uses
    it: a cut in between would have to send an integer, which is no tensor, so every cut of a
    dynamic-batch ResNet was refused. Where the user has a tensor input with a dimension of the same
    size, the size is read from that tensor instead, right before the user."""
    sym_size = torch.ops.aten.sym_size.int
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not sym_size:
            continue
        wanted = node.meta.get("val")
        if not isinstance(wanted, torch.SymInt):
            continue
        for user in list(node.users):
            source = next(((t, d) for t in user.all_input_nodes if t is not node and is_tensor_node(t)
                           for d, size in enumerate(t.meta["val"].shape)
                           if isinstance(size, torch.SymInt) and size.node.expr == wanted.node.expr), None)
            if source is None or source[0] is node.args[0]:
                continue
            with graph.inserting_before(user):
                local = graph.call_function(sym_size, source)
            local.meta["val"] = source[0].meta["val"].shape[source[1]]
            user.replace_input_with(node, local)


def build_graph(loaded: LoadedModel) -> ModelGraph:
    """Decompose to core ATen (the op set every backend imports), unlift, and annotate."""
    try:
        program = loaded.program.run_decompositions()
    except Exception as exc:
        raise ModelLoadError(f"decomposing {loaded.source} to core ATen failed: {first_line(exc)}") from exc
    module = program.module()
    # The input check export attaches re-flattens the model's own structure; splitc's graph takes
    # the flat tensors (the structure is kept as JSON in `signature`).
    module._forward_pre_hooks.clear()
    graph = module.graph
    # `ExportedProgram.module()` adds a call that re-checks export's input guards; splitc checks
    # inputs against the manifest itself, and the call would otherwise land in a partition.
    for node in list(graph.nodes):
        if node.op == "call_module" and node.users == {}:
            graph.erase_node(node)
        # Export's own run-time assertions (dtype/shape metadata of a cast, symbolic ranges): the
        # shapes are static and checked against the manifest, and no backend has a kernel for them.
        elif node.op == "call_function" and node.target in _EXPORT_ASSERTIONS and not node.users:
            graph.erase_node(node)
    localize_sizes(graph)
    graph.eliminate_dead_code()
    # Plain positional calling convention (inputs in, tuple of outputs out) instead of export's
    # pytree wrapper, so passes that add inputs (noise) or rewire outputs keep a callable module.
    graph._codegen = torch.fx.graph.CodeGen()
    module.recompile()
    annotate(module)

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    returned = [a for a in torch.utils._pytree.tree_leaves(output.args[0]) if isinstance(a, torch.fx.Node)]
    for node in placeholders + returned:
        if not is_tensor_node(node):
            raise ModelLoadError(f"{loaded.source}: {node.name} is not a tensor; splitc compiles models whose inputs and outputs are tensors")
    if len({n.name for n in returned}) != len(returned):
        raise ModelLoadError(f"{loaded.source} returns the same tensor twice; return it once")
    return ModelGraph(
        name=loaded.name,
        module=module,
        inputs=tuple(tensor_spec(n) for n in placeholders),
        outputs=tuple(tensor_spec(n) for n in returned),
        source_sha256=loaded.sha256,
        source=loaded.source,
        signature=signature(loaded.program, list(loaded.program.graph_signature.user_inputs)),
    )


def import_model(source: str | Path, *, input_shapes: Sequence[str] = (), example_input=None, trust_pickle=False,
                 weights=None, task=None, verbose=False) -> tuple[LoadedModel, ModelGraph]:
    loaded = load_model(str(source), input_shapes=input_shapes, example_input=example_input, trust_pickle=trust_pickle,
                        weights=weights, task=task, verbose=verbose)
    return loaded, build_graph(loaded)
