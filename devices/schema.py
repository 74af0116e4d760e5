"""The device profile format (JSON Schema, validated with ``jsonschema``): what a device offers a selection workload.

Sizes are bytes, bandwidths bytes per second, clocks GHz. ``app_memory_limit_bytes`` is what one app may hold before
the OS ends it (iOS jetsam; on Android the low-memory killer, with ``android:largeHeap`` only raising the Java heap);
null where the OS sets no per-app limit (desktops, Linux boards). ``sustained_gflops`` is an *estimate* of fp32
matrix-multiply throughput on the CPU cores (what onnxruntime's CPU provider uses); ``sources`` cite where each
figure comes from, and ``notes`` say which figures are derived rather than published.
"""

from __future__ import annotations

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["name", "title", "kind", "ram_bytes", "app_memory_limit_bytes", "memory_bandwidth_bytes_per_s",
                 "storage_read_bytes_per_s", "cpu", "sustained_gflops", "accelerators", "sources"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]*$"},
        "title": {"type": "string", "minLength": 1},
        "kind": {"enum": ["phone", "laptop", "board", "desktop", "measured"]},
        "os": {"type": "string"},
        "ram_bytes": {"type": "integer", "minimum": 1 << 28},
        "app_memory_limit_bytes": {"type": ["integer", "null"], "minimum": 1 << 26},
        "app_memory_limit_note": {"type": "string"},
        "memory_bandwidth_bytes_per_s": {"type": "number", "exclusiveMinimum": 0},
        "storage_read_bytes_per_s": {"type": "number", "exclusiveMinimum": 0},
        "cpu": {
            "type": "object", "required": ["cores", "clusters"], "additionalProperties": False,
            "properties": {
                "model": {"type": "string"},
                "cores": {"type": "integer", "minimum": 1},
                "clusters": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["cores", "ghz"], "additionalProperties": False,
                    "properties": {"cores": {"type": "integer", "minimum": 1}, "ghz": {"type": "number", "exclusiveMinimum": 0},
                                   "core": {"type": "string"}}}},
            },
        },
        "sustained_gflops": {"type": "number", "exclusiveMinimum": 0},
        "accelerators": {"type": "array", "items": {
            "type": "object", "required": ["kind", "name"], "additionalProperties": False,
            "properties": {"kind": {"enum": ["gpu", "npu", "dsp"]}, "name": {"type": "string"},
                           "runtime": {"type": "string"}, "tops": {"type": "number"}}}},
        "sources": {"type": "array", "items": {"type": "string", "pattern": "^https?://"}},
        "notes": {"type": "string"},
        "measured": {"type": "object"},  # probe results: machine figures and per-bundle layer costs
    },
    # a published device cites its sources; a probed one is its own source
    "if": {"properties": {"kind": {"const": "measured"}}},
    "then": {"required": ["measured"]},
    "else": {"properties": {"sources": {"minItems": 1}}},
}


def validate(doc: dict) -> None:
    """Raise ``jsonschema.ValidationError`` when ``doc`` is not a device profile."""
    import jsonschema

    jsonschema.validate(doc, SCHEMA)
