"""fastdistill.teachers: the readers of vLLM, SGLang and axolotl output (payloads shaped as each project
emits them, the causal alignment, truncation by rank, malformed input) and the teacher store (memory-
mapped views, appends, the size bound, truncated and foreign files, HF datasets)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

import fastdistill as fd
from fastdistill.teachers import (
    TeacherFormatError,
    TeacherStoreError,
    from_axolotl,
    from_sglang,
    from_vllm,
)
from fastdistill.teachers._stub import (
    TinyTeacher,
    flat_logprobs,
    sglang_response,
    vllm_prompt_logprobs,
    vllm_response,
)

NEG = -np.inf


# --------------------------------------------------------------------------------------------- fixtures
# Written from the projects' sources: vLLM's Logprob dataclass (vllm/logprobs.py) and its
# append_logprobs_for_next_position (the prompt token first, with its vocabulary rank, then the top-k with
# ranks 1..k; merged into a dict, kept twice in FlatLogprobs); the OpenAI-compatible server's
# choices[i].prompt_logprobs (string ids, Logprob serialised as an object); SGLang's meta_info
# (input_top_logprobs: None first, then [logprob, token_id, text] lists); axolotl's KD prompt strategy
# (target_logprobs / target_token_ids, -inf rows with ids range(K) as padding).


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# a 4-token prompt [11, 7, 3, 7] scored with prompt_logprobs=2
VLLM_REQUEST_OUTPUT = [
    None,
    {7: Logprob(-0.5, 1, "b"), 2: Logprob(-1.25, 2, "c")},                       # 7 is in the top-2
    {3: Logprob(-3.0, 5, "d"), 9: Logprob(-0.25, 1, "e"), 4: Logprob(-2.0, 2, "f")},  # 3 is not
    {7: Logprob(-1.0, 2, "b"), 5: Logprob(-0.75, 1, "g")},
]
VLLM_EXPECTED_IDX = [[7, 2], [9, 4], [5, 7], [-1, -1]]
VLLM_EXPECTED_VAL = [[-0.5, -1.25], [-0.25, -2.0], [-0.75, -1.0], [NEG, NEG]]

VLLM_SERVER_JSON = """{"id":"cmpl-9f2","object":"text_completion","created":1733000000,"model":"Qwen/Qwen2.5-0.5B",
"choices":[{"index":0,"text":"abcdbx","logprobs":null,"finish_reason":"length","stop_reason":null,
"prompt_logprobs":[null,
 {"7":{"logprob":-0.5,"rank":1,"decoded_token":"b"},"2":{"logprob":-1.25,"rank":2,"decoded_token":"c"}},
 {"3":{"logprob":-3.0,"rank":5,"decoded_token":"d"},"9":{"logprob":-0.25,"rank":1,"decoded_token":"e"},
  "4":{"logprob":-2.0,"rank":2,"decoded_token":"f"}},
 {"7":{"logprob":-1.0,"rank":2,"decoded_token":"b"},"5":{"logprob":-0.75,"rank":1,"decoded_token":"g"}}]}],
"usage":{"prompt_tokens":4,"total_tokens":5,"completion_tokens":1}}"""

SGLANG_META_JSON = """{"text":"x","output_ids":[42],"meta_info":{"id":"3f1","finish_reason":{"type":"length",
"length":1},"prompt_tokens":4,"completion_tokens":1,"cached_tokens":0,
"input_token_logprobs":[[null,11,null],[-0.5,7,null],[-3.0,3,null],[-1.0,7,null]],
"output_token_logprobs":[[-0.1,42,null]],
"input_top_logprobs":[null,[[-0.5,7,null],[-1.25,2,null]],[[-0.25,9,null],[-2.0,4,null]],
 [[-0.75,5,null],[-1.0,7,null]]],
"output_top_logprobs":[[[-0.1,42,null],[-2.5,1,null]]]}}"""


def _arrays(t):
    return np.asarray(t.indices), np.asarray(t.values)


def _check(t, idx, val):
    i, v = _arrays(t)
    assert i.dtype == np.int32 and v.dtype == np.float32 and t.kind == "logprobs"
    np.testing.assert_array_equal(i, np.asarray(idx, np.int32))
    np.testing.assert_array_equal(v, np.asarray(val, np.float32))


def test_import_is_light():
    code = ("import sys, fastdistill.teachers as T; "
            "print(sorted(m for m in ('pyarrow', 'httpx', 'tqdm', 'msgspec', 'datasets', 'numba', 'torch', 'asyncio') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_vllm_request_output():
    _check(from_vllm(VLLM_REQUEST_OUTPUT, k=2), VLLM_EXPECTED_IDX, VLLM_EXPECTED_VAL)

    class RequestOutput:  # the object itself
        prompt_logprobs = VLLM_REQUEST_OUTPUT

    _check(from_vllm(RequestOutput(), k=2), VLLM_EXPECTED_IDX, VLLM_EXPECTED_VAL)
    # k=None: as many slots as the fullest position (k + 1 where the prompt token is outside the top-k)
    t = from_vllm(VLLM_REQUEST_OUTPUT)
    _check(t, [[7, 2, -1], [9, 4, 3], [5, 7, -1], [-1, -1, -1]],
           [[-0.5, -1.25, NEG], [-0.25, -2.0, -3.0], [-0.75, -1.0, NEG], [NEG, NEG, NEG]])
    # more slots than entries: padded with -1
    t = from_vllm(VLLM_REQUEST_OUTPUT, k=4)
    assert t.shape == (4, 4) and (np.asarray(t.indices)[0, 2:] == -1).all()


def test_vllm_server_json():
    resp = json.loads(VLLM_SERVER_JSON)
    for form in (resp, resp["choices"][0], resp["choices"][0]["prompt_logprobs"]):
        _check(from_vllm(form, k=2), VLLM_EXPECTED_IDX, VLLM_EXPECTED_VAL)
    # the prompt's own tokens are listed at each position: the alignment check passes, a shifted list fails
    from_vllm(resp, k=2, prompt_token_ids=[11, 7, 3, 7])
    with pytest.raises(TeacherFormatError, match="position 1 does not list the prompt's token 3"):
        from_vllm(resp, k=2, prompt_token_ids=[11, 3, 7, 7])


def test_vllm_flat_logprobs():
    from fastdistill.teachers._stub import FlatLogprobs

    fl = FlatLogprobs()
    fl.append_fast([], [], [], [])  # position 0: None
    fl.append_fast([7, 7, 2], [-0.5, -0.5, -1.25], [1, 1, 2], ["b", "b", "c"])  # prompt token 7 listed twice
    fl.append_fast([3, 9, 4], [-3.0, -0.25, -2.0], [5, 1, 2], ["d", "e", "f"])
    fl.append_fast([7, 5, 7], [-1.0, -0.75, -1.0], [2, 1, 2], ["b", "g", "b"])
    _check(from_vllm(fl, k=2), VLLM_EXPECTED_IDX, VLLM_EXPECTED_VAL)
    assert from_vllm(fl).shape == (4, 3)  # the twice-listed id is one entry
    from_vllm(fl, k=2, prompt_token_ids=[11, 7, 3, 7])
    fl.logprobs[1] = -0.6  # the same id with another value
    with pytest.raises(TeacherFormatError, match="token id 7 is listed twice with different log-probabilities "
                       r"\(-0.5 and -0.6\) at position 1") as e:
        from_vllm(fl, k=2)
    assert e.value.position == 1


def test_sglang_meta_info():
    resp = json.loads(SGLANG_META_JSON)
    for form in (resp, resp["meta_info"], resp["meta_info"]["input_top_logprobs"]):
        _check(from_sglang(form, k=2), VLLM_EXPECTED_IDX, VLLM_EXPECTED_VAL)
    _check(from_sglang(resp), VLLM_EXPECTED_IDX, VLLM_EXPECTED_VAL)
    from_sglang(resp, prompt_token_ids=[11, 7, 3, 7])
    with pytest.raises(TeacherFormatError, match="scored other tokens"):
        from_sglang(resp, prompt_token_ids=[11, 7, 3, 8])
    # with text (return_text_in_logprobs=True) and as tuples (the Python engine's form)
    mi = resp["meta_info"]
    mi["input_top_logprobs"] = [None] + [[(v, i, f"<{i}>") for v, i, _ in row] for row in mi["input_top_logprobs"][1:]]
    _check(from_sglang(mi, k=2), VLLM_EXPECTED_IDX, VLLM_EXPECTED_VAL)


def test_sglang_flat_fields():
    # return_flat_raw_top_logprobs: the rows after the leading None, row-major; shape [rows, k]
    val = [-0.5, -1.25, -0.25, -2.0, -0.75, -1.0]
    idx = [7, 2, 9, 4, 5, 7]
    mi = {"prompt_tokens": 4, "input_top_logprobs_val_flat": val, "input_top_logprobs_idx_flat": idx,
          "input_top_logprobs_shape": [3, 2], "input_top_logprobs_null_prefix": 1}
    _check(from_sglang(mi, k=2), VLLM_EXPECTED_IDX, VLLM_EXPECTED_VAL)
    b64 = {"prompt_tokens": 4, "input_top_logprobs_shape": [3, 2], "input_top_logprobs_null_prefix": 1,
           "input_top_logprobs_val_flat_b64": base64.b64encode(np.asarray(val, "<f4").tobytes()).decode(),
           "input_top_logprobs_idx_flat_b64": base64.b64encode(np.asarray(idx, "<i4").tobytes()).decode(),
           "input_top_logprobs_val_flat_b64_dtype": "float32", "input_top_logprobs_idx_flat_b64_dtype": "int32"}
    _check(from_sglang({"meta_info": b64}, k=2), VLLM_EXPECTED_IDX, VLLM_EXPECTED_VAL)
    with pytest.raises(TeacherFormatError, match="covers 4 positions but the prompt has 5"):
        from_sglang({**mi, "prompt_tokens": 5})
    with pytest.raises(TeacherFormatError, match="missing position"):
        from_sglang({**mi, "input_top_logprobs_null_prefix": 2, "prompt_tokens": 5})


def test_axolotl_columns():
    # axolotl pads with -inf rows whose ids are range(K); rows may be ragged; rows are kept as given
    logprobs = [[NEG, NEG], [-0.25, -2.0], [-0.75], [-1.0, -0.5]]
    ids = [[0, 1], [9, 4], [5], [7, 2]]
    _check(from_axolotl(logprobs, ids), [[-1, -1], [9, 4], [5, -1], [2, 7]],
           [[NEG, NEG], [-0.25, -2.0], [-0.75, NEG], [-0.5, -1.0]])
    torch = pytest.importorskip("torch")
    a = torch.tensor([[-0.25, -2.0], [NEG, NEG]])
    b = torch.tensor([[9, 4], [0, 1]])
    _check(from_axolotl(a, b), [[9, 4], [-1, -1]], [[-0.25, -2.0], [NEG, NEG]])
    with pytest.raises(TeacherFormatError, match="position 1 has 2 log-probabilities but 1 token ids"):
        from_axolotl([[-1.0], [-1.0, -2.0]], [[3], [4]])
    with pytest.raises(TeacherFormatError, match="3 positions, target_token_ids 2"):
        from_axolotl([[-1.0]] * 3, [[1]] * 2)


def test_a_certain_token():
    t = from_vllm([None, {4: Logprob(-1e-9), 1: Logprob(0.0), 2: Logprob(-30.0)}], k=2)
    _check(t, [[1, 4], [-1, -1]], [[0.0, -1e-9], [NEG, NEG]])
    assert not np.signbit(np.asarray(t.values)[0, 0])


def test_truncation_by_rank_ties_to_the_lower_id():
    pl = [None, {9: Logprob(-1.0), 3: Logprob(-1.0), 5: Logprob(-0.5), 1: Logprob(-4.0)}]
    _check(from_vllm(pl, k=2), [[5, 3], [-1, -1]], [[-0.5, -1.0], [NEG, NEG]])
    _check(from_vllm(pl, k=3), [[5, 3, 9], [-1, -1, -1]], [[-0.5, -1.0, -1.0], [NEG] * 3])
    itl = [None, [[-1.0, 9, None], [-1.0, 3, None], [-0.5, 5, None]]]
    _check(from_sglang(itl, k=2), [[5, 3], [-1, -1]], [[-0.5, -1.0], [NEG, NEG]])


# ---------------------------------------------------------------------------------- causal alignment
TOKENS = [3, 14, 15, 92, 65, 35, 89, 79, 3, 23, 84, 62, 64, 33, 83, 27]
K = 5


def aligned(teacher, tokens, k, tiny):
    """Whether row i is the teacher's top-k after tokens[:i + 1] (a causal LM's logits at position i)."""
    ei, ev = tiny.expected(tokens, k)
    i, v = _arrays(teacher)
    return i.shape == ei.shape and np.array_equal(i, ei) and np.allclose(v, ev, rtol=1e-6)


def _shifted(reader, by):
    """A reader that is off by one: its rows moved by ``by`` positions."""
    def read(*args, **kwargs):
        t = reader(*args, **kwargs)
        return fd.SparseTeacher(np.roll(t.indices, by, axis=0), np.roll(t.values, by, axis=0))
    return read


@pytest.mark.parametrize("form", ["request_output", "server_json", "flat", "sglang", "sglang_flat", "axolotl"])
def test_rows_align_with_causal_logits(form):
    tiny = TinyTeacher(vocab=97, seed=3)
    toks = list(TOKENS)
    if form == "request_output":
        payload = [None] + [{int(t): Logprob(e["logprob"], e["rank"], e["decoded_token"]) for t, e in d.items()}
                            for d in vllm_prompt_logprobs(tiny, toks, K)[1:]]
        reader = from_vllm
    elif form == "server_json":
        payload = json.loads(json.dumps(vllm_response(tiny, toks, K)))
        reader = from_vllm
    elif form == "flat":
        payload = flat_logprobs(tiny, toks, K)
        reader = from_vllm
    elif form == "sglang":
        payload = json.loads(json.dumps(sglang_response(tiny, toks, K)))
        reader = from_sglang
    elif form == "sglang_flat":
        mi = sglang_response(tiny, toks, K)["meta_info"]
        rows = mi.pop("input_top_logprobs")[1:]
        payload = {"prompt_tokens": len(toks), "input_top_logprobs_shape": [len(rows), K],
                   "input_top_logprobs_null_prefix": 1,
                   "input_top_logprobs_val_flat": [e[0] for r in rows for e in r],
                   "input_top_logprobs_idx_flat": [e[1] for r in rows for e in r]}
        reader = from_sglang
    else:  # axolotl's columns: row t already pairs with the logits at t (its loss shifts only the labels)
        ei, ev = tiny.expected(toks, K)
        payload = (ev.tolist(), np.where(ei < 0, np.arange(K), ei).tolist())
        reader = lambda cols, k=None: from_axolotl(*cols)  # noqa: E731
    kw = {} if form == "axolotl" else {"k": K}
    assert aligned(reader(payload, **kw), toks, K, tiny)
    for by in (1, -1):  # an off-by-one reader fails the same check
        assert not aligned(_shifted(reader, by)(payload, **kw), toks, K, tiny)
    if form in ("request_output", "server_json", "flat"):  # vLLM lists the prompt's own token at each position
        from_vllm(payload, k=K, prompt_token_ids=toks)
        with pytest.raises(TeacherFormatError, match="does not list the prompt's token"):
            from_vllm(payload, k=K, prompt_token_ids=toks[1:] + toks[:1])


def test_last_row_is_empty_and_masked_by_the_shifted_labels():
    """T rows for T tokens: the student's logits pair row by row; the last row (no next token in the
    prompt) has no entries and is ignored by the shifted labels."""
    tiny = TinyTeacher(vocab=97, seed=3)
    t = from_vllm(vllm_prompt_logprobs(tiny, TOKENS, K), k=K)
    assert t.shape == (len(TOKENS), K)
    assert (np.asarray(t.indices)[-1] == -1).all() and (np.asarray(t.indices)[:-1] >= 0).all()


# ---------------------------------------------------------------------------------------- malformed
BAD_VLLM = {
    "a missing position": ([None, {1: Logprob(-1.0)}, None, {2: Logprob(-1.0)}], 2, "missing position"),
    "an empty position": ([None, {1: Logprob(-1.0)}, {}, {2: Logprob(-1.0)}], 2, "missing position"),
    "NaN": ([None, {1: Logprob(-1.0)}, {2: Logprob(float("nan"))}], 2, "nan .not finite"),
    "+inf": ([None, {1: Logprob(float("inf"))}], 1, "inf .not finite"),
    "-inf": ([None, {1: Logprob(-1.0), 3: Logprob(float("-inf"))}], 1, "-inf .not finite"),
    "positive": ([None, {1: Logprob(-1.0)}, {2: Logprob(0.25)}], 2, r"0.25 \(above 0"),
    "a repeated id": ([None, {"7": {"logprob": -1.0}, "07": {"logprob": -2.0}}], 1, "token id 7 is listed twice"),
    "a non-integer id": ([None, {"x7": {"logprob": -1.0}}], 1, "'x7' at position 1 is not an integer"),
    "a fractional id": ([None, {3: Logprob(-1.0), 2.5: Logprob(-2.0)}], 1, "2.5 at position 1 is not an integer"),
    "first entry": ([{1: Logprob(-1.0)}, {1: Logprob(-1.0)}], 0, "position 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_VLLM))
def test_malformed_vllm_names_the_position(case):
    payload, pos, msg = BAD_VLLM[case]
    with pytest.raises(TeacherFormatError, match=msg) as e:
        from_vllm(payload, k=2)
    assert isinstance(e.value, fd.FastDistillError) and isinstance(e.value, ValueError)
    assert e.value.position == pos and f"position {pos}" in str(e.value)


BAD_SGLANG = {
    "a missing position": ([None, [[-1.0, 1, None]], None, [[-1.0, 2, None]]], 2, "missing position"),
    "NaN": ([None, [[float("nan"), 1, None]]], 1, "not finite"),
    "positive": ([None, [[-1.0, 1, None]], [[1e-3, 2, None]]], 2, "above 0"),
    "a repeated id": ([None, [[-1.0, 1, None]], [[-1.0, 4, None], [-2.0, 4, None]]], 2, "token id 4 is listed twice"),
    "a short entry": ([None, [[-1.0]]], 1, r"\[logprob, token_id, text\]"),
    "logprob_start_len > 0": ({"prompt_tokens": 5, "input_top_logprobs": [None, [[-1.0, 1, None]]]}, None,
                              "covers 2 positions but the prompt has 5"),
}


@pytest.mark.parametrize("case", sorted(BAD_SGLANG))
def test_malformed_sglang_names_the_position(case):
    payload, pos, msg = BAD_SGLANG[case]
    with pytest.raises(TeacherFormatError, match=msg) as e:
        from_sglang(payload, k=2)
    assert e.value.position == pos


def test_malformed_axolotl():
    with pytest.raises(TeacherFormatError, match="nan .not finite") as e:
        from_axolotl([[-1.0], [float("nan")]], [[1], [2]])
    assert e.value.position == 1
    with pytest.raises(TeacherFormatError, match="token id 3 is listed twice .*at position 0"):
        from_axolotl([[-1.0, -2.0]], [[3, 3]])
    with pytest.raises(TeacherFormatError, match="above 0"):
        from_axolotl([[0.5]], [[3]])
    with pytest.raises(TeacherFormatError, match="k must be"):
        from_vllm(VLLM_REQUEST_OUTPUT, k=0)


# ------------------------------------------------------------------------------------------- the store
try:
    import pyarrow as pa
except ImportError:  # the store's tests need the teachers extra; the readers' do not
    pa = None
from fastdistill.teachers import load, save  # noqa: E402

needs_arrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed (pip install 'fastdistill[teachers]')")


def _teachers(lengths, k=8, vocab=300, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for L in lengths:
        logits = rng.normal(scale=3.0, size=(L, vocab))
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        idx = np.argsort(-lp, axis=1, kind="stable")[:, :k].astype(np.int32)
        val = np.take_along_axis(lp, idx, 1).astype(np.float32)
        idx[-1] = -1  # the last position, as the readers leave it
        val[-1] = NEG
        out.append(fd.SparseTeacher(idx, val))
    return out


def _same(a, b, dtype=np.float16):
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values).astype(dtype))


@needs_arrow
def test_store_round_trip_views_and_meta(tmp_path):
    ts = _teachers([5, 1, 40, 7])
    path = tmp_path / "store"
    assert save(path, ts[:2], meta={"vocab_size": 300, "source": "test", "tokenizer": "tiny"}) == 2
    assert save(path, ts[2:]) == 4
    store = load(path)
    assert len(store) == 4 and store.num_tokens == 53 and store.lengths.tolist() == [5, 1, 40, 7]
    assert store.meta == {"k": 8, "kind": "logprobs", "values_dtype": "float16", "temperature": 1.0,
                          "vocab_size": 300, "source": "test", "tokenizer": "tiny"}
    for i, t in enumerate(ts):
        got = store[i]
        assert isinstance(got, fd.SparseTeacher) and got.kind == "logprobs" and got.shape == t.shape
        _same(got, t)
        for a in (got.indices, got.values):  # views of the mapped file: no copy, read-only
            assert not a.flags.owndata and not a.flags.writeable
    _same(store[-1], ts[-1])
    with pytest.raises(IndexError):
        store[4]
    # the views stay valid without the store object
    v = store[2].values
    del store
    assert np.isfinite(v[:-1].astype(np.float32)).all()
    # a store's sequences are teachers the losses take
    assert load(path, tail="support")[0].tail == "support"


@needs_arrow
def test_store_pads_narrower_teachers_and_refuses_wider(tmp_path):
    path = tmp_path / "s"
    save(path, _teachers([3], k=8))
    save(path, _teachers([2], k=5))
    t = load(path)[1]
    assert t.shape == (2, 8) and (np.asarray(t.indices)[:, 5:] == -1).all()
    with pytest.raises(TeacherStoreError, match="9 slots per row, the store's k is 8"):
        save(path, _teachers([2], k=9))
    with pytest.raises(TeacherStoreError, match=r"meta\['source'\] = 'b' but the store .* has 'a'"):
        save(tmp_path / "m", _teachers([2]), meta={"source": "a"})
        save(tmp_path / "m", _teachers([2]), meta={"source": "b"})
    with pytest.raises(TeacherStoreError, match="id 300 at row 0"):
        bad = _teachers([2])[0]
        bad.indices[0, 0] = 300
        save(tmp_path / "v", bad, meta={"vocab_size": 300})
    with pytest.raises(TeacherStoreError, match="NaN"):
        bad = _teachers([2])[0]
        bad.values[0, 0] = np.nan
        save(tmp_path / "n", bad)
    with pytest.raises(TeacherStoreError, match=r"\(T, k\)"):
        save(tmp_path / "3d", fd.SparseTeacher(np.zeros((2, 3, 4), np.int32), np.zeros((2, 3, 4), np.float32)))


@needs_arrow
def test_store_float32_values(tmp_path):
    ts = _teachers([4, 6])
    save(tmp_path / "f", ts, dtype="float32")
    store = load(tmp_path / "f")
    assert store.meta["values_dtype"] == "float32"
    _same(store[1], ts[1], np.float32)


@needs_arrow
def test_store_size_bound(tmp_path):
    """At most k * (2 + 4) bytes a token plus O(1) a sequence (and a shard's headers)."""
    k, lengths = 64, [100, 3, 257, 1, 640]
    path = tmp_path / "size"
    save(path, _teachers(lengths[:3], k=k, vocab=500))
    save(path, _teachers(lengths[3:], k=k, vocab=500))
    shards = sorted(path.glob("shard-*.arrow"))
    size = sum(p.stat().st_size for p in shards)
    tokens, seqs = sum(lengths), len(lengths)
    assert size <= k * 6 * tokens + 16 * seqs + 2048 * len(shards)
    print(f"store: {size / tokens:.1f} bytes a token at k={k} (payload {k * 6})")


@needs_arrow
def test_store_truncated_or_foreign_raises_on_open(tmp_path):
    path = tmp_path / "store"
    save(path, _teachers([5, 9]))
    save(path, _teachers([3]))
    shard = path / "shard-00000.arrow"
    good = shard.read_bytes()
    for cut in (len(good) - 1, len(good) // 2, 10, 0):  # truncated
        shard.write_bytes(good[:cut])
        with pytest.raises(TeacherStoreError, match="shard-00000.arrow is .*truncated or replaced"):
            load(path)
    # a foreign Arrow stream of the right size: its schema is refused
    man = json.loads((path / "fastdistill-teachers.json").read_text())
    table = pa.table({"input_ids": pa.array([[1, 2, 3]] * 2, pa.list_(pa.int64()))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    shard.write_bytes(sink.getvalue().to_pybytes())
    man["shards"][0]["bytes"] = shard.stat().st_size
    (path / "fastdistill-teachers.json").write_text(json.dumps(man))
    with pytest.raises(TeacherStoreError, match="foreign"):
        load(path)
    # random bytes of the right size
    shard.write_bytes(os.urandom(len(good)))
    man["shards"][0]["bytes"] = len(good)
    (path / "fastdistill-teachers.json").write_text(json.dumps(man))
    with pytest.raises(TeacherStoreError, match="not a readable Arrow stream"):
        load(path)
    # a flipped byte inside the data is found by verify=True
    shard.write_bytes(good[:-100] + bytes([good[-100] ^ 0xFF]) + good[-99:])
    load(path)
    with pytest.raises(TeacherStoreError, match="CRC-32"):
        load(path, verify=True)
    # a missing shard, a truncated manifest, not a store at all
    shard.unlink()
    with pytest.raises(TeacherStoreError, match="missing"):
        load(path)
    text = (path / "fastdistill-teachers.json").read_text()
    (path / "fastdistill-teachers.json").write_text(text[: len(text) // 2])
    with pytest.raises(TeacherStoreError, match="damaged or truncated"):
        load(path)
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(TeacherStoreError, match="is a file, not a teacher store"):
        load(tmp_path / "x.npy")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "data.arrow").write_bytes(good)
    with pytest.raises(TeacherStoreError, match="not a fastdistill teacher store"):
        load(tmp_path / "d")
    with pytest.raises(TeacherStoreError, match="no teacher store"):
        load(tmp_path / "nothing")


@needs_arrow
def test_store_interrupted_append_leaves_the_store_as_it_was(tmp_path):
    """A writer killed after writing a shard but before the manifest leaves an orphan file: ignored on
    open and overwritten by the next append."""
    path = tmp_path / "s"
    ts = _teachers([4, 5, 6])
    save(path, ts[:1])
    (path / "shard-00001.arrow").write_bytes(b"half-written")
    (path / "shard-00001.arrow.tmp").write_bytes(b"half-written")
    assert len(load(path)) == 1
    save(path, ts[1:])
    store = load(path)
    assert len(store) == 3
    _same(store[2], ts[2])


@needs_arrow
def test_store_opens_in_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    ts = _teachers([5, 2, 9])
    save(tmp_path / "s", ts[:2])
    save(tmp_path / "s", ts[2:])
    store = load(tmp_path / "s")
    ds = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in store.files])
    assert len(ds) == 3 and set(ds.column_names) == {"indices", "values"}
    row = ds.with_format("numpy")[2]
    np.testing.assert_array_equal(np.stack(row["indices"]), np.asarray(ts[2].indices))
    np.testing.assert_array_equal(np.stack(row["values"]), np.asarray(ts[2].values).astype(np.float16))


@needs_arrow
def test_teacher_info_command(tmp_path, capsys):
    from fastdistill.cli import main

    save(tmp_path / "s", _teachers([5, 2]), meta={"source": "test"})
    assert main(["teacher", "info", str(tmp_path / "s"), "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sequences"] == 2 and info["tokens"] == 7 and info["meta"]["source"] == "test"
    assert main(["teacher", "info", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "error: no teacher store" in err and "Traceback" not in err
