"""Readers: what vLLM, SGLang and axolotl emit, as :class:`fastdistill.SparseTeacher` objects.

Every reader returns int32 ids and float32 values (``kind="logprobs"``) whose row ``i`` is the teacher's
distribution over the token that follows position ``i``: the row that pairs with a causal LM's logits at
position ``i``. Within a row the slots are sorted by decreasing log-probability (ties: the lower id
first); unused slots hold id ``-1`` and value ``-inf``.

Only NumPy is imported here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import chain
from operator import attrgetter, itemgetter, methodcaller
from typing import Any

import numpy as np

from ..sparse import SparseTeacher
from ._errors import TeacherFormatError

INT32_MAX = 2**31 - 1
_LOGPROB_ATTR = attrgetter("logprob")  # vLLM's Logprob
_LOGPROB_ITEM = itemgetter("logprob")  # the server JSON's {"logprob": ...}
_VALUES = methodcaller("values")
_FIRST, _SECOND = itemgetter(0), itemgetter(1)  # SGLang's [logprob, token_id, text]


def _check_k(k: Any) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise TeacherFormatError(f"k must be a positive integer or None, got {k!r}")
    return int(k)


def _assemble(
    n_rows: int,
    rows: np.ndarray,
    ids: Any,
    vals: Any,
    k: int | None,
    *,
    what: str,
    pos_offset: int,
    unique: bool = False,
    merge_equal: bool = False,
    drop_neg_inf: bool = False,
) -> SparseTeacher:
    """The ``(n_rows, width)`` teacher of the entries ``(rows[e], ids[e], vals[e])``.

    ``rows`` are teacher rows; the emitted data's position of row ``r`` is ``r + pos_offset`` (errors
    name that position). ``unique``: the source cannot repeat an id within a position (skip that check);
    ``merge_equal``: an id listed twice with the same value is one entry (vLLM's FlatLogprobs);
    ``drop_neg_inf``: ``-inf`` entries are unused slots (axolotl's padding) instead of an error. Width:
    ``k``, or the most entries of any row (at least 1); entries beyond it are dropped by rank."""
    rows = np.asarray(rows, np.int64)
    try:
        vals = np.asarray(vals, np.float64)
    except (TypeError, ValueError):
        vals = _floats_or_raise(vals, rows, what, pos_offset)
    ids = _ids_or_raise(ids, rows, what, pos_offset)
    if not (rows.shape == ids.shape == vals.shape and rows.ndim == 1):
        raise TeacherFormatError(f"{what}: token ids and log-probabilities do not pair up")

    neg_inf = vals == -np.inf
    if neg_inf.any():
        if not drop_neg_inf:
            e = int(np.argmax(neg_inf))
            raise _value_error(what, rows[e] + pos_offset, ids[e], vals[e])
        keep = ~neg_inf
        rows, ids, vals = rows[keep], ids[keep], vals[keep]
    bad = ~(vals <= 0.0)  # NaN, +inf and positive values
    if bad.any():
        e = int(np.argmax(bad))
        raise _value_error(what, rows[e] + pos_offset, ids[e], vals[e])
    if ids.size and int(ids.min()) < 0:
        e = int(np.argmin(ids))
        raise TeacherFormatError(
            f"{what}: negative token id {int(ids[e])} at position {int(rows[e]) + pos_offset}",
            int(rows[e]) + pos_offset,
        )
    if ids.size and int(ids.max()) > INT32_MAX:
        e = int(np.argmax(ids))
        raise TeacherFormatError(
            f"{what}: token id {int(ids[e])} at position {int(rows[e]) + pos_offset} does not fit int32",
            int(rows[e]) + pos_offset,
        )

    if ids.size > 1 and not (unique and not merge_equal):
        key = rows * (INT32_MAX + 1) + ids
        order = np.argsort(key, kind="stable")
        ks = key[order]
        dup = np.flatnonzero(ks[1:] == ks[:-1])
        if dup.size:
            first, second = order[dup], order[dup + 1]
            same = vals[first] == vals[second]
            if not merge_equal or not same.all():
                j = int(np.argmin(same)) if merge_equal else 0
                a, b = int(first[j]), int(second[j])
                pos = int(rows[a]) + pos_offset
                if vals[a] == vals[b]:
                    detail = "twice"
                else:
                    detail = f"twice with different log-probabilities ({float(vals[a])!r} and {float(vals[b])!r})"
                raise TeacherFormatError(
                    f"{what}: token id {int(ids[a])} is listed {detail} at position {pos}", pos
                )
            keep = np.ones(ids.size, bool)
            keep[second] = False
            rows, ids, vals = rows[keep], ids[keep], vals[keep]

    return _ranked(n_rows, rows, ids, vals, k)


def _ranked(n_rows: int, rows: np.ndarray, ids: np.ndarray, vals: np.ndarray, k: int | None) -> SparseTeacher:
    """Per row the entries sorted by decreasing value (ties: the lower id), the first ``k`` kept (all
    when ``k`` is None), padded with id -1 and value -inf. One int64 key per entry, ``bits(float32(-v))
    << 31 | id`` (both fields non-negative, so integer order is (value, id) order), sorted within rows
    of a padded matrix."""
    if rows.size > 1 and (rows[1:] < rows[:-1]).any():
        order = np.argsort(rows, kind="stable")
        rows, ids, vals = rows[order], ids[order], vals[order]
    counts = np.bincount(rows, minlength=n_rows)
    widest = int(counts.max()) if counts.size else 0
    width = k if k is not None else max(1, widest)
    out_idx = np.full((n_rows, width), -1, np.int32)
    out_val = np.full((n_rows, width), -np.inf, np.float32)
    if rows.size == 0:
        return SparseTeacher(out_idx, out_val, kind="logprobs")
    starts = np.zeros(n_rows, np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    col = np.arange(rows.size, dtype=np.int64) - starts[rows]
    neg = (0.0 - vals).astype(np.float32)  # >= 0 and never -0.0 (values are <= 0 and not -inf here)
    key = (neg.view(np.int32).astype(np.int64) << 31) | ids
    empty = np.iinfo(np.int64).max
    mat = np.full((n_rows, widest), empty, np.int64)
    mat[rows, col] = key
    if widest > 1:
        mat.sort(axis=1)
    mat = mat[:, :width]
    used = mat != empty
    n = mat.shape[1]
    out_idx[:, :n] = np.where(used, mat & INT32_MAX, -1)
    bits = (mat >> 31).astype(np.int32)
    out_val[:, :n] = np.where(used, np.float32(0.0) - bits.view(np.float32), -np.inf)
    return SparseTeacher(out_idx, out_val, kind="logprobs")


def _value_error(what: str, pos: Any, tid: Any, v: Any) -> TeacherFormatError:
    pos = int(pos)
    reason = "not finite" if not math.isfinite(float(v)) else "above 0"
    return TeacherFormatError(
        f"{what}: the log-probability of token {int(tid)} at position {pos} is {float(v)!r} ({reason}; "
        "a log-probability is finite and <= 0)",
        pos,
    )


def _floats_or_raise(vals: Any, rows: np.ndarray, what: str, pos_offset: int) -> np.ndarray:
    out = np.empty(len(vals), np.float64)
    for e, v in enumerate(vals):
        try:
            if isinstance(v, (str, bytes, bool)) or v is None:
                raise TypeError
            out[e] = float(v)
        except (TypeError, ValueError):
            pos = int(rows[e]) + pos_offset
            raise TeacherFormatError(f"{what}: log-probability {v!r} at position {pos} is not a number", pos)
    return out


def _ids_or_raise(ids: Any, rows: np.ndarray, what: str, pos_offset: int) -> np.ndarray:
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        return ids.astype(np.int64, copy=False)
    try:
        arr = np.asarray(ids)
        if arr.size == 0:
            return np.zeros(0, np.int64)
        if arr.dtype.kind in "iu":
            return arr.astype(np.int64, copy=False)
        if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
            return arr.astype(np.int64)
        if arr.dtype.kind == "U":  # JSON's string ids: parsed in C
            return arr.astype(np.int64)
        if arr.dtype.kind == "O":
            return np.asarray([_one_id(x) for x in ids], np.int64)
    except (TypeError, ValueError, OverflowError):
        pass
    for e, x in enumerate(ids):  # find the offending one
        try:
            _one_id(x)
        except (TypeError, ValueError, OverflowError):
            pos = int(rows[e]) + pos_offset
            raise TeacherFormatError(f"{what}: token id {x!r} at position {pos} is not an integer", pos)
    raise TeacherFormatError(f"{what}: token ids are not integers")


def _one_id(x: Any) -> int:
    if isinstance(x, bool):
        raise TypeError
    if isinstance(x, (int, np.integer)):
        v = int(x)
    elif isinstance(x, str):
        s = x.strip()
        if not s or not (s.isdigit() or (s[0] in "+-" and s[1:].isdigit())):
            raise ValueError
        v = int(s)
    elif isinstance(x, (float, np.floating)) and float(x).is_integer():
        v = int(x)
    else:
        raise TypeError
    if abs(v) > 2**62:
        raise OverflowError
    return v


def _logprob_values(vs: list, rows: np.ndarray, what: str, pos_offset: int) -> Any:
    """The floats of vLLM's per-entry values: ``Logprob`` objects (``.logprob``), JSON objects
    (``{"logprob": ...}``) or bare numbers."""
    if not vs:
        return []
    try:
        return [v.logprob for v in vs]
    except AttributeError:
        pass
    try:
        return [v["logprob"] for v in vs]
    except (TypeError, KeyError, IndexError):
        pass
    out = []
    for e, v in enumerate(vs):
        if hasattr(v, "logprob"):
            out.append(v.logprob)
        elif isinstance(v, Mapping) and "logprob" in v:
            out.append(v["logprob"])
        elif isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            out.append(v)
        else:
            pos = int(rows[e]) + pos_offset
            raise TeacherFormatError(
                f"{what}: the entry {v!r} at position {pos} is not a Logprob, "
                "a {'logprob': ...} object or a number",
                pos,
            )
    return out


def _is_flat_logprobs(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("start_indices", "end_indices", "token_ids", "logprobs"))


def _unwrap_vllm(obj: Any) -> Any:
    if _is_flat_logprobs(obj):
        return obj
    if isinstance(obj, Mapping):
        if "choices" in obj:
            choices = obj["choices"]
            if not isinstance(choices, Sequence) or len(choices) != 1:
                n = len(choices) if isinstance(choices, Sequence) else "no"
                raise TeacherFormatError(
                    f"from_vllm: the response has {n} choices; pass one choice's prompt_logprobs"
                )
            obj = choices[0]
        if isinstance(obj, Mapping):
            if "prompt_logprobs" not in obj:
                raise TeacherFormatError(
                    "from_vllm: no 'prompt_logprobs' in the response (request them with prompt_logprobs=k)"
                )
            obj = obj["prompt_logprobs"]
    elif hasattr(obj, "prompt_logprobs") and not isinstance(obj, (list, tuple)):
        obj = obj.prompt_logprobs  # a RequestOutput
    if obj is None:
        raise TeacherFormatError(
            "from_vllm: prompt_logprobs is None (request them with SamplingParams(prompt_logprobs=k) or the "
            "server's prompt_logprobs=k)"
        )
    return obj


def from_vllm(prompt_logprobs: Any, *, k: int | None = None, prompt_token_ids: Any = None) -> SparseTeacher:
    """vLLM's prompt log-probabilities as a :class:`~fastdistill.SparseTeacher`.

    ``prompt_logprobs`` is what vLLM returns for a prompt of ``T`` tokens, in any of its forms:

    - ``RequestOutput.prompt_logprobs`` (or the ``RequestOutput`` itself): a list whose first entry is
      ``None``, then per prompt position ``j`` a dict ``{token_id: Logprob(logprob, rank,
      decoded_token)}`` holding the top-k and, when it is not among them, the prompt token itself;
    - the same decoded from the OpenAI-compatible server's JSON: ``choices[i]["prompt_logprobs"]`` (or
      the choice, or a response with one choice), string ids and ``{"logprob": ...}`` values;
    - ``vllm.logprobs.FlatLogprobs`` (``start_indices``, ``end_indices``, ``token_ids``, ``logprobs``):
      a prompt token that is also in the top-k is listed twice there; the same id with the same value
      is one entry, with another value an error.

    **Alignment (the usual causal shift).** Row ``i`` of the result is the teacher's distribution over
    the token that follows position ``i`` -- vLLM's entry ``i + 1`` -- so it pairs with a causal LM's
    logits at position ``i``. The result has ``T`` rows, like the student's logits for the same
    ``T`` tokens; the last row has no entries (vLLM scores prompt tokens, not the token after the
    prompt): mask it as the shifted labels do (``-100``).

    ``k``: the slots per row; entries beyond ``k`` are dropped by rank (highest log-probability first,
    ties: the lower id), rows with fewer entries pad with id ``-1`` (value ``-inf``). ``None``: as many
    slots as the fullest row (``k`` or ``k + 1``). ``prompt_token_ids``: the prompt's tokens; when given,
    each position must list its own prompt token (vLLM always does), which proves the alignment.

    Returns int32 ids and float32 values, ``kind="logprobs"``. Malformed input (a first entry that is
    not ``None``, a missing position, a non-finite or positive log-probability, a repeated id) raises
    :class:`TeacherFormatError` naming the position.
    """
    k = _check_k(k)
    pl = _unwrap_vllm(prompt_logprobs)
    what = "vLLM prompt_logprobs"
    if _is_flat_logprobs(pl):
        return _from_vllm_flat(pl, k, prompt_token_ids, what)
    if isinstance(pl, (str, bytes)) or not isinstance(pl, Sequence):
        raise TeacherFormatError(f"{what}: expected a list (first entry None), got {type(pl).__name__}")
    T = len(pl)
    if T == 0:
        raise TeacherFormatError(f"{what}: empty (a prompt has at least one token)")
    if pl[0]:
        raise TeacherFormatError(
            f"{what}: position 0 holds {type(pl[0]).__name__} entries; vLLM gives None for the first prompt "
            "token (nothing predicts it). Pass the whole list, first entry included",
            0,
        )
    toks = _token_list(prompt_token_ids, T, what)
    body = pl[1:]
    for j, d in enumerate(body, 1):
        if not d:
            raise TeacherFormatError(f"{what}: position {j} has no entries (None or empty): a missing position", j)
        if not isinstance(d, Mapping):
            raise TeacherFormatError(
                f"{what}: position {j} is a {type(d).__name__}, not a dict {{token_id: Logprob}}", j
            )
        if toks is not None:
            t = toks[j]
            if t not in d and str(t) not in d:
                raise TeacherFormatError(
                    f"{what}: position {j} does not list the prompt's token {t} (vLLM lists it at every "
                    "position): the log-probabilities are not those of these tokens",
                    j,
                )
    counts = np.fromiter(map(len, body), np.int64, T - 1)
    n = int(counts.sum())
    rows = np.repeat(np.arange(T - 1, dtype=np.int64), counts)
    keys = list(chain.from_iterable(body))
    ids: Any = np.asarray(keys) if n else np.zeros(0, np.int64)
    # integer keys of dicts cannot repeat; string ids ("7", "07") can, and are checked
    unique = ids.dtype.kind in "iu" and ids.dtype != np.uint64
    if not unique:
        ids = keys
    vals: Any = None
    for get in (_LOGPROB_ATTR, _LOGPROB_ITEM):
        try:
            vals = np.fromiter(map(get, chain.from_iterable(map(_VALUES, body))), np.float64, n)
            break
        except (AttributeError, TypeError, KeyError, IndexError, ValueError):
            pass
    if vals is None:
        vals = _logprob_values(list(chain.from_iterable(map(_VALUES, body))), rows, what, 1)
    return _assemble(T, rows, ids, vals, k, what=what, pos_offset=1, unique=unique)


def _from_vllm_flat(fl: Any, k: int | None, prompt_token_ids: Any, what: str) -> SparseTeacher:
    what = "vLLM FlatLogprobs"
    try:
        starts = np.asarray(fl.start_indices, np.int64)
        ends = np.asarray(fl.end_indices, np.int64)
        tids = np.asarray(fl.token_ids, np.int64)
        vals = np.asarray(fl.logprobs, np.float64)
    except (TypeError, ValueError) as e:
        raise TeacherFormatError(f"{what}: its lists are not numbers ({e})")
    T = starts.size
    if T == 0:
        raise TeacherFormatError(f"{what}: empty (a prompt has at least one token)")
    if ends.size != T or starts.ndim != 1:
        raise TeacherFormatError(f"{what}: {T} start indices but {ends.size} end indices")
    if tids.size != vals.size:
        raise TeacherFormatError(f"{what}: {tids.size} token ids but {vals.size} log-probabilities")
    n = ends - starts
    bad = (n < 0) | (starts < 0) | (ends > tids.size)
    if bad.any():
        j = int(np.argmax(bad))
        raise TeacherFormatError(f"{what}: position {j} has the range [{starts[j]}, {ends[j]})", j)
    if n[0] != 0:
        raise TeacherFormatError(
            f"{what}: position 0 has {n[0]} entries; vLLM gives none for the first prompt token. Pass the "
            "whole container, first position included",
            0,
        )
    if T > 1 and (n[1:] == 0).any():
        j = 1 + int(np.argmax(n[1:] == 0))
        raise TeacherFormatError(f"{what}: position {j} has no entries: a missing position", j)
    # the entry indices of positions 1..T-1, in order
    m = n[1:]
    total = int(m.sum())
    rows = np.repeat(np.arange(T - 1, dtype=np.int64), m)
    if total:
        first = np.repeat(starts[1:] - np.concatenate(([0], np.cumsum(m)[:-1])), m)
        src = first + np.arange(total, dtype=np.int64)
    else:
        src = np.zeros(0, np.int64)
    ids, vs = tids[src], vals[src]
    toks = _token_list(prompt_token_ids, T, what)
    if toks is not None and T > 1:
        hit = ids == np.asarray(toks[1:], np.int64)[rows]
        listed = np.zeros(T - 1, bool)
        np.logical_or.at(listed, rows[hit], True)
        if not listed.all():
            j = 1 + int(np.argmin(listed))
            raise TeacherFormatError(
                f"{what}: position {j} does not list the prompt's token {toks[j]} (vLLM lists it at every "
                "position): the log-probabilities are not those of these tokens",
                j,
            )
    return _assemble(T, rows, ids, vs, k, what=what, pos_offset=1, merge_equal=True)


def _token_list(tokens: Any, T: int, what: str) -> list[int] | None:
    if tokens is None:
        return None
    toks = [int(t) for t in tokens]
    if len(toks) != T:
        raise TeacherFormatError(
            f"{what}: covers {T} positions but prompt_token_ids has {len(toks)} tokens"
        )
    return toks


def from_sglang(meta_info: Any, *, k: int | None = None, prompt_token_ids: Any = None) -> SparseTeacher:
    """SGLang's prompt top log-probabilities as a :class:`~fastdistill.SparseTeacher`.

    ``meta_info`` is the ``meta_info`` of an SGLang ``/generate`` answer (or the answer itself, or its
    ``input_top_logprobs`` list) for a request with ``return_logprob=True``, ``top_logprobs_num=k`` and
    ``logprob_start_len=0``: ``input_top_logprobs`` holds per prompt position ``None`` (the first) or a
    list of ``[logprob, token_id, text]`` (``text`` ``None`` unless ``return_text_in_logprobs``). The
    flat form of newer servers (``return_flat_raw_top_logprobs``: ``input_top_logprobs_val_flat`` /
    ``_idx_flat`` or their ``_b64`` variants, ``input_top_logprobs_shape``,
    ``input_top_logprobs_null_prefix``) is read too.

    **Alignment (the usual causal shift).** Row ``i`` of the result is the teacher's distribution over
    the token that follows position ``i`` -- SGLang's entry ``i + 1`` -- so it pairs with a causal LM's
    logits at position ``i``. The result has ``T`` rows for a prompt of ``T`` tokens; the last row has
    no entries (SGLang reports the distribution after the prompt as the first output token's, not as a
    prompt position): mask it as the shifted labels do (``-100``).

    ``k``: slots per row (entries beyond it dropped by rank, fewer padded with id ``-1``); ``None``:
    as many as the fullest row. ``prompt_token_ids``: when given, ``meta_info["input_token_logprobs"]``
    (if present) must name exactly these tokens and ``prompt_tokens`` their count. A position that is
    missing (``logprob_start_len`` other than 0, a ``None`` after the first), a non-finite or positive
    log-probability or a repeated id raises :class:`TeacherFormatError` naming the position.
    """
    k = _check_k(k)
    what = "SGLang input_top_logprobs"
    mi = meta_info
    if isinstance(mi, Mapping) and "meta_info" in mi and isinstance(mi["meta_info"], Mapping):
        mi = mi["meta_info"]
    if isinstance(mi, Mapping):
        n_prompt = mi.get("prompt_tokens")
        if "input_top_logprobs_shape" in mi:
            itl = None
        elif "input_top_logprobs" in mi and mi["input_top_logprobs"] is not None:
            itl = mi["input_top_logprobs"]
        else:
            raise TeacherFormatError(
                f"{what}: not in meta_info (request with return_logprob=True, top_logprobs_num=k, "
                "logprob_start_len=0)"
            )
        _check_sglang_tokens(mi, prompt_token_ids, what)
    elif isinstance(mi, Sequence) and not isinstance(mi, (str, bytes)):
        n_prompt, itl = None, mi
    else:
        raise TeacherFormatError(f"{what}: expected SGLang's meta_info dict, got {type(mi).__name__}")
    if itl is None:
        return _from_sglang_flat(mi, k, n_prompt, prompt_token_ids)

    T = len(itl)
    if T == 0:
        raise TeacherFormatError(f"{what}: empty (a prompt has at least one token)")
    expected = n_prompt if n_prompt is not None else (
        len(prompt_token_ids) if prompt_token_ids is not None else None)
    if expected is not None and int(expected) != T:
        raise TeacherFormatError(
            f"{what}: covers {T} positions but the prompt has {int(expected)} tokens (positions missing: "
            "request with logprob_start_len=0)"
        )
    if itl[0]:
        raise TeacherFormatError(
            f"{what}: position 0 holds entries; SGLang gives None for the first prompt token with "
            "logprob_start_len=0 (nothing predicts it). Pass the whole list, first entry included",
            0,
        )
    counts = np.empty(T - 1, np.int64)
    for j in range(1, T):
        e = itl[j]
        if not e:
            raise TeacherFormatError(f"{what}: position {j} has no entries (None or empty): a missing position", j)
        if isinstance(e, (str, bytes, Mapping)) or not isinstance(e, Sequence):
            raise TeacherFormatError(f"{what}: position {j} is a {type(e).__name__}, not a list of "
                                     "[logprob, token_id, text]", j)
        counts[j - 1] = len(e)
    rows = np.repeat(np.arange(T - 1, dtype=np.int64), counts)
    n = int(counts.sum())
    body = itl[1:]
    try:
        ids = np.asarray(list(map(_SECOND, chain.from_iterable(body))))
        vs = np.fromiter(map(_FIRST, chain.from_iterable(body)), np.float64, n)
    except (TypeError, IndexError, KeyError, ValueError):
        flat = list(chain.from_iterable(body))
        for e, t in enumerate(flat):
            if isinstance(t, (str, bytes, Mapping)) or not isinstance(t, Sequence) or len(t) < 2:
                pos = int(rows[e]) + 1
                raise TeacherFormatError(f"{what}: entry {t!r} at position {pos} is not [logprob, token_id, "
                                         "text]", pos)
        ids, vs = [t[1] for t in flat], [t[0] for t in flat]
    return _assemble(T, rows, ids, vs, k, what=what, pos_offset=1)


def _check_sglang_tokens(mi: Mapping, tokens: Any, what: str) -> None:
    if tokens is None:
        return
    toks = [int(t) for t in tokens]
    n = mi.get("prompt_tokens")
    if n is not None and int(n) != len(toks):
        raise TeacherFormatError(f"{what}: the server counted {n} prompt tokens, prompt_token_ids has {len(toks)}")
    itl = mi.get("input_token_logprobs")
    if itl:
        try:
            got = [int(t[1]) for t in itl]
        except (TypeError, ValueError, IndexError):
            raise TeacherFormatError(f"{what}: input_token_logprobs is not a list of [logprob, token_id, text]")
        if got != toks:
            j = next((j for j, (a, b) in enumerate(zip(got, toks)) if a != b), min(len(got), len(toks)))
            raise TeacherFormatError(
                f"{what}: the server scored other tokens than prompt_token_ids (first difference at position "
                f"{j}): the log-probabilities are not those of these tokens",
                j,
            )


def _from_sglang_flat(mi: Mapping, k: int | None, n_prompt: Any, tokens: Any) -> SparseTeacher:
    import base64

    what = "SGLang flat input_top_logprobs"
    try:
        rows_n, kk = (int(x) for x in mi["input_top_logprobs_shape"])
        null_prefix = int(mi.get("input_top_logprobs_null_prefix", 0))
        if "input_top_logprobs_val_flat_b64" in mi:
            vdt = np.dtype(mi.get("input_top_logprobs_val_flat_b64_dtype", "float32")).newbyteorder("<")
            idt = np.dtype(mi.get("input_top_logprobs_idx_flat_b64_dtype", "int32")).newbyteorder("<")
            vals = np.frombuffer(base64.b64decode(mi["input_top_logprobs_val_flat_b64"]), vdt)
            ids = np.frombuffer(base64.b64decode(mi["input_top_logprobs_idx_flat_b64"]), idt)
        else:
            vals = np.asarray(mi["input_top_logprobs_val_flat"], np.float64)
            ids = np.asarray(mi["input_top_logprobs_idx_flat"])
    except (KeyError, TypeError, ValueError) as e:
        raise TeacherFormatError(f"{what}: malformed ({type(e).__name__}: {e})")
    if rows_n < 0 or kk < 0 or vals.size != rows_n * kk or ids.size != rows_n * kk:
        raise TeacherFormatError(
            f"{what}: shape [{rows_n}, {kk}] but {vals.size} values and {ids.size} ids"
        )
    T = null_prefix + rows_n
    expected = n_prompt if n_prompt is not None else (len(tokens) if tokens is not None else None)
    if expected is not None and int(expected) != T:
        raise TeacherFormatError(
            f"{what}: covers {T} positions but the prompt has {int(expected)} tokens (positions missing: "
            "request with logprob_start_len=0)"
        )
    if null_prefix != 1:
        raise TeacherFormatError(
            f"{what}: {null_prefix} leading positions without entries; with logprob_start_len=0 only position "
            "0 has none" + (": a missing position" if null_prefix > 1 else ""),
            1 if null_prefix > 1 else 0,
        )
    if T == 0:
        raise TeacherFormatError(f"{what}: empty (a prompt has at least one token)")
    rows = np.repeat(np.arange(rows_n, dtype=np.int64), kk)  # position null_prefix + r -> row r
    return _assemble(T, rows, ids, vals, k, what=what, pos_offset=1)


def from_axolotl(logprobs: Any, target_token_ids: Any) -> SparseTeacher:
    """axolotl's KD dataset columns as a :class:`~fastdistill.SparseTeacher`.

    ``logprobs`` (axolotl's ``target_logprobs``) and ``target_token_ids``: ``[T][K]`` nested lists (rows
    may differ in length) or 2-D arrays/tensors of one sequence, as axolotl's KD prompt strategies write
    them (top-k log-probabilities already renormalised over the top-k and re-temperatured as
    ``p ** (T_gen / T_kd)``).

    **Alignment.** Rows are kept as axolotl aligns them: row ``t`` is the one axolotl's fused top-k loss
    pairs with the student's logits at position ``t`` (it shifts the labels, not the teacher's rows), so
    it is already the distribution for the token that follows position ``t`` in the causal-LM sense; no
    shift is applied here. axolotl's padding rows (``-inf`` with ids ``0..K-1``) and any ``-inf`` entry
    become unused slots (id ``-1``).

    Width: the longest row (shorter rows pad with ``-1``); slots sorted by decreasing log-probability.
    NaN, ``+inf`` or positive log-probabilities, a repeated id within a row, or rows of the two columns
    that differ in length raise :class:`TeacherFormatError` naming the position.
    """
    what = "axolotl target_logprobs/target_token_ids"
    lp = _as_rows(logprobs, what, "logprobs")
    ti = _as_rows(target_token_ids, what, "target_token_ids")
    if isinstance(lp, np.ndarray) and isinstance(ti, np.ndarray):
        if lp.shape != ti.shape:
            raise TeacherFormatError(
                f"{what}: logprobs has shape {lp.shape}, target_token_ids {ti.shape}; they must be equal"
            )
        T, K = lp.shape
        if T == 0:
            raise TeacherFormatError(f"{what}: no positions")
        rows = np.repeat(np.arange(T, dtype=np.int64), K)
        return _assemble(T, rows, ti.reshape(-1), lp.reshape(-1), None, what=what, pos_offset=0,
                         drop_neg_inf=True)
    T = len(lp)
    if len(ti) != T:
        raise TeacherFormatError(f"{what}: logprobs has {T} positions, target_token_ids {len(ti)}")
    if T == 0:
        raise TeacherFormatError(f"{what}: no positions")
    counts = np.empty(T, np.int64)
    for t in range(T):
        a, b = lp[t], ti[t]
        if a is None or b is None or isinstance(a, (str, bytes)) or isinstance(b, (str, bytes)):
            raise TeacherFormatError(f"{what}: position {t} is not a list of numbers", t)
        if len(a) != len(b):
            raise TeacherFormatError(
                f"{what}: position {t} has {len(a)} log-probabilities but {len(b)} token ids", t
            )
        counts[t] = len(a)
    rows = np.repeat(np.arange(T, dtype=np.int64), counts)
    vals = [v for row in lp for v in row]
    ids = [v for row in ti for v in row]
    return _assemble(T, rows, ids, vals, None, what=what, pos_offset=0, drop_neg_inf=True)


def _as_rows(x: Any, what: str, name: str) -> Any:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.ndim != 2:
            raise TeacherFormatError(f"{what}: {name} must be [T][K] (one sequence), got shape {x.shape}")
        return x
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TeacherFormatError(f"{what}: {name} must be [T][K] lists or a 2-D array, got {type(x).__name__}")
    return x
