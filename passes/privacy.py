"""Attack-free privacy statistic per cut: distance correlation between the model input and what crosses.

The planner needs a leakage score for every candidate cut, measured on calibration data rather than
assumed from depth (../shared/DESIGN.md, "Privacy audit"). This pass gives it Székely's distance
correlation dCor(input, crossing tensors): 1 when what is sent is an isometric image of the input (the
input itself, a shift or a scaling of it), near 0 when it is independent of the input. It is a weak
proxy on its own (on 8x8 digits dCor moves little between cuts while re-identification collapses), so
the planner reports it next to the attack-based audit, not instead of it.

Also here: reading a calibration `.npz` against the model's input specs, and whether a cut reduces the
bytes sent below the model input's (the design card asks the planner to warn when the device part has
no dimension-reducing layer).

numpy + torch, no global state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from splitc.core.errors import InputError, first_line
from splitc.frontend.loader import is_reference, resolve_reference
from splitc.core.graph import ModelGraph, is_tensor_node
from splitc.passes.cuts import CutAnalysis
from splitc.core.manifest import TensorSpec

MIN_SAMPLES = 8  # below this the V-statistic is dominated by its bias; dCor of independent data is ~1

# Keys a single-input model's calibration file may use instead of the input's name, in preference order.
_SINGLE_INPUT_KEYS = ("x", "inputs", "arr_0")
_LABEL_KEYS = ("y", "labels")


# --------------------------------------------------------------------------------------- dCor


def _squared_distances(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """n x n matrix of squared Euclidean distances between the rows of `features` (n, d), float64.

    Gram form (one matmul, no n x n x d intermediate). Rows are first shifted by row 0: distances are
    translation invariant, the shift removes the cancellation of |a|^2 + |b|^2 - 2ab when the rows share
    a large offset, and it makes a constant feature (or a constant input) contribute exact zeros.
    The matmul runs in torch: numpy's BLAS keeps a second thread pool spinning next to torch's, which
    slowed the interleaved model execution threefold on a 2-core host.
    """
    v = torch.as_tensor(features).detach().to(dtype=torch.float64, device="cpu")
    v = v.reshape(v.shape[0], -1)
    v = v - v[:1]
    gram = v @ v.T
    norms = torch.diagonal(gram)
    sq = (norms[:, None] + norms[None, :] - 2.0 * gram).numpy()
    sq = 0.5 * (sq + sq.T)
    np.maximum(sq, 0.0, out=sq)
    np.fill_diagonal(sq, 0.0)
    return sq


def _double_centred(squared: np.ndarray) -> np.ndarray:
    """Double-centred Euclidean distance matrix A_ij = a_ij - a_i. - a_.j + a_.. from squared distances."""
    a = np.sqrt(np.maximum(squared, 0.0))
    row = a.mean(axis=1, keepdims=True)
    col = a.mean(axis=0, keepdims=True)
    return a - row - col + a.mean()


def _dcor_centred(a: np.ndarray, a_var: float, b: np.ndarray) -> float:
    """dCor from two double-centred matrices; `a_var` = mean(a * a), computed once by the caller."""
    b_var = float(np.mean(b * b))
    if a_var <= 0.0 or b_var <= 0.0:  # a constant sample: distance variance 0, dCor defined as 0
        return 0.0
    cov = max(float(np.mean(a * b)), 0.0)  # the V-statistic dCov^2 is >= 0; clamp rounding
    return float(min(np.sqrt(cov / np.sqrt(a_var * b_var)), 1.0))


def _u_centred(squared: np.ndarray) -> np.ndarray:
    """U-centred distance matrix (Székely & Rizzo 2014): the unbiased counterpart of double centring."""
    n = len(squared)
    a = np.sqrt(np.maximum(squared, 0.0))
    u = a - a.sum(axis=1, keepdims=True) / (n - 2) - a.sum(axis=0, keepdims=True) / (n - 2) + a.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def _dcor_u_centred(a: np.ndarray, a_var: float, b: np.ndarray) -> float:
    """Bias-corrected dCor from two U-centred matrices (`a_var` = sum(a * a), computed once).

    The unbiased dCov² estimator can be negative when the samples are independent; it is clamped
    at 0 and the square root taken, so the result is on dCor's scale and near 0 for unrelated data
    whatever the dimensions (the V-statistic's floor for 3,072 vs 10 features at n = 128 is ~0.7).
    """
    b_var = float(np.sum(b * b))
    if a_var <= 0.0 or b_var <= 0.0:
        return 0.0
    r2 = float(np.sum(a * b)) / np.sqrt(a_var * b_var)
    return float(min(np.sqrt(max(r2, 0.0)), 1.0))


def distance_correlation(x: np.ndarray, z: np.ndarray, *, bias_corrected: bool = False) -> float:
    """Székely's distance correlation (V-statistic) between paired samples x (n, p) and z (n, q).

    With bias_corrected=True: the bias-corrected estimator (U-centred matrices, Székely & Rizzo
    2013/2014), square-rooted onto dCor's scale; it needs at least 4 samples.

    dCor^2 = dCov^2(x, z) / sqrt(dVar^2(x) dVar^2(z)), each the mean of a product of double-centred
    Euclidean distance matrices; the result is the square root, in [0, 1]. 1-D arrays are taken as
    (n, 1) and higher-rank ones are flattened per sample. Computed in float64. A constant sample has
    distance variance 0 and gives 0.0.
    """
    x = np.asarray(x)
    z = np.asarray(z)
    if x.ndim == 0 or z.ndim == 0:
        raise ValueError("distance_correlation takes arrays of samples, shaped (n, p) and (n, q)")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"distance_correlation needs paired samples: x has {x.shape[0]}, z has {z.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError(f"distance_correlation needs at least 2 samples, got {x.shape[0]}")
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    z = z.reshape(z.shape[0], -1).astype(np.float64)
    if not (np.isfinite(x).all() and np.isfinite(z).all()):
        raise ValueError("distance_correlation got non-finite values")
    if bias_corrected:
        if x.shape[0] < 4:
            raise ValueError("the bias-corrected distance correlation needs at least 4 samples")
        a = _u_centred(_squared_distances(x))
        return _dcor_u_centred(a, float(np.sum(a * a)), _u_centred(_squared_distances(z)))
    a = _double_centred(_squared_distances(x))
    b = _double_centred(_squared_distances(z))
    return _dcor_centred(a, float(np.mean(a * a)), b)


# --------------------------------------------------------------------------------------- calibration


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class Calibration:
    """Calibration samples for one model.

    inputs: one array per model input, in the graph's input order, each shaped (n, *spec.shape): a stack
        of n per-sample model inputs exactly as the model takes them (a batch-1 model's sample keeps its
        leading 1), with the spec's dtype.
    labels: (n,) int64 class labels, or None.
    """

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray | None = None

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("Calibration needs at least one input array")
        counts = {len(a) for a in self.inputs}
        if len(counts) != 1:
            raise ValueError(f"Calibration inputs disagree on the sample count: {sorted(counts)}")
        if self.labels is not None and self.labels.shape != (len(self.inputs[0]),):
            raise ValueError(f"Calibration labels have shape {self.labels.shape}, expected ({len(self.inputs[0])},)")

    def __len__(self) -> int:
        return len(self.inputs[0])


def _shape_text(shape) -> str:
    """A shape as Python writes a tuple, with symbolic dims allowed: (n, 1, 8, 8), (8,), ()."""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _expected_text(spec: TensorSpec) -> str:
    forms = [_shape_text(("n", *spec.shape))]
    if spec.shape and spec.shape[0] == 1:
        forms.append(_shape_text(("n", *spec.shape[1:])))
    return " or ".join(forms) + f" {spec.dtype}"


def _samples(where: str, key: str, array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """`array` as (n, *spec.shape) in the spec's dtype, or an InputError naming what is wrong."""
    expected = _expected_text(spec)
    if array.ndim >= 1 and array.shape[1:] == tuple(spec.shape):
        out = array
    elif spec.shape and spec.shape[0] == 1 and array.ndim >= 1 and array.shape[1:] == tuple(spec.shape[1:]):
        out = array.reshape(array.shape[0], *spec.shape)  # a batch of samples for a batch-1 model
    else:
        raise InputError(
            f"{where}: key {key!r} has shape {_shape_text(array.shape)} {array.dtype}, "
            f"but input {spec.name!r} expects {expected}"
        )
    if str(out.dtype) != spec.dtype:
        if out.dtype == np.float64 and spec.dtype == "float32":
            out = out.astype(np.float32)
        else:
            raise InputError(
                f"{where}: key {key!r} has dtype {array.dtype} {_shape_text(array.shape)}, "
                f"but input {spec.name!r} expects {expected}; cast it first"
            )
    if out.dtype.kind in "fc" and not np.isfinite(out).all():
        raise InputError(f"{where}: key {key!r} holds NaN or infinite values; input {spec.name!r} expects finite {expected}")
    return np.ascontiguousarray(out)


def load_calibration(path: str | Path, graph: ModelGraph) -> Calibration:
    """Read calibration samples for `graph` from an .npz.

    Keys: each model input's name (graph.inputs[i].name); a single-input model may use `x`, `inputs` or
    `arr_0` (np.savez's default) instead. Labels, optional: `y` or `labels`, (n,) integers. Each input
    array is (n, *spec.shape), or (n, *spec.shape[1:]) for a batch-1 model; float64 is cast to float32
    where the spec says float32, any other dtype mismatch is refused. Every problem is an InputError
    with a one-line message naming the file and key.
    """
    if not Path(path).is_file() and is_reference(str(path)):
        return calibration_from_callable(str(path), graph)
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise InputError(f"calibration file {where} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # np.load raises ValueError/OSError/EOFError/BadZipFile depending on content
        raise InputError(f"calibration file {where} is not an .npz archive ({type(exc).__name__}); write it with numpy.savez") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise InputError(f"calibration file {where} is a single .npy array, not an .npz archive; write it with numpy.savez(path, x=...)")
    with npz:
        keys = list(npz.files)
        try:
            arrays = {k: npz[k] for k in keys}
        except Exception as exc:
            raise InputError(f"calibration file {where} has an unreadable array ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return calibration_from_arrays(arrays, graph, where)


def calibration_from_callable(source: str, graph: ModelGraph) -> Calibration:
    """`package.module:callable` returning the calibration set: a mapping with the .npz keys, or a
    pair (inputs, labels) for a single-input model."""
    fn = resolve_reference(source, InputError)
    try:
        data = fn() if callable(fn) else fn
    except Exception as exc:
        raise InputError(f"calibration callable {source} failed: {first_line(exc)}") from exc
    if isinstance(data, tuple) and len(data) == 2 and len(graph.inputs) == 1:
        data = {"x": data[0], "y": data[1]}
    if not isinstance(data, Mapping):
        raise InputError(f"calibration callable {source} returned a {type(data).__name__}; return a dict of arrays (keys as in the .npz) or (inputs, labels)")
    return calibration_from_arrays({str(k): np.asarray(v) for k, v in data.items()}, graph, source)


def calibration_from_arrays(arrays: dict[str, np.ndarray], graph: ModelGraph, where: str) -> Calibration:
    """Check named arrays (the keys load_calibration documents) against `graph` and return them as
    a Calibration; `where` names their origin in error messages."""
    keys = list(arrays)
    found = ", ".join(repr(k) for k in keys) or "none"
    inputs = []
    for spec in graph.inputs:
        candidates = [spec.name] if spec.name in arrays else []
        if not candidates and len(graph.inputs) == 1:
            candidates = [k for k in _SINGLE_INPUT_KEYS if k in arrays]
            if len(candidates) > 1:
                raise InputError(
                    f"{where}: keys {', '.join(repr(k) for k in candidates)} could each be input {spec.name!r} "
                    f"({_expected_text(spec)}); keep one"
                )
        if not candidates:
            names = [spec.name] + (list(_SINGLE_INPUT_KEYS) if len(graph.inputs) == 1 else [])
            raise InputError(
                f"{where}: no key {' / '.join(repr(k) for k in names)} for input {spec.name!r} "
                f"(expected {_expected_text(spec)}); keys found: {found}"
            )
        inputs.append(_samples(where, candidates[0], arrays[candidates[0]], spec))

    counts = {spec.name: len(a) for spec, a in zip(graph.inputs, inputs)}
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{k!r} {v}" for k, v in counts.items())
        raise InputError(f"{where}: inputs hold different sample counts ({detail}); give every input the same n")
    n = len(inputs[0])
    if n < MIN_SAMPLES:
        raise InputError(
            f"{where}: key {graph.inputs[0].name!r} holds {n} sample(s) of {_expected_text(graph.inputs[0])}; "
            f"dCor needs at least {MIN_SAMPLES} samples"
        )

    label_keys = [k for k in _LABEL_KEYS if k in arrays]
    if len(label_keys) > 1:
        raise InputError(f"{where}: keys 'y' and 'labels' both hold labels; keep one")
    labels = None
    if label_keys:
        key = label_keys[0]
        raw = arrays[key]
        if raw.ndim != 1 or len(raw) != n:
            raise InputError(f"{where}: key {key!r} has shape {_shape_text(raw.shape)}, expected ({n},): one label per sample")
        if not np.issubdtype(raw.dtype, np.integer):
            raise InputError(f"{where}: key {key!r} has dtype {raw.dtype}, expected ({n},) integers (class indices)")
        labels = raw.astype(np.int64)
    return Calibration(tuple(inputs), labels)


# --------------------------------------------------------------------------------------- leakage


def check_calibration(graph: ModelGraph, calibration: Calibration) -> None:
    """Refuse calibration samples whose inputs do not match the graph's in number, shape or dtype."""
    if len(calibration.inputs) != len(graph.inputs):
        raise InputError(f"calibration has {len(calibration.inputs)} input(s), {graph.name} takes {len(graph.inputs)}")
    for spec, array in zip(graph.inputs, calibration.inputs):
        if array.shape[1:] != tuple(spec.shape) or str(array.dtype) != spec.dtype:
            raise InputError(
                f"calibration input {spec.name!r} is {_shape_text(array.shape)} {array.dtype}, "
                f"expected {_shape_text(('n', *spec.shape))} {spec.dtype}; read it with load_calibration"
            )


def sample_indices(n: int, max_samples: int) -> np.ndarray:
    """Evenly spaced, deterministic subset (a file sorted by class still gives every class)."""
    if n <= max_samples:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_samples).round().astype(np.int64))


def leakage_profile(graph: ModelGraph, analysis: CutAnalysis, calibration: Calibration, max_samples: int = 128,
                    *, bias_corrected: bool = True) -> np.ndarray:
    """dCor(model input, what crosses a cut after position p) for every p in `analysis.order`.

    Bias-corrected by default: the plain V-statistic sits far above 0 for unrelated data of
    activation-sized dimensions (~0.6-0.8 at n = 128), which would make every cut look leaky.

    Returns a float64 array of len(analysis.order). The input side is all model inputs of a sample,
    flattened and concatenated; the activation side is every tensor crossing the cut (analysis.
    crossing_nodes(p)), flattened and concatenated. Positions where a non-tensor value (a tuple from a
    multi-output op) is live are NaN, as they are no valid cut. At most `max_samples` samples are used
    (evenly spaced over the calibration set).

    How it stays cheap. dCor needs only each side's n x n Euclidean distance matrix, and the squared
    distance matrix of a concatenation is the sum of its parts' (|[a,b]_i - [a,b]_j|^2 = |a_i - a_j|^2 +
    |b_i - b_j|^2). So no crossing set is ever materialised:
      * the graph is interpreted once per sample, all samples in lock-step node by node (the exported
        graph is specialised to its batch size, so samples cannot be batched); once a node has run for
        every sample its n x n squared-distance matrix is computed, and each sample's value is dropped
        after the node's last reader has run;
      * positions are swept in the same pass: at position p the matrices of nodes last read by p are
        subtracted from a running sum, node p's is added if it is read later, and dCor(input, running
        sum) is taken;
      * a node's matrix is dropped as soon as it stops crossing.
    Memory: O(live nodes x n^2) for the matrices, plus the live activations of n samples (what a batch-n
    forward holds); nothing is kept per position. Time: O(nodes x n^2 x features) for the matrices (one
    float64 matmul per node) and O(nodes x n^2) for the sweep and the dCor per position. The running sum
    is float64; it is reset to exact zeros whenever no tensor crosses, and a brute-force comparison in
    tests/test_privacy.py pins its drift below 1e-8.
    """
    if analysis.graph is not graph:
        raise ValueError("leakage_profile: `analysis` was built for a different ModelGraph than `graph`")
    if max_samples < MIN_SAMPLES:
        raise ValueError(f"leakage_profile: max_samples={max_samples}; dCor needs at least {MIN_SAMPLES} samples")
    check_calibration(graph, calibration)
    if len(calibration) < MIN_SAMPLES:
        raise InputError(f"calibration holds {len(calibration)} sample(s); dCor needs at least {MIN_SAMPLES} samples")

    keep = sample_indices(len(calibration), max_samples)
    n = len(keep)
    order, index, last_use = analysis.order, analysis.index, analysis.last_use
    positions = len(order)
    module = graph.module
    graph_nodes = list(module.graph.nodes)
    placeholders = [node for node in graph_nodes if node.op == "placeholder"]
    if len(placeholders) != len(calibration.inputs):
        raise InputError(f"{graph.name} has {len(placeholders)} placeholder(s), calibration gives {len(calibration.inputs)} input(s)")

    # The input side, straight from the calibration arrays: one matrix per model input, and their sum.
    samples = [array[keep] for array in calibration.inputs]
    placeholder_sq = {node: _squared_distances(x.reshape(n, -1)) for node, x in zip(placeholders, samples)}
    centre, dcor = (_u_centred, _dcor_u_centred) if bias_corrected else (_double_centred, _dcor_centred)
    input_centred = centre(sum(placeholder_sq.values()))
    input_var = float(np.sum(input_centred * input_centred)) if bias_corrected else float(np.mean(input_centred * input_centred))

    # Drop a sample's value once the last node (in graph order) that reads it has run.
    step = {node: k for k, node in enumerate(graph_nodes)}
    free_after: dict[fx.Node, list[fx.Node]] = {}
    for node in graph_nodes:
        last = max((step[user] for user in node.users), default=step[node])
        free_after.setdefault(graph_nodes[last], []).append(node)
    # Placed nodes that stop crossing at each position (read for the last time by that position's node).
    dies_at: dict[int, list[int]] = {}
    for i in range(positions):
        if i < last_use[i] < positions:
            dies_at.setdefault(int(last_use[i]), []).append(i)

    interpreter = fx.Interpreter(module, garbage_collect_values=False)
    envs: list[dict[fx.Node, object]] = [{} for _ in range(n)]
    matrices: dict[int, np.ndarray] = {}  # position -> squared-distance matrix, while that node crosses
    running = np.zeros((n, n), dtype=np.float64)  # sum of `matrices`: the crossing set's squared distances
    live_other = 0                                # non-tensor values crossing
    profile = np.full(positions, np.nan, dtype=np.float64)

    with torch.no_grad():
        for node in graph_nodes:
            if node.op == "output":
                continue
            if node.op == "placeholder":
                k = placeholders.index(node)
                for s in range(n):
                    envs[s][node] = torch.from_numpy(np.ascontiguousarray(samples[k][s]))
            elif node in index:
                for s in range(n):
                    interpreter.env = envs[s]
                    envs[s][node] = interpreter.run_node(node)
            else:  # weights, and ops on weights only: the same for every sample, computed once
                interpreter.env = envs[0]
                value = interpreter.run_node(node)
                for env in envs:
                    env[node] = value

            if node in index:
                p = index[node]
                for i in dies_at.get(p, ()):
                    if i in matrices:
                        running -= matrices.pop(i)
                    else:
                        live_other -= 1
                if last_use[p] > p:
                    if node in placeholder_sq:
                        matrices[p] = placeholder_sq[node]
                    elif is_tensor_node(node):
                        matrices[p] = _value_squared_distances([env[node] for env in envs])
                    else:
                        live_other += 1
                    if p in matrices:
                        running += matrices[p]
                if not matrices:
                    running[...] = 0.0  # nothing crosses: drop the sweep's rounding residue
                if not live_other:
                    profile[p] = dcor(input_centred, input_var, centre(running))

            for dead in free_after.get(node, ()):
                for env in envs:
                    env.pop(dead, None)
    return profile


def _value_squared_distances(values: list[torch.Tensor]) -> np.ndarray:
    """Squared-distance matrix of one node's value across samples (bool/int values as numbers)."""
    return _squared_distances(torch.stack([v.detach().reshape(-1) for v in values]))


def dimension_reduced(analysis: CutAnalysis, position: int) -> bool:
    """Whether fewer bytes cross a cut after `position` than the model inputs hold.

    The design card asks the planner to warn when the device part has no dimension-reducing layer: a
    cut that sends at least as many bytes as the input leaves an inverse network an easy job. Bytes are
    those of every value crossing (analysis.crossing_bytes), non-tensor tuples included.
    """
    if not 0 <= position < len(analysis.order):
        raise IndexError(f"position {position} is outside 0..{len(analysis.order) - 1} of {analysis.graph.name}")
    input_bytes = sum(spec.nbytes for spec in analysis.graph.inputs)
    return int(analysis.crossing_bytes()[position]) < input_bytes
