"""Figures: `--defend` before and after, with fresh attackers, on the digits CNN and the MiniLM classifier.

    python bench/defend.py --model digits [--cuts conv1,conv2] [--methods nopeek,adversarial,noise-aware] [--out defend_digits/]
    python bench/defend.py --model minilm [--cuts encoder.encoder.layer.0] [--methods ...] [--out defend_minilm/]

digits: the CNN of bench/audit_digits.py (conv 8, conv 16 stride 2, fc 32, fc 10; trained on 1,000 digits);
each defence is fine-tuned on those 1,000 training digits (30 % held out for the accuracy budget) and
audited on the 797 other digits (half train fresh attackers, half are attacked), where the accuracy
is measured too. The CNN has no pooling layer: its first downsampling is conv2 (stride 2).
minilm: the topic classifier of examples/minilm.py on the real all-MiniLM-L6-v2 weights; defences are
fine-tuned on 400 generated sentences, audited on 320 others.

Per model, cut and method: the strength chosen (the strongest within --max-accuracy-drop on the
defence's held-out data), its training time, and the attacks before -> after next to their floors:
re-identification (inverse network / white-box) vs chance, SSIM vs the data-mean and class-mean
floors, dCor, dFIL (digits); token recovery vs the most-frequent-token floor and chance, dCor (MiniLM);
top-1 on the audited data. Goals (issue 27): digits, SSIM <= data-mean floor and re-identification
<= 2x chance; MiniLM after layer 0, token recovery <= 2x the floor; both at <= 1 point of accuracy.
Prints whether each is met. Writes report.json and defence.png per method into --out. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples.* and tests.* for models and data


def digits(root: Path):
    from torch import nn

    from examples.digits import DigitsCNN, load_digits_arrays, train_classifier
    from splitc.frontend import import_model
    from splitc.passes.privacy import Calibration
    from tests.models import save_pt2

    images, labels = load_digits_arrays()
    torch.manual_seed(0)  # the audit bench's model: conv 8, conv 16, fc 32, fc 10, log-softmax
    model = train_classifier(DigitsCNN(hidden=32, log_softmax=True), images[:1000], labels[:1000], steps=60, loss=nn.functional.nll_loss)
    _, graph = import_model(save_pt2(model, (torch.from_numpy(images[:1]),), root / "digits.pt2"))
    return graph, Calibration((images[:1000, None],), labels[:1000]), Calibration((images[1000:, None],), labels[1000:])


def minilm(root: Path, sentences: int = 400):
    from examples.minilm import tokenize, topic_sentences, trained_classifier
    from splitc.frontend import import_model
    from splitc.passes.privacy import Calibration
    from tests.models import save_pt2

    model, data = trained_classifier()
    example = (torch.from_numpy(data["held_ids"][:1]), torch.from_numpy(data["held_mask"][:1]))
    _, graph = import_model(save_pt2(model, example, root / "minilm.pt2"))

    def calibration(per_class, seed):
        sentences, y = topic_sentences(per_class, seed=seed)
        ids, mask = tokenize(sentences)
        return Calibration((ids[:, None], mask[:, None]), y)

    return graph, calibration(-(-sentences // 4), 11), calibration(80, 7)


def row(model: str, cut: str, method: str, result, seconds: float) -> dict:
    from splitc.drivers.defend_audit import leakage_figures

    rec = result.defence.record
    before, after = leakage_figures(result.before), leakage_figures(result.after)
    out = {"model": model, "cut": cut, "method": method, "strength": rec["strength"], "training_s": rec["training_seconds"],
           "total_s": round(seconds, 1), "before": before, "after": after,
           "defence_held_accuracy": [rec["accuracy_before"], rec["accuracy_after"]], "trials": rec["trials"]}
    drop = 100 * (before["accuracy"] - after["accuracy"])
    if "token_recovery" in before:
        goal = after["token_recovery"] <= 2 * before["floor_position_mode"] and drop <= 1.0
    else:
        reid = max(v for v in (after["reid_inverse"], after["reid_whitebox"]) if v is not None)
        ssim = max(v for v in (after["ssim_inverse"], after["ssim_whitebox"]) if v is not None)
        goal = ssim <= before["floor_data_mean_ssim"] and reid <= 2 * before["reid_chance"] and drop <= 1.0
    out["accuracy_drop_points"], out["goal_met"] = round(drop, 2), bool(goal)
    return out


def print_row(r: dict) -> None:
    b, a = r["before"], r["after"]
    fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
    if "token_recovery" in b:
        print(f"{r['cut']:24} {r['method']:12} {r['strength']:6g} {r['training_s']:7.1f} | tokens {fmt(b['token_recovery'])} -> "
              f"{fmt(a['token_recovery'])} (floor {b['floor_position_mode']:.3f}, chance {b['chance']:.4f}) | dCor {fmt(b['dcor'])} -> "
              f"{fmt(a['dcor'])} | top-1 {fmt(b['accuracy'])} -> {fmt(a['accuracy'])} ({-r['accuracy_drop_points']:+.1f}) | "
              f"goal {'met' if r['goal_met'] else 'not met'}", flush=True)
    else:
        print(f"{r['cut']:6} {r['method']:12} {r['strength']:5g} {r['training_s']:7.1f} | reid inv {fmt(b['reid_inverse'])} -> "
              f"{fmt(a['reid_inverse'])} wb {fmt(b['reid_whitebox'])} -> {fmt(a['reid_whitebox'])} (chance {b['reid_chance']:.4f}) | "
              f"SSIM inv {fmt(b['ssim_inverse'])} -> {fmt(a['ssim_inverse'])} wb {fmt(b['ssim_whitebox'])} -> {fmt(a['ssim_whitebox'])} "
              f"(floors data-mean {b['floor_data_mean_ssim']:.3f}, class-mean {b['floor_class_mean_ssim']:.3f}) | "
              f"dCor {fmt(b['dcor'])} -> {fmt(a['dcor'])} | dFIL {b['dfil']:.3g} -> {a['dfil']:.3g} | "
              f"top-1 {fmt(b['accuracy'])} -> {fmt(a['accuracy'])} ({-r['accuracy_drop_points']:+.1f}) | "
              f"goal {'met' if r['goal_met'] else 'not met'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("digits", "minilm"), default="digits")
    parser.add_argument("--cuts")
    parser.add_argument("--methods", default="nopeek,adversarial,noise-aware")
    parser.add_argument("--max-accuracy-drop", type=float, default=1.0)
    parser.add_argument("--strengths", help="Override each method's strength grid (comma-separated).")
    parser.add_argument("--no-curves", action="store_true", help="Skip the accuracy-leakage curves (faster).")
    parser.add_argument("--epochs", type=int, help="Most epochs of each defence's fine-tuning [default: passes.defend.EPOCHS].")
    parser.add_argument("--sentences", type=int, default=400, help="minilm: sentences the defence trains on (audited on 320 others).")
    parser.add_argument("--out")
    args = parser.parse_args()

    from splitc.core.errors import PlanError
    from splitc.drivers.defend_audit import audit_defence, defence_report_json, write_defence_png

    out = Path(args.out or f"defend_{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1 if args.model == "digits" else torch.get_num_threads())
    started = time.perf_counter()
    graph, defence_data, audit_data = digits(out) if args.model == "digits" else minilm(out, args.sentences)
    cuts = (args.cuts or ("conv1,conv2" if args.model == "digits" else "encoder.encoder.layer.0")).split(",")
    strengths = [float(s) for s in args.strengths.split(",")] if args.strengths else None
    print(f"{args.model}: model ready in {time.perf_counter() - started:.1f} s; defence data {len(defence_data)}, audit data "
          f"{len(audit_data)}; torch threads {torch.get_num_threads()}; budget {args.max_accuracy_drop:g} points", flush=True)
    rows = []
    for cut in cuts:
        for method in args.methods.split(","):
            tick = time.perf_counter()
            try:
                result = audit_defence(graph, cut, method, audit_data, defence_calibration=defence_data, strengths=strengths,
                                       max_accuracy_drop=args.max_accuracy_drop, curves=not args.no_curves, progress=False,
                                       defence_epochs=args.epochs)
            except PlanError as exc:
                print(f"{cut:6} {method:12} refused: {exc}", flush=True)
                rows.append({"model": args.model, "cut": cut, "method": method, "refused": str(exc)})
                continue
            r = row(args.model, cut, method, result, time.perf_counter() - tick)
            rows.append(r)
            print_row(r)
            name = f"{cut.replace('.', '_')}_{method}"
            (out / f"{name}.json").write_text(json.dumps(defence_report_json([result]), indent=2) + "\n")
            write_defence_png([result], out / f"{name}.png")
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"all {time.perf_counter() - started:.1f} s; wrote {out}/table.json and a report/PNG per cut and method")


if __name__ == "__main__":
    main()
