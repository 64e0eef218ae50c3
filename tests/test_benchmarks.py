"""Every benchmark runs on a clean checkout, with tiny arguments, and ends with its JSON line
(shellcheck of benchmarks/*.sh: tests/test_launch.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SCRIPT_ENV as ENV, make_folders, write_classes
from unetseg.synth import synth



def run_json(*args: str, env: dict | None = None) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=env or ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench") / "syn"
    synth(folder, train=8, val=2, size="32x32", workers=1, progress=False)
    return folder


def test_train_step():
    out, _ = run_json("benchmarks/train_step.py", "--batch-size", "2", "--size", "32", "--steps", "2", "--warmup", "1",
                      "--width", "4", "--depth", "2")
    assert positive(out["images_per_s"]) and positive(out["plain_images_per_s"])


def test_metrics():
    out, text = run_json("benchmarks/metrics.py", "--batch", "2", "--height", "16", "--width", "24", "--repeats", "2",
                         "--warmup", "1", "--cpu-only")
    assert positive(out["pixels_per_s"]) and positive(out["torchmetrics_pixels_per_s"])


def test_loader(tmp_path):
    make_folders(tmp_path / "src", {"train": 6, "val": 2}, size=(40, 48))
    classes = write_classes(tmp_path / "classes.json")
    subprocess.run([sys.executable, "-m", "unetseg", "pack", "--images", str(tmp_path / "src" / "images"), "--masks",
                    str(tmp_path / "src" / "masks"), "--classes", str(classes), "--out", str(tmp_path / "shards"),
                    "--workers", "1"], check=True, capture_output=True, cwd=REPO, env=ENV)
    out, _ = run_json("benchmarks/loader.py", "--data", str(tmp_path / "shards"), "--workers", "0", "--batch-size", "2",
                      "--crop-size", "32", "--batches", "2", "--warmup", "1")
    assert positive(out["samples_per_s"]) and positive(out["baseline_samples_per_s"])
    assert positive(out["device_feed_samples_per_s"]) and positive(out["decode_only_samples_per_s"])


@pytest.mark.multiprocess
def test_ddp_scaling():
    out, _ = run_json("benchmarks/ddp_scaling.py", "--batch-size", "2", "--size", "32x32", "--width", "4",
                      "--steps", "2", "--warmup", "1")
    assert positive(out["one_process_images_per_s"]) and positive(out["two_process_images_per_s"])
    assert out["efficiency"] == pytest.approx(out["two_process_images_per_s"] / (2 * out["one_process_images_per_s"]),
                                              abs=0.01)


GPU_ARGS = ["--device", "cpu", "--size", "32,48", "--batch-sizes", "1,2", "--steps", "1", "--warmup", "1",
            "--width", "4", "--depth", "2", "--workers", "0", "--loader-batches", "2", "--loader-batch-size", "2"]


def test_gpu_benchmark_runs_on_cpu(syn):
    out, text = run_json("benchmarks/gpu.py", "--data", str(syn), *GPU_ARGS, "--augment-on", "auto,device",
                         "--e2e-steps", "2", "--e2e-args",
                         "--model-width 4 --model-depth 2 --batch-size 2 --crop-size 32 --mixed-precision no")
    # A JSON line after each part, the whole run's last: a run cut short keeps what it finished.
    parts = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert [p["part"] for p in parts] == ["model", "loader", "all"] and parts[-1] == out
    assert "loader_images_per_s" not in parts[0] and parts[1]["loader_images_per_s"] == out["loader_images_per_s"]
    assert positive(out["flops_per_image"]) and out["compiled_model_images_per_s"] is None  # compile: auto, off on CPU
    # Each worker count, augmenting in the workers and on the device; auto is workers on a CPU.
    assert set(out["e2e_by_setting"]) == set(out["loader_by_setting"]) == {"workers_w0", "device_w0"}
    assert all(positive(v) for v in [*out["e2e_by_setting"].values(), *out["loader_by_setting"].values()])
    assert out["e2e_augment_on"] == out["loader_augment_on"] == "workers"
    assert out["e2e_images_per_s"] == out["e2e_by_setting"]["workers_w0"]
    assert out["e2e_over_model"] == pytest.approx(out["e2e_images_per_s"] / out["best_images_per_s"], rel=0.01)
    assert out["mfu"] is None  # no peak FLOP/s known for a CPU
    keys = {f"{p}{cl}_b{b}" for p in ("fp32", "bf16") for cl in ("", "_cl") for b in (1, 2)}
    assert set(out["images_per_s"]) == keys and all(positive(v) for v in out["images_per_s"].values())
    assert out["baseline_images_per_s"] == out["images_per_s"]["fp32_b2"]
    assert out["best_images_per_s"] == max(out["images_per_s"].values())
    assert positive(out["loader_images_per_s"])
    assert out["model_images_per_s"] == out["best_images_per_s"]  # no compiled rate on a CPU
    assert out["bound"] == ("loader" if out["loader_images_per_s"] < out["model_images_per_s"] else "model")
    assert "OOM" not in text


def test_gpu_script_runs_end_to_end_on_cpu(tmp_path, syn):
    env = {**ENV, "OUT": str(tmp_path / "out"), "DATA": str(syn), "PYTHON": sys.executable, "STEPS": "4", "E2E_STEPS": "0",
           "GPU_ARGS": " ".join(GPU_ARGS),
           "TRAIN_ARGS": "--crop-size 32 --model-width 4 --model-depth 2 --batch-size 2 --num-workers 0 "
                         "--mixed-precision no --log-every 1", "RUN": str(tmp_path / "run")}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                            timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"machine.txt", "throughput.txt", "train.log", "train-metrics.jsonl"}
    json.loads((out / "throughput.txt").read_text().strip().splitlines()[-1])
    evals = [json.loads(line) for line in (out / "train-metrics.jsonl").read_text().splitlines() if '"mIoU"' in line]
    assert [e["step"] for e in evals] == [2, 4]
    assert "val mIoU" in result.stdout and "training: median" in result.stdout


def test_gpu_script_names_the_fix_when_data_is_missing(tmp_path):
    env = {**ENV, "OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "none"), "CAMVID": str(tmp_path / "nocamvid"),
           "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2
    assert str(tmp_path / "none") in result.stderr and "Fix:" in result.stderr


def test_ab_train_compares_two_checkouts(tmp_path, syn):
    """This checkout against itself: both sides train, and the ratio is of their medians."""
    env = {**ENV, "BASE": str(REPO), "ROUNDS": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "ab")}
    result = subprocess.run(["bash", "benchmarks/ab_train.sh", "--data", str(syn), "--max-steps", "4", "--log-every", "1",
                             "--batch-size", "2", "--num-workers", "0", "--model-width", "4", "--model-depth", "2",
                             "--crop-size", "32"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert positive(out["base_images_per_s"]) and positive(out["this_images_per_s"])
    assert out["this_over_base"] == pytest.approx(out["this_images_per_s"] / out["base_images_per_s"], rel=0.01)
    assert "base run 1: median" in result.stdout and "this run 1: median" in result.stdout


def test_seeds(tmp_path, syn):
    out, text = run_json("benchmarks/seeds.py", "--seeds", "0,1", "--out", str(tmp_path / "seeds"), "--",
                         "--data", str(syn), "--max-steps", "2", "--eval-every", "2", "--batch-size", "2",
                         "--model-width", "4", "--model-depth", "2", "--crop-size", "32", "--num-workers", "0",
                         "--tracker", "none")
    finals = [out["per_seed"][s]["final"] for s in ("0", "1")]
    assert finals[0] != finals[1]  # two seeds, two runs
    assert out["final_miou_mean"] == pytest.approx(sum(finals) / 2)
    assert out["final_miou_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)
    assert set(out["per_class_mean"]) and "mean" in text
    again, _ = run_json("benchmarks/seeds.py", "--seeds", "0,1", "--out", str(tmp_path / "seeds"), "--")
    assert again["per_seed"] == out["per_seed"]  # finished runs are read, not trained again


def test_ablate(tmp_path, syn):
    tiny = ["--data", str(syn), "--max-steps", "2", "--eval-every", "2", "--batch-size", "2", "--model-width", "4",
            "--model-depth", "2", "--crop-size", "32", "--num-workers", "0", "--tracker", "none"]
    out, text = run_json("benchmarks/ablate.py", "--out", str(tmp_path / "ablate"),
                         "--variant", "seed_1=--seed 1", "--variant", "residual=--model-block residual", "--", *tiny)
    runs = out["runs"]
    assert list(runs) == ["baseline", "seed_1", "residual"] and runs["residual"]["args"] == ["--model-block", "residual"]
    config = (tmp_path / "ablate" / "residual" / "config.yaml").read_text()
    assert "block: residual" in config and "seed: 0" in config  # the variant's change, on the baseline's seed
    assert "seed: 1" in (tmp_path / "ablate" / "seed_1" / "config.yaml").read_text()
    mious = {name: r["results"][0]["miou"] for name, r in runs.items()}
    for name, miou in mious.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name}"))
        assert f"| {100 * miou:.2f} |" in row
        if name != "baseline":
            assert f"{100 * (miou - mious['baseline']):+.2f}" in row
    again, _ = run_json("benchmarks/ablate.py", "--out", str(tmp_path / "ablate"), "--variant", "seed_1=--seed 1", "--")
    assert again["runs"]["seed_1"]["results"] == runs["seed_1"]["results"]  # finished runs are read, not trained again


def gpu_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_end_to_end_runs_keep_the_callers_pythonpath():
    """A GPU machine may keep our dependencies in a side folder on PYTHONPATH: the training
    runs gpu.py starts put this checkout first and keep that folder after it."""
    import os

    env = gpu_module().child_env({"PYTHONPATH": f"/side/wheels{os.pathsep}/more", "OTHER": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/side/wheels", "/more"] and env["OTHER"] == "1"
    assert gpu_module().child_env({})["PYTHONPATH"] == str(REPO)


def test_gpu_model_is_timed_on_the_recipe_crops():
    gpu = gpu_module()
    assert gpu.model_size(None, str(REPO / "configs" / "camvid_gpu.yaml")) == (352, 480)
    assert gpu.model_size("64x96", str(REPO / "configs" / "camvid_gpu.yaml")) == (64, 96)
    assert gpu.model_size(None, "no/such.yaml") == (360, 480)


def test_check_imports_names_what_is_missing_and_the_fix():
    found = subprocess.run([sys.executable, "benchmarks/check_imports.py"], capture_output=True, text=True,
                           cwd=REPO, env=ENV)
    assert found.returncode == 0 and "all 15 found" in found.stdout
    lacking = subprocess.run([sys.executable, "benchmarks/check_imports.py", "torch", "no_such_module_here"],
                             capture_output=True, text=True, cwd=REPO, env=ENV)
    assert lacking.returncode == 1 and "cannot import no_such_module_here." in lacking.stderr
    assert "gpu_wheels.sh" in lacking.stderr and "torch" not in lacking.stderr.split("Fix:")[0].split("import")[1]

