"""kvtier's simulator: the engine's own scheduler and KV policies on a simulated clock.

One decision logic, two executors: ``serving.py`` drives ``kvtier.engine.scheduler.Scheduler``
exactly as ``LLMEngine.step`` does, but each step's time comes from ``cost_model.py`` (per layer:
linears by roofline, attention by bytes read per memory tier, transfers over links, explicit overlap
of streams on a timeline) for a machine described in a hardware file (``hardware.py``,
``presets/*.yaml``, or one written by ``kvtier profile``).
"""
