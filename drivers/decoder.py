"""Compile a causal decoder LM into a split bundle: two stateful halves with declared KV state.

    loaded -> layout (passes/decoder_split) -> halves -> ONNX per half (backends/onnx_stateful)
           -> check the artifacts against transformers -> bundle (manifest `decoder` section,
              tokenizer files, reference logits)

The check runs before the bundle is renamed into place: the compiled halves, chained by the torch-free
runtime, must reproduce transformers' logits for a prefill and several decode steps and pick the same
greedy tokens, or nothing is written.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

import splitc
from splitc.backends.onnx_stateful import export_dynamic
from splitc.core.bundle import record_artifact, staged_directory, write_manifest
from splitc.core.errors import CutError, TargetError, VerificationFailed
from splitc.core.manifest import (
    REFERENCE_NAME,
    BundleFile,
    DecoderSpec,
    Manifest,
    PartitionSpec,
    StateSpec,
    TensorSpec,
    sha256_file,
)
from splitc.drivers.compiler import CompileResult
from splitc.frontend.decoder import LoadedDecoder, save_tokenizer
from splitc.passes.decoder_split import DecoderShape, cut_layer, decoder_shape, drafting_halves, recognise_layout, split_halves
from splitc.targets import Target

DEFAULT_MAX_LEN = 256
REFERENCE_DECODE_STEPS = 4
# Logits of the compiled halves against transformers, relative to the logits' norm: float32 through
# two different kernel libraries, a few layers deep.
LOGITS_RTOL = 1e-3
ENTRY_MAIN, ENTRY_DRAFT, ENTRY_VERIFY = "generate", "draft", "verify"
DYNAMIC = {"T": "new positions in this call", "S": "positions already in the state"}


def compile_decoder(loaded: LoadedDecoder, targets: Sequence[Target], out: Path, *, cut: str, max_len: int = DEFAULT_MAX_LEN,
                    draft: bool = False, log: Callable[[str], None] = lambda _: None) -> CompileResult:
    """`draft`: also compile the drafting entries (an exit LM head on the device, all-row logits in
    the cloud) for self-speculative generation (runtime/drafting.py)."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    if len(targets) != 2:
        raise TargetError(f"a decoder splits over two targets (device, cloud); got {len(targets)}: {', '.join(t.name for t in targets)}")
    if max_len < 2:
        raise CutError(f"--max-len {max_len} leaves no room to generate; use at least 2")
    model = loaded.model
    layout = recognise_layout(model, max_len)
    if not cut or cut == "auto":
        raise CutError(f"a decoder needs its cut named: --cut {layout.layer_path(0)[:-1]}<i> (the device runs layers 0..i)")
    device_layers = cut_layer(layout, model, cut)
    shape = decoder_shape(model, layout)
    halves = split_halves(model, layout, device_layers)
    draft_halves = drafting_halves(model, layout, device_layers) if draft else ()
    reference = reference_generation(model, shape, steps=REFERENCE_DECODE_STEPS)
    seconds["plan"] = time.perf_counter() - started

    with staged_directory(Path(out)) as staging:
        specs, states = [], []
        for index, (half, target) in enumerate(zip(halves, targets)):
            tick = time.perf_counter()
            layers = device_layers if index == 0 else shape.layers - device_layers
            log(f"compiling partition {index} ({layers} layers{' + embedding' if index == 0 else ' + norm + LM head'}) "
                f"for {target.name} with onnxruntime")
            spec, state = compile_half(half, index, layers, shape, target, max_len, staging)
            if draft:
                log(f"compiling the {'draft' if index == 0 else 'verify'} entry of partition {index}")
                entry = ENTRY_DRAFT if index == 0 else ENTRY_VERIFY
                spec = with_entry(spec, compile_half(draft_halves[index], index, layers, shape, target, max_len, staging, entry)[0])
            specs.append(spec)
            states.append(state)
            seconds[f"p{index}:{target.name}"] = time.perf_counter() - tick
        reference_path = staging / REFERENCE_NAME
        np.savez(reference_path, **reference)
        decoder = DecoderSpec(
            family=layout.family, layers=shape.layers, device_layers=device_layers, hidden=shape.hidden,
            vocab=shape.vocab, max_len=max_len, state=tuple(states), eos_ids=eos_ids(model, loaded.tokenizer, shape.vocab),
            bos_id=_int_or_none(getattr(loaded.tokenizer, "bos_token_id", None)),
            tokenizer=tokenizer_files(loaded.tokenizer, staging),
            chat_template=getattr(loaded.tokenizer, "chat_template", None) if loaded.tokenizer is not None else None,
            special_tokens=special_tokens(loaded.tokenizer), dynamic=dict(DYNAMIC),
        )
        manifest = Manifest(
            model={"name": loaded.name, "source": loaded.source, "sha256": loaded.sha256, "kind": "decoder",
                   "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())},
            inputs=specs[0].inputs[:1],
            outputs=specs[1].outputs[:1],
            targets=tuple(t.summary() for t in targets),
            partitions=tuple(specs),
            boundaries=(specs[0].outputs[:1],),
            plan={"method": "manual", "cuts": [{"after": cut, "device_layers": device_layers,
                                                 "bytes_per_token": 4 * shape.hidden}],
                  "backend_choice": "onnxruntime for both halves: one dynamic-shape graph serves prefill and decode, "
                                    "and untuned TVM is far slower on matmul-heavy decoders"},
            reference={"path": REFERENCE_NAME, "sha256": sha256_file(reference_path), "samples": 1},
            decoder=decoder,
            splitc_version=splitc.__version__,
        )
        write_manifest(staging, manifest)
        tick = time.perf_counter()
        check = check_bundle_against_reference(staging, reference)
        seconds["check"] = time.perf_counter() - tick
        log(f"checked: {check['steps']} steps, greedy tokens identical, max relative logits error {check['max_rel_error']:.2e}")
    seconds["total"] = time.perf_counter() - started
    return CompileResult(Path(out), manifest, seconds, [])


def compile_half(half, index: int, layers: int, shape: DecoderShape, target: Target, max_len: int, staging: Path,
                 entry: str = ENTRY_MAIN) -> tuple[PartitionSpec, tuple[StateSpec, ...]]:
    """Export one half with dynamic T and S and record it as a partition with declared state.
    `entry`: the generation graph, or a drafting one (device: + exit-head logits; cloud: logits of
    every row)."""
    state_shape = (max_len, layers, shape.kv_heads, shape.head_dim)
    # Two distinct tensors: torch.export takes one tensor passed twice as one input, and the ONNX
    # graph would then read the keys where it should read the values.
    past_key, past_value = (torch.zeros(3, layers, shape.kv_heads, shape.head_dim) for _ in range(2))
    steps, positions = torch.export.Dim("T", min=1, max=max_len), torch.export.Dim("S", min=0, max=max_len)
    if index == 0:
        x, x_spec = torch.zeros(1, 4, dtype=torch.long), TensorSpec("input_ids", (1, -1), "int64")
        y_specs = (TensorSpec("hidden", (1, -1, shape.hidden), "float32"),)
        if entry == ENTRY_DRAFT:
            y_specs += (TensorSpec("draft_logits", (1, 1, shape.vocab), "float32"),)
    else:
        x, x_spec = torch.zeros(1, 4, shape.hidden), TensorSpec("hidden", (1, -1, shape.hidden), "float32")
        y_specs = (TensorSpec("logits", (1, -1 if entry == ENTRY_VERIFY else 1, shape.vocab), "float32"),)
    inputs = (x_spec, TensorSpec("past_key", (-1, *state_shape[1:]), "float32"), TensorSpec("past_value", (-1, *state_shape[1:]), "float32"))
    outputs = y_specs + (TensorSpec("new_key", (-1, *state_shape[1:]), "float32"), TensorSpec("new_value", (-1, *state_shape[1:]), "float32"))
    name = "model.onnx" if entry == ENTRY_MAIN else f"{entry}.onnx"
    compiled = export_dynamic(half, (x, past_key, past_value), ({1: steps}, {0: positions}, {0: positions}),
                              [t.name for t in inputs], [t.name for t in outputs], staging / f"p{index}" / name,
                              options={**target.backend_options, "entry": entry})
    artifact = record_artifact(staging, compiled.path, runtime=compiled.runtime, role=compiled.role, arch=compiled.arch,
                               options=compiled.options)
    state = (StateSpec("key", state_shape, "float32", 0, "past_key", "new_key"),
             StateSpec("value", state_shape, "float32", 0, "past_value", "new_value"))
    spec = PartitionSpec(index=index, target=target.name, backend="onnxruntime", inputs=inputs, outputs=outputs,
                         artifacts=(artifact,), nodes=(), flops=0)
    return spec, state


def with_entry(spec: PartitionSpec, extra: PartitionSpec) -> PartitionSpec:
    """`spec` with the artifact of another entry of the same half after its own (the runtime's
    default pick stays the generation graph)."""
    return dataclasses.replace(spec, artifacts=spec.artifacts + extra.artifacts)


def reference_generation(model, shape: DecoderShape, *, steps: int, prompt_len: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """transformers' greedy continuation of a seeded random prompt and its logits at every
    generated position: what the compiled halves must reproduce."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, shape.vocab, (1, prompt_len), generator=generator)
    with torch.no_grad():
        ids = prompt
        for _ in range(steps + 1):
            logits = model(ids).logits[0, -1]
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        all_logits = model(ids).logits[0, prompt_len - 1:-1]
    return {"prompt_ids": prompt[0].numpy(), "generated_ids": ids[0, prompt_len:].numpy(), "logits": all_logits.numpy()}


def compare_with_reference(bundle_dir: Path, reference: dict[str, np.ndarray]) -> dict:
    """Run the bundle with the runtime (prefill, then one decode step per generated token) and
    compare its logits and greedy tokens with transformers' (the bundle's reference.npz)."""
    from splitc.runtime.generation import GenerationSession, LocalCloud
    from splitc.runtime.session import Bundle

    session = GenerationSession(Bundle.open(bundle_dir))
    cloud: LocalCloud = session.cloud
    prompt, expected_ids, expected = reference["prompt_ids"], reference["generated_ids"], reference["logits"]
    rows = [cloud.logits(session.device.run(prompt[None, :].astype(np.int64)))[0, -1]]
    for token in expected_ids[:-1]:
        rows.append(cloud.logits(session.device.run(np.array([[token]], dtype=np.int64)))[0, -1])
    got = np.stack(rows)
    errors = np.linalg.norm(got - expected, axis=1) / np.maximum(np.linalg.norm(expected, axis=1), 1e-12)
    tokens = got.argmax(axis=1)
    return {"steps": len(rows), "max_rel_error": float(errors.max()), "tokens": tokens.tolist(),
            "expected_tokens": expected_ids.tolist(), "ok": bool(errors.max() <= LOGITS_RTOL and np.array_equal(tokens, expected_ids))}


def check_bundle_against_reference(bundle_dir: Path, reference: dict[str, np.ndarray]) -> dict:
    result = compare_with_reference(bundle_dir, reference)
    if not result["ok"]:
        raise VerificationFailed(f"the compiled halves disagree with transformers: relative logits error {result['max_rel_error']:.2e} "
                                 f"(tolerance {LOGITS_RTOL:g}), tokens {result['tokens']} vs {result['expected_tokens']}; nothing was written")
    return result


def verify_decoder(path: str | Path, log: Callable[[str], None] = lambda _: None):
    """`splitc verify` on a decoder bundle: the chained halves, here, against the reference logits
    (prefill + decode steps) that transformers computed at compile time."""
    from splitc.drivers.verify import Check, VerifyReport
    from splitc.runtime.session import Bundle

    started = time.perf_counter()
    bundle = Bundle.open(path)
    result = compare_with_reference(Path(path), bundle.reference())
    targets = " -> ".join(p.target for p in bundle.manifest.partitions)
    note = "" if result["ok"] else f"tokens {result['tokens']} vs {result['expected_tokens']}"
    check = Check(f"decoder prefill + {result['steps'] - 1} decode steps ({targets})", None, targets,
                  ", ".join(p.artifacts[0].path for p in bundle.manifest.partitions), "portable",
                  "pass" if result["ok"] else "fail", rtol=LOGITS_RTOL, max_rel_err=result["max_rel_error"],
                  samples=result["steps"], note=note, seconds=time.perf_counter() - started)
    log(f"decoder: {result['steps']} steps, max relative logits error {result['max_rel_error']:.2e}")
    return VerifyReport(str(path), [check], time.perf_counter() - started)


def eos_ids(model, tokenizer, vocab: int) -> tuple[int, ...]:
    """End-of-sequence ids from the generation config, the model config and the tokenizer (those
    inside the vocabulary: random test configs keep GPT-2's 50256)."""
    found: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and 0 <= int(token) < vocab and int(token) not in found:
                found.append(int(token))
    return tuple(found)


def special_tokens(tokenizer) -> dict[str, str]:
    if tokenizer is None:
        return {}
    return {name: str(getattr(tokenizer, name)) for name in ("bos_token", "eos_token") if getattr(tokenizer, name, None)}


def tokenizer_files(tokenizer, staging: Path) -> tuple[BundleFile, ...]:
    if tokenizer is None:
        return ()
    written = save_tokenizer(tokenizer, staging / "tokenizer")
    written.sort(key=lambda p: p.name != "tokenizer.json")
    return tuple(BundleFile(p.relative_to(staging).as_posix(), sha256_file(p)) for p in written)


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)
