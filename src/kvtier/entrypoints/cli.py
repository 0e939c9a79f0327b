"""The ``kvtier`` command line: generate, chat, compare (and the commands registered at the end).

Engine options are shared by every command that runs a model (``--model``, ``--kv-policy``...;
see ``options.py``). Problems with the user's input end with a one-line ``error: ...`` and exit
status 2, no traceback. A new command lives in its own module (heavy imports inside the function)
and is attached to ``cli`` in the registration block below.
"""

from __future__ import annotations

import json
import sys

import click

from kvtier.entrypoints.bench_serve import bench
from kvtier.entrypoints.options import engine_config, engine_kwargs, engine_options
from kvtier.entrypoints.serve import serve
from kvtier.errors import ConfigError, KvtierError
from kvtier.utils.units import format_bytes


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="kvtier")
def cli():
    """kvtier: memory-hierarchy-aware LLM inference over a paged KV cache."""


# ---- generate ---------------------------------------------------------------------------------

@cli.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--max-tokens", type=int, default=64, show_default=True, help="new tokens per prompt")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0: no limit")
@click.option("--sample-seed", type=int, default=None, help="per-request seed (same seed, same text)")
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--ignore-eos", is_flag=True, help="keep going past the end-of-sequence token")
@click.option("--chat", "as_chat", is_flag=True, help="wrap each prompt as a user message (chat template)")
@click.option("--json", "as_json", is_flag=True, help="print JSON: text, token ids, finish reason, stats")
@click.option("--stats", is_flag=True, help="print per-request and engine statistics")
@engine_options
def generate(prompts, max_tokens, temperature, top_p, top_k, sample_seed, stop, ignore_eos, as_chat, as_json,
             stats, **kw):
    """Complete PROMPTS (one or more; batched together)."""
    from kvtier.entrypoints.llm import LLM
    from kvtier.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=sample_seed, stop=list(stop), ignore_eos=ignore_eos)
    llm = LLM(**engine_kwargs(kw))
    items = [_chat_prompt(llm, p) if as_chat else p for p in prompts]
    if len(items) == 1 and not as_json:
        outs = [_stream(llm, items[0], params)]
    else:
        outs = llm.generate(items, params, use_tqdm=not as_json)
        if not as_json:
            for i, out in enumerate(outs):
                click.echo(f"--- [{i}] {out.outputs[0].finish_reason}")
                click.echo(out.text)
    if as_json:
        click.echo(json.dumps([_as_json(p, o) for p, o in zip(prompts, outs, strict=True)], indent=2))
    if stats:
        _print_stats(llm.engine, outs)


def _chat_prompt(llm, text: str) -> dict:
    tok = llm.get_tokenizer()
    if tok is None:
        raise ConfigError("this model has no tokenizer", "drop --chat")
    return {"prompt": text, "prompt_token_ids": tok.apply_chat_template([{"role": "user", "content": text}])}


def _stream(llm, prompt, params):
    """Print one completion as it is generated."""
    engine = llm.engine
    engine.incremental_text = True
    text, ids = llm._encode(prompt)  # noqa: SLF001 - same validation as generate()
    rid = engine.add_request(None, text, params, ids)
    printed = 0
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != rid:
                continue
            piece = out.text[printed:]
            printed = len(out.text)
            click.echo(piece, nl=False)
            sys.stdout.flush()
            final = out if out.finished else final
    click.echo()
    return final


def _as_json(prompt: str, out) -> dict:
    c = out.outputs[0]
    return {"prompt": prompt, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason, "num_prompt_tokens": len(out.prompt_token_ids),
            "stats": out.stats[0].as_dict()}


def _print_stats(engine, outs) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="requests")
    for col in ("#", "prompt tok", "output tok", "TTFT ms", "TPOT ms", "decode tok/s", "preempted"):
        t.add_column(col, justify="right")
    for i, out in enumerate(outs):
        s = out.stats[0]
        t.add_row(str(i), str(s.num_prompt_tokens), str(s.num_output_tokens), _ms(s.ttft_s), _ms(s.tpot_s),
                  f"{s.decode_tokens_per_s:.1f}" if s.decode_tokens_per_s else "-", str(s.num_preemptions))
    console = Console(stderr=True)
    console.print(t)
    st = engine.stats
    step_s = st.decode_only_s / st.decode_only_steps if st.decode_only_steps else None
    wbytes = engine.loaded.model.weight_bytes_per_step()
    lines = [f"steps {st.num_steps}, prefill tokens {st.num_prefill_tokens}, decode tokens {st.num_decode_tokens}, "
             f"preemptions {engine.scheduler.num_preemptions}"]
    if step_s:
        lines.append(f"decode step {step_s * 1e3:.1f} ms: weights read at {wbytes / step_s / 1e9:.1f} GB/s "
                     f"({format_bytes(wbytes)} per step)")
    for tier, u in engine.kv_usage().items():
        lines.append(f"KV tier {tier}: peak {format_bytes(u['peak_bytes'])} of {format_bytes(u['bytes_total'])} "
                     f"({u['blocks_total']} blocks of {engine.config.block_size} tokens)")
    for line in lines:
        console.print(line)


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


# ---- chat -------------------------------------------------------------------------------------

@cli.command()
@click.option("--system", default=None, help="system prompt")
@click.option("--max-tokens", type=int, default=512, show_default=True, help="new tokens per reply")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--top-p", type=float, default=0.9, show_default=True)
@click.option("--sample-seed", type=int, default=None, help="seed for reproducible replies")
@engine_options
def chat(system, max_tokens, temperature, top_p, sample_seed, **kw):
    """Talk to the model. Type /reset to start over, /exit or Ctrl-D to leave."""
    from kvtier.entrypoints.llm import LLM
    from kvtier.sampling_params import SamplingParams

    llm = LLM(**engine_kwargs(kw))
    tok = llm.get_tokenizer()
    if tok is None or not tok.has_chat_template:
        raise ConfigError("this model has no chat template", "use `kvtier generate` instead")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=sample_seed)
    history = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    while True:
        line = _read_line(interactive)
        if line is None or line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        out = _stream(llm, {"prompt_token_ids": _chat_ids(llm, tok, history, max_tokens)}, params)
        history.append({"role": "assistant", "content": out.text})


def _chat_ids(llm, tok, history: list[dict], max_tokens: int) -> list[int]:
    """The conversation as token ids, dropping the oldest turns when it would not fit the context."""
    limit = llm.engine.max_model_len - min(max_tokens, llm.engine.max_model_len // 2)
    ids = tok.apply_chat_template(history)
    while len(ids) > limit and len(history) > 2:
        drop = 1 if history[0]["role"] == "system" else 0
        del history[drop:drop + 2]
        ids = tok.apply_chat_template(history)
    return ids


def _read_line(interactive: bool) -> str | None:
    try:
        return input("> ") if interactive else sys.stdin.readline() or None
    except EOFError:
        return None


# ---- compare ----------------------------------------------------------------------------------

@cli.command()
@click.option("--policies", default=None, help="comma-separated KV policies (default: all)")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="greedy tokens per prompt")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
@engine_options
def compare(policies, max_tokens, as_json, **kw):
    """Run fixed prompts under every KV policy: KV bytes per tier, decode speed, greedy agreement."""
    from rich.console import Console
    from rich.table import Table

    from kvtier.entrypoints.compare import COMPARE_PROMPTS
    from kvtier.entrypoints.compare import compare as run

    names = [p.strip() for p in policies.split(",")] if policies else None
    console = Console(stderr=True)
    config = engine_config(kw)
    console.print(f"kvtier compare: {len(COMPARE_PROMPTS)} prompts x {max_tokens} greedy tokens, "
                  f"model {config.model}")
    rows = run(config, names, max_tokens=max_tokens,
               on_row=lambda r: console.print(f"  {r.policy}: done in {r.seconds:.1f} s"))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    t = Table(title=f"KV policies: {len(COMPARE_PROMPTS)} prompts x {max_tokens} greedy tokens")
    for col in ("policy", "KV peak per tier", "decode tok/s", "agreement", "diverges at", "preemptions"):
        t.add_column(col, justify="left" if col.startswith(("policy", "KV")) else "right", no_wrap=True)
    for r in rows:
        tiers = ", ".join(f"{k} {format_bytes(v)}" for k, v in r.kv_bytes_peak.items())
        t.add_row(r.policy, tiers, f"{r.decode_tokens_per_s:.1f}", f"{100 * r.agreement:.1f}%",
                  "-" if r.first_divergence is None else str(r.first_divergence), str(r.num_preemptions))
    Console(width=max(100, Console().width)).print(t)


# ---- commands defined in their own modules ----------------------------------------------------
# (one line each: cli.add_command(module.command))
cli.add_command(serve)
cli.add_command(bench)


# ---- entry point ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="kvtier", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KvtierError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
