"""The benchmark scripts run end to end (CPU, tiny model) and print their tables.

No timing is asserted: only that they run, print what they promise, and that what they
measure is what they claim (forced answer lengths, ids equal to the original's decoding).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_model_speed_quick(tmp_path):
    out_json = tmp_path / "speed.json"
    out = run_script("model_speed.py", "--quick", "--threads", "1", "--json", str(out_json))
    assert "| model | path | latency ms (median) | p95 | speedup vs original |" in out
    for path in ("original", "kv-cache", "original 1-fwd", "fast", "kv-cache 2nd+", "fast 2nd+"):
        assert f"| tiny | {path} |" in out
    assert "## Ratios and targets" in out
    assert "| stage | ms (median) |" in out and "sam image encoder" in out
    assert "generated ids identical to the original's: True" in out
    result = json.loads(out_json.read_text())["sizes"][0]
    assert result["name"] == "tiny" and result["same_ids_as_original"]
    paths = result["paths"]
    for name in ("original", "kv-cache", "kv-cache 2nd+"):
        assert paths[name]["new_tokens"] and set(paths[name]["new_tokens"]) == {32}
        assert set(paths[name]["masks"]) == {1}  # one planted [SEG] per answer
    assert set(paths["fast"]["masks"]) == {1}
    # The original's one teacher-forced forward: a new frame every repeat, the fast path's mask.
    assert set(paths["original 1-fwd"]["masks"]) == {1}
    assert len(paths["original 1-fwd"]["latencies"]) == 2
    assert paths["original 1-fwd"]["work"]["llm calls"] == 1
    assert paths["original 1-fwd"]["work"]["sam encoder passes"] == 1
    assert 0 <= result["max_mask_diff_1fwd"] < 1e-3
    assert "fast vs original 1-fwd: largest mask-logit difference" in out
    assert "fast vs original 1-fwd, new frame (>= 1.5x)" in out
    assert "fast 2nd+ vs original 1-fwd, set frame" in out
    keys = (
        "kv_vs_original",
        "fast_vs_original",
        "fast_vs_original_1fwd",
        "fast_2nd_vs_original_1fwd",
        "second_vs_first_fast",
        "memory_factor",
    )
    for key in keys:
        assert result["ratios"][key] > 0 and result["cpu_ratios"][key] > 0


def test_model_speed_rejects_unknown_size():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "model_speed.py"), "--sizes", "huge"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown sizes ['huge']" in proc.stderr


def test_gpu_benchmark_dry_run_on_cpu():
    out = run_script(
        "gpu_benchmark.py", "--device", "cpu", "--sizes", "tiny", "--quick", "--threads", "1"
    )
    assert "| card | model | precision | path | latency ms (median) |" in out
    for path in ("set_image", "fast, new frame", "fast, same frame", "32-token answer"):
        assert f"| tiny | float32 | {path} |" in out
    assert "tiny 4bit: skipped" in out
    # The published shapes fit an 80 GB card in bf16 (meta-device build, no memory used).
    assert "| 7b | 7.70 B |" in out and "| 13b | 13.99 B |" in out
    fits = [line for line in out.splitlines() if line.startswith(("| 7b |", "| 13b |"))]
    assert len(fits) == 2 and all(line.rstrip().endswith("| yes |") for line in fits)


def test_dtype_agreement_quick(tmp_path):
    out_json = tmp_path / "dtype.json"
    out = run_script("dtype_agreement.py", "--quick", "--threads", "1", "--json", str(out_json))
    for model in ("demo", "fixture"):
        assert f"### {model}: IoU with the float32 mask" in out
        assert f"### {model}: seconds per example (set_image + predict)" in out
    assert "| example | IoU bf16 encoders | IoU bfloat16 |" in out
    assert "| img0/q0_short |" in out and "| scene_0#0 |" in out
    results = {r["model"]: r for r in json.loads(out_json.read_text())}
    assert set(results) == {"demo", "fixture"}
    assert len(results["demo"]["examples"]) == 6  # one command per bundled scene
    assert len(results["fixture"]["examples"]) == 3
    for r in results.values():
        assert set(r["iou"]) == {"float32", "bf16 encoders", "bfloat16"}
        assert all(v == 1.0 for v in r["iou"]["float32"])  # the reference against itself
        for precision in ("bf16 encoders", "bfloat16"):
            ious = r["iou"][precision]
            assert len(ious) == len(r["examples"]) and all(0.0 <= v <= 1.0 for v in ious)
        for seconds in r["seconds"].values():
            assert len(seconds) == len(r["examples"]) and all(s > 0 for s in seconds)


def test_dtype_agreement_rejects_unknown_model():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "dtype_agreement.py"), "--models", "huge"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown models ['huge']" in proc.stderr


def test_sam_encoder_quick(tmp_path):
    out_json = tmp_path / "sam.json"
    out = run_script("sam_encoder.py", "--quick", "--threads", "1", "--json", str(out_json))
    assert "| shape | dtype | upstream ms (median) |" in out and "| small | float32 |" in out
    assert "- native bf16 on cpu:" in out
    payload = json.loads(out_json.read_text())
    assert payload["img_size"] == 512 and payload["query_chunk"] == 256
    (row,) = payload["rows"]
    assert row["shape"] == "small" and row["dtype"] == "float32"
    assert len(row["times_ms"]["upstream"]) == len(row["times_ms"]["fused"]) == 1
    assert row["max_abs_diff"] <= 1e-4  # same weights, same output
    assert row["peak_bytes"]["upstream"] > 0 and row["peak_bytes"]["fused"] > 0
    assert row["speedup"] > 0 and row["memory_ratio"] > 0


def test_sam_encoder_rejects_unknown_shape():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sam_encoder.py"), "--shapes", "vit-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown shapes ['vit-z']" in proc.stderr


@pytest.mark.ros
def test_node_latency_new_frames_and_continuous_mode():
    out = run_script("node_latency.py", "--runs", "3", "--seconds", "2", "--size", "48x64")
    assert "command latency (48x64 rgb8, mode segment, 3 runs): median" in out
    assert "continuous mode:" in out and "masks/s steady" in out
    assert "0 pre-encoded" in out  # every timed command paid its frame's encoding


@pytest.mark.ros
def test_node_latency_live_smoke(tmp_path):
    out_json = tmp_path / "live.json"
    out = run_script(
        "node_latency.py", "--live", "--commands", "3", "--gap", "0.2,0.5", "--camera-hz", "10",
        "--size", "48x64", "--json", str(out_json),
    )  # fmt: skip
    assert "| setting | commands | latency ms (median) | p95 | min | pre-encoded | errors |" in out
    for label in ("live, preencode on", "live, preencode off", "set frame (already encoded)"):
        assert f"| {label} | 3 |" in out
    assert "| live with preencode / set frame |" in out and "| live preencode off / on |" in out
    report = json.loads(out_json.read_text())
    phases = report["phases"]
    for phase in phases.values():  # every command answered: served (timed) or a typed error
        assert len(phase["latencies_ms"]) + len(phase["errors"]) == 3
    # Set frame: the camera stopped and the last frame encoded, so every command finds it so.
    floor = phases["set frame (already encoded)"]
    assert floor["errors"] == [] and floor["preencoded"] == 3
    assert report["ratios"]["live_on_vs_set_frame"] > 0
    assert report["ratios"]["live_off_vs_live_on"] > 0


@pytest.mark.ros
def test_node_stress_quick(tmp_path):
    out_json = tmp_path / "stress.json"
    out = run_script("node_stress.py", "--quick", "--json", str(out_json))
    assert "respawn emulated" in out and "crashes (process died): 0" in out
    report = json.loads(out_json.read_text())
    malformed = report["malformed"]
    assert malformed["crashes"] == 0 and report["crashes"] == 0
    assert all(n > 0 for n in malformed["frames"].values()) and len(malformed["frames"]) == 6
    assert len(malformed["commands"]) == 6
    # Every malformed command that reached the node got a typed answer; empty ones are rejected.
    assert malformed["answered"] == malformed["expected_answers"] > 0
    assert malformed["answers"].get("rejected", 0) > 0
    assert report["flood"]["alive"] and report["flood"]["rss_max_mib"] > 0
    cycle = report["respawn"]["cycles"][0]
    assert report["respawn"]["emulated"]
    assert cycle["respawned_s"] >= report["respawn"]["delay_s"]
    assert cycle["first_result_s"] >= cycle["active_s"] >= cycle["respawned_s"]
    pairing = report["pairing"]
    assert pairing["mismatches"] == [] and pairing["results"] == pairing["sent"] == 6
