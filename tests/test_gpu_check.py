"""benchmarks/gpu_check.sh: every part runs on a CPU with tiny arguments and records real
results; the torch log parser, the step planner and the throughput answer on their own
(shellcheck of the script: tests/test_launch.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from conftest import REPO, SCRIPT_ENV as ENV

sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_check import main, parse_compile_log, plan_steps, throughput, training_summary  # noqa: E402
from test_benchmarks import positive, syn  # noqa: E402,F401  (syn: test_benchmarks' tiny synthetic shards)

TINY_GPU = "--device cpu --size 32,48 --batch-sizes 2 --steps 1 --warmup 1 --width 4 --depth 2 --workers 0 " \
           "--loader-batches 2 --loader-batch-size 2"
# Compiling on a CPU takes about 30 s even for this model, so the run here is eager (no
# recompiles to count); the parser is tested on a real compiled log below.
TINY_TRAIN = "--crop-size 32 --model-width 8 --model-depth 2 --batch-size 2 --num-workers 0 --mixed-precision no " \
             "--compile off --log-every 1"


def test_every_part_runs_on_a_cpu_and_records_its_results(tmp_path, syn):
    env = {**ENV, "OUT": str(tmp_path / "out"), "DATA": str(syn), "PYTHON": sys.executable, "STEPS_SMOKE": "4",
           "RECIPE_STEPS": "6", "EVAL_EVERY": "3", "BUDGET_S": "240", "GPU_ARGS": TINY_GPU, "TRAIN_ARGS": TINY_TRAIN}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    assert {"machine.txt", "check.jsonl", "smoke.log", "smoke-metrics.jsonl", "throughput.txt", "recipe.log",
            "recipe-metrics.jsonl"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "check.jsonl").read_text().splitlines()]
    assert [r["part"] for r in rows] == ["augment", "smoke", "throughput", "recipe"]
    augment, smoke, speed, recipe = rows

    # The same batches augmented in the workers and on the device (the CPU here): equal.
    assert augment["device"] == "cpu" and augment["batches"] == 4 and augment["crop_size"] == [32, 32]
    assert augment["keys_equal"] and augment["masks_equal"] and augment["max_abs_image_diff"] <= 1e-5
    assert augment["jitter"] == 0.2 and augment["tolerance_levels"] == pytest.approx(1.2 ** 2 * 1.4, abs=0.01)
    assert augment["ok"]

    # The smoke: all its steps, two validations, finite losses, and the torch log read.
    assert smoke["ok"] and smoke["exit"] == 0 and smoke["steps_done"] == 4 and smoke["losses_finite"]
    assert [e["step"] for e in smoke["evals"]] == [2, 4] and smoke["losses_logged"] == 4
    assert smoke["recompiles"] == 0 and smoke["graph_breaks"] == 0  # eager: nothing compiled
    assert positive(smoke["images_per_s"]) and 0 <= smoke["overhead_s"] <= smoke["wall_s"]
    assert "parameters" in smoke["banner"] and "on cpu" in smoke["banner"]

    # Throughput: gpu.py ran no end-to-end training (E2E_STEPS 0), so the smoke's rate is it.
    assert speed["gpu_py_parts"] == ["model", "loader", "all"] and speed["exit"] == 0
    assert speed["e2e_source"] == "smoke" and speed["e2e_images_per_s"] == smoke["images_per_s"]
    assert not speed["model_compiled"] and positive(speed["model_images_per_s"])
    assert speed["e2e_over_model"] == pytest.approx(speed["e2e_images_per_s"] / speed["model_images_per_s"], rel=0.01)
    assert speed["mfu"] is None and speed["loader_augment_on"] == "device" and speed["loader_workers"] == 0

    # The recipe for what fits (here capped at RECIPE_STEPS), val mIoU at each evaluation.
    assert recipe["steps_planned"] == 6 and recipe["finished"] and recipe["steps_done"] == 6
    assert [e["step"] for e in recipe["evals"]] == [3, 6] and recipe["losses_finite"]
    assert all(0 <= e["mIoU"] <= 1 for e in recipe["evals"]) and recipe["final_mIoU"] == recipe["evals"][-1]["mIoU"]
    assert recipe["rate_used"] == smoke["images_per_s"] and not recipe["like_for_like"]
    assert "val mIoU" in result.stdout and "total" in result.stdout


def test_the_recipe_is_skipped_when_the_budget_is_spent(tmp_path, capsys):
    smoke = {"part": "smoke", "images_per_s": 800.0, "overhead_s": 60.0}
    (tmp_path / "check.jsonl").write_text(json.dumps(smoke) + "\n")
    assert main(["recipe", "--out", str(tmp_path), "--deadline", str(time.time() + 50), "--",
                 "--config", str(REPO / "configs" / "camvid_gpu.yaml")]) == 0
    row = json.loads((tmp_path / "check.jsonl").read_text().splitlines()[-1])
    assert row["part"] == "recipe" and row["steps_planned"] == 0 and "start-up (60 s)" in row["skipped"]
    assert "recipe: skipped" in capsys.readouterr().out


def test_a_recipe_cut_at_its_limit_keeps_the_evaluations_it_finished(tmp_path, syn):
    """A rate far above the real one plans too many steps: the run is stopped at the part's
    limit (SIGTERM, so it checkpoints) and its line still holds what it evaluated."""
    (tmp_path / "check.jsonl").write_text(json.dumps({"part": "smoke", "images_per_s": 1e6, "overhead_s": 0}) + "\n")
    # The limit is 20 s: the deadline less the time kept for writing results and the grace period.
    main(["recipe", "--out", str(tmp_path), "--deadline", str(time.time() + 50), "--max-steps", "5000",
          "--eval-every", "1", "--eval-seconds", "0", "--", "--config", str(REPO / "configs" / "camvid_gpu.yaml"),
          "--data", str(syn), *TINY_TRAIN.split()])
    row = json.loads((tmp_path / "check.jsonl").read_text().splitlines()[-1])
    assert row["steps_planned"] == 5000 and row["timed_out"] and not row["finished"]
    assert row["evals"] and all(0 <= e["mIoU"] <= 1 for e in row["evals"])
    assert row["wall_s"] < 45 and 0 < row["steps_done"] < 5000
    assert (tmp_path / "recipe-metrics.jsonl").is_file() and "stopped by" in (tmp_path / "recipe.log").read_text()


def test_plan_fits_whole_evaluation_intervals_into_what_is_left():
    # 1000 steps of 16 at 800 images/s are 20 s, plus 5 s of evaluation: 25 s an interval.
    assert plan_steps(800, 16, overhead=60, left=300, max_steps=8000, eval_every=1000, eval_seconds=5) == 8000
    assert plan_steps(800, 16, overhead=60, left=200, max_steps=8000, eval_every=1000, eval_seconds=5) == 5000
    assert plan_steps(800, 16, overhead=60, left=900, max_steps=8000, eval_every=1000, eval_seconds=5) == 8000
    assert plan_steps(800, 16, overhead=60, left=80, max_steps=8000, eval_every=1000, eval_seconds=5) == 0
    assert plan_steps(800, 16, overhead=90, left=60, max_steps=8000, eval_every=1000, eval_seconds=5) == 0


# Real TORCH_LOGS=recompiles,graph_breaks output (torch 2.14 on this CPU VM), trimmed: the
# first block from a compiled `unetseg.train` run (its first validation recompiles on the grad
# mode), the rest from a function compiled and called with a new shape, under no_grad, and
# with a print inside; the "step N: val mIoU" lines are the training log's.
TORCH_LOG = """\
UNet depth=2 width=4 norm=batch upsample=transpose num_classes=10: 7.59K parameters; 1 process(es) on cpu, mixed precision no, compiled, augmentation in loader workers; 6 steps of 2 x 1 x 1 images (4 per epoch); run dir /tmp/gc/run1
W1204 21:09:59.786000 7412 .venv/lib/python3.11/site-packages/torch/utils/cpp_extension.py:183] [0/0] No CUDA runtime is found, using CUDA_HOME='/usr/local'
V1204 21:10:13.960000 7412 .venv/lib/python3.11/site-packages/torch/_dynamo/guards.py:5621] [0/1] [__recompiles] Recompiling function forward in /work/main/unetseg/models/unet.py:193
V1204 21:10:13.960000 7412 .venv/lib/python3.11/site-packages/torch/_dynamo/guards.py:5621] [0/1] [__recompiles]     triggered by the following guard failure(s):
V1204 21:10:13.960000 7412 .venv/lib/python3.11/site-packages/torch/_dynamo/guards.py:5621] [0/1] [__recompiles]     - 0/0: GLOBAL_STATE changed: grad_mode 
step 3: val mIoU 2.22 (best 2.22 at step 3)
V1204 21:10:36.770000 7626 torch/_dynamo/guards.py:5621] [0/1] [__recompiles] Recompiling function f in /tmp/gc/logs.py:2
V1204 21:10:36.770000 7626 torch/_dynamo/guards.py:5621] [0/1] [__recompiles]     triggered by the following guard failure(s):
V1204 21:10:36.770000 7626 torch/_dynamo/guards.py:5621] [0/1] [__recompiles]     - 0/0: tensor 'x' size mismatch at index 0. expected 2, actual 4
V1204 21:10:37.800000 7626 torch/_dynamo/guards.py:5621] [0/2] [__recompiles] Recompiling function f in /tmp/gc/logs.py:2
V1204 21:10:37.800000 7626 torch/_dynamo/guards.py:5621] [0/2] [__recompiles]     triggered by the following guard failure(s):
V1204 21:10:37.800000 7626 torch/_dynamo/guards.py:5621] [0/2] [__recompiles]     - 0/1: GLOBAL_STATE changed: grad_mode 
V1204 21:10:37.800000 7626 torch/_dynamo/guards.py:5621] [0/2] [__recompiles]     - 0/0: GLOBAL_STATE changed: grad_mode 
V1204 21:10:38.018000 7626 torch/_dynamo/symbolic_convert.py:5368] [1/0] [__graph_breaks] Graph break in user code at /tmp/gc/logs.py:8
V1204 21:10:38.018000 7626 torch/_dynamo/symbolic_convert.py:5368] [1/0] [__graph_breaks] Graph Break Reason: Encountered graph break when attempting to trace CALL: a function call, e.g. f(x, y):
V1204 21:10:38.018000 7626 torch/_dynamo/symbolic_convert.py:5368] [1/0] [__graph_breaks] 
V1204 21:10:38.018000 7626 torch/_dynamo/symbolic_convert.py:5368] [1/0] [__graph_breaks] Failed to trace builtin operator
V1204 21:10:38.018000 7626 torch/_dynamo/symbolic_convert.py:5368] [1/0] [__graph_breaks]   Explanation: Dynamo does not know how to trace builtin operator `print` with argument types ['str'] (has_kwargs False)
V1204 21:10:38.018000 7626 torch/_dynamo/symbolic_convert.py:5368] [1/0] [__graph_breaks] User code traceback:
V1204 21:10:38.018000 7626 torch/_dynamo/symbolic_convert.py:5368] [1/0] [__graph_breaks]   File "/tmp/gc/logs.py", line 8, in g
V1204 21:10:38.018000 7626 torch/_dynamo/symbolic_convert.py:5368] [1/0] [__graph_breaks]     print("side effect")
side effect
step 6: val mIoU 3.61 (best 3.61 at step 6)
"""


def test_the_torch_log_parser_counts_recompiles_and_graph_breaks():
    parsed = parse_compile_log(TORCH_LOG)
    assert parsed["recompiles"] == 3
    # The grad-mode recompile of the first validation came before its line; the rest after.
    assert parsed["recompiles_after_first_validation"] == 2
    assert parsed["recompile_reasons"] == ["GLOBAL_STATE changed: grad_mode",
                                           "tensor 'x' size mismatch at index 0. expected 2, actual 4",
                                           "GLOBAL_STATE changed: grad_mode"]  # the first guard that failed
    assert parsed["graph_breaks"] == 1 and parsed["graph_break_sites"] == ["/tmp/gc/logs.py:8"]
    assert not parsed["recompile_limit_hit"]
    assert parse_compile_log("step 1: val mIoU 1.00\n")["recompiles"] == 0


def test_a_skipped_nonfinite_loss_counts_though_the_logged_mean_is_finite():
    rows = [{"step": 10, "loss": 1.2, "images_per_s": 5.0}, {"step": 20, "loss": 1.1, "images_per_s": 9.0},
            {"step": 20, "mIoU": 0.4}, {"step": 30, "loss": 1.0, "images_per_s": 11.0}]
    clean = training_summary("", rows)
    assert clean["losses_finite"] and clean["images_per_s"] == 10.0 and clean["steps_done"] == 30  # first log left out
    assert clean["evals"] == [{"step": 20, "mIoU": 0.4}]
    warned = training_summary("warning: non-finite loss in 2 of the 10 steps up to step 20, each skipped (2 in a row "
                              "now; the run stops at 5)\n", rows)
    assert not warned["losses_finite"] and warned["nonfinite_steps_skipped"] == 2
    assert not training_summary("", [{"step": 1, "loss": math.nan}])["losses_finite"]


def test_end_to_end_against_the_compiled_model_and_mfu_in_proportion():
    gpu = {"compiled_model_images_per_s": 1000.0, "model_images_per_s": 1000.0, "model_mfu": 0.3,
           "e2e_images_per_s": None, "bound": "model"}
    answer = throughput(gpu, {"images_per_s": 920.0})
    assert answer["e2e_source"] == "smoke" and answer["e2e_over_model"] == 0.92 and answer["meets_target"]
    assert answer["mfu"] == pytest.approx(0.276) and answer["model_compiled"]
    own = throughput({**gpu, "e2e_images_per_s": 500.0}, {"images_per_s": 920.0})
    assert own["e2e_source"] == "gpu.py" and own["e2e_over_model"] == 0.5 and not own["meets_target"]


def test_missing_data_names_the_fix(tmp_path):
    env = {**ENV, "OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "none"), "CAMVID": str(tmp_path / "nocamvid"),
           "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2
    assert str(tmp_path / "none") in result.stderr and "Fix:" in result.stderr
