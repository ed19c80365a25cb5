"""MetaSchedule tuning and the tuning database (backends/tvm/: driver.py, search.py, database.py, ...).

The tuning test really tunes (no mocks): a 2-conv CNN at 1x3x16x16, 2 tasks, a small trial budget
and a small search population, about 1-2 minutes on 2 cores. Then two compiles must both apply the
records without tuning, agree bit for bit, and pass verify.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from splitc.backends.tvm import build_cache, database, driver, host_records, prepare, records_io, rpc, target_keys
from torch import nn

from splitc.cli.tune import parse_budget
from splitc.core.errors import InputError

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "host"}


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


@pytest.fixture(scope="module")
def cnn_pt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = TwoConv().eval()
    path = tmp_path_factory.mktemp("cnn") / "cnn.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(model, (torch.randn(1, 3, 16, 16),)), str(path))
    return path


def test_parse_budget():
    assert parse_budget("10m") == 600 and parse_budget("90s") == 90 and parse_budget("1h") == 3600 and parse_budget("2.5") == 2.5
    with pytest.raises(InputError):
        parse_budget("soon")


def test_target_key_is_per_target_and_resolves_host():
    resolved = target_keys.resolve_target(X86)
    assert resolved["mcpu"] != "host" and resolved["num-cores"] >= 1
    other = dict(resolved, **{"num-cores": resolved["num-cores"] + 1})
    assert target_keys.target_key(resolved) != target_keys.target_key(other)
    assert target_keys.target_key(resolved) == target_keys.target_key(dict(reversed(list(resolved.items()))))


def test_vector_width_comes_from_the_cpu_features():
    """AVX2 CPUs have 256-bit vectors (TVM's own query says 512 for every x86 CPU); the width sizes
    the Winograd input transform's vectors and appears in the host-tuned label."""
    def x86(cpu):
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu}

    assert target_keys.vector_bits(x86("haswell")) == target_keys.vector_bits(x86("znver3")) == 256
    assert target_keys.vector_bits(x86("znver4")) == 512
    assert target_keys.vector_bits(x86("skylake-avx512")) == 512  # LLVM prefers 256-bit there, but explicit 16-lane vectors are 512
    assert target_keys.vector_bits(x86("x86-64")) == 128 and target_keys.vector_bits(RPI4) == 128
    assert target_keys.vector_bits({"kind": "cuda"}) is None
    assert "256-bit vs 128-bit" in host_records.host_tuned_label(x86("haswell"), RPI4)


def test_repair_drops_a_cut_line_and_keeps_whole_ones(tmp_path):
    (tmp_path / database.WORKLOAD_FILE).write_text('["h1", "mod1"]\n["h2", "mod2"]\n["h3", "mo')
    (tmp_path / database.RECORD_FILE).write_text('[0, ["trace"]]\n[1, ["trace"]]\n[2, ["trace"]]\n[1, ["tr')
    assert database.repair_database(tmp_path) == 3  # the cut workload, the record pointing at it, the cut record
    assert database.database_stats(tmp_path) == {"workloads": 2, "records": 2}
    assert database.repair_database(tmp_path) == 0
    for name in (database.WORKLOAD_FILE, database.RECORD_FILE):
        for line in (tmp_path / name).read_text().splitlines():
            json.loads(line)


def test_best_records_are_ranked_once_per_database_content(tmp_path, monkeypatch):
    """Compiles read each workload's best record through an index beside the database; any change
    to the database's bytes (a tuning run's appends, a rewrite in place of the same size) ranks
    the records again."""
    def line(workload: int, seconds: float) -> str:
        return json.dumps([workload, ["trace", [seconds]]])

    def best() -> list[str]:
        with database.readable_copy(tmp_path) as snapshot:
            return (snapshot / database.RECORD_FILE).read_text().splitlines()

    (tmp_path / database.WORKLOAD_FILE).write_text('["h0", "mod0"]\n["h1", "mod1"]\n')
    lines = [line(0, 3.0), line(0, 1.0), line(1, 5.0), line(0, 2.0)]
    (tmp_path / database.RECORD_FILE).write_text("".join(f"{x}\n" for x in lines))
    assert best() == [lines[1], lines[2]]

    parsed = []
    parse = database._parse_database
    monkeypatch.setattr(database, "_parse_database", lambda *texts: parsed.append(1) or parse(*texts))
    assert best() == [lines[1], lines[2]] and parsed == []  # unchanged: the index answered

    faster = line(1, 0.5)
    with open(tmp_path / database.RECORD_FILE, "a") as records:
        records.write(faster + "\n")
    assert best() == [lines[1], faster] and parsed == [1]

    text = (tmp_path / database.RECORD_FILE).read_text()
    (tmp_path / database.RECORD_FILE).write_text(text.replace("1.0", "9.0"))  # same size, same file
    assert best() == [lines[3], faster] and parsed == [1, 1]

    database._best_index(tmp_path, 1).write_text("not an index\n")
    assert best() == [lines[3], faster] and parsed == [1, 1, 1]


class PadBnClip(nn.Module):
    """Hugging Face MobileNetV2's building blocks: explicit zero padding, convolution without bias,
    batch norm, ReLU6 (clip), a depthwise convolution."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.b2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.clamp(self.b1(self.c1(nn.functional.pad(x, (0, 1, 0, 1)))), 0.0, 6.0)
        return self.b2(self.dw(y)) + y


def test_pre_tuning_rewrites_fold_and_keep_results():
    import tvm
    from tvm import relax
    from tvm_ffi import structural_hash
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    model = PadBnClip().eval()
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(1, 3, 18, 18)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        expected = model(x).numpy()
    mod = from_exported_program(program, keep_params_as_input=False)
    before = structural_hash(mod)
    target = target_keys.resolve_target(X86)
    prepared = prepare.prepare(mod, target, prepack=False)
    # The module handed in is left as it was: compile builds it as the untuned candidate, and
    # prepares it again for the other variants.
    assert structural_hash(mod) == before
    names = [gv.name_hint for gv in prepared.functions if gv.name_hint != "main"]
    # Pad folded into the convolution, batch norm into its weights and bias, clip written as max/min,
    # convolutions in NHWC (a transpose in, a transpose out, none between the layers).
    assert not any("pad" in n or "batch_norm" in n or "clip" in n for n in names), names
    # Folded, the batch norm is the convolution's bias: no normalising arithmetic left after it.
    assert not any("subtract" in n or "divide" in n for n in names), names
    assert sum("transpose" in n for n in names) == 2, names
    assert "R.Tensor((1, 9, 9, 8)" in prepared["main"].script(show_meta=False), "the 8-channel 9x9 activations should be NHWC"
    vm = relax.VirtualMachine(tvm.compile(prepared, target=tvm.target.Target(target)), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))
    got = (got[0] if not hasattr(got, "numpy") else got).numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5


def test_weights_are_read_in_place_and_written_once():
    from tvm import relax

    from splitc.backends.tvm.relax_rewrites import constant_array, new_tensor, tensor_of

    values = np.arange(24, dtype="float32").reshape(2, 3, 4)
    weights = constant_array(relax.const(values))
    np.testing.assert_array_equal(weights, values)
    with pytest.raises(ValueError):  # a view of the module's constant: a rewrite must not write into it
        weights[0, 0, 0] = 1.0
    np.testing.assert_array_equal(tensor_of(np.transpose(weights, (2, 0, 1))).numpy(), np.transpose(values, (2, 0, 1)))
    product = new_tensor((2, 3, 4), "float32", lambda out: np.multiply(weights, 2.0, out=out))
    np.testing.assert_array_equal(product.numpy(), values * 2.0)
    # A type DLPack cannot hand to numpy is copied both ways instead.
    bfloat16 = pytest.importorskip("ml_dtypes").bfloat16
    halves = constant_array(relax.const(values.astype(bfloat16), "bfloat16"))
    moved = tensor_of(np.transpose(halves, (2, 0, 1)))
    assert moved.dtype == "bfloat16"
    np.testing.assert_array_equal(moved.numpy().astype(np.float32), np.transpose(values, (2, 0, 1)))


def _compile(pt2: Path, out: Path):
    from splitc.frontend import import_model
    from splitc.targets import load_link, load_targets

    from splitc.drivers.compiler import compile_model

    from splitc.passes.contract import CompileOptions

    _, graph = import_model(pt2)
    return compile_model(graph, CompileOptions(load_targets("x86"), link=load_link("4g"), samples=2), out)


def _run(bundle: Path, x: np.ndarray) -> np.ndarray:
    from splitc.runtime import Bundle, SplitSession

    session = SplitSession(Bundle.open(bundle))
    return next(iter(session.run({session.manifest.inputs[0].name: x}).values()))


@pytest.fixture(scope="module")
def tuned_cache(cnn_pt2, tmp_path_factory):
    """A cache whose x86 database holds a real (small) tuning run of the 2-conv CNN."""
    from tvm.relax.frontend.torch import from_exported_program

    cache = tmp_path_factory.mktemp("tuned") / "cache"
    patch = pytest.MonkeyPatch()
    patch.setenv("SPLITC_CACHE", str(cache))
    ticks: list[driver.TuneProgress] = []
    try:
        mod = from_exported_program(torch.export.load(str(cnn_pt2)), keep_params_as_input=False)
        report = driver.tune_module(mod, X86, trials=32, trials_per_task=16, population=64, progress=ticks.append)
    finally:
        patch.undo()
    return cache, report, ticks


def test_tune_then_compile_reuses_records(cnn_pt2, tuned_cache, tmp_path, monkeypatch):
    from splitc.frontend import import_model

    from splitc.drivers.verify import verify_bundle

    cache, report, _ = tuned_cache
    # The transposes into and out of NHWC, the first convolution (3 input channels: direct), and the
    # second as Winograd: its batched product and its output transform (with the bias); the input
    # transform is scheduled by splitc, not tuned.
    n = report.tasks
    assert report.stopped == "finished" and n == 5
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "empty-cache"))
    untuned = _compile(cnn_pt2, tmp_path / "untuned.splitc")
    info = untuned.manifest.partitions[0].artifacts[0].options["tuning"]
    assert info["tasks"] == n and info["tasks_with_record"] == 0 and info["chosen"] == "untuned" and info["schedules"] == "untuned"

    monkeypatch.setenv("SPLITC_CACHE", str(cache))
    _, graph = import_model(cnn_pt2)
    assert report.new_records > 0 and report.coverage.with_record == n and report.coverage.complete
    # Every task's untuned code was measured once, as a record with a schedule that changes nothing.
    db = database.open_database(report.directory)
    baselines = [r for r in db.get_all_tuning_records() if database.is_untuned(r)]
    assert len(baselines) == n and all(float(r.run_secs[0]) > 0 for r in baselines)
    assert any(not database.is_untuned(r) for r in db.get_all_tuning_records())
    records = database.database_stats(report.directory)["records"]
    record_file = report.directory / database.RECORD_FILE
    stamp = record_file.stat().st_mtime_ns

    first = _compile(cnn_pt2, tmp_path / "a.splitc")
    second = _compile(cnn_pt2, tmp_path / "b.splitc")
    for result in (first, second):
        info = result.manifest.partitions[0].artifacts[0].options["tuning"]
        assert info["tasks"] == n and info["tasks_with_record"] == n, info
        # Complete coverage: per task the fastest of tuned and untuned, no whole-module untuned build.
        assert info["chosen"] == "tuned" and info["tuned_ms"] > 0 and "untuned_ms" not in info, info
        assert info["schedules"] == "tuned on this host" and info["prepack"] is True and info["winograd"] is True
        assert any(f"{n}/{n} TVM tasks had a tuning record" in note for note in result.notes)
        assert result.manifest.partitions[0].artifacts[0].options["llvm_options"] == ["-fast-isel"]
    # Compiling ran no tuning: the database is untouched.
    assert database.database_stats(report.directory)["records"] == records and record_file.stat().st_mtime_ns == stamp

    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    a, b = _run(first.bundle, x), _run(second.bundle, x)
    np.testing.assert_array_equal(a, b)
    for bundle in (first.bundle, second.bundle):
        assert verify_bundle(bundle).ok
    # The tuned build computes what torch computes.
    expected = graph.module(torch.from_numpy(x))
    expected = (expected[0] if isinstance(expected, (tuple, list)) else expected).detach().numpy()
    assert np.linalg.norm(a - expected) / np.linalg.norm(expected) < 1e-5


def test_a_compile_opens_only_its_own_tasks_records(cnn_pt2, tuned_cache):
    """A database shared by many models is opened for the workloads of the tasks at hand only: each
    of them with its best record, the same one the whole database gives; none of the others."""
    import tvm
    from tvm.relax.frontend.torch import from_exported_program

    _, report, _ = tuned_cache
    target = target_keys.resolve_target(X86)
    mod = from_exported_program(torch.export.load(str(cnn_pt2)), keep_params_as_input=False)
    tasks = prepare.extract_tasks(prepare.prepare(mod, target, prepack=True), target)
    best = database.BestRecords(report.directory)
    whole, one = best.open(tasks), best.open(tasks[1:2])
    assert len(tasks) == report.tasks and len(whole) == len(tasks) and len(one) == 1

    tvm_target = tvm.target.Target(target)

    def trace(database, task):
        record = database.query_tuning_record(task.dispatched[0], tvm_target, task.task_name)
        return None if record is None else str(record.trace)

    assert trace(one, tasks[1]) == trace(whole, tasks[1]) is not None
    assert trace(one, tasks[0]) is None and trace(whole, tasks[0]) is not None
    assert best.open([]) is None


def test_tuning_reports_progress(tuned_cache):
    """The progress callback (the CLI's bar) sees the run advance: records counted as measured,
    never more than the run added, the fraction within [0, 1] and not going back."""
    _, report, ticks = tuned_cache
    assert ticks, "no progress reported during a run of several seconds"
    measured = [t.measured for t in ticks]
    assert measured == sorted(measured) and measured[-1] <= report.new_records and measured[-1] > 0
    fractions = [t.fraction for t in ticks]
    assert fractions == sorted(fractions) and 0 < fractions[-1] <= 1
    assert all(t.trials == 32 and t.budget_s is None for t in ticks)


def test_tune_closes_with_compiles_build_which_the_next_compile_copies(cnn_pt2, tuned_cache, tmp_path, monkeypatch):
    """`splitc tune`'s closing build (build_tuned) is compile's own: it says how fast the tuned
    partition runs here, and the next compile of the model copies its library from the build cache
    instead of running LLVM on the tuned kernels again."""
    import re

    from splitc.cli.common import console
    from splitc.cli.tune import build_tuned
    from splitc.drivers.compiler import plan_partitions
    from splitc.frontend import import_model
    from splitc.targets import load_link, load_targets

    source, report, _ = tuned_cache
    cache = tmp_path / "cache"
    shutil.copytree(source, cache, ignore=shutil.ignore_patterns(build_cache.BUILDS_SUBDIR))  # other tests' builds left out
    monkeypatch.setenv("SPLITC_CACHE", str(cache))
    _, graph = import_model(cnn_pt2)
    [partition] = plan_partitions(graph, load_targets("x86"), "auto", load_link("4g"))
    with console.capture() as captured:
        build_tuned(partition)
    line = " ".join(captured.get().split())
    assert f"built with {report.tasks}/{report.tasks} tasks' records" in line and "kept in the build cache" in line, line
    assert re.search(r"one run on this host: tuned \d+\.\d{3} ms", line), line
    assert len(list((cache / build_cache.BUILDS_SUBDIR).glob("*.so"))) == 1
    artifact = _compile(cnn_pt2, tmp_path / "after-tune.splitc").manifest.partitions[0].artifacts[0]
    assert artifact.options["build_cache"] == "hit" and artifact.options["tuning"]["tasks_with_record"] == report.tasks


def test_recompile_copies_the_library_from_the_build_cache(cnn_pt2, tmp_path, monkeypatch):
    """An unchanged model recompiles from the build cache (same library bytes, same outputs); other
    weights are another module, so a miss, whose kernels are all linked from the objects the first
    build kept; SPLITC_BUILD_CACHE=0 builds without the cache."""
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(1)
    other_pt2 = tmp_path / "other.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(TwoConv().eval(), (torch.randn(1, 3, 16, 16),)), str(other_pt2))

    def deploy(result):
        artifact = result.manifest.partitions[0].artifacts[0]
        return artifact, (result.bundle / artifact.path).read_bytes()

    (first, first_bytes), (second, second_bytes) = (deploy(_compile(cnn_pt2, tmp_path / f"{n}.splitc")) for n in "ab")
    assert first.options["build_cache"] == "miss" and second.options["build_cache"] == "hit"
    assert first_bytes == second_bytes and first.sha256 == second.sha256
    assert len(list((tmp_path / "cache" / build_cache.BUILDS_SUBDIR).glob("*.so"))) == 1
    groups = first.options["kernel_objects"]["groups"]
    assert groups >= 1 and first.options["kernel_objects"]["reused"] == 0
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "a.splitc", x), _run(tmp_path / "b.splitc", x))

    other_result = _compile(other_pt2, tmp_path / "other.splitc")
    other, other_bytes = deploy(other_result)
    assert other.options["build_cache"] == "miss" and other_bytes != first_bytes
    assert other.options["kernel_objects"] == {"groups": groups, "reused": groups}
    assert any("kernel groups linked from the build cache" in note for note in other_result.notes)

    monkeypatch.setenv("SPLITC_BUILD_CACHE", "0")
    off, _ = deploy(_compile(cnn_pt2, tmp_path / "off.splitc"))
    assert "build_cache" not in off.options and "kernel_objects" not in off.options
    # The other weights linked with the kept kernels compute what a build from scratch computes.
    _compile(other_pt2, tmp_path / "other-off.splitc")
    np.testing.assert_array_equal(_run(tmp_path / "other.splitc", x), _run(tmp_path / "other-off.splitc", x))


def test_build_cache_drops_least_recently_used_libraries(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITC_BUILD_CACHE_MB", "1")
    library = tmp_path / "lib.so"
    for name in ("old", "used", "new"):
        library.write_bytes((name.encode() * 200_000)[: 400 << 10])  # 400 KiB each: three exceed 1 MiB
        build_cache.store(name, library, tmp_path)
        time.sleep(0.01)
        if name == "used":
            assert build_cache.fetch("old", tmp_path / "back.so", tmp_path)  # a hit makes "old" recent again
    kept = sorted(p.stem for p in (tmp_path / build_cache.BUILDS_SUBDIR).glob("*.so"))
    assert kept == ["new", "old"], kept
    assert not build_cache.fetch("used", tmp_path / "gone.so", tmp_path) and not (tmp_path / "gone.so").exists()
    monkeypatch.setenv("SPLITC_BUILD_CACHE_MB", "lots")
    with pytest.raises(InputError, match="SPLITC_BUILD_CACHE_MB='lots'"):
        build_cache.enabled()  # before a build starts, not after it


def test_compile_with_tuning_disabled(cnn_pt2, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPLITC_TUNING", "0")
    result = _compile(cnn_pt2, tmp_path / "off.splitc")
    assert result.manifest.partitions[0].artifacts[0].options["tuning"]["chosen"].startswith("untuned")


@pytest.mark.slow
def test_ctrl_c_keeps_finished_records(cnn_pt2, tmp_path):
    """`splitc tune` interrupted with SIGINT once records exist: exit 130, readable database, records kept."""
    env = dict(os.environ, SPLITC_CACHE=str(tmp_path / "cache"))
    script = "from splitc.cli import cli, main\nfrom splitc.cli.tune import tune\ncli.add_command(tune)\nmain()\n"
    proc = subprocess.Popen([sys.executable, "-c", script, "tune", str(cnn_pt2), "--target", "x86", "--budget", "30m"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = tmp_path / "cache" / "tuning"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        files = list(root.glob(f"*/{database.RECORD_FILE}"))
        if files and files[0].stat().st_size > 0:
            break
        time.sleep(2)
    else:
        proc.kill()
        pytest.fail("no tuning record within 400 s")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    directory = files[0].parent
    assert database.repair_database(directory) == 0  # the run already left whole lines only
    assert database.database_stats(directory)["records"] > 0
    database.open_database(directory)  # MetaSchedule itself reads it


def _best_means(directory: Path) -> dict[int, float]:
    best: dict[int, float] = {}
    for workload, _, line in _records(directory):
        runs = json.loads(line)[1][1]
        best[workload] = min(best.get(workload, float("inf")), sum(runs) / len(runs))
    return best


def test_resumed_tuning_retimes_records_left_by_a_faster_run(cnn_pt2, tuned_cache, tmp_path, monkeypatch):
    """A database whose timings came from a faster host (here: the fixture's, divided by 100) would
    beat every new candidate; a resumed run first times each task's best record again and rescales
    that task's records to what this host measures now."""
    source, tuned, _ = tuned_cache
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    db = cache / tuned.directory.relative_to(source)
    measured = _best_means(db)
    lines = []
    for line in (db / database.RECORD_FILE).read_text().splitlines():
        workload, record = json.loads(line)
        if max(record[1]) < database.FAILED_RUN:
            record[1] = [v / 100 for v in record[1]]
        lines.append(json.dumps([workload, record]))
    (db / database.RECORD_FILE).write_text("".join(line + "\n" for line in lines))
    failed = [line for line in lines if max(json.loads(line)[1][1]) >= database.FAILED_RUN]

    monkeypatch.setenv("SPLITC_CACHE", str(cache))
    said: list[str] = []
    report = driver.tune_module(_cnn_module(cnn_pt2), X86, trials=0, log=said.append)
    assert len(report.retimed) == 5 and all(factor > 10 for factor in report.retimed), report.retimed
    assert any("re-timed the best record of 5 task(s)" in line for line in said), said
    now = _best_means(db)
    assert now.keys() == measured.keys()
    assert all(0.1 < now[w] / measured[w] < 10 for w in measured), {w: now[w] / measured[w] for w in measured}
    assert all(line in (db / database.RECORD_FILE).read_text() for line in failed)  # failed runs keep their marker


def test_final_retiming_unseats_a_record_whose_timing_was_lucky(cnn_pt2, tuned_cache, tmp_path, monkeypatch):
    """The winner's curse: a task's recorded best is the minimum of noisy timings. Here one task's
    slowest record is given a time ten times below its best, as a lucky measurement would; after
    the search, a run times each task's fastest records again side by side, and that record loses
    its place to the one that really is faster."""
    source, tuned, _ = tuned_cache
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    db = cache / tuned.directory.relative_to(source)
    rows = _records(db)
    means = {}
    for workload, _, line in rows:
        runs = json.loads(line)[1][1]
        means.setdefault(workload, []).append((sum(runs) / len(runs), line))
    spread = {w: max(entries)[0] / min(entries)[0] for w, entries in means.items() if len(entries) > 1}
    task = max(spread, key=spread.get)
    assert spread[task] > 2, spread  # the fixture's run holds a task whose records differ clearly
    slow_line, best_time = max(means[task])[1], min(means[task])[0]
    workload, record = json.loads(slow_line)
    lucky_trace = record[0]
    record[1] = [best_time / 10]
    _write_records(db, [(w, u, json.dumps([workload, record]) if line == slow_line else line) for w, u, line in rows])

    monkeypatch.setenv("SPLITC_CACHE", str(cache))
    said: list[str] = []
    report = driver.tune_module(_cnn_module(cnn_pt2), X86, trials=0, log=said.append)
    assert report.final_tasks == 5 and report.final_best_changed >= 1, (report.final_tasks, report.final_best_changed)
    assert any("fastest records of 5 task(s) side by side" in line for line in said), said
    after = {}
    for w, _, line in _records(db):
        if w == task:
            trace, runs = json.loads(line)[1][:2]
            after[json.dumps(trace)] = sum(runs) / len(runs)
    best = min(after, key=after.get)
    assert best != json.dumps(lucky_trace), after
    assert after[json.dumps(lucky_trace)] > 1.5 * after[best], after  # its time is now what this host measures


def test_export_import_shares_records_with_another_cache(cnn_pt2, tuned_cache, tmp_path, monkeypatch):
    """`splitc tuning export` on one machine, `import` on another (another cache here): the next
    compile there applies every record without tuning; importing twice adds nothing."""
    cache, report, _ = tuned_cache
    env = dict(os.environ, SPLITC_CACHE=str(cache))
    script = "from splitc.cli import main\nmain()\n"

    def splitc(*args, cache_root):
        return subprocess.run([sys.executable, "-c", script, "tuning", *args], env=dict(env, SPLITC_CACHE=str(cache_root)),
                              capture_output=True, text=True, check=False)

    archive = tmp_path / "records.tar.gz"
    done = splitc("export", "-o", str(archive), cache_root=cache)
    assert done.returncode == 0 and archive.is_file(), done.stderr
    listed = json.loads(splitc("list", "--json", cache_root=cache).stdout)
    key = report.directory.name
    assert [d["key"] for d in listed] == [key] and listed[0]["records"] == database.database_stats(report.directory)["records"]

    other = tmp_path / "other-cache"
    first = splitc("import", str(archive), cache_root=other)
    assert first.returncode == 0, first.stderr
    imported = other / "tuning" / key
    workloads = database.database_stats(report.directory)["workloads"]
    # Each workload's fastest record travels (the search's slower candidates stay home).
    assert database.database_stats(imported) == {"workloads": workloads, "records": workloads}
    assert f"{workloads} new record(s), 0 already here" in first.stdout
    assert f"measured: host {socket.gethostname()}" in first.stdout  # the origin travels with the records
    again = splitc("import", str(archive), cache_root=other)
    assert f"0 new record(s), {workloads} already here" in again.stdout
    assert database.database_stats(imported)["records"] == workloads

    monkeypatch.setenv("SPLITC_CACHE", str(other))
    result = _compile(cnn_pt2, tmp_path / "imported.splitc")
    info = result.manifest.partitions[0].artifacts[0].options["tuning"]
    assert info["tasks_with_record"] == info["tasks"] == report.tasks and info["chosen"] == "tuned", info
    assert info["schedules"] == "tuned on this host"
    # Records measured on another machine say which one.
    origin = json.loads((imported / database.ORIGIN_FILE).read_text())
    (imported / database.ORIGIN_FILE).write_text(json.dumps({**origin, "host": "build-box-7"}))
    assert database.schedules_label(imported, "?") == "tuned on host build-box-7"


def test_import_refuses_what_is_not_a_tuning_archive(tmp_path):
    import tarfile

    not_tar = tmp_path / "notes.txt"
    not_tar.write_text("hello")
    with pytest.raises(InputError, match="is not a tuning archive"):
        records_io.import_databases(not_tar, tmp_path / "cache")
    truncated = tmp_path / "truncated.tar.gz"
    with tarfile.open(truncated, "w:gz") as archive:
        archive.add(not_tar, arcname="llvm-x/database_workload.json")
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(InputError, match="is not a tuning archive"):
        records_io.import_databases(truncated, tmp_path / "cache")
    hostile = tmp_path / "hostile.tar.gz"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(hostile, "w:gz") as archive:
        archive.add(payload, arcname="../../etc/evil")
    with pytest.raises(InputError, match="which no tuning archive has"):
        records_io.import_databases(hostile, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(InputError, match="no tuning database"):
        records_io.export_databases(tmp_path / "out.tar.gz", cache_dir=tmp_path / "empty")
    assert not (tmp_path / "out.tar.gz").exists()


# ----------------------------------------------------------------------------------------- other ISAs


RPI4 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}


def _cnn_module(cnn_pt2):
    from tvm.relax.frontend.torch import from_exported_program

    return from_exported_program(torch.export.load(str(cnn_pt2)), keep_params_as_input=False)


def _records(directory: Path) -> list[tuple[int, bool, str]]:
    """A database's records that ran, as (workload index, is the untuned baseline, line)."""
    rows = []
    for line in (directory / database.RECORD_FILE).read_text().splitlines():
        workload, (trace, run_secs, *_) = json.loads(line)
        if run_secs and max(run_secs) < database.FAILED_RUN:
            rows.append((workload, all(inst[0] == "GetSBlock" for inst in trace[0]), line))
    return rows


def _write_records(directory: Path, rows: list[tuple[int, bool, str]]) -> None:
    (directory / database.RECORD_FILE).write_text("".join(line + "\n" for *_, line in rows))


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs the aarch64 cross compiler")
def test_host_tuned_schedules_for_rpi4_are_applied_labelled_and_verified(cnn_pt2, tuned_cache, tmp_path, monkeypatch):
    """`splitc tune --target rpi4 --from-host`: the x86 records re-keyed for aarch64, a trace that no
    longer applies is skipped and counted, compile labels the artifact, verify still passes."""
    import tvm
    from splitc.frontend import import_model
    from splitc.targets import load_link, load_targets

    from splitc.drivers.compiler import compile_model

    from splitc.passes.contract import CompileOptions
    from splitc.drivers.verify import verify_bundle

    source, tuned, _ = tuned_cache
    host_db = tuned.directory.relative_to(source)  # the x86 database, inside a cache
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    # Whether a searched schedule or the untuned code is a task's fastest depends on the host: on a CI
    # host the 32-trial search lost to the untuned code on every task of this tiny model, leaving
    # nothing to transfer. Dropping the baseline of each task that has a searched schedule makes that
    # schedule its best on any host; the other tasks keep their baseline as their best.
    rows = _records(cache / host_db)
    searched = {workload for workload, untuned, _ in rows if not untuned}
    _write_records(cache / host_db, [row for row in rows if not (row[1] and row[0] in searched)])
    k = len(searched)
    assert 1 <= k <= 5
    monkeypatch.setenv("SPLITC_CACHE", str(cache))
    mod = _cnn_module(cnn_pt2)

    # No host-tuned database yet: the rpi4 build is untuned and says how to get schedules.
    _, graph = import_model(cnn_pt2)
    plain = compile_model(graph, CompileOptions(load_targets("rpi4"), link=load_link("4g"), samples=1), tmp_path / "plain.splitc")
    assert plain.manifest.partitions[0].artifacts[0].options["tuning"]["schedules"] == "untuned"
    assert any("--from-host" in n and "--rpc" in n for n in plain.notes)

    # The CLI: no budget, so only the transfer of what this host already tuned.
    cli = subprocess.run([sys.executable, "-c", "from splitc.cli import main\nmain()\n", "tune", str(cnn_pt2), "--target", "rpi4",
                          "--from-host"], env=dict(os.environ, SPLITC_CACHE=str(cache)), capture_output=True, text=True, check=False)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    said = " ".join(cli.stdout.split())  # rich wraps lines at the terminal width
    assert "host-tuned (x86_64" in said and "vector width differs" in said, said
    assert f"{k}/5 task(s) have a host-tuned schedule ({k} new); 0 did not apply" in said, said
    assert f"{5 - k} stay untuned (faster untuned on this host), 0 have no record" in said, said

    report = host_records.transfer_host_records(mod, RPI4)  # again: everything is already there
    assert report.tasks == 5 and report.failed == 0 and report.missing == 0 and report.applied == 0
    assert report.already == k and report.untuned_best == 5 - k, report
    assert report.label.startswith("host-tuned (x86_64") and "vector width differs" in report.label
    origin = database.read_origin(report.directory)
    assert origin["schedules"] == report.label and report.directory.name.endswith(database.HOST_TUNED_SUFFIX)

    result = compile_model(graph, CompileOptions(load_targets("rpi4"), link=load_link("4g"), samples=2), tmp_path / "rpi4.splitc")
    deploy = result.manifest.partitions[0].artifacts[0]
    info = deploy.options["tuning"]
    assert deploy.arch == "aarch64" and info["schedules"] == report.label, info
    # FastISel is measured on x86-64 only: the device's build keeps LLVM's default, the host twin not.
    assert "llvm_options" not in deploy.options and result.manifest.partitions[0].artifacts[1].options["llvm_options"] == ["-fast-isel"]
    assert info["chosen"] == "tuned (not measured: cross target)" and "tuned_ms" not in info
    assert info["tasks_with_record"] == report.already
    assert info["winograd"] is True  # the aarch64 library verified below has a Winograd layer (4-lane input transform)
    assert any(report.label in n and "no timing" in n for n in result.notes), result.notes
    monkeypatch.delenv("SPLITC_CACHE")  # verify finds the emulation toolchain in the default cache
    verdict = verify_bundle(result.bundle)
    assert verdict.ok, [c.note for c in verdict.checks]
    from splitc.backends.emulation import find_aarch64_toolchain

    if find_aarch64_toolchain() is not None:  # the aarch64 library itself ran, under qemu
        assert any(c.mode == "emulated" and c.status == "pass" for c in verdict.checks)

    # A schedule that does not replay on a task (here: a convolution's, on a transpose) is refused
    # with the reason, so the transfer skips and counts it instead of applying it.
    monkeypatch.setenv("SPLITC_CACHE", str(cache))
    host = target_keys.resolve_target(X86)
    records = database.open_database(database.database_dir(host)).get_all_tuning_records()
    conv = next(r for r in records if not database.is_untuned(r) and "conv2d" in r.workload.mod.script())
    tasks = prepare.extract_tasks(prepare.prepare(mod, RPI4, True), RPI4)
    transpose = next(t for t in tasks if "transpose" in t.task_name)
    device = tvm.target.Target(target_keys.resolve_target(RPI4))
    assert host_records.replay_error(conv.trace, transpose.dispatched[0], device)
    assert host_records.replay_error(conv.trace, conv.workload.mod, device) is None

    # Where the untuned code is a task's fastest on this host, the task stays untuned on the device.
    baselines_only = tmp_path / "baselines-only"
    shutil.copytree(source, baselines_only)
    _write_records(baselines_only / host_db, [row for row in _records(baselines_only / host_db) if row[1]])
    kept = host_records.transfer_host_records(mod, RPI4, cache_dir=baselines_only)
    assert kept.untuned_best == 5 and kept.applied == kept.already == kept.failed == kept.missing == 0, kept


def test_tuning_another_isa_needs_rpc_or_from_host(cnn_pt2, tmp_path, monkeypatch):
    from splitc.core.errors import TargetError

    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "cache"))
    mod = _cnn_module(cnn_pt2)
    with pytest.raises(InputError, match="--rpc HOST:PORT.*--from-host"):
        driver.tune_module(mod, RPI4, trials=4)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(TargetError, match=f"cannot reach the TVM RPC server at 127.0.0.1:{port}") as exc:
        driver.tune_module(mod, X86, trials=4, rpc=rpc.parse_rpc(f"127.0.0.1:{port}"))
    assert "\n" not in str(exc.value) and time.monotonic() - started < 30
    with pytest.raises(TargetError, match="HOST:PORT"):
        rpc.parse_rpc("no-port")


def test_tune_cli_refuses_what_it_cannot_do(cnn_pt2, tmp_path):
    env = dict(os.environ, SPLITC_CACHE=str(tmp_path / "cache"))
    script = "from splitc.cli import main\nmain()\n"

    def run(*args):
        return subprocess.run([sys.executable, "-c", script, "tune", str(cnn_pt2), *args], env=env, capture_output=True, text=True,
                              check=False)

    both = run("--target", "rpi4", "--rpc", "127.0.0.1:9", "--from-host")
    assert both.returncode == 7 and "give one of them" in both.stderr
    neither = run("--target", "rpi4", "--budget", "1m")
    assert neither.returncode == 7 and "--from-host" in neither.stdout and "--rpc" in neither.stdout


@pytest.mark.slow
def test_tune_over_rpc_against_a_local_server(cnn_pt2, rpc_server, tmp_path, monkeypatch):
    """MetaSchedule's RPCRunner wired to a server without a tracker: candidates are exported as
    shared libraries, uploaded and timed by the server. Loopback only: not run against a device."""
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "cache"))
    report = driver.tune_module(_cnn_module(cnn_pt2), X86, trials=16, trials_per_task=8, population=32,
                                rpc=rpc.parse_rpc(rpc_server))
    assert report.stopped == "finished" and report.measured_on == f"rpc {rpc_server}"
    assert report.new_records > report.tasks and report.coverage.complete
    assert database.read_origin(report.directory)["schedules"] == "tuned on the device over RPC"
    result = _compile(cnn_pt2, tmp_path / "rpc.splitc")
    info = result.manifest.partitions[0].artifacts[0].options["tuning"]
    assert info["tasks_with_record"] == report.tasks and info["schedules"] == "tuned on the device over RPC"


_EMULATED_SERVER = """
import sys, time
from tvm.rpc import server
# In-process: tvm.exec.rpc_server would start a worker by exec'ing sys.executable, an aarch64
# binary the host kernel cannot exec without binfmt_misc; sessions still fork under qemu.
server._popen_start_rpc_server("127.0.0.1", int(sys.argv[1]), int(sys.argv[1]) + 1)
print("listening", flush=True)
while True:
    time.sleep(3600)
"""


@pytest.mark.slow
@pytest.mark.emulation
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs the aarch64 cross compiler")
def test_tune_rpi4_over_rpc_against_an_emulated_aarch64_runtime(cnn_pt2, tmp_path, monkeypatch):
    """The --rpc path for another ISA end to end: candidates cross-compiled to aarch64 shared
    libraries, uploaded to a TVM *runtime-only* RPC server (as a device runs) and timed there. The
    server runs under qemu-user, so its timings say nothing about a Pi: this checks the wiring only,
    into a throwaway cache. Not run against a real device."""
    import cloudpickle
    from splitc.backends.emulation import find_aarch64_toolchain

    toolchain = find_aarch64_toolchain()
    if toolchain is None:
        pytest.skip("aarch64 emulation toolchain not provisioned (splitc toolchain aarch64)")
    extra = tmp_path / "pure-python"
    shutil.copytree(Path(cloudpickle.__file__).parent, extra / "cloudpickle")  # the server's popen pool imports it
    (tmp_path / "server.py").write_text(_EMULATED_SERVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = toolchain.environment()
    env["PYTHONPATH"] += os.pathsep + str(extra)
    log = tmp_path / "server.log"
    with open(log, "w") as stream:
        proc = subprocess.Popen(toolchain.python_argv(str(tmp_path / "server.py"), str(port)), env=env, stdout=stream,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "listening" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"emulated RPC server did not start: {log.read_text()[-500:]}")
            time.sleep(0.5)
        monkeypatch.setenv("SPLITC_CACHE", str(tmp_path / "cache"))
        report = driver.tune_module(_cnn_module(cnn_pt2), RPI4, trials=8, trials_per_task=4, population=16,
                                    rpc=rpc.parse_rpc(f"127.0.0.1:{port}"))
        assert report.stopped == "finished" and report.coverage.complete, report
        assert report.new_records > report.tasks  # the untuned baselines and some tuned candidates
        assert report.directory == database.database_dir(target_keys.resolve_target(RPI4))  # the device's own database
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
