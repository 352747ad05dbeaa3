"""The README's and the user guide's code blocks, run as written (at tiny sizes), so the docs stay true.

Every `diffpolicy ...` line of a ```bash block is parsed by the real command line and its overrides by the
real config; the ones a CI machine can run are then run in document order in an empty folder, with
overrides appended that shrink them (episodes, steps, network widths) but leave the documented arguments
as they are. The ```python blocks run after the commands that made their checkpoints. A documented
command, option, override key, import or `diffpolicy.x.Name` reference that stops working fails here.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import diffpolicy
from diffpolicy.cli import build_parser, main
from diffpolicy.config import RunConfig, load_config, with_overrides

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = str(Path(diffpolicy.__file__).resolve().parents[1])  # the code under test, for subprocesses
DOCS = [ROOT / "README.md", ROOT / "docs" / "guide.md"]
# Guide pages whose commands need a robot's recording or hours of CPU: parsed and checked, not run.
PARSED_ONLY = [ROOT / "docs" / "koch_so101.md"]

# Commands documented for a person at a machine, not for CI; they are parsed and checked, not run.
NOT_RUN = {"record": "needs a screen and a person at the mouse"}
DOC_PORT = "50051"  # the docs' server port; the test serves on a free one instead
PLACEHOLDER = "path/to/"  # the user's own dataset: parsed and checked only

TINY_TRAIN = [
    "train.num_steps=2",
    "train.batch_size=4",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.val_every=0",
    "train.checkpoint_every=0",
    "policy.unet.down_dims=[8,16]",
    "policy.unet.n_groups=4",
    "policy.unet.diffusion_step_embed_dim=8",
    "policy.transformer.n_layer=1",
    "policy.transformer.n_emb=16",
    "policy.transformer.n_head=2",
    "policy.scheduler.num_inference_steps=2",
]
TINY_EVAL = ["eval.n_episodes=1", "eval.n_envs=1", "eval.max_steps=3", "eval.n_videos=0"]
TINY_DISTILL = [
    "distill.num_steps=2",
    "distill.warmup_steps=0",
    "train.batch_size=4",
    "train.log_every=1",
    "train.val_every=0",
    "train.checkpoint_every=0",
]


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of each fenced block, in document order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def documented_commands(docs: list[Path] = DOCS) -> list[list[str]]:
    """Each `diffpolicy ...` command of the bash blocks as argv (without `diffpolicy`), in order, once."""
    commands: list[list[str]] = []
    for doc in docs:
        for lang, text in code_blocks(doc):
            if lang != "bash":
                continue
            for line in text.replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                if argv[:1] == ["diffpolicy"] and argv[1:] not in commands:
                    commands.append(argv[1:])
    return commands


def python_blocks() -> list[str]:
    return [text for doc in DOCS for lang, text in code_blocks(doc) if lang == "python"]


def check_parses(argv: list[str]) -> None:
    """The real parser accepts the command (as main() does: overrides anywhere) and the config its
    overrides describe is valid."""
    args, extra = build_parser().parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    assert not stray, f"diffpolicy {' '.join(argv)}: unrecognized {stray}"
    overrides = list(getattr(args, "overrides", [])) + extra
    if getattr(args, "preset", None) or args.command in ("collect", "train"):
        load_config(args.preset, overrides)
    elif overrides:
        with_overrides(RunConfig(), overrides)


def shrunk(argv: list[str]) -> list[str]:
    """The command at CI size: fewer episodes, steps and workers, narrower networks."""
    argv = list(argv)
    for flag, value in (("--episodes", "2" if argv[0] == "collect" else "1"), ("--workers", "1")):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
    extra = {"train": TINY_TRAIN + TINY_EVAL, "distill": TINY_DISTILL + TINY_EVAL, "eval": TINY_EVAL[1:]}
    return argv + extra.get(argv[0], [])


def test_every_documented_command_parses():
    commands = documented_commands()
    assert {c[0] for c in commands} >= {"collect", "train", "eval", "distill", "dataset", "presets"}
    for argv in commands:
        check_parses(argv)
        check_parses(shrunk(argv))


def test_the_arm_guide_commands_parse():
    commands = documented_commands(PARSED_ONLY)
    assert {c[0] for c in commands} >= {"collect", "train", "eval", "dataset"}
    for argv in commands:
        check_parses(argv)


def test_documented_references_resolve():
    """`diffpolicy.module.Name` in the docs' prose and `from diffpolicy... import ...` in their code."""
    refs = set()
    for doc in DOCS:
        text = doc.read_text()
        refs |= set(re.findall(r"`(diffpolicy(?:\.\w+)+)", text))
        for module, names in re.findall(r"^from (diffpolicy[\w.]*) import ([\w, ]+)$", text, flags=re.M):
            refs |= {f"{module}.{n.strip()}" for n in names.split(",")}
    assert "diffpolicy.data.episodes.EpisodeStore" in refs
    for ref in sorted(refs):
        parts = ref.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ModuleNotFoundError:
                continue
        for name in parts[i:]:
            assert hasattr(obj, name), f"{ref}: {'.'.join(parts[:i])} has no {name!r}"
            obj = getattr(obj, name)


def fake_recordings(n: int = 2, steps: int = 20) -> list[SimpleNamespace]:
    rng = np.random.default_rng(0)
    return [
        SimpleNamespace(
            keypoints=rng.uniform(0, 512, (steps, 9, 2)),
            agent_xy=rng.uniform(0, 512, (steps, 2)),
            target_xy=rng.uniform(0, 512, (steps, 2)),
        )
        for _ in range(n)
    ]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def start_server(argv: list[str], cwd: Path) -> subprocess.Popen:
    """`diffpolicy serve ...` in the background, once it says it is serving."""
    cmd = [sys.executable, "-m", "diffpolicy.cli", *argv, "--max-seconds", "300"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    line = server.stdout.readline()  # "serving ... on HOST:PORT", or the error that stopped it
    assert line.startswith("serving"), f"diffpolicy {' '.join(argv)}: {line}{server.stdout.read()}"
    return server


def snippet_inputs(code: str) -> dict[str, object]:
    """The names a python block leaves to the reader: recordings, and Push-T state observations per
    environment (controller.act) or as windows (client.predict, policy.predict_action)."""
    kp, xy = np.full((1, 9, 2), 256.0, np.float32), np.full((1, 2), 200.0, np.float32)
    observation = {"keypoint": kp, "agent_pos": xy}  # one row per environment
    obs = {k: np.repeat(v[:, None], 2, axis=1) for k, v in observation.items()}  # (B, n_obs_steps, ...)
    if "client.predict({" in code:
        kp, xy = obs["keypoint"], obs["agent_pos"]
    return {"my_recordings": fake_recordings(), "kp": kp, "xy": xy, "observation": observation, "obs": obs}


def test_the_documented_commands_and_snippets_run(tmp_path, monkeypatch, capsys):
    """README then guide, in order: collect, train, eval, convert, serve + eval --remote, export, distil,
    flow, then the python blocks (~1 minute on 2 CPU cores)."""
    pytest.importorskip("gym_pusht")
    monkeypatch.chdir(tmp_path)
    port, ran, server = free_port(), [], None
    try:
        for argv in documented_commands():
            if argv[0] in NOT_RUN or PLACEHOLDER in " ".join(argv):
                continue
            argv = [a.replace(DOC_PORT, port) for a in shrunk(argv)]
            if argv[0] == "serve":
                server = start_server(argv, tmp_path)
                ran.append("serve")
                continue
            rc = main(argv)
            err = capsys.readouterr().err
            assert rc == 0, f"diffpolicy {' '.join(argv)} -> exit {rc}: {err}"
            ran.append(argv[0] + (" --remote" if "--remote" in argv else ""))
        assert ran.count("train") >= 4 and ran.count("distill") == 2 and "export" in ran
        assert "serve" in ran and "eval --remote" in ran
        for code in python_blocks():
            namespace = snippet_inputs(code)
            exec(compile(code.replace(DOC_PORT, port), "<docs python block>", "exec"), namespace)
            if "action" in namespace:
                assert namespace["action"].shape == (1, 2) and np.isfinite(namespace["action"]).all()
    finally:
        if server is not None:
            server.terminate()  # SIGTERM: the server stops cleanly
            server.wait(timeout=60)
    assert (tmp_path / "data" / "my_pusht.zarr").exists()


def test_the_contributing_lint_command_passes():
    """contributing.md: `ruff check src tests bench` holds on a clean checkout."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    assert "ruff check src tests bench" in (ROOT / "docs" / "contributing.md").read_text()
    result = subprocess.run(
        [ruff, "check", "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-2000:]
