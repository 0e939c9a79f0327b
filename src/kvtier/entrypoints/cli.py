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
from kvtier.entrypoints.profile_cmd import profile
from kvtier.entrypoints.serve import serve
from kvtier.entrypoints.simulate_cmd import simulate
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
    llm.engine.log_steps = stats
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
    console = Console(stderr=True, width=max(120, Console().width))
    console.print(t)
    st = engine.stats
    step_s = st.decode_only_s / st.decode_only_steps if st.decode_only_steps else None
    wbytes = engine.loaded.model.weight_bytes_per_step()
    lines = [f"steps {st.num_steps}, prefill tokens {st.num_prefill_tokens}, decode tokens {st.num_decode_tokens}, "
             f"preemptions {engine.scheduler.num_preemptions}"]
    if step_s:
        lines.append(f"decode step {step_s * 1e3:.1f} ms: weights read at {wbytes / step_s / 1e9:.1f} GB/s "
                     f"({format_bytes(wbytes)} per step)")
    lines += _kv_lines(engine)
    if engine.policy.name != "plain":
        console.print(_kv_step_table(engine.stats.step_log))
    for line in lines:
        console.print(line)


def _kv_lines(engine) -> list[str]:
    """Per memory tier: capacity and peak, KV bytes attention read and bytes migrated per step."""
    kv, steps = engine.kv_stats.totals, max(engine.stats.num_steps, 1)
    out = [f"KV policy {engine.policy.name}: {kv.moves} block moves"
           + ("" if kv.fast_mass_share is None else f", {100 * kv.fast_mass_share:.1f}% of attention mass "
              "served from the fast tier")]
    for tier, u in engine.kv_usage().items():
        moved = kv.bytes_migrated_in.get(tier, 0) + kv.bytes_migrated_out.get(tier, 0)
        out.append(f"KV tier {tier}: peak {format_bytes(u['peak_bytes'])} of {format_bytes(u['bytes_total'])} "
                   f"({u['blocks_total']} blocks of {engine.config.block_size} tokens); per step: read "
                   f"{format_bytes(kv.bytes_read.get(tier, 0) // steps)}, migrated {format_bytes(moved // steps)}")
    return out


def _kv_step_table(log: list[dict], max_rows: int = 16):
    """Per step (sampled to ``max_rows``): KV blocks resident per target, bytes read per tier, migrated."""
    from rich.table import Table

    t = Table(title="KV per step")
    for col in ("step", "decodes", "resident blocks", "read", "migrated", "fast-tier mass"):
        t.add_column(col, justify="right" if col in ("step", "decodes") else "left")
    stride = max(1, -(-len(log) // max_rows))
    for r in log[::stride]:
        kv = r["kv"]
        mass = kv.get("fast_mass_share")
        t.add_row(str(r["step"]), str(r["num_decode"]), _per_tier(kv["resident_blocks"], str),
                  _per_tier(kv["bytes_read"]), _per_tier(kv["bytes_migrated"]),
                  "-" if mass is None else f"{100 * mass:.0f}%")
    return t


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

    from kvtier.entrypoints.compare import COMPARE_PROMPTS, runs_on
    from kvtier.entrypoints.compare import compare as run
    from kvtier.kv.policies import POLICY_REGISTRY

    names = [p.strip() for p in policies.split(",")] if policies else None
    console = Console(stderr=True)
    config = engine_config(kw, fast=True)
    console.print(f"kvtier compare: {len(COMPARE_PROMPTS)} prompts x {max_tokens} greedy tokens, "
                  f"model {config.model}, {config.weights} weights, KV {config.kv_dtype}")
    skipped = [n for n in sorted(POLICY_REGISTRY) if not runs_on(config, n)] if names is None else []
    if skipped:
        console.print(f"  skipped over {config.kv_dtype} KV (they need a float cache): {', '.join(skipped)}")
    rows = run(config, names, max_tokens=max_tokens,
               on_row=lambda r: console.print(f"  {r.policy}: done in {r.seconds:.1f} s"))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    t = Table(title=f"KV policies: {len(COMPARE_PROMPTS)} prompts x {max_tokens} greedy tokens")
    cols = ("policy", "KV peak per tier", "KV read per tier", "migrated", "fast-tier mass", "decode tok/s",
            "agreement", "diverges at", "preempted")
    for col in cols:
        t.add_column(col, justify="left" if col.startswith(("policy", "KV")) else "right", no_wrap=True)
    for r in rows:
        mass = "-" if r.fast_mass_share is None else f"{100 * r.fast_mass_share:.1f}%"
        t.add_row(r.policy, _per_tier(r.kv_bytes_peak), _per_tier(r.kv_bytes_read), format_bytes(r.kv_bytes_migrated),
                  mass, f"{r.decode_tokens_per_s:.1f}", f"{100 * r.agreement:.1f}%",
                  "-" if r.first_divergence is None else str(r.first_divergence), str(r.num_preemptions))
    Console(width=max(140, Console().width)).print(t)


def _per_tier(d: dict[str, int], fmt=format_bytes) -> str:
    return ", ".join(f"{k} {fmt(v)}" for k, v in d.items() if v) or "-"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of integers") from e


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of numbers") from e


@cli.command("eval")
@click.option("--policy", "specs", multiple=True, metavar="NAME[:K=V,...]",
              help="a policy and its options, e.g. kcache:top_n=0.1 (repeatable; default: every policy)")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="greedy tokens per agreement prompt")
@click.option("--context-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="agreement prompts of this many tokens of English text (0: short fixed prompts)")
@click.option("--ppl-tokens", type=int, default=8192, show_default=True, help="English tokens for perplexity (0: skip)")
@click.option("--ppl-window", type=int, default=1024, show_default=True, help="perplexity window (tokens)")
@click.option("--lengths", default="512,1024,2048,4096", show_default=True,
              help="retrieval context lengths in tokens ('' skips retrieval)")
@click.option("--depths", default="0.1,0.5,0.9", show_default=True, help="where the fact is planted")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
@engine_options
def eval_cmd(specs, max_tokens, context_tokens, ppl_tokens, ppl_window, lengths, depths, as_json, **kw):
    """Accuracy of KV policies against the plain engine: agreement, KL, perplexity, retrieval."""
    from rich.console import Console

    from kvtier.entrypoints.eval import EvalSettings, evaluate, parse_spec
    from kvtier.kv.policies import POLICY_REGISTRY

    parsed = [parse_spec(s) for s in specs] or [(n, {}) for n in sorted(POLICY_REGISTRY) if n != "plain"]
    settings = EvalSettings(max_tokens=max_tokens, ppl_tokens=ppl_tokens, ppl_window=ppl_window,
                            lengths=_ints(lengths), depths=_floats(depths), context_tokens=context_tokens)
    console = Console(stderr=True)
    console.print(f"kvtier eval: plain + {len(parsed)} policies on model {kw['model']}")
    rows = evaluate(engine_config(kw), parsed, settings,
                    on_row=lambda r: console.print(_eval_line(r)))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    Console(width=max(140, Console().width)).print(_eval_table(rows))


def _eval_line(r) -> str:
    """A finished row at once (stderr), so a long evaluation shows its figures as they come."""
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    ppl = "-" if r.perplexity is None else f"{r.perplexity:.3f}"
    kl = "-" if r.kl_mean is None else f"{r.kl_mean:.4f}"
    cases = ", ".join(f"{k} {pct(v)}" for k, v in r.retrieval.items())
    return (f"  {r.label}: agreement {pct(r.agreement)}, forced top-1 {pct(r.forced_agreement)}, KL {kl}, "
            f"perplexity {ppl}, retrieval {pct(r.retrieval_accuracy)} ({cases}) in {r.seconds:.1f} s")


def _eval_table(rows):
    from rich.table import Table

    t = Table(title="KV policy accuracy against the plain engine")
    for col in ("policy", "agreement", "diverges at", "forced top-1", "KL mean", "KL max", "perplexity",
                "retrieval"):
        t.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    num = lambda x, f=".4f": "-" if x is None else format(x, f)  # noqa: E731
    for r in rows:
        t.add_row(r.label, pct(r.agreement), "-" if r.first_divergence is None else str(r.first_divergence),
                  pct(r.forced_agreement), num(r.kl_mean), num(r.kl_max), num(r.perplexity, ".3f"),
                  pct(r.retrieval_accuracy))
    return t


# ---- commands defined in their own modules ----------------------------------------------------
# (one line each: cli.add_command(module.command))
cli.add_command(profile)
cli.add_command(simulate)
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
