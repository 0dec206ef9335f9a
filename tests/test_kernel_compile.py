"""Every Triton kernel in kernels/ compiles for Hopper (sm_90a) and Blackwell (sm_100a) at DeepSeek-V3.2's shapes.

No GPU needed: bench/kernel_report.py runs each launcher on meta tensors, records its launches and compiles
them with the ptxas that Triton's wheel ships. The interpreter the other kernel tests use (TRITON_INTERPRET=1)
compiles nothing, so it hides what these tests catch: compile errors, shared memory a GPU will not give a
program, and register spills inside a kernel's main loop. The report runs in a subprocess because the
kernels must be decorated with the interpreter off. Compiled kernels land in Triton's cache
(~/.triton/cache), so later runs only re-read the cubins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHS = (90, 100)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, str(REPO / "bench" / "kernel_report.py"), "--arch", ",".join(map(str, ARCHS)),
               "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def _describe(row: dict) -> str:
    return f"{row['case']} / {row['kernel']} / sm_{row['arch']} {row['config']}"


def test_every_kernel_is_compiled_for_every_target(report: dict) -> None:
    assert report["uncovered"] == [], f"kernels no case of bench/kernel_report.py launches: {report['uncovered']}"
    for arch in ARCHS:
        assert {r["case"] for r in report["rows"] if r["arch"] == arch} == {r["case"] for r in report["rows"]}


def test_no_compile_errors(report: dict) -> None:
    failed = [f"{_describe(r)}: {r['error']}" for r in report["rows"] if r["error"]]
    assert not failed, "\n".join(failed)


def test_shared_memory_within_the_targets_limit(report: dict) -> None:
    # H100/H200 and B200 give one program at most 227 KB of (opt-in dynamic) shared memory.
    limit = 227 * 1024
    over = [f"{_describe(r)}: {r['shared'] / 1024:.1f} KB" for r in report["rows"] if r["shared"] > limit]
    assert not over, "\n".join(over)


def test_no_register_spills_in_main_loops(report: dict) -> None:
    spilling = [
        f"{_describe(r)}: {r['loop_spills']} local loads/stores in a loop, {r['registers']} registers"
        for r in report["rows"] if r["loop_spills"]
    ]
    assert not spilling, "\n".join(spilling)


def test_attention_kernels_use_hoppers_warp_group_mma(report: dict) -> None:
    """The sparse MLA forward, the indexer and the indexer loss were tiled for wgmma; falling back to the
    older mma.sync (a tile change, a Triton upgrade) would cost them a large share of their speed."""
    wgmma = {"_sparse_mla_fwd_kernel", "_indexer_fwd_kernel", "_indexer_bwd_dq_dw_kernel", "_indexer_bwd_dk_kernel",
             "_indexer_kl_fwd_kernel"}
    slow = [f"{_describe(r)}: {r['mma']}" for r in report["rows"]
            if r["arch"] == 90 and r["kernel"] in wgmma and r["mma"] != "wgmma"]
    assert not slow, "\n".join(slow)
