"""Self-speculative split generation: the device drafts n tokens with an exit LM head on its own
last layer, the cloud verifies them in one call (one round trip) and both sides keep only the
accepted positions. Greedy output is identical to one-token-per-round-trip generation.

A round, from the last verified token x (not yet run on the device):

    device  runs x, d1 .. d(n-1)  -> hidden rows r0 .. r(n-1), drafts d1 .. dn (exit-head argmax)
    cloud   runs r0 .. r(n-1) in one call -> its own choices c1 .. cn (ci follows row i-1)
    accept  a = the longest prefix with ci == di; emit c1 .. c(min(a+1, n)): the accepted drafts and
            the cloud's own token after them
    both    roll their KV state back to the emitted length: the rows of rejected drafts are dropped,
            as if they had never been sent

Needs a bundle compiled with drafting entries (`compile_decoder(..., draft=True)`): partition 0's
`draft` graph (outputs hidden, draft_logits, new_key, new_value) and partition 1's `verify` graph
(logits of every row). The cloud half is a LocalVerifier here, or a RemoteCloud against
`splitc serve` (POST .../sessions/<id>/verify: one round trip per round).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from splitc.core.errors import BundleError, InputError
from splitc.runtime.executors import load_executor
from splitc.runtime.generation import StatefulHalf, _rates, decoder_spec
from splitc.runtime.session import Bundle


def entry_executor(bundle: Bundle, index: int, entry: str):
    partition = bundle.manifest.partitions[index]
    artifact = next((a for a in partition.artifacts if a.options.get("entry") == entry), None)
    if artifact is None:
        raise BundleError(f"{bundle.path} has no {entry} graph for partition {index}; recompile the decoder with --draft")
    return load_executor(artifact, bundle.file(artifact))


class _DraftingHalf(StatefulHalf):
    """The device half's draft graph: `run` returns the hidden rows and the exit head's logits."""

    def run(self, x: np.ndarray):
        self.state.check_room(x.shape[1])
        hidden, draft_logits, *new_rows = self.executor([x, *self.state.prefix()])
        self.state.append(new_rows)
        self.calls += 1
        return hidden, draft_logits


def accept_drafts(choices: Sequence[int], drafts: Sequence[int]) -> tuple[list[int], int]:
    """The cloud's greedy `choices` for rows x, d1 .. d(n-1) against the `drafts` d1 .. dn: the
    tokens to emit (the accepted drafts, then the cloud's own next token, n at most) and how many
    drafts were accepted. The caller keeps len(emitted) positions of the round."""
    accepted = 0
    while accepted < len(drafts) and int(choices[accepted]) == int(drafts[accepted]):
        accepted += 1
    return [int(c) for c in choices[:min(accepted + 1, len(drafts))]], accepted


class LocalVerifier:
    """The cloud half's verify graph in this process (the server's is runtime/decoder_sessions.py)."""

    def __init__(self, bundle: Bundle):
        self.half = StatefulHalf(bundle, 1, entry_executor(bundle, 1, "verify"))

    def begin(self, sampling=None) -> None:
        self.half.state.truncate(0)

    def advance(self, hidden: np.ndarray) -> int:
        return int(self.half.run(hidden)[0, -1].argmax())

    def verify(self, rows: np.ndarray, drafts: Sequence[int]) -> tuple[list[int], int]:
        base = self.half.state.length
        emitted, accepted = accept_drafts(self.half.run(rows)[0].argmax(axis=-1), drafts)
        self.half.state.truncate(base + len(emitted))
        return emitted, accepted

    def end(self) -> None:
        self.half.state.truncate(0)


class DraftingSession:
    """Greedy generation with n drafted tokens per cloud call. `cloud`: a LocalVerifier (default)
    or a runtime/decoder_client.py RemoteCloud against a server that has the verify graph."""

    def __init__(self, bundle: Bundle, draft: int = 4, cloud=None):
        if draft < 1:
            raise InputError(f"--draft {draft} must be at least 1 (1 drafts nothing beyond the verified token)")
        self.bundle, self.draft = bundle, int(draft)
        self.spec = decoder_spec(bundle)
        self.device = _DraftingHalf(bundle, 0, entry_executor(bundle, 0, "draft"))
        self.cloud = cloud if cloud is not None else LocalVerifier(bundle)

    def stream_ids(self, prompt_ids: Sequence[int], *, max_new_tokens: int, eos: bool = True,
                   figures: dict | None = None) -> Iterator[int]:
        ids = np.asarray(list(prompt_ids), dtype=np.int64)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.spec.vocab:
            raise InputError(f"the prompt must be token ids in 0..{self.spec.vocab - 1}")
        # A round may run n positions past the last token it keeps.
        if len(ids) + max_new_tokens + self.draft > self.spec.max_len:
            raise InputError(f"the prompt ({len(ids)} tokens), {max_new_tokens} new tokens and {self.draft} drafted ones need "
                             f"{len(ids) + max_new_tokens + self.draft} cache positions; the bundle was compiled for {self.spec.max_len}")
        figures = figures if figures is not None else {}
        started = time.perf_counter()
        self.device.state.truncate(0)
        self.cloud.begin(None)
        rows, _ = self.device.run(ids[None, :])
        token = self.cloud.advance(rows)
        figures.update(time_to_first_token_s=time.perf_counter() - started, round_trips=1, drafted=0, accepted=0)
        produced = 0
        try:
            while True:
                produced += 1
                yield token
                if (eos and token in self.spec.eos_ids) or produced >= max_new_tokens:
                    return
                for token in self._round(token, figures):
                    produced += 1
                    yield token
                    if (eos and token in self.spec.eos_ids) or produced >= max_new_tokens:
                        return
                token = self._pending
        finally:
            self.cloud.end()
            figures["seconds"] = time.perf_counter() - started

    def _round(self, token: int, figures: dict) -> list[int]:
        """One draft-and-verify round from the verified `token`; returns the tokens emitted before the
        last one, which becomes `_pending` (the next round's start)."""
        device_base = self.device.state.length
        rows, drafts = [], []
        for _ in range(self.draft):
            hidden, draft_logits = self.device.run(np.array([[token]], dtype=np.int64))
            rows.append(hidden)
            token = int(draft_logits[0, -1].argmax())
            drafts.append(token)
        emitted, accepted = self.cloud.verify(np.concatenate(rows, axis=1), drafts)
        self.device.state.truncate(device_base + len(emitted))
        figures["round_trips"] += 1
        figures["drafted"] += self.draft
        figures["accepted"] += accepted
        self._pending = emitted[-1]
        return emitted[:-1]

    def generate_ids(self, prompt_ids: Sequence[int], *, max_new_tokens: int, eos: bool = True) -> tuple[list[int], dict]:
        figures: dict = {}
        out = list(self.stream_ids(prompt_ids, max_new_tokens=max_new_tokens, eos=eos, figures=figures))
        return out, _rates(figures, len(out))
