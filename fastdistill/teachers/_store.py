"""The teacher store: sequences of sparse (top-k) teachers on disk, opened memory-mapped.

Layout (format version 1). A store is a directory::

    STORE/
      fastdistill-teachers.json   the manifest: format, version, meta, and the shards in order
      shard-00000.arrow           Arrow IPC stream files, one per append
      shard-00001.arrow
      ...

Each shard holds one Arrow record batch (or a few) of two columns, one Arrow row per sequence:

- ``indices``: ``list<fixed_size_list<int32>[k]>`` -- the sequence's ``(T, k)`` class ids, ``-1`` for
  an unused slot;
- ``values``: ``list<fixed_size_list<float16>[k]>`` (or float32) -- the teacher's values (``kind``).

No validity bitmaps are written, so a token costs exactly ``k * (4 + 2)`` bytes (float16 values) and a
sequence 8 bytes more (two int32 list offsets); a shard adds its schema and batch headers (a few hundred
bytes). The schema's metadata (key ``fastdistill.teachers``) repeats the store's meta as JSON. The
stream format is what HF ``datasets`` memory-maps (``datasets.Dataset.from_file(shard)``); the
fixed-size lists read as ``Sequence(..., length=k)``.

Appending writes a new shard (to a temporary name, flushed and fsync'ed, then renamed) and then
replaces the manifest atomically, so a writer killed at any point leaves the store as it was before
that append (a shard file that the manifest does not list is ignored and overwritten by the next
append). The manifest records each shard's sequences, tokens, size in bytes and CRC-32: opening a
store checks every shard's size, schema and counts, so a truncated, replaced or foreign file raises
:class:`TeacherStoreError` on open, never a wrong number later (``verify=True`` also checks the CRCs).
"""
from __future__ import annotations

import inspect
import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ..sparse import VALUE_KINDS, SparseTeacher
from ._errors import TeacherStoreError

MANIFEST = "fastdistill-teachers.json"
FORMAT = "fastdistill.teachers"
VERSION = 1
META_KEY = b"fastdistill.teachers"
VALUE_DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
RESERVED = ("k", "kind", "values_dtype")

_TEMPERATURE_KW = "temperature" in inspect.signature(SparseTeacher.__init__).parameters


# ----------------------------------------------------------------------------------------------- writing


def _host(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    try:
        arr = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - device arrays and the like
        raise TeacherStoreError(f"a teacher's {name} cannot be read on the host ({type(e).__name__}: {e})")
    if arr.dtype.kind not in "iufb" and arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)
    return arr


def _schema(k: int, value_type: pa.DataType, meta: dict) -> pa.Schema:
    fields = [
        pa.field("indices", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
        pa.field("values", pa.list_(pa.list_(value_type, k)), nullable=False),
    ]
    head = {"format": FORMAT, "version": VERSION, "meta": meta}
    return pa.schema(fields, metadata={META_KEY: json.dumps(head, sort_keys=True).encode()})


class _CrcFile:
    """A binary file that keeps the CRC-32 of what is written to it."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.crc = 0
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        mv = memoryview(data)
        self.crc = zlib.crc32(mv, self.crc)
        self.size += mv.nbytes
        return self.f.write(mv)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class _Lock:
    """An exclusive lock on the store's directory while it is written (POSIX ``flock``; none elsewhere)."""

    def __init__(self, root: Path) -> None:
        self.path = root / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "_Lock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise TeacherStoreError(f"the teacher store {self.path.parent} is being written by another process")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def read_manifest(path: Any) -> dict | None:
    """The manifest of the store at ``path``; None when ``path`` does not exist or is an empty directory.
    Anything else that is not a store raises :class:`TeacherStoreError`."""
    root = Path(path)
    if not root.exists():
        return None
    if not root.is_dir():
        raise TeacherStoreError(
            f"{root} is a file, not a teacher store (a directory holding {MANIFEST} and Arrow shards)"
        )
    mpath = root / MANIFEST
    if not mpath.exists():
        if not any(p for p in root.iterdir() if p.name != ".lock"):
            return None
        raise TeacherStoreError(f"{root} is not a fastdistill teacher store: it has no {MANIFEST}")
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TeacherStoreError(f"the manifest {mpath} is damaged or truncated ({e})")
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise TeacherStoreError(f"{mpath} is not a fastdistill teacher store manifest")
    if man.get("version") != VERSION:
        raise TeacherStoreError(
            f"{mpath} is a teacher store of format version {man.get('version')!r}; this fastdistill reads "
            f"version {VERSION}"
        )
    meta, shards = man.get("meta"), man.get("shards")
    if not isinstance(meta, dict) or not isinstance(shards, list) or not _valid_meta(meta):
        raise TeacherStoreError(f"the manifest {mpath} is damaged (meta or shards missing)")
    for s in shards:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and "/" not in s["file"]
                and all(isinstance(s.get(x), int) and s[x] >= 0 for x in ("sequences", "tokens", "bytes", "crc32"))):
            raise TeacherStoreError(f"the manifest {mpath} is damaged (a shard entry is {s!r})")
    return man


def _valid_meta(meta: dict) -> bool:
    return (isinstance(meta.get("k"), int) and meta["k"] >= 1 and meta.get("kind") in VALUE_KINDS
            and meta.get("values_dtype") in VALUE_DTYPES)


def _as_list(teachers: Any) -> list:
    if isinstance(teachers, SparseTeacher):
        return [teachers]
    try:
        out = list(teachers)
    except TypeError:
        raise TeacherStoreError(
            f"save() takes a SparseTeacher or an iterable of them, got {type(teachers).__name__}"
        )
    for i, t in enumerate(out):
        if not isinstance(t, SparseTeacher):
            raise TeacherStoreError(f"save(): item {i} is a {type(t).__name__}, not a SparseTeacher")
    return out


def save(path: Any, teachers: Any, *, meta: dict | None = None, dtype: str = "float16",
         shard_info: dict | None = None) -> int:
    """See :func:`fastdistill.teachers.save`. ``shard_info``: extra JSON fields for the new shard's
    manifest entry (the capture command records a digest of the input there)."""
    if dtype not in VALUE_DTYPES:
        raise TeacherStoreError(f"dtype must be one of {sorted(VALUE_DTYPES)}, got {dtype!r}")
    if meta is not None and not isinstance(meta, dict):
        raise TeacherStoreError(f"meta must be a dict, got {type(meta).__name__}")
    items = _as_list(teachers)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with _Lock(root):
        man = read_manifest(root)
        seqs = [(_host(t.indices, "indices"), _host(t.values, "values"), t) for t in items]
        for i, (idx, val, _) in enumerate(seqs):
            if idx.ndim != 2 or idx.shape[0] == 0:
                raise TeacherStoreError(
                    f"save(): sequence {i} has shape {idx.shape}; one SparseTeacher per sequence, (T, k) with "
                    "T >= 1"
                )
        new = dict(meta or {})
        try:
            json.dumps(new)
        except (TypeError, ValueError) as e:
            raise TeacherStoreError(f"meta must be JSON-serialisable ({e})")
        kinds = {t.kind for _, _, t in seqs}
        if len(kinds) > 1:
            raise TeacherStoreError(f"save(): the sequences mix kinds {sorted(kinds)}")
        temps = {float(getattr(t, "temperature", 1.0)) for _, _, t in seqs}
        if man is None:
            store_meta = dict(new)
            store_meta.setdefault("kind", next(iter(kinds)) if kinds else "logprobs")
            if "k" not in store_meta:
                if not seqs:
                    raise TeacherStoreError("save(): no sequences and no meta['k']: the store's k is unknown")
                store_meta["k"] = max(int(idx.shape[1]) for idx, _, _ in seqs)
            store_meta.setdefault("values_dtype", dtype)
            store_meta.setdefault("temperature", temps.pop() if len(temps) == 1 else 1.0)
            if not _valid_meta(store_meta):
                raise TeacherStoreError(
                    f"save(): meta k={store_meta.get('k')!r} kind={store_meta.get('kind')!r} is not valid "
                    f"(k a positive integer, kind one of {VALUE_KINDS})"
                )
            man = {"format": FORMAT, "version": VERSION, "meta": store_meta, "shards": []}
        else:
            store_meta = man["meta"]
            for key, v in new.items():
                if key in store_meta and store_meta[key] != v:
                    raise TeacherStoreError(
                        f"save(): meta[{key!r}] = {v!r} but the store at {root} has {store_meta[key]!r}"
                    )
            if "values_dtype" not in new and dtype != store_meta["values_dtype"] and seqs:
                raise TeacherStoreError(
                    f"save(): dtype={dtype!r} but the store at {root} holds {store_meta['values_dtype']} values"
                )
            store_meta = {**store_meta, **new}
        k, kind = int(store_meta["k"]), store_meta["kind"]
        if kinds and kinds != {kind}:
            raise TeacherStoreError(f"save(): the sequences are kind={kinds.pop()!r}, the store kind={kind!r}")
        if seqs:
            entry = _write_shard(root, len(man["shards"]), seqs, k, store_meta, shard_info)
            man["shards"].append(entry)
        man["meta"] = store_meta
        _write_json(root / MANIFEST, man)
        return sum(s["sequences"] for s in man["shards"])


def _write_shard(root: Path, number: int, seqs: list, k: int, meta: dict, shard_info: dict | None) -> dict:
    np_vt, pa_vt = VALUE_DTYPES[meta["values_dtype"]]
    vocab = meta.get("vocab_size")
    lengths = np.array([idx.shape[0] for idx, _, _ in seqs], np.int64)
    total = int(lengths.sum())
    if total > 2**31 - 1:
        raise TeacherStoreError(f"save(): {total} tokens in one append; at most 2**31 - 1 (append in parts)")
    ids = np.full((total, k), -1, np.int32)
    vals = np.full((total, k), -np.inf, np_vt)
    r = 0
    for i, (idx, val, _) in enumerate(seqs):
        T, kk = idx.shape
        if kk > k:
            raise TeacherStoreError(f"save(): sequence {i} has {kk} slots per row, the store's k is {k}")
        if val.shape != idx.shape:
            raise TeacherStoreError(f"save(): sequence {i} has indices {idx.shape} but values {val.shape}")
        if idx.dtype.kind not in "iu":
            raise TeacherStoreError(f"save(): sequence {i}'s indices are {idx.dtype}, not integers")
        if val.dtype.kind != "f":
            raise TeacherStoreError(f"save(): sequence {i}'s values are {val.dtype}, not floats")
        lo, hi = (int(idx.min()), int(idx.max()))
        top = (vocab if isinstance(vocab, int) else 2**31)
        if lo < -1 or hi >= top:
            bad = (idx < -1) | (idx >= top)
            row, col = np.argwhere(bad)[0]
            raise TeacherStoreError(
                f"save(): sequence {i} has id {int(idx[row, col])} at row {int(row)} (slot {int(col)}); ids are "
                f"-1 (unused) or in [0, {top})"
            )
        used = idx >= 0
        v = val.astype(np_vt)
        vbad = used & (np.isnan(v) | (np.isinf(v) & np.isfinite(val)) | (v == np.inf))
        if vbad.any():
            row, col = np.argwhere(vbad)[0]
            raise TeacherStoreError(
                f"save(): sequence {i} has value {float(val[row, col])!r} at row {int(row)} (slot {int(col)}): "
                f"NaN, +inf or beyond {meta['values_dtype']}'s range (save with dtype='float32')"
            )
        ids[r:r + T, :kk] = idx
        vals[r:r + T, :kk] = np.where(used, v, -np.inf)
        r += T
    offsets = np.zeros(len(seqs) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    off = pa.array(offsets)
    col_i = pa.ListArray.from_arrays(off, pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), k))
    col_v = pa.ListArray.from_arrays(off, pa.FixedSizeListArray.from_arrays(pa.array(vals.reshape(-1)), k))
    schema = _schema(k, pa_vt, meta)
    batch = pa.RecordBatch.from_arrays([col_i, col_v], schema=schema)
    name = f"shard-{number:05d}.arrow"
    tmp = root / (name + ".tmp")
    with open(tmp, "wb") as f:
        sink = _CrcFile(f)
        with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), schema) as w:
            w.write_batch(batch)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / name)
    _fsync_dir(root)
    entry = {"file": name, "sequences": len(seqs), "tokens": total, "bytes": sink.size, "crc32": sink.crc}
    if shard_info:
        entry.update({k_: v_ for k_, v_ in shard_info.items() if k_ not in entry})
    return entry


# ----------------------------------------------------------------------------------------------- reading


class _Part:
    """One record batch: its first sequence number, its offsets and its (rows, k) views."""

    __slots__ = ("start", "offsets", "indices", "values")

    def __init__(self, start: int, offsets: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
        self.start = start
        self.offsets = offsets
        self.indices = indices
        self.values = values


class TeacherStore:
    """A teacher store opened memory-mapped (:func:`fastdistill.teachers.load`).

    ``store[i]`` is sequence ``i`` as a :class:`~fastdistill.SparseTeacher` of shape ``(T_i, k)`` whose
    ``indices`` (int32) and ``values`` (float16 or float32) are read-only NumPy views of the mapped
    files: nothing is copied or read from disk until a loss reads them. ``len(store)``; ``store.meta``
    (a copy of the store's metadata: ``k``, ``kind``, ``values_dtype``, ``temperature``, and whatever
    the writer added: ``vocab_size``, ``source``, ``tokenizer``, ...); ``store.lengths`` (each
    sequence's ``T``); ``store.files`` (the shard files, in order: ``datasets.Dataset.from_file`` opens
    each). The views stay valid after the store object is gone (they hold the mapping)."""

    def __init__(self, root: Path, manifest: dict, parts: list[_Part], files: list[Path], tail: str) -> None:
        self.path = root
        self._meta = manifest["meta"]
        self._parts = parts
        self._starts = np.array([p.start for p in parts], np.int64)
        self._n = sum(s["sequences"] for s in manifest["shards"])
        self._tokens = sum(s["tokens"] for s in manifest["shards"])
        self.files = files
        self.tail = tail
        # check the tail against the kind once (SparseTeacher's own rules)
        SparseTeacher(np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float32), kind=self.kind, tail=tail)

    @property
    def meta(self) -> dict:
        return json.loads(json.dumps(self._meta))

    @property
    def k(self) -> int:
        return int(self._meta["k"])

    @property
    def kind(self) -> str:
        return str(self._meta["kind"])

    @property
    def temperature(self) -> float:
        return float(self._meta.get("temperature", 1.0))

    @property
    def num_tokens(self) -> int:
        return self._tokens

    @property
    def lengths(self) -> np.ndarray:
        if not self._parts:
            return np.zeros(0, np.int64)
        return np.concatenate([np.diff(p.offsets).astype(np.int64) for p in self._parts])

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> SparseTeacher:
        if isinstance(i, slice):
            raise TypeError("a TeacherStore is indexed by sequence number (an int); iterate for many")
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"a TeacherStore is indexed by sequence number (an int), got {type(i).__name__}")
        n = self._n
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"sequence {int(i)} is out of range for a store of {n} sequences")
        b = int(np.searchsorted(self._starts, j, side="right")) - 1
        p = self._parts[b]
        r = j - p.start
        o0, o1 = int(p.offsets[r]), int(p.offsets[r + 1])
        kw = {"temperature": self.temperature} if _TEMPERATURE_KW and self.temperature != 1.0 else {}
        return SparseTeacher(p.indices[o0:o1], p.values[o0:o1], kind=self.kind, tail=self.tail, **kw)

    def __iter__(self) -> Iterator[SparseTeacher]:
        for i in range(self._n):
            yield self[i]

    def __repr__(self) -> str:
        return (f"TeacherStore({str(self.path)!r}, sequences={self._n}, tokens={self._tokens}, k={self.k}, "
                f"kind={self.kind!r})")


def _damaged(path: Path, why: str) -> TeacherStoreError:
    return TeacherStoreError(f"the teacher store shard {path} is {why}")


def load(path: Any, *, tail: str = "renormalize", verify: bool = False) -> TeacherStore:
    """See :func:`fastdistill.teachers.load`."""
    root = Path(path)
    man = read_manifest(root)
    if man is None:
        raise TeacherStoreError(f"no teacher store at {root}")
    meta = man["meta"]
    k = int(meta["k"])
    np_vt, pa_vt = VALUE_DTYPES[meta["values_dtype"]]
    want_i = pa.list_(pa.list_(pa.int32(), k))
    want_v = pa.list_(pa.list_(pa_vt, k))
    parts: list[_Part] = []
    files: list[Path] = []
    start = 0
    for s in man["shards"]:
        f = root / s["file"]
        files.append(f)
        try:
            size = f.stat().st_size
        except OSError:
            raise _damaged(f, "missing")
        if size != s["bytes"]:
            raise _damaged(f, f"{size} bytes but the manifest records {s['bytes']}: truncated or replaced")
        try:
            mm = pa.memory_map(str(f), "r")
            if verify and zlib.crc32(memoryview(mm.read_buffer())) != s["crc32"]:
                raise _damaged(f, "damaged: its CRC-32 differs from the manifest's")
            mm.seek(0)
            reader = pa.ipc.open_stream(mm)
            schema = reader.schema
            batches = list(reader)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise _damaged(f, f"not a readable Arrow stream ({type(e).__name__}: {e})")
        names = schema.names
        if names[:2] != ["indices", "values"] or not schema.field("indices").type.equals(want_i) or \
                not schema.field("values").type.equals(want_v):
            raise _damaged(
                f, f"foreign: its columns are {schema} but this store's are indices {want_i}, values {want_v}"
            )
        if not schema.metadata or META_KEY not in schema.metadata:
            raise _damaged(f, "foreign: its schema has no fastdistill.teachers metadata")
        seqs = toks = 0
        for batch in batches:
            ci, cv = batch.column(0), batch.column(1)
            if ci.null_count or cv.null_count:
                raise _damaged(f, "damaged: it holds null sequences")
            oi = ci.offsets.to_numpy()
            ov = cv.offsets.to_numpy()
            fi = ci.values.flatten()
            fv = cv.values.flatten()
            if fi.null_count or fv.null_count:
                raise _damaged(f, "damaged: it holds null ids or values")
            try:
                idx = fi.to_numpy(zero_copy_only=True).reshape(-1, k)
                val = fv.to_numpy(zero_copy_only=True).reshape(-1, k)
            except (pa.ArrowException, ValueError) as e:
                raise _damaged(f, f"damaged ({e})")
            n = len(batch)
            if not np.array_equal(oi, ov) or oi.size != n + 1 or (n and (oi[0] < 0 or (np.diff(oi) < 1).any()
                                                                        or oi[-1] > idx.shape[0])):
                raise _damaged(f, "damaged: its sequence offsets are not consistent")
            if idx.shape[0] != val.shape[0]:
                raise _damaged(f, "damaged: its ids and values differ in length")
            parts.append(_Part(start + seqs, oi, idx, val))
            seqs += n
            toks += int(oi[-1] - oi[0]) if n else 0
        if seqs != s["sequences"] or toks != s["tokens"]:
            raise _damaged(
                f, f"holding {seqs} sequences / {toks} tokens but the manifest records {s['sequences']} / "
                f"{s['tokens']}"
            )
        start += seqs
    return TeacherStore(root, man, parts, files, tail)
