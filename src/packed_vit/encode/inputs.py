"""Stage 1 of the encode job: what to read. Command-line inputs -> parts -> samples, in input order.

An input is an image file (any extension), a folder (its image files, recursively, sorted), a text file `*.txt`
listing one image path per line (relative paths are relative to the list's folder), or a webdataset tar shard
`*.tar` (also a brace range, `shards-{000000..000127}.tar`). Tar shards are streamed, never unpacked to disk; a
sample is the members sharing a key (webdataset's rule), its image the member with an image extension.

Damaged inputs never stop the job: a file that cannot be read, a listed path that does not exist, a tar sample with
no image become samples that fail to read, and so are reported and skipped with their reason; a tar shard that is
cut short or holds a corrupt header keeps every sample before the damage and adds one more, named after the shard,
that says where it broke (`DamagedTarShard`).

The inputs are cut into parts, the units that ranks share and output shards are cut from: each tar shard is one part
(its length is known only once read), and each run of at most `part_size` consecutive image files is one part.
Sample names are stable: a file's path as given or found, a tar sample's `<shard path>/<key>`.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import PIL.ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
LIST_EXTENSION = ".txt"
TAR_EXTENSION = ".tar"

# What reading a broken or non-image file raises in PIL (SyntaxError: some plugins' "broken file" error), and what
# the processors raise on an image they cannot take.
UNREADABLE = (OSError, SyntaxError, ValueError, TypeError, EOFError, PIL.Image.DecompressionBombError)


class NoImageInSample(ValueError):
    """A tar sample whose members have no image extension."""


class DamagedTarShard(ValueError):
    """A tar shard that ends early, holds a corrupt header or cannot be read: the samples after the damage are lost."""


@dataclass(frozen=True)
class Sample:
    """One image to encode: its stable name and where its bytes are (a file, or a tar member's bytes in `data`)."""

    name: str
    path: Path | None = None
    data: bytes | None = None
    error: Exception | None = None  # set when the sample cannot be read at all (no image, a damaged shard)

    def read_bytes(self) -> bytes:
        if self.error is not None:
            raise self.error
        return self.data if self.data is not None else self.path.read_bytes()


def read_image(source: Path | bytes | Sample) -> PIL.Image.Image:
    """The decoded image, upright: the first frame of an animation, its EXIF orientation applied as transformers'
    `load_image` (what its processors read a file with) applies it. Decoding happens here, so a corrupt file fails
    here, and so does an image past PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`), before its
    pixels are allocated. The mode is kept: the processors convert to RGB (transparency onto white)."""
    if isinstance(source, Sample):
        source = source.read_bytes() if source.data is not None or source.error else source.path
    with PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return PIL.ImageOps.exif_transpose(image)  # a copy (of the first frame), rotated where the EXIF says


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
    """Image files under `folder` by extension, sorted by their path in it; a dangling link too (a file that has
    vanished): it is reported and skipped when read, not left out unnoticed. Linked folders are not entered; a
    folder that cannot be read is an error (PermissionError), not a silent gap.

    Walked with os.scandir rather than Path.rglob: a directory entry knows its type without a stat for all but links,
    and the sort key is built as a string (12000 files: 0.43 s through rglob, is_file and relative_to on the CPU
    machine; RESULTS.md, encode job, session 12)."""
    found = []  # (path relative to the folder, POSIX separators; path)
    pending = [(os.fspath(folder), "")]
    while pending:
        directory, relative = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                name = relative + entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, name + "/"))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and (
                    entry.is_file() or entry.is_symlink() and not os.path.exists(entry.path)
                ):
                    found.append((name, entry.path))
    found.sort(key=lambda item: item[0])  # the same order on every run
    return [Path(path) for _, path in found]


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


# webdataset's tar reader (`tar_file_iterator`, through Python's tarfile) ends silently where a member header is
# corrupt or where the file ends inside a member it does not read, so a damaged shard would lose its later samples
# unnoticed. The loop below is its loop (regular members, its metadata rule, webdataset's keys) plus the checks that
# say where a shard broke: a member running past the end of the file, a read error, and what follows the last
# member (only zero blocks, the end-of-archive marker, in an intact shard).
WEBDATASET_META = re.compile(r"__[^/]*__($|/)")  # tar_file_iterator's `skip_meta`: members it never yields
TAR_BLOCK = tarfile.BLOCKSIZE


def tar_samples(tar: Path, wanted) -> Iterator[tuple[int, Sample | None]]:
    """The samples of a webdataset tar shard, streamed, in member order.

    Every member name is seen, which is where samples are counted (webdataset's `base_plus_ext` gives the key), but
    only the first image member of wanted samples is read into memory. A sample is complete when the next key starts
    (webdataset's rule: a sample's members are consecutive). Damage ends the shard with one more sample, named after
    the shard, whose reading fails with `DamagedTarShard`: where it broke and how many samples were read. Where it
    broke depends on the file only, not on `wanted`, so every DataLoader worker counts the same samples.
    """
    from webdataset.tariterators import base_plus_ext

    keys: list[str] = []  # every sample's key, in order
    has_image: set[int] = set()  # positions whose image member has been seen
    images: dict[int, bytes] = {}  # position -> bytes of wanted samples' first image
    emitted = 0

    def finished(upto: int, error: Exception | None = None) -> Iterator[tuple[int, Sample | None]]:
        """The samples before position `upto`; `error`: why the last one's image, seen but not read, is lost."""
        nonlocal emitted
        while emitted < upto:
            name = f"{tar}/{keys[emitted]}"
            if not wanted(emitted):
                yield emitted, None
            elif emitted in images:
                yield emitted, Sample(name, data=images.pop(emitted))
            elif emitted in has_image and error is not None:
                yield emitted, Sample(name, error=error)
            else:
                yield emitted, Sample(name, error=NoImageInSample(f"no member with an image extension in {tar}"))
            emitted += 1

    damage, archive = None, None
    try:
        with open(tar, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            archive = tarfile.open(fileobj=stream, mode="r|")
            for member in archive:
                archive.members = []  # as webdataset: a shard of a million members needs no list of them
                key, extension = base_plus_ext(member.name) if member.isreg() else (None, None)
                is_image = key is not None and "." + extension.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS
                if member.offset_data + member.size > size:
                    damage = f"cut short in member {member.name!r}: the file ends at byte {size}"
                    if is_image and keys and keys[-1] == key:
                        has_image.add(len(keys) - 1)  # that sample's image is the member lost
                    break
                if key is None or is_webdataset_metadata(member.name):
                    continue
                if not keys or keys[-1] != key:
                    keys.append(key)
                    yield from finished(len(keys) - 1)  # every sample before the new key is complete
                position = len(keys) - 1
                if position in has_image or not is_image:
                    continue
                has_image.add(position)
                if wanted(position):
                    images[position] = archive.extractfile(member).read()
            else:
                damage = end_of_archive_damage(stream, archive.offset, size)
    except (OSError, tarfile.TarError, EOFError) as error:
        damage = f"unreadable at byte {getattr(archive, 'offset', 0)}: {type(error).__name__}: {error}"
    read = len(keys)
    lost = None if damage is None else DamagedTarShard(
        f"tar shard {tar} is damaged: {damage}; {read} sample{'s' * (read != 1)} read before the damage, the rest "
        "of the shard is lost")  # fmt: skip
    yield from finished(len(keys), lost)
    if lost is not None:
        yield emitted, Sample(str(tar), error=lost) if wanted(emitted) else None


def is_webdataset_metadata(name: str) -> bool:
    """Members webdataset's `tar_file_iterator` never yields (its `skip_meta` and `__...__` rules)."""
    return bool(WEBDATASET_META.match(name)) or ("/" not in name and name.startswith("__") and name.endswith("__"))


def end_of_archive_damage(stream, offset: int, size: int) -> str | None:
    """What is wrong after the last member tarfile read; None when it is the end-of-archive marker (zero blocks).

    tarfile stops, silently, at the first header it cannot parse: bytes that are not zeros there are a header cut
    short or corrupt."""
    if offset >= size:
        return f"the file ends at byte {size} without the end-of-archive marker (cut short after a member)"
    stream.seek(offset)
    while block := stream.read(1 << 20):
        if block.strip(b"\0"):
            what = "cut short in a member header" if size - offset < TAR_BLOCK else "corrupt member header"
            return f"{what} at byte {offset}"
    return None


__all__ = [
    "IMAGE_EXTENSIONS",
    "UNREADABLE",
    "DamagedTarShard",
    "NoImageInSample",
    "Part",
    "Sample",
    "find_images",
    "find_parts",
    "read_image",
]
