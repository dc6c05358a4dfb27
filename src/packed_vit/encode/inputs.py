"""Stage 1 of the encode job: what to read. Command-line inputs -> parts -> samples, in input order.

An input is an image file (any extension), a folder (its image files, recursively, sorted), a text file `*.txt`
listing one image path per line (relative paths are relative to the list's folder), or a webdataset tar shard
`*.tar` (also a brace range, `shards-{000000..000127}.tar`). Tar shards are streamed with webdataset's tar reader,
never unpacked to disk; a sample is the members sharing a key, its image the member with an image extension.

The inputs are cut into parts, the units that ranks share and output shards are cut from: each tar shard is one part
(its length is known only once read), and each run of at most `part_size` consecutive image files is one part.
Sample names are stable: a file's path as given or found, a tar sample's `<shard path>/<key>`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
LIST_EXTENSION = ".txt"
TAR_EXTENSION = ".tar"

# What reading a broken or non-image file raises in PIL (SyntaxError: some plugins' "broken file" error), and what
# the processors raise on an image they cannot take.
UNREADABLE = (OSError, SyntaxError, ValueError, TypeError, EOFError, PIL.Image.DecompressionBombError)


class NoImageInSample(ValueError):
    """A tar sample whose members have no image extension."""


@dataclass(frozen=True)
class Sample:
    """One image to encode: its stable name and where its bytes are (a file, or a tar member's bytes in `data`)."""

    name: str
    path: Path | None = None
    data: bytes | None = None
    missing_why: str | None = None  # set when the sample cannot be read at all (a tar sample with no image)

    def read_bytes(self) -> bytes:
        if self.missing_why is not None:
            raise NoImageInSample(self.missing_why)
        return self.data if self.data is not None else self.path.read_bytes()


def read_image(source: Path | bytes | Sample) -> PIL.Image.Image:
    """The decoded image (the first frame of an animation). Decoding happens here, so a corrupt file fails here."""
    if isinstance(source, Sample):
        source = source.read_bytes() if source.data is not None or source.missing_why else source.path
    with PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return image.copy()


# --------------------------------------------------------------------------------------------------------------
# Command-line inputs -> image files and tar shards
# --------------------------------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """`shards-{000..002}.tar` -> the three names (webdataset's brace expansion); other names unchanged."""
    if "{" not in pattern:
        return [pattern]
    import braceexpand  # a webdataset dependency

    return list(braceexpand.braceexpand(pattern))


def files_in_folder(folder: Path) -> list[Path]:
    files = (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())  # the same order on every run


def files_in_list(list_file: Path) -> list[Path]:
    """The paths a list file names, one per line (blank lines and `#` comments ignored). A listed file that does
    not exist is not an error here: it is reported and skipped like an unreadable image, so that one missing file
    does not stop a job of millions."""
    paths = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line)
            paths.append(path if path.is_absolute() else list_file.parent / path)
    return paths


def is_tar(path: Path) -> bool:
    return path.suffix.lower() == TAR_EXTENSION


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files of the inputs, in order: files given by name (whatever their extension), the image files under
    folders (recursively, by extension, sorted), the paths in list files (`*.txt`). A path that does not exist is a
    FileNotFoundError. Tar shards are not image files: see `find_parts`."""
    return [path for item in resolve_inputs(inputs) if isinstance(item, list) for path in item]


def resolve_inputs(inputs: Iterable[str | Path]) -> list[list[Path] | Path]:
    """Each input, brace-expanded, as a list of image files or a tar shard path, in order."""
    resolved = []
    for given in inputs:
        for path in map(Path, expand_braces(str(given))):
            if path.is_dir():
                resolved.append(files_in_folder(path))
            elif path.is_file() and is_tar(path):
                resolved.append(path)
            elif path.is_file() and path.suffix.lower() == LIST_EXTENSION:
                resolved.append(files_in_list(path))
            elif path.is_file():
                resolved.append([path])
            else:
                raise FileNotFoundError(f"No such file or folder: {path}")
    return resolved


# --------------------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """A run of samples in input order: a tar shard, or up to `part_size` consecutive image files."""

    index: int
    files: tuple[Path, ...] = ()
    tar: Path | None = None

    @property
    def source(self) -> str:
        """What the part is, for the manifest."""
        if self.tar is not None:
            return str(self.tar)
        return f"{len(self.files)} files: {self.files[0]} .. {self.files[-1]}"

    @property
    def known_length(self) -> int | None:
        return None if self.tar is not None else len(self.files)

    def samples(self, wanted=lambda position: True) -> Iterator[tuple[int, Sample | None]]:
        """(position in the part, sample) for every sample; the sample is None where `wanted(position)` is false
        (it is counted, not read: a worker reads only its own samples' bytes)."""
        if self.tar is None:
            for position, path in enumerate(self.files):
                yield position, Sample(str(path), path=path) if wanted(position) else None
        else:
            yield from tar_samples(self.tar, wanted)


def find_parts(inputs: Iterable[str | Path], part_size: int) -> list[Part]:
    """The inputs (see the module docstring) as parts, in input order. Consecutive image files share parts of at
    most `part_size` files; each tar shard is a part of its own."""
    if part_size < 1:
        raise ValueError(f"part_size must be a positive number of images, got {part_size}")
    parts: list[Part] = []
    pending: list[Path] = []

    def flush_files() -> None:
        for start in range(0, len(pending), part_size):
            parts.append(Part(len(parts), files=tuple(pending[start : start + part_size])))
        pending.clear()

    for item in resolve_inputs(inputs):
        if isinstance(item, list):
            pending.extend(item)
        else:
            flush_files()
            parts.append(Part(len(parts), tar=item))
    flush_files()
    return parts


# --------------------------------------------------------------------------------------------------------------
# Tar shards (webdataset)
# --------------------------------------------------------------------------------------------------------------


def tar_samples(tar: Path, wanted) -> Iterator[tuple[int, Sample | None]]:
    """The samples of a webdataset tar shard, streamed, in member order.

    webdataset's `tar_file_iterator` reads the stream; its `select_files` hook sees every member name, which is
    where samples are counted (webdataset's `base_plus_ext` gives the key), so that only the image members of
    wanted samples are read into memory. A sample is complete when the next key starts (webdataset's rule: a
    sample's members are consecutive).
    """
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    keys: list[str] = []  # every sample's key, in order
    images: dict[int, tuple[str, bytes]] = {}  # position -> (member name, bytes) of wanted samples' first image

    def select(member: str) -> bool:
        key, extension = base_plus_ext(member)
        if key is None:
            return False
        if not keys or keys[-1] != key:
            keys.append(key)
        position = len(keys) - 1
        return ("." + extension.lower().rsplit(".", 1)[-1]) in IMAGE_EXTENSIONS and wanted(position) and \
            position not in images  # fmt: skip

    def finished(upto: int) -> Iterator[tuple[int, Sample | None]]:
        nonlocal emitted
        while emitted < upto:
            name = f"{tar}/{keys[emitted]}"
            if not wanted(emitted):
                yield emitted, None
            elif emitted in images:
                yield emitted, Sample(name, data=images.pop(emitted)[1])
            else:
                yield emitted, Sample(name, missing_why=f"no member with an image extension in {tar}")
            emitted += 1

    emitted = 0
    with open(tar, "rb") as stream:
        for member in tar_file_iterator(stream, select_files=select):
            images[len(keys) - 1] = (member["fname"], member["data"])
            yield from finished(len(keys) - 1)  # every sample before the current key is complete
    yield from finished(len(keys))


__all__ = [
    "IMAGE_EXTENSIONS",
    "UNREADABLE",
    "Part",
    "Sample",
    "find_images",
    "find_parts",
    "read_image",
]
