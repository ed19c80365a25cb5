"""Small random causal LMs of four transformers families, for tests and quick tries:

    splitc compile examples.decoders:tiny_llama --targets rpi4,a100 --cut model.layers.1 -o tiny.splitc
    splitc generate tiny.splitc --prompt "hello" --max-new-tokens 16

Each factory seeds its weights and returns (model, tokenizer): a byte-level tokenizer built with
`tokenizers` (256 byte tokens + <s>, </s>, <unk>) and a small chat template, so the text path runs
without a model hub. Weights use a wide initialiser so the logits spread and greedy choices are not
near-ties (which would make token-for-token comparisons depend on float rounding).
"""

from __future__ import annotations

import torch

VOCAB = 320
EOS = 1
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               max_position_embeddings=512, initializer_range=0.1, bos_token_id=0, eos_token_id=EOS, pad_token_id=EOS)


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build(config_class_name: str, model_class_name: str, seed: int, **overrides):
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_class_name)(**{**_COMMON, **overrides})
    model = getattr(transformers, model_class_name)(config).eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = EOS
    return model, byte_tokenizer()


def tiny_llama():
    return _build("LlamaConfig", "LlamaForCausalLM", 0, num_key_value_heads=2)


def tiny_qwen2():
    return _build("Qwen2Config", "Qwen2ForCausalLM", 1, num_key_value_heads=2)


def tiny_qwen3():
    return _build("Qwen3Config", "Qwen3ForCausalLM", 2, num_key_value_heads=2, head_dim=16)


def tiny_mistral():
    return _build("MistralConfig", "MistralForCausalLM", 3, num_key_value_heads=1, sliding_window=None)


def tiny_gpt2():
    return _build("GPT2Config", "GPT2LMHeadModel", 4, n_embd=64, n_layer=4, n_head=4, n_positions=512,
                  n_inner=128)


def tiny_gemma():
    """A family the split does not know: compiling it must be refused by name."""
    return _build("GemmaConfig", "GemmaForCausalLM", 5, num_key_value_heads=1, head_dim=16)


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "mistral": tiny_mistral, "gpt2": tiny_gpt2}
