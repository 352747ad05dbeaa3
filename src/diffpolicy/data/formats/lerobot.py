"""LeRobot datasets in a local folder: read codebase v3.0 and v2.1, write v3.0. pyarrow + PyAV, no lerobot.

v3.0 layout (many episodes per file; what :func:`write_lerobot` writes)::

    meta/info.json                 codebase_version, fps, features, data_path, video_path, chunks_size, ...
    meta/stats.json                per feature: min, max, mean, std, count, q01, q10, q50, q90, q99
    meta/tasks.parquet             task_index, indexed by the task string
    meta/episodes/chunk-000/file-000.parquet
                                   per episode: episode_index, tasks, length, data/chunk_index,
                                   data/file_index, dataset_from_index, dataset_to_index,
                                   videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp},
                                   meta/episodes/{chunk_index,file_index}, stats/<feature>/<stat>,
                                   and diffpolicy/<field> (a collected store's per-episode records:
                                   seed, group, task_kwargs; see EPISODE_RECORD)
    data/chunk-XXX/file-YYY.parquet  one row per frame: features + timestamp, frame_index,
                                   episode_index, index, task_index
    videos/<key>/chunk-XXX/file-YYY.mp4   a camera's frames of the episodes of one data file, back to back

v2.1 has one parquet and one mp4 per episode (``meta/episodes.jsonl``, per-episode timestamps from 0).

Reading: opening a folder checks that every data file and mp4 the metadata lists exists and that each
data file stores the features in the shapes ``meta/info.json`` declares (from the parquet footers), so
``dataset info`` reports what an import would. Every data file and every mp4 is then read once, front to
back; an episode's frames are the decoded frames whose timestamps fall in its
``[from_timestamp, to_timestamp)`` (to the nearest frame). Image features stored in parquet
(``dtype: image``) are decoded with Pillow. Checked against a folder written by lerobot 0.6.1 itself
(tests/data/lerobot_v30_tiny, AV1): every frame equals what LeRobot's own loader returns.

Tasks: the tasks table is kept in the store's ``source.tasks`` (in task index order; list position = the
store's task index); when it has more than one task, a per-frame ``task_index`` key holds each frame's
(not a policy input). The writer restores the tasks table, every frame's ``task_index`` and every
episode's ``tasks`` from them.

Key names (store key <-> LeRobot feature): ``observation.images.<cam>`` <-> ``<cam>``, ``observation.image``
<-> ``image``, ``observation.<name>`` <-> ``<name>`` (``state``, ``environment_state``, ...), ``action`` <->
``action``, ``next.reward`` <-> ``reward`` (LeRobot's name for the reward received after the frame's action,
which is what our tasks' ``reward`` key records: it is no observation); other features (``next.done``,
...) are kept as ``next_done`` etc. and are not policy inputs either. Remaining dots become ``_``. An
import records the original names in the store's ``source.names`` and the writer uses them, so
LeRobot -> EpisodeStore -> LeRobot keeps every name (and EpisodeStore -> LeRobot -> EpisodeStore our keys).

Writing: every store key becomes a feature; uint8 (T, H, W, 3) keys are videos, the rest parquet columns
that keep their dtype (bit-exact round trip): shape-[1] features as scalar columns (as LeRobot writes
them), vectors as fixed-size lists, 2-D keys (Push-T's keypoint [9, 2]) as nested fixed-size lists with
their 2-D shape in info.json. Data and video files roll over at ~100 MB of raw frames per data file
(LeRobot's default file size), 1000 files per chunk folder. Cameras are encoded with libx264,
yuv420p (yuv444p when a side is odd), CRF 18, a keyframe every 2 frames (as LeRobot's encoder, for fast
seeking). Measured on the smooth 16x16 test images: mean absolute error below 2 uint8 levels per pixel
(the round-trip test asserts <= 3).

Stats (``meta/stats.json`` and each episode's ``stats/<feature>/<stat>``) follow LeRobot's own rules, so
its loader, aggregation and normalizers accept them: numeric features are reduced over every axis but the
last (Push-T's (9, 2) keypoints get (2,) stats; ``count`` is the number of frames); cameras get per-channel
(3, 1, 1) stats of pixels scaled to [0, 1], from all frames. ``scripts/check_lerobot_export.py`` checks an
export with lerobot's own code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.data.formats.base import (
    ForeignDataset,
    FormatError,
    atomic_folder,
    check_finite,
    image_histogram,
    image_stats,
    low_dim_stats,
    require,
)

__all__ = ["feature_to_key", "key_to_feature", "read_lerobot", "write_lerobot"]

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk folder (LeRobot's default)
DATA_FILE_MB = 100  # a new data file (and new video files) once a file holds this many MB of raw frames
VIDEO_FILE_MB = 500
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
# Prefix of the meta/episodes columns that keep an EpisodeStore's per-episode records (attrs["episodes"],
# written by `collect`: seed, group, task_kwargs): whole numbers as int64 columns, anything else as JSON
# strings. LeRobot's loader ignores columns it does not know.
EPISODE_RECORD = "diffpolicy/"


def _decode_record(row: dict[str, Any]) -> dict[str, Any]:
    """The diffpolicy/* columns of a meta/episodes row as the record they were written from."""
    out = {}
    if row.get("tasks") and len(row["tasks"]) == 1 and any(c.startswith(EPISODE_RECORD) for c in row):
        out["task"] = str(row["tasks"][0])  # as collect's records name it
    for column, value in row.items():
        if not column.startswith(EPISODE_RECORD):
            continue
        if isinstance(value, str):
            with contextlib.suppress(json.JSONDecodeError):  # a plain string column stays a string
                value = json.loads(value)
        out[column[len(EPISODE_RECORD) :]] = value
    return out


def _record_columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-episode records (without their task strings, which go to the tasks table) as diffpolicy/*
    columns: a key whose every value is a whole number stays int64, any other is JSON-encoded."""
    keys = list(dict.fromkeys(k for r in records for k in r if k != "task"))
    columns = {}
    for key in keys:
        values = [r.get(key) for r in records]
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        columns[EPISODE_RECORD + key] = values if whole else [json.dumps(v) for v in values]
    return columns


# ----------------------------------------------------------------------------------------- key names
# LeRobot's own names for per-step quantities that are not observations (lerobot's constants REWARD ...)
# <-> our store keys
REWARD_FEATURE = "next.reward"


def feature_to_key(name: str) -> str:
    """LeRobot feature name -> store key (see the module docstring)."""
    if name == REWARD_FEATURE:
        return "reward"
    for prefix in ("observation.images.", "observation."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.replace(".", "_")


def key_to_feature(key: str, is_image: bool) -> str:
    """Store key -> LeRobot feature name (the inverse of :func:`feature_to_key` for our keys)."""
    if key == "action":
        return "action"
    if key == "reward" and not is_image:
        return REWARD_FEATURE
    if is_image:
        return "observation.image" if key == "image" else f"observation.images.{key}"
    return f"observation.{key}"


# ----------------------------------------------------------------------------------------- reading
@dataclass
class _Episode:
    index: int
    length: int
    data_file: Path
    videos: dict[str, tuple[Path, float, float]] = field(default_factory=dict)  # key -> (file, from, to)
    record: dict[str, Any] = field(default_factory=dict)  # the diffpolicy/* columns (see EPISODE_RECORD)


def _read_parquet(path: Path, columns: list[str] | None = None) -> Any:
    pq = require("pyarrow.parquet")
    if not path.is_file():
        raise FormatError(path, "missing file (listed by the dataset's metadata)")
    try:
        return pq.read_table(path, columns=columns)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
        if columns and "No match for FieldRef" in str(e):
            raise FormatError(path, f"missing columns (missing features): {e}") from None
        raise FormatError(path, f"corrupt or unreadable parquet file: {e}") from None


def _load_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FormatError(path, "missing file") from None
    except json.JSONDecodeError as e:
        raise FormatError(path, f"not valid JSON: {e}") from None


def _format_path(root: Path, template: str, **kw: Any) -> Path:
    try:
        return root / template.format(**kw)
    except (KeyError, IndexError, ValueError) as e:
        raise FormatError(
            root / "meta" / "info.json", f"cannot fill path template {template!r}: {e}"
        ) from None


def _episodes_v3(root: Path, info: dict, video_keys: list[str]) -> list[_Episode]:
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise FormatError(root / "meta" / "episodes", "no episode metadata files (chunk-*/file-*.parquet)")
    needed = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    for key in video_keys:
        needed += [
            f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
        ]
    rows: list[dict[str, Any]] = []
    for f in files:
        table = _read_parquet(f)
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise FormatError(f, f"missing columns {missing} (missing features)")
        extra = [c for c in table.column_names if c.startswith(EPISODE_RECORD)]
        extra += ["tasks"] if extra and "tasks" in table.column_names else []
        rows.extend(table.select(needed + extra).to_pylist())
    rows.sort(key=lambda r: r["episode_index"])
    out = []
    for r in rows:
        ep = _Episode(
            index=int(r["episode_index"]),
            length=int(r["length"]),
            data_file=_format_path(
                root, info["data_path"], chunk_index=r["data/chunk_index"], file_index=r["data/file_index"]
            ),
            record=_decode_record(r),
        )
        for key in video_keys:
            video = _format_path(
                root,
                info["video_path"],
                video_key=key,
                chunk_index=r[f"videos/{key}/chunk_index"],
                file_index=r[f"videos/{key}/file_index"],
            )
            ep.videos[key] = (
                video,
                float(r[f"videos/{key}/from_timestamp"]),
                float(r[f"videos/{key}/to_timestamp"]),
            )
        out.append(ep)
    return out


def _episodes_v2(root: Path, info: dict, video_keys: list[str]) -> list[_Episode]:
    path = root / "meta" / "episodes.jsonl"
    if not path.is_file():
        raise FormatError(path, "missing file (v2.x lists its episodes there)")
    out = []
    chunks = int(info.get("chunks_size", CHUNKS_SIZE))
    fps = float(info["fps"])
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            index, length = int(r["episode_index"]), int(r["length"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(path, f"line {n + 1}: bad episode record: {e}") from None
        kw = {"episode_chunk": index // chunks, "episode_index": index}
        ep = _Episode(index, length, _format_path(root, info["data_path"], **kw))
        for key in video_keys:
            ep.videos[key] = (_format_path(root, info["video_path"], video_key=key, **kw), 0.0, length / fps)
        out.append(ep)
    out.sort(key=lambda e: e.index)
    return out


class _VideoReader:
    """Decodes one mp4 front to back, handing out the frames of consecutive time ranges."""

    def __init__(self, path: Path, fps: float) -> None:
        av = require("av")
        self.path, self.fps = path, fps
        if not path.is_file():
            raise FormatError(path, "missing video file (listed by the dataset's metadata)")
        try:
            self.container = av.open(str(path))
            stream = self.container.streams.video[0]
        except (av.error.FFmpegError, IndexError) as e:
            raise FormatError(path, f"corrupt or unreadable mp4 (no decodable video stream): {e}") from None
        codec = stream.codec_context.name
        try:
            av.codec.Codec(codec, "r")
        except Exception:
            raise FormatError(
                path, f"unsupported codec {codec!r}: this FFmpeg build cannot decode it"
            ) from None
        self.frames = self._decode(stream)
        self.pending: tuple[float, np.ndarray] | None = None
        self.position = -1.0

    def _decode(self, stream: Any) -> Iterator[tuple[float, np.ndarray]]:
        av = require("av")
        try:
            for frame in self.container.decode(stream):
                yield float(frame.time), frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise FormatError(self.path, f"corrupt mp4 (decoding failed): {e}") from None

    def take(self, start: float, stop: float) -> list[np.ndarray]:
        """Frames with timestamps in [start, stop) (to half a frame); ranges must come in time order."""
        half = 0.5 / self.fps
        out = []
        self.position = stop
        while True:
            if self.pending is None:
                self.pending = next(self.frames, None)
                if self.pending is None:
                    return out
            t, img = self.pending
            if t >= stop - half:
                return out
            self.pending = None
            if t >= start - half:
                out.append(img)

    def close(self) -> None:
        self.container.close()


def _decode_image_column(path: Path, values: list[Any]) -> np.ndarray:
    from PIL import Image

    frames = []
    for v in values:
        data = v.get("bytes") if isinstance(v, dict) else v
        if data is None:
            raise FormatError(path, "an image cell has no bytes (images stored by path are not supported)")
        frames.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return np.stack(frames)


def _rgb_spec(name: str, ft: dict) -> tuple[list[int], bool]:
    """shape_meta [C, H, W] of an image/video feature, and whether LeRobot stored it channel-first."""
    shape = [int(s) for s in ft["shape"]]
    names = [str(n) for n in (ft.get("names") or [])]
    if len(shape) != 3:
        raise ValueError(f"{name}: image shape {shape} is not 3-D")
    if names and names[0] in ("channel", "channels", "c"):
        return shape, True
    return [shape[2], shape[0], shape[1]], False


def _read_tasks(root: Path, version: str) -> dict[int, str] | None:
    """The tasks table {task_index: task}: ``meta/tasks.parquet`` (v3.0: pandas keeps the strings as its
    index) or ``meta/tasks.jsonl`` (v2.x); None when the dataset has none."""
    if version.startswith("v3"):
        path = root / "meta" / "tasks.parquet"
        if not path.is_file():
            return None
        rows = _read_parquet(path).to_pylist()
        column = next((c for c in ("task", "__index_level_0__") if rows and c in rows[0]), None)
        if rows and (column is None or "task_index" not in rows[0]):
            raise FormatError(path, f"expected columns 'task_index' and 'task', found {sorted(rows[0])}")
        return {int(r["task_index"]): str(r[column]) for r in rows}
    path = root / "meta" / "tasks.jsonl"
    if not path.is_file():
        return None
    out = {}
    for n, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                r = json.loads(line)
                out[int(r["task_index"])] = str(r["task"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise FormatError(path, f"line {n + 1}: bad task record: {e}") from None
    return out


def _declared_shape(ft: dict) -> list[int]:
    return [int(s) for s in ft.get("shape") or [1]]


def _stored_shape(field: Any) -> list[int] | None:
    """A parquet column's per-frame shape from its type alone: [1] for scalars, the sizes of nested
    fixed-size lists, the shape Hugging Face datasets records for its ArrayND columns (Push-T's keypoints);
    None when the type does not say (variable-length lists: checked when the values are read)."""
    pa = require("pyarrow")
    extension = (field.metadata or {}).get(b"ARROW:extension:metadata")
    if extension:
        try:
            return [int(s) for s in json.loads(extension)[0]]
        except (ValueError, TypeError, IndexError, KeyError):
            return None
    kind, shape = field.type, []
    while pa.types.is_fixed_size_list(kind):
        shape.append(int(kind.list_size))
        kind = kind.value_type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return None
    return shape or [1]


def _shape_problem(info_path: Path, name: str, declared: list[int], actual: Any) -> str:
    return f"feature {name!r}: {info_path} declares shape {declared} but the file holds {actual} per frame"


def _check_files(
    info_path: Path, features: dict[str, dict], columns: list[str], episodes: list[_Episode]
) -> list[str]:
    """Every data and video file the metadata lists exists (a stat each, so ``dataset info`` reports what
    an import would meet), and the first data file stores the features in the shapes ``info.json``
    declares (from its parquet footer; the others are checked as they are read). Returns that file's
    column names."""
    pq = require("pyarrow.parquet")
    files = list(dict.fromkeys(ep.data_file for ep in episodes))
    videos = dict.fromkeys(file for ep in episodes for file, _, _ in ep.videos.values())
    for path in [*files, *videos]:
        if not path.is_file():
            raise FormatError(path, "missing file (listed by the dataset's metadata)")
    if not files:
        return []
    try:
        schema = pq.read_schema(files[0])
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise FormatError(files[0], f"corrupt or unreadable parquet file: {e}") from None
    for name in columns:
        if features[name].get("dtype") == "image" or name not in schema.names:
            continue  # images are checked when decoded, missing columns when read
        declared, stored = _declared_shape(features[name]), _stored_shape(schema.field(name))
        if stored is not None and stored != declared:
            raise FormatError(files[0], _shape_problem(info_path, name, declared, stored))
    return list(schema.names)


def read_lerobot(path: str | os.PathLike) -> ForeignDataset:
    """Describe a local LeRobot dataset folder (v3.0 or v2.x) for import."""
    root = Path(path)
    info_path = root / "meta" / "info.json"
    info = _load_json(info_path)
    version = str(info.get("codebase_version", ""))
    if not (version.startswith("v3") or version.startswith("v2")):
        raise FormatError(info_path, f"unsupported codebase_version {version!r} (reads v2.x and v3.0)")
    for field_name in ("features", "fps", "data_path"):
        if field_name not in info:
            raise FormatError(info_path, f"missing field '{field_name}'")
    features: dict[str, dict] = info["features"]
    fps = float(info["fps"])
    if "action" not in features:
        raise FormatError(info_path, f"missing feature 'action' (features: {sorted(features)})")
    video_keys = [k for k, ft in features.items() if ft.get("dtype") == "video"]
    if video_keys and not info.get("video_path"):
        raise FormatError(info_path, "video features but no 'video_path'")
    av = require("av") if video_keys else None
    for key in video_keys:
        vinfo = features[key].get("info") or features[key].get("video_info") or {}
        codec = vinfo.get("video.codec")
        if codec:
            try:
                av.codec.Codec(codec, "r")
            except Exception:
                raise FormatError(
                    info_path,
                    f"feature {key!r}: unsupported codec {codec!r} (this FFmpeg build cannot decode it)",
                ) from None

    names: dict[str, str] = {}
    obs_meta: dict[str, Any] = {}
    channel_first: dict[str, bool] = {}
    columns: list[str] = []
    for name, ft in features.items():
        if name in BOOKKEEPING or ft.get("dtype") == "string":
            continue
        key = feature_to_key(name)
        if key in names:
            raise FormatError(
                info_path, f"features {names[key]!r} and {name!r} both map to store key {key!r}"
            )
        names[key] = name
        dtype = ft.get("dtype")
        if dtype not in ("video", "image"):
            columns.append(name)
        if not name.startswith("observation."):
            continue
        if dtype in ("video", "image"):
            try:
                obs_meta[key], channel_first[key] = {"type": "rgb"}, False
                obs_meta[key]["shape"], channel_first[key] = _rgb_spec(name, ft)
            except ValueError as e:
                raise FormatError(info_path, str(e)) from None
            if dtype == "image":
                columns.append(name)
        elif dtype != "bool":
            obs_meta[key] = {"shape": [int(d) for d in ft.get("shape") or [1]], "type": "low_dim"}
    if not obs_meta:
        raise FormatError(info_path, "no observation.* features (missing features)")
    action_shape = [int(s) for s in features["action"]["shape"]]
    shape_meta = {"obs": dict(sorted(obs_meta.items())), "action": {"shape": [int(np.prod(action_shape))]}}
    episodes = (
        _episodes_v3(root, info, video_keys)
        if version.startswith("v3")
        else _episodes_v2(root, info, video_keys)
    )
    stored_columns = _check_files(info_path, features, columns, episodes)
    table = _read_tasks(root, version) if "task_index" in stored_columns else None
    tasks = [table[i] for i in sorted(table)] if table else None
    per_frame_tasks = bool(tasks) and len(tasks) > 1  # one task for every frame needs no per-frame key
    task_position = np.full(max(table) + 1 if table else 0, -1, np.int64)  # source index -> list position
    for position, index in enumerate(sorted(table or {})):
        if index >= 0:
            task_position[index] = position
    stats_path = root / "meta" / "stats.json"
    stats = _load_json(stats_path) if stats_path.is_file() else None
    key_of = {v: k for k, v in names.items()}

    def read_episodes(low_dim_only: bool = False) -> Iterator[dict[str, np.ndarray]]:
        table_file, table, ep_col = None, None, None
        image_columns = [n for n in columns if features[n].get("dtype") == "image"]
        wanted = [n for n in columns if n not in image_columns] if low_dim_only else columns
        read = [*wanted, "task_index"] if per_frame_tasks else wanted
        readers: dict[str, _VideoReader] = {}
        try:
            for ep in episodes:
                if ep.data_file != table_file:
                    table_file = ep.data_file
                    table = _read_parquet(ep.data_file, ["episode_index", *read])
                    ep_col = table.column("episode_index").to_numpy()
                rows = np.flatnonzero(ep_col == ep.index)
                if rows.size != ep.length:
                    raise FormatError(
                        ep.data_file,
                        f"episode {ep.index}: {rows.size} rows but meta says length {ep.length} "
                        "(mismatched lengths)",
                    )
                part = table.take(rows)
                out: dict[str, np.ndarray] = {}
                for name in wanted:
                    col = part.column(name)
                    if features[name].get("dtype") == "image":
                        values = _decode_image_column(ep.data_file, col.to_pylist())
                    else:
                        values = _column_array(col, features[name], ep.data_file, name, info_path)
                    out[key_of[name]] = values
                if per_frame_tasks:
                    indices = part.column("task_index").to_numpy()
                    inside = (indices >= 0) & (indices < len(task_position))
                    positions = np.where(inside, task_position[np.where(inside, indices, 0)], -1)
                    if (positions < 0).any():
                        bad = int(indices[np.flatnonzero(positions < 0)[0]])
                        raise FormatError(
                            ep.data_file, f"episode {ep.index}: task_index {bad} is not in the tasks table"
                        )
                    out["task_index"] = positions
                for name in [] if low_dim_only else video_keys:
                    file, start, stop = ep.videos[name]
                    reader = readers.get(name)
                    if reader is None or reader.path != file or start < reader.position - 0.5 / fps:
                        if reader is not None:
                            reader.close()
                        reader = readers[name] = _VideoReader(file, fps)
                    frames = reader.take(start, stop)
                    c, h, w = obs_meta[key_of[name]]["shape"]
                    if frames and frames[0].shape != (h, w, c):
                        raise FormatError(
                            file,
                            _shape_problem(info_path, name, features[name]["shape"], list(frames[0].shape)),
                        )
                    if len(frames) != ep.length:
                        raise FormatError(
                            file,
                            f"episode {ep.index}: {len(frames)} video frames in [{start:.3f}, {stop:.3f}) s "
                            f"but {ep.length} rows (mismatched lengths)",
                        )
                    out[key_of[name]] = np.stack(frames)
                for key, first in channel_first.items():
                    if first and key in out and out[key].shape[-1] not in (1, 3):
                        out[key] = np.moveaxis(out[key], 1, -1)
                check_finite(ep.data_file, f"episode {ep.index} 'action'", out["action"])
                yield out
        finally:
            for reader in readers.values():
                reader.close()

    return ForeignDataset(
        path=root,
        format=f"lerobot {version}",
        episode_lengths=[ep.length for ep in episodes],
        shape_meta=shape_meta,
        episodes=read_episodes,
        fps=fps,
        source_names=names,
        attrs={
            "robot_type": info.get("robot_type"),
            "codebase_version": version,
            "tasks": tasks,
            # per-episode records (collect's seed, group, task_kwargs), when the writer kept them
            **({"episodes": [ep.record for ep in episodes]} if any(ep.record for ep in episodes) else {}),
        },
        stats=stats,
    )


def _column_array(col: Any, ft: dict, path: Path, name: str, info_path: Path) -> np.ndarray:
    """A parquet column (scalars or (nested) lists) as a (T, *shape) numpy array of the feature's dtype;
    a FormatError naming the file, the feature and both shapes when the values do not fit the shape."""
    pa = require("pyarrow")
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    shape = _declared_shape(ft)
    flat = col.storage if isinstance(col, pa.ExtensionArray) else col
    while (
        pa.types.is_list(flat.type)
        or pa.types.is_fixed_size_list(flat.type)
        or pa.types.is_large_list(flat.type)
    ):
        flat = flat.flatten()
    values = flat.to_numpy(zero_copy_only=False)
    if values.size != len(col) * int(np.prod(shape)):
        per_frame = f"{values.size / max(len(col), 1):g} values"
        raise FormatError(path, _shape_problem(info_path, name, shape, per_frame))
    arr = values.reshape(len(col), *shape)
    dtype = ft.get("dtype")
    return arr.astype(dtype, copy=False) if dtype not in (None, "string") else arr


# ----------------------------------------------------------------------------------------- writing
def _encode_video(path: Path, frames: list[np.ndarray], fps: int, crf: int) -> str:
    av = require("av")
    h, w = frames[0].shape[:2]
    pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = {"crf": str(crf), "g": "2", "preset": "medium"}
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return pix_fmt


def _fixed_list(values: np.ndarray) -> Any:
    """(T, *shape) -> a column of (nested) fixed-size lists; (T, 1) and (T,) -> a scalar column, as
    LeRobot stores shape-[1] features (datasets.Value). The reader returns those as (T, 1)."""
    pa = require("pyarrow")
    out = pa.array(np.ascontiguousarray(values).reshape(-1))
    if values.shape[1:] in ((), (1,)):
        return out
    for size in reversed(values.shape[1:]):
        out = pa.FixedSizeListArray.from_arrays(out, size)
    return out


def _tasks_table(tasks: list[str]) -> Any:
    """meta/tasks.parquet as pandas writes LeRobot's DataFrame: task_index, indexed by the task string."""
    pa = require("pyarrow")
    table = pa.table(
        {"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())}
    )
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": "task",
                "field_name": "task",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def write_lerobot(
    store: EpisodeStore | str | os.PathLike,
    dst: str | os.PathLike,
    *,
    fps: float | None = None,
    task: str = "",
    robot_type: str | None = None,
    crf: int = 18,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export an EpisodeStore to a LeRobot v3.0 folder at ``dst``; returns ``dst``.

    Every store key becomes a feature (uint8 (H, W, 3) arrays become mp4 videos, the rest parquet columns
    of their own dtype). ``fps`` defaults to the store's ``fps`` attribute. Tasks: a store imported from
    LeRobot keeps its tasks (``source.tasks``, and a per-frame ``task_index`` key when its frames have
    several); ``task`` gives every frame that one task instead; otherwise every frame gets the store's
    ``task`` attribute (or ""); a store written by ``collect`` gives each episode its own task string
    (its per-episode records' ``task``, e.g. one per group of a mix). Those records (attrs["episodes"]:
    seed, group, task_kwargs) become ``diffpolicy/*`` columns of meta/episodes, which the reader gives back.
    ``robot_type`` defaults to the source's or the store's. Written into a temporary folder and renamed
    into place; ``dst`` is replaced only with ``overwrite``; the store is only read.
    """
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    if not isinstance(store, EpisodeStore):
        store = EpisodeStore.open(store)
    target = Path(dst)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True to replace it")
    fps = fps or store.attrs.get("fps")
    if not fps:
        raise ValueError("the data records no frame rate, which LeRobot needs: pass fps= (--fps in the CLI)")
    if int(round(float(fps))) != float(fps):
        raise ValueError(f"LeRobot needs an integer fps, got {fps}")
    fps = int(round(float(fps)))
    if "action" not in store:
        raise ValueError(f"the store has no 'action' key (keys: {store.keys})")
    source = store.attrs.get("source") or {}
    if not str(source.get("format", "")).startswith("lerobot"):
        source = {}
    known = source.get("names", {})
    recorded = [str(t) for t in source.get("tasks") or []]
    task_key = "task_index" if recorded and "task_index" in store else None  # LeRobot's, not a feature
    records = store.attrs.get("episodes")
    records = records if isinstance(records, list) and len(records) == store.n_episodes else None
    episode_task: list[int] | None = None  # per episode: its task's position in `tasks`
    if task:
        tasks, task_key = [task], None
    elif recorded:
        if len(recorded) > 1 and task_key is None:
            raise ValueError(f"the store records {len(recorded)} tasks but has no per-frame 'task_index' key")
        tasks = recorded
    elif records and all(r.get("task") for r in records):  # collect's per-episode task strings
        tasks = list(dict.fromkeys(str(r["task"]) for r in records))
        episode_task = [tasks.index(str(r["task"])) for r in records]
    else:
        tasks = [str(store.attrs.get("task") or "")]
    keys = [k for k in store.keys if k != "task_index" or not recorded]
    image_keys = [
        k for k in keys if store[k].dtype == np.uint8 and store[k].ndim == 4 and store[k].shape[-1] == 3
    ]
    low_keys = [k for k in keys if k not in image_keys]
    bad = [k for k in low_keys if store[k].dtype.kind not in "biuf"]
    if bad:
        raise ValueError(f"keys {bad} are neither numeric arrays nor (T, H, W, 3) uint8 images")
    name_of = {k: known.get(k) or key_to_feature(k, k in image_keys) for k in keys}
    with atomic_folder(target, overwrite) as tmp:
        robot_type = robot_type or source.get("robot_type") or store.attrs.get("robot_type")
        _write_v3(
            store,
            tmp,
            fps,
            tasks,
            task_key,
            robot_type,
            image_keys,
            low_keys,
            name_of,
            crf,
            progress,
            pa,
            pq,
            episode_task,
            _record_columns(records) if records else {},
        )
    return target


def _write_v3(
    store: EpisodeStore,
    root: Path,
    fps: int,
    tasks: list[str],
    task_key: str | None,
    robot_type: str | None,
    image_keys: list[str],
    low_keys: list[str],
    name_of: dict[str, str],
    crf: int,
    progress: bool,
    pa: Any,
    pq: Any,
    episode_task: list[int] | None = None,
    record_columns: dict[str, list[Any]] | None = None,
) -> None:
    frame_bytes = sum(int(np.prod(store[k].shape[1:])) * store[k].dtype.itemsize for k in store.keys)
    task_indices: list[np.ndarray] = []
    per_file = max(1, int(DATA_FILE_MB * 2**20 // max(1, frame_bytes)))
    features: dict[str, Any] = {}
    episode_rows: list[dict[str, Any]] = []
    sums: dict[str, list[np.ndarray]] = {k: [] for k in low_keys}
    histograms: dict[str, np.ndarray] = {}  # camera -> (C, 256) counts over the dataset
    pix_fmts: dict[str, str] = {}
    chunk, file_index = 0, 0
    buffer: dict[str, list[np.ndarray]] = {}
    frames: dict[str, list[np.ndarray]] = {}
    in_file = 0
    ends = store.episode_ends

    def flush() -> None:
        nonlocal chunk, file_index, in_file
        if not in_file:
            return
        cols: dict[str, Any] = {}
        for k in low_keys:
            values = np.concatenate(buffer[k])
            cols[name_of[k]] = _fixed_list(values)
        for b in BOOKKEEPING:
            cols[b] = pa.array(np.concatenate(buffer[b]))
        path = root / DATA_PATH.format(chunk_index=chunk, file_index=file_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), path)
        for k in image_keys:
            video = root / VIDEO_PATH.format(video_key=name_of[k], chunk_index=chunk, file_index=file_index)
            pix_fmts[k] = _encode_video(video, [f for ep in frames[k] for f in ep], fps, crf)
        buffer.clear()
        frames.clear()
        in_file = 0
        chunk, file_index = (chunk + 1, 0) if file_index == CHUNKS_SIZE - 1 else (chunk, file_index + 1)

    bar = tqdm(
        total=store.n_steps, desc=f"export {Path(str(store.path)).name}", unit="frame", disable=not progress
    )
    with bar:
        for i in range(store.n_episodes):
            ep = store.get_episode(i)
            n = len(ep["action"])
            start = int(ends[i - 1]) if i else 0
            if in_file and in_file + n > per_file:
                flush()
            offset = in_file  # frames already in this file before this episode
            for k in low_keys:
                buffer.setdefault(k, []).append(ep[k])
                sums[k].append(ep[k])
            if task_key is not None:
                task_index = ep[task_key].reshape(n).astype(np.int64)
            else:
                task_index = np.full(n, 0 if episode_task is None else episode_task[i], np.int64)
            outside = task_index[(task_index < 0) | (task_index >= len(tasks))]
            if outside.size:
                raise ValueError(
                    f"store key {task_key!r}, episode {i}: task index {int(outside[0])} is not one of the "
                    f"{len(tasks)} tasks the store records (source.tasks)"
                )
            task_indices.append(task_index)
            book = {
                "timestamp": (np.arange(n) / fps).astype(np.float32),
                "frame_index": np.arange(n, dtype=np.int64),
                "episode_index": np.full(n, i, np.int64),
                "index": np.arange(start, start + n, dtype=np.int64),
                "task_index": task_index,
            }
            for b, v in book.items():
                buffer.setdefault(b, []).append(v)
            row: dict[str, Any] = {
                "episode_index": i,
                "tasks": [tasks[t] for t in dict.fromkeys(task_index.tolist())],  # in order of appearance
                "length": n,
                "data/chunk_index": chunk,
                "data/file_index": file_index,
                "dataset_from_index": start,
                "dataset_to_index": start + n,
            }
            for k in image_keys:
                frames.setdefault(k, []).append(list(ep[k]))
                feature = name_of[k]
                row[f"videos/{feature}/chunk_index"] = chunk
                row[f"videos/{feature}/file_index"] = file_index
                row[f"videos/{feature}/from_timestamp"] = offset / fps
                row[f"videos/{feature}/to_timestamp"] = (offset + n) / fps
                hist = image_histogram(ep[k])
                histograms[k] = histograms[k] + hist if k in histograms else hist
                for stat, value in image_stats(hist, n).items():
                    row[f"stats/{feature}/{stat}"] = value
            columns = {name_of[k]: ep[k] for k in low_keys} | book
            for feature, values in columns.items():  # LeRobot keeps every numeric feature's, bookkeeping too
                for stat, value in low_dim_stats(values).items():
                    row[f"stats/{feature}/{stat}"] = value
            row["meta/episodes/chunk_index"] = 0
            row["meta/episodes/file_index"] = 0
            for column, values in (record_columns or {}).items():
                row[column] = values[i]
            episode_rows.append(row)
            in_file += n
            bar.update(n)
        flush()

    for k in low_keys:
        arr = store[k]
        shape = [int(s) for s in arr.shape[1:]] or [1]
        features[name_of[k]] = {"dtype": str(arr.dtype), "shape": shape, "names": None}
    for k in image_keys:
        h, w, c = (int(s) for s in store[k].shape[1:])
        features[name_of[k]] = {
            "dtype": "video",
            "shape": [h, w, c],
            "names": ["height", "width", "channels"],
            "info": {
                "video.height": h,
                "video.width": w,
                "video.codec": "h264",
                "video.pix_fmt": pix_fmts.get(k, "yuv420p"),
                "video.is_depth_map": False,
                "video.fps": fps,
                "video.channels": c,
                "has_audio": False,
            },
        }
    features.update(
        {
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        }
    )
    meta = root / "meta"
    path = root / EPISODES_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), path)
    pq.write_table(_tasks_table(tasks), meta / "tasks.parquet")
    stats: dict[str, Any] = {name_of[k]: low_dim_stats(np.concatenate(v)) for k, v in sums.items()}
    for k, hist in histograms.items():
        stats[name_of[k]] = image_stats(hist, store.n_steps)
    n_steps = store.n_steps
    stats["index"] = low_dim_stats(np.arange(n_steps)[:, None])
    stats["episode_index"] = low_dim_stats(
        np.repeat(np.arange(store.n_episodes), store.episode_lengths)[:, None]
    )
    stats["frame_index"] = low_dim_stats(
        np.concatenate([np.arange(n) for n in store.episode_lengths])[:, None]
    )
    stats["timestamp"] = low_dim_stats(
        np.concatenate([np.arange(n) / fps for n in store.episode_lengths])[:, None]
    )
    stats["task_index"] = low_dim_stats(np.concatenate(task_indices))
    (meta / "stats.json").write_text(json.dumps(stats, indent=4))
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": store.n_episodes,
        "total_frames": n_steps,
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": DATA_FILE_MB,
        "video_files_size_in_mb": VIDEO_FILE_MB,
        "fps": fps,
        "splits": {"train": f"0:{store.n_episodes}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if image_keys else None,
        "features": features,
    }
    (meta / "info.json").write_text(json.dumps(info, indent=4))
