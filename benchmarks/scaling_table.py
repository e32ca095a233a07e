"""Print the tables of docs/scaling.md: memory per device and optimizer-step time on paper.

    python benchmarks/scaling_table.py

Everything is arithmetic on the constants below (no measurement happens here); the transient
bytes per element are adamkit's eager step, measured by docs/scaling.md's method.
"""

from __future__ import annotations

GB = 1e9

# Llama-style models: (parameters, elements of the largest tensor)
MODELS = {
    "1B (Llama-3.2-1B shape)": (1.236e9, 128256 * 2048),
    "7B (Llama-2-7B shape)": (6.738e9, 32000 * 4096),
    "70B (Llama-2-70B shape)": (68.98e9, 32000 * 8192),
}
DEVICES = (8, 64, 512)

# bytes per param of the moments (m and v) in each format; int8/int4 codes + fp32 block scales
STATE_BYTES = {
    "float32": 8.0,
    "bfloat16": 4.0,
    "int8": 2 * (1 + 4 / 256),
    "int4": 2 * (0.5 + 4 / 128),
}
# peak bytes of temporaries per element of the param being stepped (eager executor, fp32
# params; measured with a dispatch-mode allocation tracker on a 4M-element tensor)
TRANSIENT = {"float32": 24.0, "bfloat16": 53.0, "int8": 58.0, "int4": 57.6}
TRANSIENT_BF16_PARAMS = {"float32": 47.0, "bfloat16": 51.0, "int8": 56.0, "int4": 55.6}

# bytes read + written per param by one step with fp32 params and grads (REFERENCE.md s4):
# p (r+w) 8, g (r) 4, then m and v read and written in the state format
STEP_BYTES = {k: 12 + 2 * v for k, v in STATE_BYTES.items()}

BANDWIDTH = {  # vendor HBM specifications, TB/s
    "A100 80GB": 2.04,
    "H100 SXM": 3.35,
    "H200": 4.8,
}


def memory_rows(params_bytes: float = 4.0, grads_bytes: float = 4.0) -> list[str]:
    """GB per device: sharded params and grads, sharded moments per format, the transient of
    adamkit's eager step (largest local shard), and the totals."""
    fmts = list(STATE_BYTES)
    rows = [
        "| model | devices | params + grads | states " + " / ".join(fmts)
        + " | adamkit adds " + " / ".join(fmts) + " | total " + " / ".join(fmts) + " |",
        "|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, (n, largest) in MODELS.items():
        for d in DEVICES:
            pg = n * (params_bytes + grads_bytes) / d
            states = [n * STATE_BYTES[f] / d for f in fmts]
            per_element = TRANSIENT if params_bytes == 4.0 else TRANSIENT_BF16_PARAMS
            extra = [largest / d * per_element[f] for f in fmts]
            total = [pg + s + e for s, e in zip(states, extra)]
            cells = [" / ".join(f"{x / GB:.2f}" for x in col) for col in (states, extra, total)]
            rows.append(f"| {name} | {d} | {pg / GB:.2f} | " + " | ".join(cells) + " |")
    return rows


def time_rows(device: str = "H100 SXM") -> list[str]:
    """Milliseconds per optimizer step on each device when the step moves its shard's bytes
    once at the device's memory bandwidth (a lower bound)."""
    bw = BANDWIDTH[device] * 1e12
    head = " | ".join(f"{d} devices" for d in DEVICES)
    rows = [f"| model | state | B/param | {head} |", "|---|---|---:|" + "---:|" * len(DEVICES)]
    for name, (n, _) in MODELS.items():
        for fmt, b in STEP_BYTES.items():
            cells = " | ".join(f"{n / d * b / bw * 1e3:.2f}" for d in DEVICES)
            rows.append(f"| {name} | {fmt} | {b:.1f} | {cells} |")
    return rows


def single_device_rows() -> list[str]:
    """One device, bf16 params and grads (torchao's Llama2-7B setting), GiB."""
    gib = 2**30
    rows = ["| model | state | params + grads + states (GiB) |", "|---|---|---:|"]
    for name, (n, _) in MODELS.items():
        if not name.startswith("7B"):
            continue
        for fmt in ("bfloat16", "int8", "int4"):
            rows.append(f"| {name} | {fmt} | {n * (4 + STATE_BYTES[fmt]) / gib:.1f} |")
    return rows


if __name__ == "__main__":
    print("\n".join(memory_rows()))
    print()
    print("\n".join(memory_rows(2.0, 2.0)))
    print()
    print("\n".join(time_rows()))
    print()
    print("\n".join(single_device_rows()))
