"""What every benchmark records next to its numbers, and how it prints and saves them."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Date, device, library versions and commit: a figure without these cannot be compared."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # A copy of the tree without .git (the GPU machine's) gets the commit through KUBELLM_COMMIT.
    commit = os.environ.get("KUBELLM_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
    }


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    """A fixed-width table of dict rows (columns from the first row)."""
    if not rows:
        print(f"{title}: no rows")
        return
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns}
    print(f"\n{title}")
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(cell(row.get(c, "")).rjust(widths[c]) for c in columns))


def save_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"environment": environment(), **payload}, indent=2))
        print(f"wrote {path}")


def copy_bandwidth_gbs(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second): the memory roofline."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / cuda_time_s(lambda: dst.copy_(src)) / 1e9


def cuda_time_s(fn, warmup: int = 3, repeat: int = 20) -> float:
    """Median wall time of fn on the GPU, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]
