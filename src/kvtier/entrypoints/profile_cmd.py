"""``kvtier profile``: measure this machine and write the hardware file ``kvtier simulate -H local`` reads."""

from __future__ import annotations

import click


@click.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="where to write the file (default: the cache dir's hardware/local.yaml)")
@click.option("--dtypes", default="auto", show_default=True,
              help="comma-separated dtypes to measure (float32, bfloat16, float16); the first is the engine's. "
                   "auto: float32 on a CPU, bfloat16,float16,float32 on a GPU")
@click.option("--model", "-m", default="default", show_default=True,
              help="model whose attention head shape the attention kernels are measured at")
@click.option("--name", default="local", show_default=True, help="the hardware name written in the file")
@click.option("--quick", is_flag=True, help="fewer points and smaller buffers (about 30 s; rougher figures)")
@click.option("--repeats", type=int, default=5, show_default=True, help="best of N runs for each figure")
@click.option("--threads", "num_threads", type=int, default=None,
              help="CPU threads (default: torch's choice, as the engine)")
@click.option("--cpu-clock", is_flag=True,
              help="one thread, timed in its CPU time: figures that ignore other processes on a shared machine")
@click.option("--show", is_flag=True, help="print the file after writing it")
def profile(output, dtypes, model, name, quick, repeats, num_threads, cpu_clock, show):
    """Measure memory bandwidth, matmul and attention speed and engine overheads; write a hardware file."""
    from pathlib import Path

    import torch
    from rich.console import Console

    from kvtier.errors import ConfigError
    from kvtier.sim import machine_file
    from kvtier.sim.model_shape import DEFAULT_MODEL_SHAPE, model_shape
    from kvtier.sim.profile import TORCH_DTYPES, ProfileOptions, use_cpu_clock

    if dtypes == "auto":
        dtypes = "bfloat16,float16,float32" if torch.cuda.is_available() else "float32"
    names = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    bad = [d for d in names if d not in TORCH_DTYPES]
    if bad or not names:
        raise ConfigError(f"unknown dtype(s) {', '.join(bad) or repr(dtypes)} for --dtypes",
                          f"use one or more of: {', '.join(TORCH_DTYPES)}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    if cpu_clock and torch.cuda.is_available():
        raise ConfigError("--cpu-clock times CPU work and cannot time a GPU", "drop --cpu-clock")
    if num_threads or cpu_clock:
        torch.set_num_threads(1 if cpu_clock else num_threads)
    use_cpu_clock(cpu_clock)
    console = Console(stderr=True)
    name_or_path = DEFAULT_MODEL_SHAPE if model == "default" else model
    opts = ProfileOptions(names, quick, repeats, model_shape(model), name_or_path,
                          say=lambda msg: console.print(f"  {msg}"))
    console.print(f"kvtier profile: {torch.get_num_threads()} threads, "
                  f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
    raw = machine_file.profile_machine(opts, name)
    path = machine_file.write_hardware_file(raw, Path(output) if output else machine_file.default_path())
    console.print(f"wrote {path}; use it with: kvtier simulate serve --hardware "
                  f"{'local' if output is None else path}")
    if show:
        click.echo(path.read_text())
