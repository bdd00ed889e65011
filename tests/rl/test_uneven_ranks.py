"""3 gloo ranks (FSDP2) whose row blocks differ by one take the single-process step.

43 rows split 15/14/14: at micro-batch 1, 2 and 7 the first rank has one micro-batch more
than the others (15 vs 14, 8 vs 7, 3 vs 2). Every FSDP2 forward and backward is a collective,
so before the ranks padded to a common count with filler passes this run hung (measured: no
step in 7 minutes with 64 rows at micro-batch 7). Each step must equal the single-process step
at the same micro-batch size within the AdamW bound of `one_step` (the ranks only re-order the
fp32 gradient sums); the timeout turns a hang into a failure. Both replay the same rollout
routes (R3, `one_step.rule_routes`), so the sharded routing replay, its agreement and the
rollout's expert load are checked too.

The single-process step runs the same micro-batches. A micro-batch of one row takes another
BF16 kernel than a batched one (measured here: the same 43 rows at micro-batch 1 and 64 give
gradients 7e-4 apart, relative), so rank 0's short last micro-batch (row 14 alone) must be a
micro-batch of one in the reference too: its rows are reordered so that every rank's
trailing partial micro-batch comes last (the gradient is a sum over rows: order-free).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from one_step import DELTA, assert_same_adamw_step, single_step

from qerl_rollout.workers.trainer import row_blocks

ROWS = 43
SIZES = (1, 2, 7)
HANG_S = 300     # the three steps take ~60 s on 2 cores


@pytest.fixture(scope="module")
def uneven_run(tiny_qwen3_moe, tmp_path_factory, launch_env):
    out = tmp_path_factory.mktemp("uneven")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
           "--master-port", "29563", str(Path(__file__).parent / "uneven_step.py"),
           str(tiny_qwen3_moe), str(out), str(ROWS), *map(str, SIZES)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=launch_env(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"), start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"3 ranks with uneven row blocks did not finish in {HANG_S} s (a collective hang)")
    assert proc.returncode == 0, log[-4000:]
    return out


def _rank_micro_batch_order(rows: int, world: int, size: int) -> list[int]:
    """Rows in an order whose single-process micro-batches are the ranks' micro-batches
    (exact when at most one rank has a partial one, as here)."""
    whole, tails = [], []
    for a, b in row_blocks(rows, world):
        cut = a + (b - a) // size * size
        whole += range(a, cut)
        tails += range(cut, b)
    return whole + tails


def test_the_blocks_are_uneven_at_every_size():
    """Guards the premise: rank 0 has one micro-batch more than ranks 1 and 2 at every size."""
    for size in SIZES:
        counts = [-(-(b - a) // size) for a, b in row_blocks(ROWS, 3)]
        assert counts[0] == counts[1] + 1 == counts[2] + 1, (size, counts)


@pytest.mark.parametrize("size", SIZES)
def test_uneven_row_blocks_take_the_single_process_step(uneven_run, tiny_qwen3_moe, size):
    sharded = torch.load(uneven_run / f"mb{size}.pt")
    metrics, grads, lora = single_step(tiny_qwen3_moe, ROWS, size, _rank_micro_batch_order(ROWS, 3, size), "r3")
    assert sharded["metrics"]["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
    assert sharded["metrics"]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-5)
    assert sharded["metrics"]["response_tokens"] == metrics["response_tokens"]
    # The expert load and the agreement with the replayed routes: each rank counts its rows,
    # the counts are all-reduced (`rl.routing`).
    routing = {k: v for k, v in metrics.items() if k.startswith(("experts/", "router/"))}
    assert "experts/rollout/load_cv" in routing and "router/flip_rate" in routing
    assert {k: sharded["metrics"][k] for k in routing} == routing
    for name, g in grads.items():   # measured: <= 2.6e-7 of the largest entry
        assert (sharded["grads"][name] - g).abs().max() <= DELTA * g.abs().max(), name
    assert_same_adamw_step(grads, lora, sharded["lora"])
