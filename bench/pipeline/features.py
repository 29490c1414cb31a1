"""The frozen-backbone feature cache: per-block exit features of the dataset's train and test arrays, computed
once per trained backbone, kept on disk as raw ``.npy`` arrays and handed to methods memory-mapped, so neither
building nor reading them holds a whole array in RAM (ImageNet's ViT-B features are 47 GB).

Layout, under ``<cache>/features/<dataset>-<key>/`` (``key``: ``feature_key``, which names the backbone, hence
the split and seed, and the arithmetic):

- ``train-k00.npy`` .. ``train-k{K-1}.npy``: block k's features [N_train, D] float32 of the dataset's whole train
  array, and ``train.json``, their header; ``test-k*.npy`` and ``test.json`` likewise for the test array. Written
  batch by batch (``write_feature_range``) into ``open_memmap`` temporary files, then flushed, hashed and renamed.
- ``split-train.npy``, ``split-val.npy``, ``split-cal.npy``, ``split-test.npy``: each one split's features
  [K, n, D] float32 (rows in the order of ``Splits``' indices), gathered chunk by chunk from the array shards,
  and ``splits.json``, their header (which also records the splits' sha256). These are what methods read.

Why the derived per-split files: ``SplitData.features`` is one torch tensor [K, n, D] that methods index as
``features[k]``, ``features[:k]``, ``features[:, idx]``. Stacking K per-block memmaps, or indexing the train array
by a split's rows, would copy the split into anonymous memory; a [K, n, D] file opened with ``np.load(mmap_mode=
"c")`` is a zero-copy tensor (``torch.from_numpy``) whose pages come from the page cache as they are touched.
The price is disk: the train array's features are stored twice (as shards and as splits). The shards stay the
canonical entry (computed in index ranges, see below); the split files are re-derived from them, without a
forward pass, whenever they are missing or damaged.

A header lists the key, the dtype, the array's shape [K, N, D] (the split files': the splits' sha256) and, per
file, its shape, sha256, size and mtime_ns. A file's sha256 is computed once when it is written and again only
when its size or mtime_ns differ from the header's (a match then refreshes the header). A missing file, a
truncated or modified one, a wrong shape, a pickled (object) array or a header of another key is reported and
rebuilt, never used. One process builds an entry while others wait (``exclusive``). Nothing here unpickles:
``np.load(allow_pickle=False)``.

Ranges: ``write_feature_range(st, x, start, stop, outs, ...)`` computes rows [start, stop) of one array in
batches that start at multiples of the batch size, so a range computed alone gives bit-identically the rows the
whole array's pass gives. Sequentially one range is the whole array. With ``--executor dask`` the missing arrays
are extracted on the cluster (``extract``, ``bench.pipeline.feature_ranges``): while the driver holds the
entry's lock, workers compute index ranges (a multiple of the batch size, ``$BENCH_FEATURE_RANGE_ROWS``,
default 4096 rows) into ``ranges/<array>-<start>-<stop>.npy`` [K, n, D] files (temporary file, then rename;
a ``.json`` beside each records its sha256), the driver copies them chunk by chunk into the array shards
(``write_array``, the same files and header as the sequential build), then deletes them. A range file left
intact by an earlier attempt is reused; a killed worker leaves only a temporary file, ignored and removed, and
its range is computed again elsewhere. ``compute_features`` keeps the in-memory [K, N, D] result for callers
without a cache (the device check, the perf tests).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from bench.backbones.base import Stages, TrainedBackbone, arithmetic, block_features, to_tensor, use_fast_cuda
from bench.base.hashing import atomic_files, atomic_write_text, config_hash, file_sha256
from bench.base.locks import exclusive
from bench.pipeline.splits import Splits
from datasets import iter_batches, take

log = logging.getLogger(__name__)
FORMAT = 1
DTYPE = np.dtype("<f4")
ARRAYS = ("train", "test")  # the dataset's arrays
SOURCE = {"train": "train", "val": "train", "cal": "train", "test": "test"}  # split -> the array it indexes
GATHER_BYTES = 64 << 20  # rows copied at a time when deriving the split files


# ---------------------------------------------------------------------------------------------- computing


def feature_batches(st: Stages, x_uint8, img_size: int, batch_size: int, device: str = "cpu", start: int = 0,
                    stop: int | None = None, desc: str = "features") -> Iterator[tuple[int, torch.Tensor]]:
    """(row, features [K, b, D] float32 on the CPU) for the batches ``x[i:i + batch_size]``, i = start, start +
    batch_size, .. below ``stop``. ``x``: a uint8 array, or streamed images (``datasets.lazy``). On CUDA in fp32
    with TF32 matmuls, as the real early-exit runner computes them (not bf16: the simulation from these features
    and the real runner must agree)."""
    use_fast_cuda(device)
    stop = len(x_uint8) if stop is None else stop
    # an array's rows are sliced; streamed images (datasets.lazy) are decoded in DataLoader workers, in order
    part = x_uint8[start:stop] if isinstance(x_uint8, np.ndarray) else take(x_uint8, np.arange(start, stop))
    batches = iter_batches(part, batch_size)
    for i in tqdm(range(start, stop, batch_size), desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        xb = to_tensor(next(batches), img_size, device)
        with torch.no_grad():  # not around the yield: grad mode is the caller's between batches
            feats = block_features(st, xb).float().cpu()
        yield i, feats


def compute_features(st: Stages, x_uint8, img_size: int, batch_size: int = 512, device: str = "cpu",
                     desc: str = "features") -> torch.Tensor:
    """Exit features [K, N, D] (float32, CPU, in memory) for uint8 images [N, H, W, C]: for callers without a
    cache. The same batches and arithmetic as the cached features."""
    return torch.cat([f for _, f in feature_batches(st, x_uint8, img_size, batch_size, device, desc=desc)], dim=1)


def write_feature_range(st: Stages, x_uint8, start: int, stop: int, outs: Sequence[np.ndarray], img_size: int,
                        batch_size: int, device: str = "cpu", offset: int = 0, desc: str = "features") -> None:
    """Rows [start, stop) of ``x``'s exit features, written batch by batch into ``outs`` (K writable arrays
    [rows, D], e.g. ``open_memmap`` files) at rows ``i - offset``. ``start`` must be a multiple of ``batch_size``
    and ``stop`` one too or the array's end, so the batches are the whole pass's and the values bit-identical."""
    if start % batch_size or (stop % batch_size and stop != len(x_uint8)) or not 0 <= start <= stop <= len(x_uint8):
        raise ValueError(f"range [{start}, {stop}) of {len(x_uint8)} rows is not aligned to batches of {batch_size}")
    for i, feats in feature_batches(st, x_uint8, img_size, batch_size, device, start, stop, desc):
        if feats.shape[0] != len(outs) or feats.shape[2] != outs[0].shape[1]:
            raise ValueError(f"features {tuple(feats.shape)} do not fit {len(outs)} outputs of {outs[0].shape}")
        for k, out in enumerate(outs):
            out[i - offset:i - offset + feats.shape[1]] = feats[k].numpy()


# ---------------------------------------------------------------------------------------------- files


def feature_key(backbone: TrainedBackbone, device: str = "cpu") -> str:
    """The features are a function of the trained weights, the data and the arithmetic they were computed in
    (device type and precision: TF32 GPU features are not a CPU run's)."""
    return config_hash({"backbone": backbone.key, **arithmetic(device, training=False)})


def feature_dir(cache_dir: str | os.PathLike, dataset: str, key: str) -> Path:
    return Path(cache_dir) / "features" / f"{dataset}-{key}"


def array_files(name: str, num_exits: int) -> list[str]:
    return [f"{name}-k{k:02d}.npy" for k in range(num_exits)]


def split_files() -> list[str]:
    return [f"split-{name}.npy" for name in SOURCE]


def header_path(directory: Path, group: str) -> Path:
    """``train.json`` / ``test.json`` (the array shards) or ``splits.json`` (the split files)."""
    return Path(directory) / f"{group}.json"


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_group(directory: Path, group: str, key: str, files: dict[str, tuple[int, ...]],
                fill: Callable[[list[np.ndarray]], None], extra: dict | None = None) -> None:
    """Write one group of files: ``fill`` gets one writable ``open_memmap`` array per entry of ``files`` (name ->
    shape, float32) in temporary files next to the destinations; then each is flushed, hashed and renamed, and
    the header (``group``.json) is written last, so a group without a header, or with an old one, is never
    taken for complete."""
    directory = Path(directory)
    names = list(files)
    with atomic_files([directory / n for n in names]) as tmps:
        outs = [open_memmap(tmp, mode="w+", dtype=DTYPE, shape=tuple(files[n])) for tmp, n in zip(tmps, names)]
        fill(outs)
        for out in outs:
            out.flush()
        del outs
        digests = [file_sha256(tmp) for tmp in tmps]
    entries = [{"name": n, "shape": list(files[n]), "sha256": h, **_stat(directory / n)}
               for n, h in zip(names, digests)]
    header = {"format": FORMAT, "key": key, "group": group, "dtype": DTYPE.str, **(extra or {}), "files": entries}
    atomic_write_text(header_path(directory, group), json.dumps(header, indent=1))


def open_group(directory: Path, group: str, key: str, files: dict[str, tuple[int, ...]], extra: dict | None = None
               ) -> list[np.ndarray] | None:
    """The group's arrays, memory-mapped copy-on-write, if its header exists, was written for ``key`` (and
    ``extra``), lists exactly ``files`` with these shapes, and every file is intact; None otherwise (with a
    warning unless the header is simply absent: not built yet).

    Mode "c" (copy-on-write): torch.from_numpy needs a writable array (it warns on a read-only one), and a
    method that writes into its features changes private pages, never the cache file. Pages are read from the
    file as they are touched and shared with the page cache until written."""
    directory = Path(directory)
    hpath = header_path(directory, group)
    if not hpath.exists():
        return None
    try:
        header = json.loads(hpath.read_text())
        if header.get("key") != key:
            raise ValueError(f"built for key {header.get('key')}, need {key}")
        if header.get("format") != FORMAT or header.get("group") != group or header.get("dtype") != DTYPE.str:
            raise ValueError(f"format {header.get('format')} / group {header.get('group')} / dtype "
                             f"{header.get('dtype')}, need {FORMAT} / {group} / {DTYPE.str}")
        for field, want in (extra or {}).items():
            if header.get(field) != want:
                raise ValueError(f"{field} is {header.get(field)}, need {want}")
        listed = {e["name"]: tuple(e["shape"]) for e in header["files"]}
        want_files = {n: tuple(s) for n, s in files.items()}
        if listed != want_files or [e["name"] for e in header["files"]] != list(files):
            raise ValueError(f"lists {listed}, need {want_files}")
        arrays, refreshed = [], False
        for entry in header["files"]:
            path = directory / entry["name"]
            if not path.exists():
                raise ValueError(f"{entry['name']} is missing")
            now = _stat(path)
            if now != {"size": entry["size"], "mtime_ns": entry["mtime_ns"]}:  # touched: hash it again
                if file_sha256(path) != entry["sha256"]:
                    raise ValueError(f"{entry['name']}: sha256 mismatch (truncated or modified file)")
                entry.update(now)
                refreshed = True
            try:
                arr = np.load(path, mmap_mode="c", allow_pickle=False)
            except ValueError as e:  # not an .npy, an object (pickled) array, shorter than its header says
                raise ValueError(f"{entry['name']}: {e}") from None
            if arr.dtype != DTYPE or arr.shape != tuple(entry["shape"]) or not arr.flags.c_contiguous:
                raise ValueError(f"{entry['name']} holds {arr.dtype} {arr.shape}, need {DTYPE} {entry['shape']}")
            arrays.append(arr)
        if refreshed:  # same bytes, new mtime (copied, touched): record it so the next load does not rehash
            atomic_write_text(hpath, json.dumps(header, indent=1))
        return arrays
    except Exception as e:  # corrupt, truncated, missing, foreign or unsafe: never used, rebuilt
        log.warning("feature cache %s is unusable (%s: %s); rebuilding", hpath, type(e).__name__, e)
        return None


# ---------------------------------------------------------------------------------------------- the entry


def _split_spec(splits: Splits, shapes: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, int, int]]:
    return {f"split-{name}.npy": (shapes[src][0], len(splits[name]), shapes[src][2]) for name, src in SOURCE.items()}


def _open_splits(directory: Path, key: str, splits: Splits, shapes: dict) -> dict[str, torch.Tensor] | None:
    arrays = open_group(directory, "splits", key, _split_spec(splits, shapes), {"splits_sha256": splits.sha256})
    return None if arrays is None else {name: torch.from_numpy(a) for name, a in zip(SOURCE, arrays)}


def derive_split_files(directory: Path, key: str, arrays: dict[str, list[np.ndarray]], splits: Splits,
                       shapes: dict[str, tuple[int, int, int]]) -> None:
    """Gather each split's rows from its array's block shards into ``split-<name>.npy`` [K, n, D], a bounded
    number of rows at a time (no split is ever whole in anonymous memory)."""
    spec = _split_spec(splits, shapes)

    def fill(outs: list[np.ndarray]) -> None:
        for name, out in zip(SOURCE, outs):
            idx = np.asarray(splits[name], dtype=np.int64)
            shards = arrays[SOURCE[name]]
            rows = max(1, GATHER_BYTES // (DTYPE.itemsize * max(1, out.shape[2])))
            for k, shard in enumerate(shards):
                for j in range(0, len(idx), rows):
                    out[k, j:j + rows] = shard[idx[j:j + rows]]

    write_group(directory, "splits", key, spec, fill, {"splits_sha256": splits.sha256})


def load_or_build(directory: Path, key: str, splits: Splits, shapes: dict[str, tuple[int, int, int]],
                  build_arrays: Callable[[list[str]], None], what: str) -> dict[str, torch.Tensor]:
    """{"train", "val", "cal", "test"}: memory-mapped [K, n, D] tensors of each split, from the entry in
    ``directory``. Missing or unusable parts are rebuilt under the entry's lock: the split files from the array
    shards, the shards of the arrays missing (``shapes[name]`` = (K, N, D)) by ``build_arrays(names)`` (which
    must write each with ``write_array``)."""
    directory = Path(directory)
    feats = _open_splits(directory, key, splits, shapes)
    if feats is not None:
        return feats
    lock = directory.parent.parent / "locks" / f"features-{directory.name}.lock"
    with exclusive(lock, what):
        feats = _open_splits(directory, key, splits, shapes)  # built by the process we waited for
        if feats is not None:
            return feats

        def open_array(name: str) -> list[np.ndarray] | None:
            spec = {f: shapes[name][1:] for f in array_files(name, shapes[name][0])}
            return open_group(directory, name, key, spec, {"shape": list(shapes[name])})

        arrays = {name: open_array(name) for name in ARRAYS}
        missing = [name for name in ARRAYS if arrays[name] is None]
        if missing:
            build_arrays(missing)
        for name in missing:
            arrays[name] = open_array(name)
            if arrays[name] is None:
                raise RuntimeError(f"the {name} features just written to {directory} do not read back")
        derive_split_files(directory, key, arrays, splits, shapes)
        del arrays
        feats = _open_splits(directory, key, splits, shapes)
    if feats is None:
        raise RuntimeError(f"the split features just written to {directory} do not read back")
    return feats


def write_array(directory: Path, key: str, name: str, shape: tuple[int, int, int],
                fill: Callable[[list[np.ndarray]], None]) -> None:
    """Write array ``name``'s K block shards [N, D] (``shape`` = (K, N, D)) and their header; ``fill`` gets the K
    writable arrays (``write_feature_range`` fills them from the backbone)."""
    k, n, d = shape
    write_group(directory, name, key, {f: (n, d) for f in array_files(name, k)}, fill, {"shape": [k, n, d]})


Extract = Callable[[TrainedBackbone, object, Path, str, dict[str, tuple[int, int, int]], str], None]


def load_or_compute_features(cache_dir: str | os.PathLike, backbone: TrainedBackbone, dataset, splits: Splits,
                             device: str = "cpu", extract: Extract | None = None) -> dict[str, torch.Tensor]:
    """{"train", "val", "cal", "test"}: each split's exit features [K, n, D], memory-mapped from the cache and
    computed (then cached) when missing or unusable. Rows follow ``splits``' indices into the dataset's train
    (train/val/cal) or test array. ``extract(backbone, dataset, directory, key, shapes, device)``, when given,
    builds the missing arrays (``shapes``: name -> (K, N, D)) elsewhere and writes them with ``write_array``
    (``bench.pipeline.feature_ranges``: on a Dask cluster); None: here, one pass per array."""
    key = feature_key(backbone, device)
    directory = feature_dir(cache_dir, dataset.name, key)
    heads = backbone.plugin.heads(backbone.model)
    k, d = backbone.stages().num_exits, int(heads.weight.shape[1])
    data = {"train": dataset.train_x, "test": dataset.test_x}
    shapes = {name: (k, len(x), d) for name, x in data.items()}

    def build_arrays(names: list[str]) -> None:
        if extract is not None:
            extract(backbone, dataset, directory, key, {name: shapes[name] for name in names}, device)
            return
        cfg = backbone.config
        backbone.model.eval()
        st = backbone.stages()
        for name in names:
            x = data[name]
            write_array(directory, key, name, shapes[name], lambda outs: write_feature_range(
                st, x, 0, len(x), outs, cfg.img_size, cfg.eval_batch_size, device, desc=f"features ({name})"))

    return load_or_build(directory, key, splits, shapes, build_arrays, f"the features of {backbone.label}")
