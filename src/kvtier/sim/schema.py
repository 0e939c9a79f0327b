"""The JSON schema of hardware files (YAML or JSON). ``docs/simulator.md`` explains each field.

Every number sits in a *quantity* ``{value, source}``: the value with its unit ("3.35 TB/s") and
where it comes from (a datasheet, a measurement, or "assumption: ..."). A file describes a device
(an accelerator and its memory and links), a host (a CPU server: cores and DRAM), or a whole
machine (what ``kvtier profile`` writes); ``kvtier simulate --hardware D --host H`` joins a device
and a host.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
DTYPES = ("float32", "tf32", "bfloat16", "float16", "float8", "int8")
ROLES = ("device", "host", "machine")
PROCESSOR_KINDS = ("gpu", "cpu", "npu")
EFFICIENCIES = ("matmul", "memory", "attention_decode", "attention_prefill")
OVERHEADS = ("op", "matmul_call", "step", "sequence")
SAMPLING = ("call", "greedy", "random")
NAME = r"^[a-z0-9][a-z0-9._-]*$"

QUANTITY = {
    "type": "object",
    "required": ["value", "source"],
    "additionalProperties": False,
    "properties": {
        "value": {"type": ["number", "string"]},
        "source": {"type": "string", "minLength": 3},
        "note": {"type": "string"},
    },
}
Q = {"$ref": "#/$defs/quantity"}


def _map(keys: tuple[str, ...], value: dict) -> dict:
    return {"type": "object", "propertyNames": {"enum": list(keys)}, "additionalProperties": value}


LENGTH_CURVE = {
    "type": "object",
    "required": ["lengths", "flops", "source"],
    "additionalProperties": False,
    "properties": {
        "lengths": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1}},
        "flops": {"type": "array", "minItems": 1, "items": {"type": ["number", "string"]}},
        "source": {"type": "string", "minLength": 3},
    },
}

CURVE = {
    "type": "object",
    "required": ["rows", "flops", "shape", "source"],
    "additionalProperties": False,
    "properties": {
        "rows": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1}},
        "flops": {"type": "array", "minItems": 1, "items": {"type": ["number", "string"]}},
        "shape": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 1}},
        "source": {"type": "string", "minLength": 3},
    },
}

PROCESSOR = {
    "type": "object",
    "required": ["kind", "memory"],
    "additionalProperties": False,
    "properties": {
        "kind": {"enum": list(PROCESSOR_KINDS)},
        "model": {"type": "string"},
        "isa": {"type": "string"},
        "memory": {"type": "string", "pattern": NAME},
        "cores": Q,
        "threads": Q,
        "peak_flops": _map(DTYPES, Q),
        "l2_cache": Q,
        "efficiency": _map(EFFICIENCIES, Q),
        "overheads": _map(OVERHEADS, Q),
        "sampling": _map(SAMPLING, Q),  # the engine's sampler: seconds per call, per logit (greedy, random)
        "matmul_curves": _map(DTYPES, {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/curve"}}),
        "attention": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "decode_bandwidth": Q,
                "decode_per_sequence": Q,
                "decode_per_call": Q,
                "prefill_curves": _map(DTYPES, {"$ref": "#/$defs/length_curve"}),  # causal, by chunk length
                "prefill_masked_flops": _map(DTYPES, Q),  # a chunk after a cached prefix (explicit mask)
            },
        },
    },
}

TIER = {
    "type": "object",
    "required": ["capacity", "read_bandwidth"],
    "additionalProperties": False,
    "properties": {"capacity": Q, "read_bandwidth": Q, "write_bandwidth": Q, "copy_bandwidth": Q,
                   "technology": {"type": "string"}},
}

LINK = {
    "type": "object",
    "required": ["ends", "forward", "backward"],
    "additionalProperties": False,
    "properties": {
        "ends": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "string", "pattern": NAME}},
        "forward": Q,  # ends[0] -> ends[1]
        "backward": Q,  # ends[1] -> ends[0]
        "both_directions": Q,  # total of both directions when they run at once (absent: no contention)
        "latency": Q,
        "technology": {"type": "string"},
    },
}

HARDWARE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "kvtier hardware description",
    "type": "object",
    "required": ["schema_version", "name", "role"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "name": {"type": "string", "pattern": NAME},
        "description": {"type": "string"},
        "role": {"enum": list(ROLES)},
        "processors": {"type": "object", "propertyNames": {"pattern": NAME},
                       "additionalProperties": {"$ref": "#/$defs/processor"}},
        "memory": {"type": "object", "propertyNames": {"pattern": NAME},
                   "additionalProperties": {"$ref": "#/$defs/tier"}},
        "links": {"type": "object", "propertyNames": {"pattern": NAME},
                  "additionalProperties": {"$ref": "#/$defs/link"}},
        "notes": {"type": ["string", "array"]},
    },
    "$defs": {"quantity": QUANTITY, "curve": CURVE, "length_curve": LENGTH_CURVE, "processor": PROCESSOR,
              "tier": TIER, "link": LINK},
}
