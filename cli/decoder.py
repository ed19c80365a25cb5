"""CLI for split decoder LMs: `splitc generate`, and the decoder paths of `splitc compile` and
`splitc serve` (cli/__init__.py and cli/serve.py call into here):

    splitc compile model.gguf --targets rpi4,a100 --cut model.layers.7 -o chat.splitc
    splitc generate chat.splitc --prompt "What is the capital of France?" --max-new-tokens 32
    splitc serve chat.splitc --token-file secret          # the cloud half, with sessions
    splitc generate chat.splitc --prompt "..." --remote http://cloud:8000 --token-file secret
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from splitc.cli.common import console
from splitc.core.errors import InputError


def compile_decoder_command(source: str, targets: str, cut: str, output: str | None, max_len: int, draft: str = "off") -> None:
    from splitc.drivers.decoder import compile_decoder
    from splitc.frontend.decoder import load_decoder
    from splitc.targets import load_targets

    if not targets:
        raise InputError("compiling a decoder needs --targets device,cloud (e.g. rpi4,a100)")
    target_list = load_targets(targets)
    with console.status(f"loading {source}"):
        loaded = load_decoder(source)
    out = Path(output) if output else Path(f"{loaded.name}.splitc")
    result = compile_decoder(loaded, target_list, out, cut=cut, max_len=max_len, draft=draft != "off", log=lambda m: console.print(m))
    spec = result.manifest.decoder
    console.print(f"wrote {out}: {spec.family}, layers 0..{spec.device_layers - 1} on {target_list[0].name}, "
                  f"{spec.device_layers}..{spec.layers - 1} + LM head on {target_list[1].name}; cache {spec.max_len} positions; "
                  f"{4 * spec.hidden} bytes per token at the cut ({result.seconds['total']:.1f} s)")


def is_decoder_bundle(path: str) -> bool:
    manifest = Path(path) / "manifest.json"
    try:
        return manifest.is_file() and "decoder" in json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False


def serve_decoder(bundle: str, *, token: str | None, name: str | None, max_body: int, host: str, port: int,
                  drain_timeout: float, ttl_s: float, max_sessions: int) -> None:
    from splitc.runtime import Bundle
    from splitc.runtime.decoder_sessions import DecoderService
    from splitc.runtime.server import make_http_server, serve_until_signalled

    app = DecoderService(Bundle.open(bundle), token=token, model_name=name, max_body=max_body, ttl_s=ttl_s, max_sessions=max_sessions)
    httpd = make_http_server([app], host, port)
    url = f"http://{host}:{httpd.port}/v2/models/{app.name}/sessions"

    def ready() -> None:
        click.echo(f"serving decoder {app.name} (layers {app.spec.device_layers}..{app.spec.layers - 1} + LM head) at {url}"
                   f"{'' if token else ' WITHOUT a token'}; SIGTERM or Ctrl-C to stop", err=True)

    serve_until_signalled(httpd, drain_timeout=drain_timeout, on_ready=ready)
    s = app.stats
    click.echo(f"stopped: {s['sessions_created']} sessions, {s['steps']} steps, {s['errors_4xx']} refused (4xx)", err=True)


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--prompt", "-p", required=True, help="The user's message (rendered through the model's chat template).")
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=click.IntRange(1), help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0: greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed (tokens are drawn per position from it).")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable); it is not printed.")
@click.option("--no-chat", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--cut-encoding", type=click.Choice(["fp32", "int8", "int4"]), default="fp32", show_default=True,
              help="How hidden states cross the cut (int8/int4: per-row quantized).")
@click.option("--remote", help="URL of `splitc serve` running this bundle's cloud half.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Shared secret for --remote (or $SPLITC_TOKEN).")
@click.option("--name", help="Model name on the server (default: the bundle's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the run's figures as JSON ('-' for stdout).")
@click.option("--draft", default="off", show_default=True, help="N: the device drafts N tokens per cloud call (greedy, in process; "
              "needs a bundle compiled with --draft).")
def generate(bundle, prompt, max_new_tokens, temperature, top_p, seed, stop, no_chat, cut_encoding, remote, token_file, name,
             json_path, draft):
    """Generate text with a split decoder BUNDLE: the device half here, the cloud half here or at --remote."""
    from splitc.cli.serve import read_token
    from splitc.runtime import Bundle
    from splitc.runtime.generation import GenerationSession, Sampling
    from splitc.runtime.v2protocol import model_name_for

    opened = Bundle.open(bundle)
    cloud = None
    if remote:
        from splitc.runtime.decoder_client import RemoteCloud

        model = model_name_for(name or str(opened.manifest.model.get("name") or "model"))
        cloud = RemoteCloud(remote, model, token=read_token(token_file), cut_encoding=cut_encoding)
    session = GenerationSession(opened, cloud, cut_encoding=cut_encoding, draft=_draft_count(draft))
    sampling = Sampling(temperature, top_p, seed)
    result = session.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop, chat=not no_chat,
                              on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    sys.stdout.write("\n")
    figures = {**result.figures, "stop_reason": result.stop_reason, "prompt_tokens": len(result.prompt_ids),
               "generated_ids": result.ids, "text": result.text, "cut_encoding": cut_encoding,
               "bytes_per_token_at_cut": _bytes_per_token(opened, cut_encoding), "remote": remote or None}
    if cloud is not None:
        figures.update(http_round_trips=cloud.round_trips, sessions_recreated=cloud.recreated, bytes_sent=cloud.bytes_sent)
        cloud.close()
    if json_path:
        text = json.dumps(figures, indent=2)
        if json_path == "-":
            click.echo(text)
        else:
            Path(json_path).write_text(text + "\n")
    click.echo(f"{figures['tokens']} tokens, {figures['tokens_per_s']:.1f} tokens/s, first token after "
               f"{1e3 * figures['time_to_first_token_s']:.0f} ms, {figures['round_trips']} round trips ({result.stop_reason})", err=True)


def _draft_count(value: str) -> int:
    if value == "off":
        return 0
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise InputError(f"--draft {value!r}: give off or a number of drafted tokens (auto, adapting n to acceptance and RTT, is not built yet)")


def _bytes_per_token(bundle, encoding: str) -> int:
    from splitc.runtime.cut_codec import encoded_size

    return encoded_size(1, bundle.manifest.decoder.hidden, encoding)
