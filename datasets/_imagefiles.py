"""Image files in a folder or an archive, and the one Pillow decoding every image loader shares.

:class:`_Tree` lists the non-skipped files and folders of a folder, a zip or a tar archive and reads a file's
bytes. A tar is read in one of two ways: streamed (compressed or not) with every member's bytes held in memory, as
small archives are, or, given ``plain_tar`` (an uncompressed tar: the archive itself, or a copy decompressed into
the cache), by the byte offset and size of each member's data (``offsets``), holding nothing. The offsets recorded
by a streamed pass are those of the uncompressed stream, so they also locate the members in a decompressed copy.

:func:`_decode` turns a file's bytes into a uint8 array with one set of rules (truncated files are errors, EXIF
orientation applied, first frame, alpha dropped, grayscale modes kept as one channel); ``imagefolder`` and the
streamed images of :mod:`datasets.lazy` both use it, so they give the same pixels. Every problem the user can fix
raises :class:`bench.base.errors.UserError` naming the file.
"""
from __future__ import annotations

import contextlib
import io
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bench.base.errors import UserError

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
    ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".avif", ".heic", ".heif", ".pcx", ".sgi", ".im", ".dds"})
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})  # compared lower-case
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
RESAMPLE = Image.Resampling.BILINEAR
_ORIENTATION = 0x0112
COMPRESSIONS = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}  # magic bytes -> tarfile's name


# ------------------------------------------------------------------------------------------------- entries


def _skipped(part: str) -> bool:
    """Hidden (``.name``) and system entries, skipped wherever they are."""
    return part.startswith(".") or part.lower() in IGNORED_NAMES


def _utf8(text: str) -> bytes:
    """File names as bytes for hashing; names that are not valid UTF-8 keep their original bytes."""
    return text.encode("utf-8", "surrogateescape")


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _member_name(raw: str, archive: Path, backslashes: bool) -> Optional[str]:
    """The normalised relative path of an archive member (None for the root itself); UserError if unsafe."""
    name = raw.replace("\\", "/") if backslashes else raw
    parts = name.split("/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":" and name[0].isalpha()) or ".." in parts:
        raise UserError(
            f"{archive} holds the member {raw!r}, an absolute path or one with '..'; such members could point "
            f"outside the dataset and are refused. Rebuild the archive with relative member names (create it from "
            f"the folder's parent directory)."
        )
    parts = [p for p in parts if p not in ("", ".")]
    return "/".join(parts) or None


class _Tree:
    """The non-skipped files and folders of a folder or archive: ``files`` maps relative posix paths to what
    :meth:`read` needs (a folder: the file's path; a zip: its ``ZipInfo``; a tar: its bytes, or None when read by
    offset); ``where`` names an entry in messages (``path``, the folder or archive the user gave). For a tar,
    ``offsets`` maps each member to (offset of its data in the uncompressed tar, size; offset -1 for a sparse
    member). ``plain_tar``: an uncompressed tar with the same members (the archive itself, or a decompressed copy)
    that is read by offset instead of streaming ``path`` and holding every member's bytes."""

    def __init__(self, path: Path, plain_tar: Optional[Path] = None) -> None:
        self.path = path
        self.plain_tar = plain_tar
        self.files: dict[str, object] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        self.dirs: set[str] = set()
        self._zip: Optional[zipfile.ZipFile] = None
        self._plain: Optional[io.FileIO] = None
        if path.is_dir():
            self.kind = "folder"
            self._walk()
        elif path.name.lower().endswith(".zip"):
            self.kind = "zip"
            self._open_zip()
        else:
            self.kind = "tar"
            self._read_tar()
        for f in list(self.files) + list(self.dirs):  # folders implied by deeper entries
            parts = f.split("/")
            self.dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))

    # -- sources
    def _walk(self) -> None:
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # a symlink loop
                dirnames[:] = []
                continue
            seen.add(real)
            rel = Path(dirpath).relative_to(self.path).as_posix()
            prefix = "" if rel == "." else rel + "/"
            dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
            self.dirs.update(prefix + d for d in dirnames)
            for f in filenames:
                if not _skipped(f):
                    self.files[prefix + f] = Path(dirpath) / f

    def _open_zip(self) -> None:
        try:
            self._zip = zipfile.ZipFile(self.path)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise UserError(f"{self.path} is not a readable zip archive ({type(e).__name__}: {e}). Check the file "
                            f"or pass the extracted folder as --data-dir.") from None
        for info in infos:
            name = _member_name(info.filename, self.path, backslashes=True)
            if name is None or any(_skipped(p) for p in name.split("/")):
                continue
            if info.is_dir():
                self.dirs.add(name)
                continue
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the tool stored no Unix mode
            if kind and kind != stat.S_IFREG:
                raise UserError(f"{self.path}:{info.filename} is not a regular file (a link or device); the archive "
                                f"must hold the image files themselves. Rebuild it without links.")
            self._add(name, info)

    def _read_tar(self) -> None:
        hold = self.plain_tar is None  # streamed: hold each member's bytes; else read them by offset later
        try:
            with tarfile.open(self.plain_tar or self.path, "r|*" if hold else "r:") as tar:
                while (info := tar.next()) is not None:
                    tar.members.clear()  # tarfile keeps every TarInfo it parsed; nothing here needs them
                    name = _member_name(info.name, self.path, backslashes=False)
                    if name is None or any(_skipped(p) for p in name.split("/")):
                        continue
                    if info.isdir():
                        self.dirs.add(name)
                        continue
                    if not info.isfile():
                        raise UserError(f"{self.path}:{info.name} is not a regular file (a link or device); the "
                                        f"archive must hold the image files themselves. Rebuild it without links "
                                        f"(e.g. `tar --dereference`).")
                    f = tar.extractfile(info) if hold else None
                    self._add(name, f.read() if f is not None else None)
                    self.offsets[name] = (-1 if info.issparse() else info.offset_data, info.size)
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise UserError(f"{self.path} is not a readable tar archive ({type(e).__name__}: {e}). Check the file "
                            f"(it may be truncated) or pass the extracted folder as --data-dir.") from None
        if self.plain_tar is not None:
            self._plain = open(self.plain_tar, "rb", buffering=0)

    def _add(self, name: str, item: object) -> None:
        if name in self.files:
            raise UserError(f"{self.path}:{name} appears twice in the archive; rebuild it so that every file "
                            f"appears once.")
        self.files[name] = item

    # -- access
    def where(self, rel: str) -> str:
        return str(self.path / rel) if self.kind == "folder" else f"{self.path}:{rel}"

    def read(self, rel: str) -> bytes:
        item = self.files[rel]
        try:
            if self.kind == "folder":
                return Path(item).read_bytes()  # type: ignore[arg-type]
            if self.kind == "zip":
                assert self._zip is not None
                return self._zip.read(item)  # type: ignore[arg-type]
            if item is None:
                assert self._plain is not None
                return read_member(self._plain.fileno(), *self.offsets[rel], self.where(rel))
            return item  # type: ignore[return-value]
        except (OSError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError) as e:
            raise UserError(f"{self.where(rel)} cannot be read ({type(e).__name__}: {e}). Check its permissions or "
                            f"the archive, or remove the file.") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._plain is not None:
            self._plain.close()


def read_member(fd: int, offset: int, size: int, where: str) -> bytes:
    """``size`` bytes at ``offset`` of the open uncompressed tar ``fd`` (no file position is used: safe to share
    between threads and forked processes). UserError for a sparse member (offset -1) or a tar cut short."""
    if offset < 0:
        raise UserError(f"{where} is a sparse tar member, which cannot be read by offset. Rebuild the archive "
                        f"without --sparse.")
    parts, done = [], 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            raise UserError(f"{where} cannot be read: the tar ends inside it (truncated). Check the archive.")
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def compression(path: Path) -> Optional[str]:
    """``"gz"``, ``"bz2"`` or ``"xz"`` from a file's magic bytes (whatever its name says), else None."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in COMPRESSIONS.items() if head.startswith(magic)), None)


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """Within the block Pillow refuses truncated images (``ImageFile.LOAD_TRUNCATED_IMAGES`` off), whatever another
    library set; restored afterwards."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


# ------------------------------------------------------------------------------------------------ decoding


def _decode(data: bytes, where: str, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """One file as uint8 ``[H, W]`` (grayscale modes) or ``[H, W, 3]`` (any other mode), EXIF orientation applied,
    resized to ``size`` = (width, height) when given. UserError naming ``where`` if it is not a readable image."""
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UserError(f"{where} is not an image (Pillow cannot identify it). Only images may sit in the class "
                        f"folders (hidden files such as .DS_Store are skipped): remove or move it.") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{where} is too large to decode safely ({e}). Downscale it, or remove it.") from None
    except Exception as e:  # noqa: BLE001  (any failure to parse a damaged header)
        raise UserError(f"{where} is a damaged image ({type(e).__name__}: {e}). Replace or remove it.") from None
    try:
        with im:
            im.load()
            img = im
            if im.getexif().get(_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(im)
            mode = "L" if img.mode in GRAY_MODES else "RGB"
            if img.mode != mode:
                if img.mode == "P" and "transparency" in img.info:
                    img = img.convert("RGBA")
                img = img.convert(mode)
            if size is not None and img.size != size:
                img = img.resize(size, RESAMPLE)
            return np.asarray(img, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001  (truncated data, corrupt streams: any decoder failure)
        raise UserError(f"{where} is truncated or corrupt ({type(e).__name__}: {e}). Replace or remove it.") from None
