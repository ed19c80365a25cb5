"""Split a causal decoder LM after layer k into two stateful halves with explicit KV state.

Each half is a pure function (x, past_key, past_value) -> (y, new_key, new_value):

    device  x = token ids [1, T]          y = hidden states after layer k-1 [1, T, H]
    cloud   x = hidden states [1, T, H]   y = logits of the last `logits_positions` rows

`past_key`/`past_value` hold the S positions already seen, position-major: [S, layers, kv_heads,
head_dim], so the runtime's cache prefix `cache[:S]` is one contiguous block it hands over without a
copy, and `new_key`/`new_value` [T, layers, kv_heads, head_dim] are the rows it appends at S.
Positions are S .. S+T-1, read from the past's length: the runtime owns the state, the artifact never
mutates anything. The transformer layers themselves are the model's own modules (its attention,
rotary embedding, norms and MLP), called with a cache object that concatenates the given past.

A layout is recognised by model type and module structure; anything else is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splitc.core.errors import CutError, ModelLoadError


@dataclass(frozen=True)
class DecoderLayout:
    """Where a transformers causal LM keeps its parts (attribute paths from the top module)."""

    family: str
    body: str                 # the base model: "model" (Llama-like) or "transformer" (GPT-2)
    embed: str                # token embedding, under body
    layers: str               # the decoder layer list, under body
    norm: str                 # the final norm, under body
    positions: str | None     # learned position embedding (GPT-2), under body
    rotary: str | None        # rotary embedding module (Llama-like), under body

    def part(self, model: nn.Module, name: str) -> nn.Module:
        return getattr(getattr(model, self.body), name)

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return self.part(model, self.layers)

    def layer_path(self, index: int) -> str:
        return f"{self.body}.{self.layers}.{index}"


_LLAMA_LIKE = dict(body="model", embed="embed_tokens", layers="layers", norm="norm", positions=None, rotary="rotary_emb")
LAYOUTS = {
    "llama": DecoderLayout("llama", **_LLAMA_LIKE),
    "qwen2": DecoderLayout("qwen2", **_LLAMA_LIKE),
    "qwen3": DecoderLayout("qwen3", **_LLAMA_LIKE),
    "mistral": DecoderLayout("mistral", **_LLAMA_LIKE),
    "gpt2": DecoderLayout("gpt2", body="transformer", embed="wte", layers="h", norm="ln_f", positions="wpe", rotary=None),
}


def recognise_layout(model: nn.Module, max_len: int) -> DecoderLayout:
    """The layout of `model`, checked against its modules; refuses what this split cannot keep exact
    (sliding-window attention shorter than the cache, unknown families)."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    layout = LAYOUTS.get(str(family))
    if layout is None:
        raise ModelLoadError(f"decoder layout {family or type(model).__name__!r} is not recognised; "
                             f"splitc splits {', '.join(sorted(LAYOUTS))} causal LMs")
    expected = [layout.embed, layout.layers, layout.norm] + [p for p in (layout.positions, layout.rotary) if p]
    body = getattr(model, layout.body, None)
    missing = [name for name in expected if body is None or not hasattr(body, name)]
    if missing or not hasattr(model, "lm_head"):
        raise ModelLoadError(f"{family} model lacks {', '.join(f'{layout.body}.{m}' for m in missing) or 'lm_head'}: "
                             "its layout is not the usual transformers one; splitc cannot split it")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True) and window
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if (uses_window and int(window) < max_len) or layer_types - {"full_attention"}:
        raise ModelLoadError(f"{family} model uses sliding-window attention (window {window}) shorter than the "
                             f"cache of {max_len} positions; compile with --max-len {window} or less")
    return layout


def cut_layer(layout: DecoderLayout, model: nn.Module, cut: str) -> int:
    """Layers on the device for `--cut <layers path>.<i>`: the cut falls after layer i, so the device
    runs layers 0..i (i + 1 of them), as a cut after any other module does."""
    count = len(layout.layer_list(model))
    prefix = layout.layer_path(0)[:-1]
    if cut.startswith(prefix) and cut[len(prefix):].isdigit():
        index = int(cut[len(prefix):])
        if 0 <= index < count - 1:
            return index + 1
    raise CutError(f"cut {cut!r} does not name a decoder layer that leaves work for the cloud; "
                   f"use {prefix}0 .. {prefix}{count - 2} (the cut falls after that layer)")


class _ConcatCache:
    """The transformers Cache protocol, reduced to what attention calls: `update` returns the past
    (given as inputs) with this step's keys/values appended, and keeps the new ones as outputs."""

    def __init__(self, past_key: torch.Tensor, past_value: torch.Tensor, first_layer: int):
        self.past_key, self.past_value, self.first = past_key, past_value, first_layer
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []

    @staticmethod
    def _heads_major(past: torch.Tensor, local: int) -> torch.Tensor:
        return past[:, local].permute(1, 0, 2).unsqueeze(0)  # [S, kvh, d] -> [1, kvh, S, d]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        local = layer_idx - self.first
        self.new_keys.append(key)
        self.new_values.append(value)
        full_key = torch.cat([self._heads_major(self.past_key, local), key], dim=2)
        full_value = torch.cat([self._heads_major(self.past_value, local), value], dim=2)
        return full_key, full_value

    @staticmethod
    def _positions_major(states: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([s[0].permute(1, 0, 2) for s in states], dim=1)  # [T, layers, kvh, d]

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._positions_major(self.new_keys), self._positions_major(self.new_values)


class DecoderHalf(nn.Module):
    """Layers [first, last) of a causal LM, with the embedding (device half) or the final norm and
    LM head (cloud half), as a pure function of its inputs and the past KV state."""

    def __init__(self, model: nn.Module, layout: DecoderLayout, first: int, last: int, *, embed: bool, head: bool,
                 logits_positions: int = 1, exit_head: bool = False):
        super().__init__()
        self.layout, self.first, self.embed, self.head = layout, first, embed, head
        # An exit LM head on the device's last hidden row: the model's own final norm and LM head
        # (shared weights), giving the draft logits of self-speculative decoding.
        self.exit_head = exit_head and not head
        self.logits_positions = logits_positions  # 0: logits for every position (draft verification)
        self.layers = nn.ModuleList(list(layout.layer_list(model))[first:last])
        self.token_embedding = layout.part(model, layout.embed) if embed else None
        self.position_embedding = layout.part(model, layout.positions) if embed and layout.positions else None
        self.rotary = layout.part(model, layout.rotary) if layout.rotary else None
        self.norm = layout.part(model, layout.norm) if head or exit_head else None
        self.lm_head = model.lm_head if head or exit_head else None

    def forward(self, x: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor):
        past_len, steps = past_key.shape[0], x.shape[1]
        positions = (torch.arange(steps, device=x.device) + past_len).unsqueeze(0)
        if self.embed:
            hidden = self.token_embedding(x)
            if self.position_embedding is not None:
                hidden = hidden + self.position_embedding(positions)
        else:
            hidden = x
        # Query i (position S+i) sees keys 0..S+i: the past and the causal part of this step.
        # Additive (0 / float min) rather than boolean: eager attention adds the mask, SDPA takes either.
        keys = torch.arange(past_len + steps, device=x.device)
        allowed = (keys.unsqueeze(0) <= positions.transpose(0, 1)).unsqueeze(0).unsqueeze(0)  # [1, 1, T, S+T]
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        cache = _ConcatCache(past_key, past_value, self.first)
        extra = {"position_ids": positions}
        if self.rotary is not None:
            extra["position_embeddings"] = self.rotary(hidden, positions)
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask, cache=cache, use_cache=True, **extra)
            hidden = out[0] if isinstance(out, tuple) else out
        new_key, new_value = cache.outputs()
        if self.exit_head:
            return hidden, self.lm_head(self.norm(hidden[:, -1:])), new_key, new_value
        if not self.head:
            return hidden, new_key, new_value
        if self.logits_positions:
            hidden = hidden[:, -self.logits_positions:]
        return self.lm_head(self.norm(hidden)), new_key, new_value


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int


def decoder_shape(model: nn.Module, layout: DecoderLayout) -> DecoderShape:
    """Cache geometry read from a real attention call: kv heads and head dim as the model computes
    them (configs spell them in several ways)."""
    half = DecoderHalf(model, layout, 0, 1, embed=True, head=False)
    with torch.no_grad():
        kv_heads, head_dim = _probe_kv(half)
    return DecoderShape(layers=len(layout.layer_list(model)), hidden=int(model.config.hidden_size),
                        kv_heads=kv_heads, head_dim=head_dim, vocab=int(model.lm_head.out_features))


def _probe_kv(half: DecoderHalf) -> tuple[int, int]:
    class Recorder(_ConcatCache):
        def update(self, key, value, layer_idx, *args, **kwargs):
            self.new_keys.append(key)
            return key, value

    recorder = Recorder(None, None, 0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    hidden_states = half.token_embedding(ids)
    if half.position_embedding is not None:
        hidden_states = hidden_states + half.position_embedding(torch.zeros(1, 1, dtype=torch.long))
    extra = {"position_ids": torch.zeros(1, 1, dtype=torch.long)}
    if half.rotary is not None:
        extra["position_embeddings"] = half.rotary(hidden_states, extra["position_ids"])
    half.layers[0](hidden_states, attention_mask=None, cache=recorder, use_cache=True, **extra)
    key = recorder.new_keys[0]
    return int(key.shape[1]), int(key.shape[3])


def drafting_halves(model: nn.Module, layout: DecoderLayout, device_layers: int) -> tuple[DecoderHalf, DecoderHalf]:
    """The halves of self-speculative decoding: the device half with an exit LM head (draft logits of
    its last row), the cloud half with logits for every row (n drafts verified in one call)."""
    total = len(layout.layer_list(model))
    device = DecoderHalf(model, layout, 0, device_layers, embed=True, head=False, exit_head=True).eval()
    cloud = DecoderHalf(model, layout, device_layers, total, embed=False, head=True, logits_positions=0).eval()
    return device, cloud


def split_halves(model: nn.Module, layout: DecoderLayout, device_layers: int, *, logits_positions: int = 1) -> tuple[DecoderHalf, DecoderHalf]:
    total = len(layout.layer_list(model))
    device = DecoderHalf(model, layout, 0, device_layers, embed=True, head=False).eval()
    cloud = DecoderHalf(model, layout, device_layers, total, embed=False, head=True, logits_positions=logits_positions).eval()
    return device, cloud
