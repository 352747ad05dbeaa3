"""The demo end to end: a tiny CI-sized run, and the real acceptance runs (slow, minutes each)."""

import json

import pytest
from conftest import TINY

from diffpolicy.demo import run_demo


def test_tiny_demo_writes_a_complete_report(tmp_path):
    result = run_demo(tmp_path, overrides=TINY, progress=False)
    report = (tmp_path / "report.md").read_text()
    assert "| metric | diffusion | mse_bc |" in report and "## Checks" in report
    for kind in ("diffusion", "mse_bc"):
        assert (tmp_path / kind / "eval" / "rollouts.png").exists()
        assert f"({kind}/eval/rollouts.png)" in report
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["passed"] == result["passed"] and len(saved["checks"]) == 4
    # a second run reuses the demonstrations and the finished training runs' folders
    again = run_demo(tmp_path, overrides=TINY, progress=False)
    assert again["timings"]["collect_s"] < result["timings"]["collect_s"] + 5


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["trajectory2d_lowdim_unet", "trajectory2d_lowdim_transformer"])
def test_demo_acceptance(tmp_path, preset):
    """Issue acceptance: both modes >= 25%, small distance, MSE-BC on no path (~10+ min each)."""
    result = run_demo(tmp_path, preset=preset, progress=False)
    assert result["passed"], result["checks"]
