"""Generate text with a split decoder bundle: the device half here, the cloud half here or remote.

    session = GenerationSession(Bundle.open("chat.splitc"))           # both halves in process
    for piece in session.stream("What is the capital of France?", max_new_tokens=32):
        print(piece, end="", flush=True)
    result = session.generate(prompt_ids=[1, 2, 3], max_new_tokens=8)  # .ids, .text, .figures

Each half owns the KV state its partition declares in the manifest (`KVState`): the artifact gets the
filled prefix of its cache and returns the rows of the new positions, which the state appends. A
cloud half is anything with `begin(sampling)`, `advance(hidden rows) -> token id`, `end()`:
`LocalCloud` runs partition 1 here; runtime/decoder_client.py's `RemoteCloud` asks a server. Token
choice (greedy, or temperature/top-p with a seed) is the cloud's, keyed by position, so a run is
reproducible and a cloud that re-prefills after losing its state picks the same tokens.

No torch: numpy, the backend runtime, `tokenizers` for text, jinja2 for a chat template.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from splitc.core.errors import BundleError, InputError, ToolchainError
from splitc.core.manifest import DecoderSpec, StateSpec, check_file
from splitc.runtime import cut_codec
from splitc.runtime.executors import Executor, load_executor
from splitc.runtime.session import Bundle, host_artifact


def decoder_spec(bundle: Bundle) -> DecoderSpec:
    spec = bundle.manifest.decoder
    if spec is None:
        raise BundleError(f"{bundle.path} is not a decoder bundle; compile a causal LM (a .gguf, an HF folder or a factory)")
    return spec


# --------------------------------------------------------------------------------------- state

class KVState:
    """The state tensors of one partition for one session: allocated once at full length, filled
    from position 0; `prefix()` is what the artifact reads, `append` writes its new rows."""

    def __init__(self, specs: Sequence[StateSpec]):
        for spec in specs:
            if spec.position_axis != 0:
                raise BundleError(f"state {spec.name} keeps positions on axis {spec.position_axis}; this runtime reads axis 0")
        self.specs = tuple(specs)
        self.arrays = [np.zeros(s.shape, dtype=s.dtype) for s in specs]
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.specs[0].max_len if self.specs else 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def prefix(self) -> list[np.ndarray]:
        return [a[:self.length] for a in self.arrays]  # contiguous views: positions are axis 0

    def check_room(self, steps: int) -> None:
        if self.length + steps > self.max_len:
            raise InputError(f"{self.length + steps} positions do not fit the compiled cache of {self.max_len}; "
                             f"shorten the prompt or --max-new-tokens, or recompile with --max-len {self.length + steps}")

    def append(self, rows: Sequence[np.ndarray]) -> None:
        steps = rows[0].shape[0]
        self.check_room(steps)
        for array, new in zip(self.arrays, rows):
            array[self.length:self.length + steps] = new
        self.length += steps

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (a rejected draft, a restart)."""
        self.length = min(self.length, max(0, int(length)))


class StatefulHalf:
    """One partition of a decoder bundle with its state: `run(x)` -> y, the state advanced by T."""

    def __init__(self, bundle: Bundle, index: int, executor: Executor | None = None):
        partition = bundle.manifest.partitions[index]
        self.index = index
        self.state_specs = decoder_spec(bundle).state[index]
        if executor is None:
            artifact = host_artifact(partition)
            executor = load_executor(artifact, bundle.file(artifact))
        self.executor = executor
        self.state = KVState(self.state_specs)
        self.calls = 0

    def run(self, x: np.ndarray) -> np.ndarray:
        self.state.check_room(x.shape[1])
        y, *new_rows = self.executor([x, *self.state.prefix()])
        self.state.append(new_rows)
        self.calls += 1
        return y


# ------------------------------------------------------------------------------------ sampling

@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature is 0; else softmax(logits / temperature) cut to the smallest set of
    tokens whose probability reaches top_p, drawn with a generator keyed by (seed, position)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise InputError(f"temperature {self.temperature} is negative; use 0 for greedy or a positive value")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p {self.top_p} is not in (0, 1]")

    def to_json(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}

    @classmethod
    def from_json(cls, data: dict | None) -> Sampling:
        data = data or {}
        try:
            return cls(float(data.get("temperature", 0.0)), float(data.get("top_p", 1.0)), int(data.get("seed", 0)))
        except (TypeError, ValueError) as exc:
            raise InputError(f"sampling parameters are malformed ({exc})") from exc

    def choose(self, logits: np.ndarray, position: int) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits / self.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        keep = int(np.searchsorted(np.cumsum(probs[order]), self.top_p) + 1)
        kept = order[:keep]
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(position)])
        return int(kept[rng.choice(len(kept), p=probs[kept] / probs[kept].sum())])


# ---------------------------------------------------------------------------------- cloud side

class CloudHalf(Protocol):
    def begin(self, sampling: Sampling) -> None: ...
    def advance(self, hidden: np.ndarray) -> int: ...
    def end(self) -> None: ...


class LocalCloud:
    """Partition 1 in this process."""

    def __init__(self, bundle: Bundle, executor: Executor | None = None):
        self.half = StatefulHalf(bundle, 1, executor)
        self.sampling = Sampling()
        self.round_trips = 0

    def begin(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self.half.state.truncate(0)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return self.half.run(hidden)

    def advance(self, hidden: np.ndarray) -> int:
        logits = self.logits(hidden)
        self.round_trips += 1
        return self.sampling.choose(logits[0, -1], self.half.state.length)

    def end(self) -> None:
        self.half.state.truncate(0)


# ---------------------------------------------------------------------------------- tokenizer

class BundleTokenizer:
    """The model's tokenizer from the bundle's tokenizer.json, and its chat template."""

    def __init__(self, bundle: Bundle):
        spec = decoder_spec(bundle)
        if not spec.tokenizer:
            raise BundleError(f"{bundle.path} carries no tokenizer; pass token ids, or compile from a source that has one")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ToolchainError(f"text generation needs the tokenizers package ({exc}); pip install tokenizers") from exc
        first = spec.tokenizer[0]
        self.tokenizer = Tokenizer.from_file(str(check_file(bundle.path, first.path, first.sha256)))
        self.chat_template = spec.chat_template
        self.special = spec.special_tokens

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, prompt: str) -> str:
        """The prompt as one user turn through the model's chat template (rendered as transformers
        renders it: sandboxed jinja2, trimmed blocks), ready for the assistant's answer."""
        if not self.chat_template:
            return prompt
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise ToolchainError(f"the model's chat template needs jinja2 ({exc}); pip install jinja2, or pass --no-chat") from exc

        def raise_exception(message):
            raise InputError(f"the chat template refused the prompt: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        return template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, **self.special)


# --------------------------------------------------------------------------------- generation

@dataclass
class GenerationResult:
    prompt_ids: list[int]
    ids: list[int]                    # generated, the stop token excluded
    text: str = ""
    stop_reason: str = ""             # "eos", "stop-string", "length"
    figures: dict = field(default_factory=dict)


class GenerationSession:
    """Token-by-token generation through both halves; one generation at a time per session."""

    def __init__(self, bundle: Bundle, cloud: CloudHalf | None = None, *, cut_encoding: str = "fp32",
                 device_executor: Executor | None = None, draft: int = 0):
        self.bundle = bundle
        self.spec = decoder_spec(bundle)
        self.drafting = None
        if draft:  # n drafted tokens per cloud call (runtime/drafting.py): greedy
            from splitc.runtime.drafting import DraftingSession

            if cloud is None and cut_encoding != "fp32":
                raise InputError("in-process drafting sends fp32 rows; --cut-encoding applies with --remote")
            self.drafting = DraftingSession(bundle, draft, cloud)
        self.device = StatefulHalf(bundle, 0, device_executor)
        self.cloud = cloud if cloud is not None else LocalCloud(bundle)
        self.cut_encoding = cut_codec.check_scheme(cut_encoding)
        self._tokenizer: BundleTokenizer | None = None

    @property
    def tokenizer(self) -> BundleTokenizer:
        if self._tokenizer is None:
            self._tokenizer = BundleTokenizer(self.bundle)
        return self._tokenizer

    def prompt_ids(self, prompt: str, *, chat: bool = True) -> list[int]:
        tok = self.tokenizer
        if chat and tok.chat_template:
            return tok.encode(tok.chat_prompt(prompt), special=False)
        return tok.encode(prompt)

    def check_ids(self, ids: Sequence[int]) -> np.ndarray:
        array = np.asarray(list(ids), dtype=np.int64)
        if array.ndim != 1 or array.size == 0:
            raise InputError("the prompt is empty; give at least one token")
        bad = array[(array < 0) | (array >= self.spec.vocab)]
        if bad.size:
            raise InputError(f"token id {int(bad[0])} is outside the vocabulary of {self.spec.vocab}")
        return array

    def _send(self, rows: np.ndarray) -> np.ndarray:
        """The hidden rows as the cloud receives them under the cut encoding."""
        return cut_codec.round_trip(rows[0], self.cut_encoding)[None] if self.cut_encoding != "fp32" else rows

    def stream_ids(self, prompt_ids: Sequence[int], *, max_new_tokens: int, sampling: Sampling = Sampling(),
                   eos: bool = True, figures: dict | None = None) -> Iterator[int]:
        """Yield generated token ids, the end-of-sequence token included (the caller stops there)."""
        ids = self.check_ids(prompt_ids)
        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens {max_new_tokens} must be at least 1")
        needed = len(ids) + max_new_tokens - 1
        if needed > self.spec.max_len:
            raise InputError(f"the prompt ({len(ids)} tokens) and {max_new_tokens} new tokens need {needed} cache positions; "
                             f"the bundle was compiled for {self.spec.max_len} (recompile with --max-len {needed}, or shorten them)")
        figures = figures if figures is not None else {}
        if self.drafting is not None:
            if sampling.temperature != 0:
                raise InputError("drafting is greedy for now; drop --temperature or --draft")
            yield from self.drafting.stream_ids(ids, max_new_tokens=max_new_tokens, eos=eos, figures=figures)
            return
        started = time.perf_counter()
        self.device.state.truncate(0)
        self.cloud.begin(sampling)
        try:
            token = self.cloud.advance(self._send(self.device.run(ids[None, :])))
            figures["time_to_first_token_s"] = time.perf_counter() - started
            figures["round_trips"] = 1
            for produced in range(1, max_new_tokens + 1):
                yield token
                if (eos and token in self.spec.eos_ids) or produced == max_new_tokens:
                    break
                hidden = self.device.run(np.array([[token]], dtype=np.int64))
                token = self.cloud.advance(self._send(hidden))
                figures["round_trips"] += 1
        finally:
            self.cloud.end()
            figures["seconds"] = time.perf_counter() - started

    def generate_ids(self, prompt_ids: Sequence[int], *, max_new_tokens: int, sampling: Sampling = Sampling(),
                     eos: bool = True) -> GenerationResult:
        figures: dict = {}
        out = list(self.stream_ids(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, eos=eos, figures=figures))
        stop = "eos" if out and eos and out[-1] in self.spec.eos_ids else "length"
        ids = out[:-1] if stop == "eos" else out
        return GenerationResult(list(prompt_ids), ids, stop_reason=stop, figures=_rates(figures, len(out)))

    def stream(self, prompt: str, *, max_new_tokens: int, sampling: Sampling = Sampling(), stop: Sequence[str] = (),
               chat: bool = True, result: GenerationResult | None = None) -> Iterator[str]:
        """Yield text as tokens arrive. Text is released only once no stop string can still begin in
        it, and never mid-character (a token may end inside a multi-byte sequence)."""
        prompt_ids = self.prompt_ids(prompt, chat=chat)
        result = result if result is not None else GenerationResult(prompt_ids, [])
        result.prompt_ids, result.stop_reason = prompt_ids, "length"
        figures: dict = {}
        emitted, text = 0, ""
        for token in self.stream_ids(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, figures=figures):
            if token in self.spec.eos_ids:
                result.stop_reason = "eos"
                break
            result.ids.append(token)
            text = self.tokenizer.decode(result.ids)
            cut = _stop_at(text, stop)
            if cut is not None:
                text, result.stop_reason = text[:cut], "stop-string"
                if emitted < len(text):
                    yield text[emitted:]
                emitted = len(text)
                break
            safe = _safe_length(text, stop)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        else:
            text = self.tokenizer.decode(result.ids)
        if result.stop_reason != "stop-string":
            text = self.tokenizer.decode(result.ids)
            if len(text) > emitted:
                yield text[emitted:]
        result.text = text
        result.figures = _rates(figures, len(result.ids) + (result.stop_reason == "eos"))

    def generate(self, prompt: str, *, max_new_tokens: int, sampling: Sampling = Sampling(), stop: Sequence[str] = (),
                 chat: bool = True, on_text: Callable[[str], None] | None = None) -> GenerationResult:
        result = GenerationResult([], [])
        for piece in self.stream(prompt, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop, chat=chat, result=result):
            if on_text is not None:
                on_text(piece)
        return result


def _stop_at(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _safe_length(text: str, stop: Sequence[str]) -> int:
    """How much of `text` can be released: not a trailing replacement character (an unfinished
    multi-byte character) nor a tail that could still grow into a stop string."""
    end = len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


def _rates(figures: dict, tokens: int) -> dict:
    figures = dict(figures, tokens=tokens)
    seconds = figures.get("seconds") or 0.0
    ttft = figures.get("time_to_first_token_s") or 0.0
    figures["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
    figures["decode_tokens_per_s"] = (tokens - 1) / (seconds - ttft) if tokens > 1 and seconds > ttft else 0.0
    figures["tokens_per_round_trip"] = tokens / figures["round_trips"] if figures.get("round_trips") else 0.0
    if figures.get("drafted"):
        figures["acceptance_rate"] = figures["accepted"] / figures["drafted"]
    return figures
