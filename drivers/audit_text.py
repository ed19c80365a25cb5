"""Token-recovery audit: how many input tokens an attacker reads back from what a device sends.

The text counterpart of the image audit in drivers/audit.py, for models whose input is token ids
feeding an embedding (BERT-style encoders). `splitc audit` runs it instead of the image attacks when
the model has such an input.

Attack (He et al.'s learned inverse network, ACSAC 2019, adapted to text; the probing attacks of Song
& Raghunathan, CCS 2020): the calibration sentences are split (seeded, 50/50) into the attacker's
auxiliary set and a held-out set. The attacker runs the device part on the auxiliary sentences, takes
what is sent at the cut that holds one vector per token (a (1, T, D) tensor; several are concatenated
per position) and trains a decoder from each position's vector to the token id at that position: a
linear softmax layer over the candidate vocabulary, the tokens of the auxiliary and held-out
sentences together (so chance is 1 / |candidate vocabulary|; a held-out token the auxiliary set never
shows cannot be learned, and the report gives that ceiling). Features are standardised on the
auxiliary set; Adam, minibatches of 128.

Reported on the held-out sentences, next to the floors an attacker gets without the activation:

* token recovery: exact-token rate over real (attention mask 1) positions other than the special
  tokens; [CLS]/[SEP] (found as the token every sentence starts / ends with) are reported apart,
  as they are recoverable from the position and the mask alone;
* sentence recovery: every real token of a sentence recovered, specials included;
* floors: the most frequent auxiliary token at each position (specials placed where the mask says
  they are), and chance;
* ceiling: the share of evaluated held-out tokens the auxiliary set contains;
* dCor (bias-corrected, passes/privacy.py) between the one-hot token ids (every position) and the
  attacked tensors, as sent;
* top-1 accuracy of the whole model with the transform applied, next to the plain accuracy (labels).

`transform` (GaussianNoise, a quantiser: any per-sample callable on a tensor) is applied to the
attacked per-token tensors only; other tensors crossing the cut (the attention mask, the extended
additive mask, whose -3.4e38 entries relative noise would turn to garbage) are sent unchanged, and the
report says so. dFIL is not reported: the input is discrete.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitc.drivers.audit import MIN_AUDIT_SAMPLES, DeviceSplit, Transform, audit_threads, json_number
from splitc.core.errors import CutError, InputError
from splitc.core.graph import ModelGraph
from splitc.passes.privacy import (
    Calibration,
    check_calibration,
    distance_correlation,
    sample_indices,
)
from splitc.core.training import fit, holdout_split

SCHEMA = "splitc.drivers.audit.tokens/1"
DECODER = "linear softmax over the candidate vocabulary (tokens of the auxiliary and held-out sentences)"
DCOR_INPUT = "one-hot token ids, every position"

aten = torch.ops.aten
_EMBEDDINGS = {aten.embedding.default}
# Ops an id tensor may pass through on its way to the embedding without changing what it holds.
_ID_PASS_THROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
                    aten.squeeze.dim, aten.squeeze.default, aten.clone.default, aten.slice.Tensor, aten.expand.default,
                    aten.alias.default}


# --------------------------------------------------------------------------------------- results


@dataclass
class TokenAudit:
    cut: str                               # as the caller named it
    setting: str                           # "plain", or the caller's label for the transform
    bytes_sent: int
    attacked: list[str]                    # the per-token tensors the decoder reads
    recovery: float                        # exact tokens, real non-special held-out positions
    ceiling: float                         # share of those tokens the auxiliary set contains
    special_recovery: float | None         # at the [CLS]/[SEP] positions; None without specials
    sentence_recovery: float               # every real token of a sentence right
    floors: dict[str, dict[str, float]]    # "position_mode": {token, sentence}, "chance": {token}
    candidate_vocab: int
    special_ids: list[int]
    dcor: float
    accuracy: float | None                 # top-1 with the transform applied (with labels)
    accuracy_plain: float | None
    after: str = ""
    tokens: int = 0                        # evaluated held-out tokens
    n_aux: int = 0
    n_held: int = 0
    seconds: float = 0.0
    examples: list[dict[str, list[int]]] = field(default_factory=list)   # held-out ids and recovered ids
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "cut": self.cut, "after": self.after, "setting": self.setting, "bytes_sent": self.bytes_sent,
            "attacked": list(self.attacked), "token_recovery": json_number(self.recovery), "ceiling": json_number(self.ceiling),
            "special_recovery": json_number(self.special_recovery), "sentence_recovery": json_number(self.sentence_recovery),
            "floors": {k: {m: json_number(v) for m, v in f.items()} for k, f in self.floors.items()},
            "candidate_vocab": self.candidate_vocab, "special_ids": list(self.special_ids), "decoder": DECODER,
            "dcor": json_number(self.dcor), "dcor_input": DCOR_INPUT,
            "accuracy": json_number(self.accuracy), "accuracy_plain": json_number(self.accuracy_plain),
            "tokens": self.tokens, "n_aux": self.n_aux, "n_held": self.n_held, "seconds": round(self.seconds, 3),
            "examples": [dict(e) for e in self.examples], "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------- the model's inputs


def token_inputs(graph: ModelGraph) -> list[str]:
    """Names of the integer model inputs that feed an embedding's indices (through view-like ops)."""
    placeholders = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    found = []
    for spec, node in zip(graph.inputs, placeholders):
        if spec.dtype not in ("int64", "int32"):
            continue
        frontier, seen = [node], set()
        while frontier:
            current = frontier.pop()
            if current in seen:
                continue
            seen.add(current)
            for user in current.users:
                if user.target in _EMBEDDINGS and len(user.args) > 1 and user.args[1] is current:
                    found.append(spec.name)
                    frontier = []
                    break
                if user.target in _ID_PASS_THROUGH and user.args and user.args[0] is current:
                    frontier.append(user)
    return found


def _mask_input(graph: ModelGraph, calibration: Calibration, ids_index: int) -> int | None:
    """Index of the attention-mask input: another integer input of the ids' shape holding only 0/1."""
    shape = tuple(graph.inputs[ids_index].shape)
    for k, (spec, array) in enumerate(zip(graph.inputs, calibration.inputs)):
        if k != ids_index and spec.dtype.startswith("int") and tuple(spec.shape) == shape and np.isin(array, (0, 1)).all():
            return k
    return None


def _special_ids(ids: np.ndarray, real: np.ndarray) -> list[int]:
    """Tokens every sentence starts with, or ends with ([CLS], [SEP] of a BERT tokenizer)."""
    rows = np.flatnonzero(real.any(1))
    if len(rows) == 0:
        return []
    first = ids[rows, real[rows].argmax(1)]
    last = ids[rows, real.shape[1] - 1 - real[rows, ::-1].argmax(1)]
    return sorted({int(t[0]) for t in (first, last) if (t == t[0]).all()})


# --------------------------------------------------------------------------------------- the attack


def _train_token_decoder(features: torch.Tensor, labels: torch.Tensor, classes: int, epochs: int, seed: int):
    """Linear softmax decoder features (m, d) -> class (m,), standardised inputs; returns predict(f) -> classes."""
    torch.manual_seed(seed)
    mean, std = features.mean(0, keepdim=True), features.std(0, keepdim=True).clamp_min(1e-6)
    z = (features - mean) / std
    decoder = nn.Linear(z.shape[1], classes)
    optimiser = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    # No early stopping (held_share 0): the decoder memorises a vocabulary, and a token held out to stop
    # training is a token it can never read back (it cost 5 points of recovery after the embeddings).
    fit(decoder, len(z), optimizer=optimiser, loss_of=lambda idx: F.cross_entropy(decoder(z[idx]), labels[idx]), epochs=epochs,
        batch=128, seed=seed, held_share=0.0, description="token decoder")

    def predict(f: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return decoder((f.float() - mean) / std).argmax(1)

    return predict


def _position_mode(ids: np.ndarray, content: np.ndarray) -> np.ndarray:
    """(T,) the most frequent content token at each position (the overall most frequent where none)."""
    tokens = ids[content]
    overall = int(np.bincount(tokens).argmax()) if tokens.size else 0
    out = np.full(ids.shape[1], overall, dtype=ids.dtype)
    for t in range(ids.shape[1]):
        column = ids[content[:, t], t]
        if column.size:
            values, counts = np.unique(column, return_counts=True)
            out[t] = values[counts.argmax()]
    return out


def _floors(ids, real, content, special, aux, held, vocab_size: int) -> dict[str, dict[str, float]]:
    """What an attacker gets without the activation, on the held-out sentences: the most frequent auxiliary
    token at each position, with the special tokens placed where the mask (sent in the clear) puts them;
    and chance over the candidate vocabulary."""
    mode = _position_mode(ids[aux], content[aux])
    truth = ids[held]
    guess = np.where(special[held], truth, np.broadcast_to(mode, truth.shape))
    hit = (guess == truth) | ~real[held]
    return {"position_mode": {"token": float(hit[content[held]].mean()), "sentence": float(hit.all(1).mean())},
            "chance": {"token": 1.0 / vocab_size}}


def _dcor_one_hot(ids: np.ndarray, vocab: np.ndarray, features: torch.Tensor) -> float:
    """Bias-corrected dCor between one-hot ids (n, T) over `vocab` plus one slot for any other id (padding) at
    every position, and per-sample features (n, ...). One-hot distances are sqrt(2 x positions that differ),
    the same over any vocabulary holding the ids."""
    one_hot = np.zeros((*ids.shape, len(vocab) + 1), dtype=np.float32)
    codes = np.where(np.isin(ids, vocab), np.searchsorted(vocab, ids).clip(0, len(vocab) - 1), len(vocab))
    np.put_along_axis(one_hot, codes[..., None], 1.0, axis=2)
    return distance_correlation(one_hot.reshape(len(ids), -1), features.reshape(len(ids), -1).double().numpy(), bias_corrected=True)


def token_ids_input(graph: ModelGraph) -> int:
    """Index of the model input holding the token ids (the first of token_inputs), shaped (1, T); InputError otherwise."""
    names = token_inputs(graph)
    if not names:
        kinds = ", ".join(f"{s.name} {s.dtype}" for s in graph.inputs)
        raise InputError(f"token-recovery audit needs integer token ids feeding an embedding; {graph.name} takes {kinds}")
    index = [s.name for s in graph.inputs].index(names[0])
    spec = graph.inputs[index]
    if not spec.shape or math.prod(spec.shape[:-1]) != 1:
        raise InputError(f"token-recovery audit takes one sequence a sample, ids shaped (1, T); {spec.name} is {tuple(spec.shape)}")
    return index


def per_token_tensors(split: DeviceSplit) -> list[int]:
    """Indices into split.crossing of the floating tensors holding one vector per token (the ids' shape + (D,));
    an extended attention mask (1, 1, T, T) is not one. CutError where the ids themselves cross or none is sent."""
    ids = split.graph.inputs[token_ids_input(split.graph)]
    where = f"the cut after {split.cut.after!r}"
    if ids.name in {s.name for s in split.crossing}:
        raise CutError(f"the token ids {ids.name!r} themselves cross {where}: an attacker reads every token; "
                       f"pick a cut after the last reader of {ids.name!r}")
    picks = [k for k, spec in enumerate(split.crossing)
             if (spec.dtype.startswith("float") or spec.dtype == "bfloat16") and tuple(spec.shape[:-1]) == tuple(ids.shape)]
    if not picks:
        sent = ", ".join(f"{s.name} {tuple(s.shape)} {s.dtype}" for s in split.crossing)
        raise CutError(f"nothing sent at {where} holds one vector per token ({', '.join(map(str, ids.shape))}, D); "
                       f"sent: {sent}; pick a cut between transformer layers")
    return picks


def sent_tensors(split: DeviceSplit, calibration: Calibration, threads: int | None = None) -> tuple[torch.Tensor, ...]:
    """What the device part sends for every calibration sample, clean: one (n, *spec) tensor per crossing tensor.
    Callers auditing several settings of one cut compute it once and pass it as `clean`. `threads` as in
    token_recovery."""
    with audit_threads(split.graph, threads):
        return split.send(*(torch.from_numpy(a) for a in calibration.inputs))


def token_recovery(graph: ModelGraph, cut_name: str, calibration: Calibration, *, transform: Transform | None = None,
                   setting: str = "plain", seed: int = 0, epochs: int = 10, dcor_samples: int = 256,
                   special_ids: Sequence[int] | None = None, n_examples: int = 3, split: DeviceSplit | None = None,
                   clean: Sequence[torch.Tensor] | None = None, threads: int | None = None) -> TokenAudit:
    """Attack what the device sends at `cut_name` for token ids; see the module docstring.

    `special_ids`: token ids reported apart from the others (None: the tokens every calibration
    sentence starts / ends with). `split` and `clean` (from `sent_tensors`) let callers auditing
    several settings of one cut build the split and run the device part once. `threads`: torch
    intra-op threads during the audit (splitc.drivers.audit.audit_threads; default 1, as token ids are small).
    """
    with audit_threads(graph, threads):
        return _token_recovery(graph, cut_name, calibration, transform, setting, seed, epochs, dcor_samples, special_ids,
                               n_examples, split, clean)


def _token_recovery(graph, cut_name, calibration, transform, setting, seed, epochs, dcor_samples, special_ids, n_examples,
                    split, clean) -> TokenAudit:
    started = time.perf_counter()
    check_calibration(graph, calibration)
    ids_index = token_ids_input(graph)
    seq_len = int(graph.inputs[ids_index].shape[-1])
    n = len(calibration)
    if n < MIN_AUDIT_SAMPLES:
        raise InputError(f"calibration holds {n} sentence(s); the token audit needs at least {MIN_AUDIT_SAMPLES} "
                         f"(half train the attacker, half are attacked; a few hundred give stable figures)")
    split = split or DeviceSplit(graph, cut_name)
    picks = per_token_tensors(split)
    notes: list[str] = []

    ids = calibration.inputs[ids_index].reshape(n, seq_len).astype(np.int64)
    mask_index = _mask_input(graph, calibration, ids_index)
    real = np.ones_like(ids, dtype=bool) if mask_index is None else calibration.inputs[mask_index].reshape(n, seq_len) == 1
    if mask_index is None:
        notes.append("no attention-mask input: every position counts as a real token")
    specials = _special_ids(ids, real) if special_ids is None else sorted(int(t) for t in special_ids)
    content = real & ~np.isin(ids, specials)
    special = real & np.isin(ids, specials)

    clean = tuple(clean) if clean is not None else sent_tensors(split, calibration)
    attacked = [clean[k] for k in picks]
    if transform is not None:
        with torch.no_grad():
            attacked = [torch.stack([transform(t[i]) for i in range(n)]) for t in attacked]
        others = [f"{s.name} {tuple(s.shape)}" for k, s in enumerate(split.crossing) if k not in picks and s.dtype.startswith("float")]
        if others:
            notes.append(f"transform applied to the per-token tensors only; {', '.join(others)} sent unchanged")
    features = torch.cat([t.reshape(n, seq_len, -1).float() for t in attacked], dim=2)   # (n, T, D)
    if not torch.isfinite(features).all():
        raise InputError(f"the per-token tensors sent at {cut_name!r} ({setting}) hold NaN or infinite values")

    aux, held = holdout_split(n, 0.5, seed)
    vocab = np.unique(ids[real])
    classes = np.searchsorted(vocab, ids).clip(0, len(vocab) - 1)         # exact at real positions
    aux_real = torch.from_numpy(real[aux])
    predict = _train_token_decoder(features[aux][aux_real], torch.from_numpy(classes[aux][real[aux]]), len(vocab), epochs, seed)
    recovered = np.zeros((len(held), seq_len), dtype=np.int64)
    recovered[real[held]] = vocab[predict(features[held][torch.from_numpy(real[held])]).numpy()]
    truth = ids[held]
    hit = (recovered == truth) & real[held]
    held_content, held_special = content[held], special[held]
    tokens = int(held_content.sum())
    if tokens == 0:
        raise InputError("the held-out sentences hold no tokens besides padding and special tokens; give longer sentences")
    recovery = float(hit[held_content].mean())
    special_recovery = float(hit[held_special].mean()) if held_special.any() else None
    sentence_recovery = float((hit | ~real[held]).all(1).mean())
    ceiling = float(np.isin(truth[held_content], ids[aux][real[aux]]).mean())

    floors = _floors(ids, real, content, special, aux, held, len(vocab))
    pick = sample_indices(n, dcor_samples)
    dcor = _dcor_one_hot(ids[pick], vocab, features[pick])

    accuracy = accuracy_plain = None
    if calibration.labels is not None:
        accuracy, accuracy_plain = _accuracies(split, calibration, clean, picks, attacked, transform is not None, notes)

    examples = [{"ids": truth[i][real[held][i]].tolist(), "recovered": recovered[i][real[held][i]].tolist()}
                for i in range(min(n_examples, len(held)))]
    return TokenAudit(cut=cut_name, setting=setting, bytes_sent=int(split.cut.nbytes), attacked=[split.crossing[k].name for k in picks],
                      recovery=recovery, ceiling=ceiling, special_recovery=special_recovery, sentence_recovery=sentence_recovery,
                      floors=floors, candidate_vocab=len(vocab), special_ids=specials, dcor=dcor, accuracy=accuracy,
                      accuracy_plain=accuracy_plain, after=split.cut.after, tokens=tokens, n_aux=len(aux), n_held=len(held),
                      seconds=time.perf_counter() - started, examples=examples, notes=notes)


def _accuracies(split: DeviceSplit, calibration: Calibration, clean, picks, attacked, transformed: bool, notes: list[str]):
    """Top-1 of the whole model on every calibration sample with the attacked tensors as sent, and plain."""
    inputs = tuple(torch.from_numpy(a) for a in calibration.inputs)
    sent = list(clean)
    for k, t in zip(picks, attacked):
        sent[k] = t.to(clean[k].dtype)
    out = split.finish(inputs, sent)[0]
    n = len(calibration)
    if not (out.is_floating_point() and out.shape[-1] > 1 and out[0].numel() == out.shape[-1]):
        notes.append("accuracy not measured: the model's first output is not one row of class scores")
        return None, None
    accuracy = float((out.reshape(n, -1).argmax(1).numpy() == calibration.labels).mean())
    plain = split.finish(inputs, clean)[0] if transformed else out
    return accuracy, float((plain.reshape(n, -1).argmax(1).numpy() == calibration.labels).mean())


# --------------------------------------------------------------------------------------- outputs


def token_report_json(audits: Sequence[TokenAudit]) -> dict:
    """The token-recovery audit as JSON: one entry per cut and setting (TokenAudit.to_json)."""
    return {"schema": SCHEMA, "attack": "learned inverse: " + DECODER, "audits": [a.to_json() for a in audits]}


def print_token_table(audits: Sequence[TokenAudit], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    table = Table(title="token-recovery audit: tokens an attacker reads back from the sent hidden states (held-out sentences)")
    for column in ("cut", "setting", "sent", "tokens", "ceiling", "floor: pos-mode", "chance", "[CLS]/[SEP]", "sentences",
                   "dCor", "top-1"):
        table.add_column(column, justify="left" if column in ("cut", "setting") else "right")
    for a in audits:
        accuracy = "" if a.accuracy is None else f"{a.accuracy:.3f}" + (
            f" ({a.accuracy - a.accuracy_plain:+.3f})" if a.accuracy_plain is not None and a.setting != "plain" else "")
        floor = a.floors["position_mode"]
        table.add_row(a.cut, a.setting, f"{a.bytes_sent} B", f"{a.recovery:.3f}", f"{a.ceiling:.3f}", f"{floor['token']:.3f}",
                      f"{a.floors['chance']['token']:.4f}", "" if a.special_recovery is None else f"{a.special_recovery:.3f}",
                      f"{a.sentence_recovery:.3f} (floor {floor['sentence']:.3f})", f"{a.dcor:.3f}", accuracy)
    console.print(table)
    vocab = sorted({a.candidate_vocab for a in audits})
    console.print(f"[dim]note: decoder: {DECODER}; |vocabulary| {', '.join(map(str, vocab))}; ceiling = share of held-out "
                  f"tokens the auxiliary set contains; tokens exclude padding and special ids "
                  f"{sorted({t for a in audits for t in a.special_ids})}[/dim]")
    for note in sorted({note for a in audits for note in a.notes}):
        console.print(f"[dim]note: {note}[/dim]")
