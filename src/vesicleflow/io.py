"""Reading tomograms and writing every output atomically.

A killed cluster job must never leave a half-written file behind that Snakemake (or a user) could
mistake for a result, so every writer here goes through :func:`atomic_output`: write under a
temporary name in the same folder, then rename. A temporary left behind by a killed process is
removed the next time the same output is written.

Input MRC files are checked before their voxels are touched (:func:`inspect_mrc`): every problem
becomes an :class:`InputError` whose message is one line naming the file and the problem. Input
files are only ever opened read-only.

Large transfers bypass the page cache where the file system allows (:func:`open_for_io`,
:class:`PageWriter`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Voxel sizes outside this range (Å) are almost surely a broken or unset header.
PLAUSIBLE_VOXEL_SIZE_ANGSTROM = (3.0, 100.0)
#: MRC modes whose voxels are real numbers (0 int8, 1 int16, 2 float32, 6 uint16, 12 float16).
REAL_MRC_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
MRC_MODE_NAMES = {3: "complex int16", 4: "complex float32", 101: "4-bit packed"}
HEADER_BYTES = 1024


class InputError(ValueError):
    """A user's input file or setting is unusable; the message names the file and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


@dataclass(frozen=True)
class TomogramInfo:
    """What the workflow needs to know about an input tomogram, without reading its voxels."""

    path: Path
    shape: tuple[int, int, int]
    voxel_size_angstrom: float
    origin_angstrom: tuple[float, float, float]

    @property
    def voxel_size_nm(self) -> float:
        return self.voxel_size_angstrom / 10.0


@dataclass(frozen=True)
class MrcLayout:
    """Where an MRC file's voxels are and how they are stored (from a validated header)."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    header_voxel_size_angstrom: tuple[float, float, float]  # (z, y, x)
    origin_angstrom: tuple[float, float, float]  # (z, y, x)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


# --------------------------------------------------------------------------------- atomic writes

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` left by a killed process of this host (its pid is gone)."""
    prefix = _temp_prefix(path)
    try:
        siblings = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for stale in siblings:
        match = re.match(r"(?:scratch-)?(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}", stale.name[len(prefix):])
        if not match or match["host"] != _HOST or _process_alive(int(match["pid"])):
            continue
        log.info("removing %s, left behind by a killed job", stale)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temporary_sibling(path: Path, kind: str = "") -> Path:
    return path.with_name(f"{_temp_prefix(path)}{kind}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                          f"{''.join(path.suffixes)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary sibling path; on success rename it to ``path`` (file or folder).

    The temporary lives in the same folder (so the rename is atomic) and keeps ``path``'s suffixes
    (so writers that pick a format by suffix still work). On an exception it is deleted and
    ``path`` is left as it was; after a SIGKILL it stays behind, hidden, until the next write of
    ``path`` on this host removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        if not (tmp.exists() or tmp.is_symlink()):
            raise FileNotFoundError(f"{tmp}: the writer produced nothing for {path}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def scratch_dir(output: str | os.PathLike):
    """A private scratch folder beside ``output``, deleted on exit (and, if killed, with the next write)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output)
    scratch = _temporary_sibling(output, "scratch-")
    scratch.mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------ reading MRC

def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def inspect_mrc(path: str | os.PathLike, what: str = "tomogram") -> MrcLayout:
    """Validate an MRC file's header against its size, without reading voxels.

    Refuses: a missing file, a file that is not MRC, a truncated file, complex or packed modes, and
    anything but a 3D volume with at least 2 voxels per axis (a 2D image, a single slice).
    """
    import mrcfile
    from mrcfile.utils import data_dtype_from_header, data_shape_from_header

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise InputError(f"{path}: not an MRC file (only {size} bytes; an MRC header alone is {HEADER_BYTES})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
                voxel = mrc.voxel_size
    except Exception as err:  # mrcfile raises ValueError, OSError, EOFError... for broken files
        raise InputError(f"{path}: not a readable MRC file ({err})") from err
    if bytes(header.map).strip(b"\0 ") not in (b"MAP",):
        raise InputError(f"{path}: not an MRC file (no 'MAP ' identifier at byte 208 of the header)")
    mode = int(header.mode)
    if mode not in REAL_MRC_MODES:
        kind = MRC_MODE_NAMES.get(mode, "unknown")
        raise InputError(f"{path}: unsupported MRC mode {mode} ({kind}); a {what} must hold real numbers "
                         f"(modes {', '.join(map(str, REAL_MRC_MODES))})")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1:
        raise InputError(f"{path}: corrupt MRC header (dimensions {nz} x {ny} x {nx})")
    try:
        dtype = np.dtype(data_dtype_from_header(header))
        shape = tuple(int(s) for s in data_shape_from_header(header))
    except Exception as err:
        raise InputError(f"{path}: corrupt MRC header ({err})") from err
    if len(shape) != 3:
        raise InputError(f"{path}: a {what} must be a 3D volume; this MRC holds a 2D image of {ny} x {nx} "
                         "pixels")
    if nz < 2:
        raise InputError(f"{path}: a {what} must be a 3D volume; this MRC holds a single slice "
                         f"({nz} x {ny} x {nx} voxels)")
    if min(shape) < 2:
        raise InputError(f"{path}: a {what} needs at least 2 voxels along each axis; its shape (z, y, x) "
                         f"is {shape}")
    offset = HEADER_BYTES + int(header.nsymbt)
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size < expected:
        raise InputError(f"{path}: truncated: the header promises {shape[0]} x {shape[1]} x {shape[2]} "
                         f"{dtype.name} voxels ({_mib(expected - offset)}) but the file holds only "
                         f"{_mib(max(0, size - offset))} of voxel data")
    origin = (float(header.origin.z), float(header.origin.y), float(header.origin.x))
    return MrcLayout(path=path, shape=shape, dtype=dtype, offset=offset,
                     header_voxel_size_angstrom=(float(voxel.z), float(voxel.y), float(voxel.x)),
                     origin_angstrom=origin)


def validated_voxel_size_angstrom(path: Path, header_value: float, override: float | None) -> float:
    """Return the voxel size to use, refusing unset or implausible header values."""
    if override is not None:
        value, source = float(override), "config override"
    else:
        value, source = float(header_value), "MRC header"
    low, high = PLAUSIBLE_VOXEL_SIZE_ANGSTROM
    if override is None and value == 1.0:
        raise InputError(
            f"{path}: voxel size in the MRC header is 1.0 Å, which usually means it was never set; "
            "set it with the dataset's voxel_size_angstrom in the config"
        )
    if not np.isfinite(value) or not low <= value <= high:
        raise InputError(
            f"{path}: voxel size {value:g} Å from the {source} is outside the plausible range "
            f"{low:g}-{high:g} Å; fix the header or set voxel_size_angstrom in the config"
        )
    return value


def read_tomogram_info(path: str | os.PathLike, voxel_size_override: float | None = None) -> TomogramInfo:
    """Read and validate an MRC header: a 3D real-valued volume with a plausible voxel size."""
    layout = inspect_mrc(path)
    vz, vy, vx = layout.header_voxel_size_angstrom
    if voxel_size_override is None and not np.allclose([vz, vy], vx, rtol=1e-3):
        raise InputError(f"{layout.path}: anisotropic voxel size (x {vx:g}, y {vy:g}, z {vz:g} Å) is not "
                         "supported; resample it or set voxel_size_angstrom in the config")
    voxel = validated_voxel_size_angstrom(layout.path, vx, voxel_size_override)
    return TomogramInfo(path=layout.path, shape=layout.shape, voxel_size_angstrom=voxel,
                        origin_angstrom=layout.origin_angstrom)


#: Direct I/O (``O_DIRECT``) needs memory addresses, file offsets and lengths in multiples of the
#: device's logical block size: 512 or 4096 bytes on the disks and parallel filesystems we know of.
DIRECT_IO_ALIGNMENT = 4096
#: Set to 0 to read and write every file through the page cache (see :func:`open_for_io`).
DIRECT_IO_VARIABLE = "VESICLEFLOW_DIRECT_IO"


def direct_io_enabled() -> bool:
    """Whether this platform has ``O_DIRECT`` and :data:`DIRECT_IO_VARIABLE` does not turn it off."""
    return hasattr(os, "O_DIRECT") and os.environ.get(DIRECT_IO_VARIABLE, "1").strip().lower() not in (
        "0", "false", "no", "off")


def open_for_io(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open`` with direct I/O where the filesystem has it and :data:`DIRECT_IO_VARIABLE` allows.

    The volumes stages hand each other (hundreds of MB) are written once and read once or twice;
    through the page cache each byte is also copied into memory the kernel must first take and zero.
    On the benchmark machine, a VM whose host takes back idle memory, that was most of normalize
    (11-13 s by the page cache, 5-8 s direct, for the largest benchmark tomogram) and of writing
    infer's probability map (8.5-9.5 s, 0.8-0.9 s direct). :func:`pread_into` and :func:`pwrite_all`
    fall back to the page cache for any transfer the device refuses (unaligned memory, offset or
    length), so callers only align their large transfers (:func:`aligned_empty`) to benefit.
    """
    if direct_io_enabled():
        try:
            return os.open(path, flags | os.O_DIRECT, mode)
        except OSError as err:  # EINVAL: a filesystem without direct I/O (older tmpfs, some FUSE)
            if err.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode)


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose memory starts on a :data:`DIRECT_IO_ALIGNMENT` boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + DIRECT_IO_ALIGNMENT, np.uint8)
    skip = -raw.ctypes.data % DIRECT_IO_ALIGNMENT
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


class ReusedBuffers:
    """Scratch arrays by name, each reused from call to call and grown to the largest asked for
    (aligned as :func:`aligned_empty`'s): a new large array's pages cost more to fault in and zero
    than the work done in them, the more so where the host is slow to supply new memory (README)."""

    def __init__(self):
        self._bytes: dict[str, np.ndarray] = {}

    def get(self, name: str, shape, dtype=np.float32) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype``, contents undefined, in the buffer kept as ``name``."""
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if name not in self._bytes or self._bytes[name].size < size:
            self._bytes[name] = aligned_empty(size, np.uint8)
        return self._bytes[name][:size].view(dtype).reshape(shape)

    def release(self) -> None:
        """Drop every buffer (arrays handed out stay valid while referenced)."""
        self._bytes.clear()


def _leave_direct_io(descriptor: int, err: OSError, left_already: bool) -> None:
    """After ``err``, go on through the page cache if direct I/O can be why (EINVAL), else re-raise.

    Safe while other threads use the descriptor (a transfer through the page cache accepts anything);
    one of them may have turned direct I/O off already, so a call retries once whatever the flags.
    """
    if err.errno != errno.EINVAL or left_already or not hasattr(os, "O_DIRECT"):
        raise err
    flags = fcntl.fcntl(descriptor, fcntl.F_GETFL)
    if flags & os.O_DIRECT:
        fcntl.fcntl(descriptor, fcntl.F_SETFL, flags & ~os.O_DIRECT)


def pread_into(descriptor: int, out: np.ndarray, offset: int) -> int:
    """Fill the contiguous ``out`` from byte ``offset`` of an open file (positioned reads: no shared
    file position, so threads may share the descriptor); returns the bytes read, fewer only at the
    end of the file."""
    if not out.flags.c_contiguous:
        raise ValueError("reading into a non-contiguous array")
    view = memoryview(out.reshape(-1).view(np.uint8))
    done, left_direct_io = 0, False
    while done < view.nbytes:
        try:
            count = os.preadv(descriptor, [view[done:]], offset + done)
        except OSError as err:
            _leave_direct_io(descriptor, err, left_direct_io)
            left_direct_io = True
            continue
        if count == 0:
            break
        done += count
    return done


def pread_cached(path: str | os.PathLike, out: np.ndarray, offset: int) -> int:
    """Fill ``out`` from byte ``offset`` of the file at ``path`` as far as the page cache holds it
    (``RWF_NOWAIT``: a read that would wait for the disk stops instead); returns the bytes copied, a
    multiple of :data:`DIRECT_IO_ALIGNMENT` unless the file ends.

    Direct I/O reads the disk even where the kernel holds the file already (a tomogram read before,
    or just written): 1.2 GB took 1.3 s from this machine's disk against 0.3 s from memory. Reading
    what is cached first, then the rest directly, takes no new page-cache memory either way."""
    if not (direct_io_enabled() and hasattr(os, "RWF_NOWAIT")):
        return 0
    view = memoryview(out.reshape(-1).view(np.uint8))
    descriptor = os.open(path, os.O_RDONLY)
    done = 0
    try:
        while done < view.nbytes:
            try:
                count = os.preadv(descriptor, [view[done:]], offset + done, os.RWF_NOWAIT)
            except OSError:  # EAGAIN: not cached; EOPNOTSUPP: a filesystem without the flag
                break
            if count == 0:
                return done
            done += count
    finally:
        os.close(descriptor)
    return done if done == view.nbytes else done - done % DIRECT_IO_ALIGNMENT


def pwrite_all(descriptor: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at byte ``offset`` of an open file (positioned writes: threads may share
    the descriptor)."""
    view = memoryview(data).cast("B")
    done, left_direct_io = 0, False
    while done < view.nbytes:
        try:
            done += os.pwrite(descriptor, view[done:], offset + done)
        except OSError as err:
            _leave_direct_io(descriptor, err, left_direct_io)
            left_direct_io = True


class PageWriter:
    """Positioned writes into one open file: the whole file pages of each write by direct I/O, through
    one reused aligned buffer, where the file system allows it; the bytes around them (a write's
    partial first and last page) through the page cache. For writers whose data are neither aligned
    nor in whole pages (an MRC's planes start after its 1024-byte header)."""

    def __init__(self, path: str | os.PathLike, descriptor: int, buffer_bytes: int = 8 * 2**20):
        self.buffered, self.direct, self.buffer = descriptor, None, None
        direct = open_for_io(path, os.O_WRONLY)
        if hasattr(os, "O_DIRECT") and fcntl.fcntl(direct, fcntl.F_GETFL) & os.O_DIRECT:
            self.direct, self.buffer = direct, aligned_empty(buffer_bytes, np.uint8)
        else:
            os.close(direct)

    def __enter__(self) -> PageWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.direct is not None:
            os.close(self.direct)

    def write(self, data: np.ndarray, offset: int) -> None:
        """Write the bytes of the contiguous ``data`` at byte ``offset``."""
        raw = data.reshape(-1).view(np.uint8)
        if self.direct is None:
            pwrite_all(self.buffered, raw, offset)
            return
        first = min(raw.size, -offset % DIRECT_IO_ALIGNMENT)
        last = max(first, raw.size - (offset + raw.size) % DIRECT_IO_ALIGNMENT)
        if first:
            pwrite_all(self.buffered, raw[:first], offset)
        for lo in range(first, last, self.buffer.size):
            piece = self.buffer[:min(last - lo, self.buffer.size)]
            piece[...] = raw[lo:lo + piece.size]
            pwrite_all(self.direct, piece, offset + lo)
        if last < raw.size:
            pwrite_all(self.buffered, raw[last:], offset + last)


class MrcVolume:
    """Read-only access to an MRC file's voxels that reads only the z-planes asked for.

    Unlike a memory map, nothing stays resident after a read, so streaming a tomogram larger than
    memory slab by slab keeps the process's memory at one slab. Index it like a (z, y, x) array;
    the first index selects which planes are read from disk.
    """

    def __init__(self, layout: MrcLayout):
        self.layout = layout
        self.path = layout.path
        self.shape = layout.shape
        self.dtype = layout.dtype
        self.ndim = 3

    @property
    def plane_bytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.dtype.itemsize

    def _span(self, start: int, n_planes: int) -> tuple[int, int, int]:
        """The aligned byte range holding planes [start, start + n_planes): its offset, the planes'
        place in it, and its length (direct I/O reads whole blocks; the header shifts the planes)."""
        offset = self.layout.offset + start * self.plane_bytes
        head = offset % DIRECT_IO_ALIGNMENT
        length = -(-(head + n_planes * self.plane_bytes) // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT
        return offset - head, head, length

    def scratch_bytes(self, n_planes: int) -> int:
        """Size of the ``scratch`` that :meth:`read_into` needs for ``n_planes`` planes."""
        return self._span(0, n_planes)[2] + DIRECT_IO_ALIGNMENT

    def read_into(self, start: int, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """Planes [start, start + len(out)) as ``out``'s dtype, with positioned reads (safe from several
        threads). ``scratch``: a uint8 array of at least :meth:`scratch_bytes` bytes that the caller
        reuses from read to read; the file's blocks are copied into it from the page cache where the
        kernel holds them (:func:`pread_cached`), the others read by direct I/O (:func:`open_for_io`).
        Returns a view of ``scratch`` when the file holds the planes as ``out``'s dtype already (no
        copy: copying 1.2 GB took a third of normalize's wall time), else ``out``, converted; either
        is valid until the caller reuses its buffers."""
        offset, head, length = self._span(start, len(out))
        skip = -scratch.ctypes.data % DIRECT_IO_ALIGNMENT
        span = scratch[skip:skip + length]
        if len(span) != length:
            raise ValueError(f"scratch of {scratch.nbytes} bytes; {self.scratch_bytes(len(out))} needed")
        needed = head + len(out) * self.plane_bytes
        read = pread_cached(self.path, span, offset)
        if read < needed:
            descriptor = open_for_io(self.path, os.O_RDONLY)
            try:
                read += pread_into(descriptor, span[read:], offset + read)
            finally:
                os.close(descriptor)
        complete = read >= needed
        if not complete:
            raise InputError(f"{self.path}: truncated while reading z planes {start}-{start + len(out)}")
        planes = span[head:head + len(out) * self.plane_bytes].view(self.dtype).reshape(out.shape)
        if planes.dtype == out.dtype and planes.flags.aligned:
            return planes
        np.copyto(out, planes)
        return out

    def planes(self, start: int, stop: int) -> np.ndarray:
        """Planes [start, stop) as a native-endian array (a copy)."""
        start, stop = max(0, int(start)), min(self.shape[0], int(stop))
        count = max(0, stop - start) * self.shape[1] * self.shape[2]
        with open(self.path, "rb") as handle:
            handle.seek(self.layout.offset + start * self.plane_bytes)
            data = np.fromfile(handle, dtype=self.dtype, count=count)
        if data.size != count:
            raise InputError(f"{self.path}: truncated while reading z planes {start}-{stop}")
        data = data.reshape((max(0, stop - start), *self.shape[1:]))
        return data.astype(self.dtype.newbyteorder("="), copy=False)

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        first, rest = index[0], index[1:]
        if isinstance(first, (int, np.integer)):
            z = int(first) + (self.shape[0] if first < 0 else 0)
            if not 0 <= z < self.shape[0]:
                raise IndexError(f"plane {first} out of range for {self.shape[0]} planes")
            return self.planes(z, z + 1)[0][rest]
        if isinstance(first, slice):
            start, stop, step = first.indices(self.shape[0])
            if step < 0 or stop <= start:
                return np.asarray(self.planes(0, self.shape[0])[first])[(slice(None), *rest)]
            return self.planes(start, stop)[::step][(slice(None), *rest)]
        return np.asarray(self.planes(0, self.shape[0]))[index]

    def __array__(self, dtype=None, copy=None):
        data = self.planes(0, self.shape[0])
        return data if dtype is None else data.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]


def open_mrc_volume(path: str | os.PathLike, what: str = "tomogram") -> MrcVolume:
    """Validate ``path`` (:func:`inspect_mrc`) and return a plane-reading :class:`MrcVolume`."""
    return MrcVolume(inspect_mrc(path, what))


def read_tomogram(path: str | os.PathLike, what: str = "tomogram") -> np.ndarray:
    """Memory-map the voxels, (z, y, x), read-only, after validating the file (:func:`inspect_mrc`).

    A memory map suits random access (small boxes anywhere); to stream a whole volume with bounded
    memory use :func:`open_mrc_volume`.
    """
    import mrcfile

    layout = inspect_mrc(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mrcfile.mmap(layout.path, mode="r", permissive=True).data
    except Exception as err:
        raise InputError(f"{layout.path}: not a readable MRC file ({err})") from err


# ------------------------------------------------------------------------------------------ writers

def write_mrc(
    path: str | os.PathLike,
    data: np.ndarray,
    voxel_size_angstrom: float,
    origin_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> None:
    """Write a volume as MRC atomically, with voxel size and origin (z, y, x) in Å."""
    import mrcfile

    with atomic_output(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data))
        mrc.voxel_size = voxel_size_angstrom
        mrc.header.origin.z, mrc.header.origin.y, mrc.header.origin.x = origin_angstrom


def write_table(path: str | os.PathLike, table) -> None:
    """Write a pandas DataFrame as CSV (or Parquet by suffix) atomically."""
    with atomic_output(path) as tmp:
        if Path(path).suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False, float_format="%.6g")


def write_json(path: str | os.PathLike, payload: dict) -> None:
    import json

    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    import json

    return json.loads(Path(path).read_text())
