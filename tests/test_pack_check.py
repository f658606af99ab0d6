"""Pack validation as a class: every malformed json, header or size is a CheckpointError naming the
problem (never a TypeError, AttributeError or RecursionError), checked on upload (check_pack,
embedded_meta) and on load (PackStore.load); a pack laid out for another hidden size is refused even with
consistent tensors and the right backbone; hpeft_serve.pack and the serving runtime import no torch."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save

from hpeft_serve.errors import CheckpointError
from hpeft_serve.pack.check import MAX_SIZE_FACTOR, check_pack, embedded_meta, safetensors_header
from hpeft_serve.pack.layout import FILL, LAYOUT_VERSION, Layout, resolve_shape, size_keys, spec
from hpeft_serve.pack.store import PackStore

SHA = "ab" * 32
DIMS = {"L": 2, "d": 64, "f": 128}
GRAPH = {"backbone": {"name": "tiny", "sha256": SHA, "num_layers": 2, "hidden_size": 64},
         "dims": DIMS | {"vocab": 100, "max_positions": 64},
         "layout": Layout(lora=("q", "v"), bitfit=True).to_dict()}


def sizes_of(**over) -> dict:
    return {k: 0 for k in size_keys()} | DIMS | {"n": 1, "C": 2, "R_q": 4, "R_v": 4} | over


def make_pack(sizes: dict, seed: int = 0, meta_over: dict | None = None, header_meta=None, flags=None,
              drop=()) -> tuple[bytes, dict]:
    """A pack of the given sizes, tensors consistent with them (random values, padding fills; head flags 0
    unless `flags` says), less the tensors `drop`, and its json."""
    g = np.random.default_rng(seed)
    tensors = {}
    for k, syms in spec().items():
        t = np.asarray(g.standard_normal(resolve_shape(syms, sizes)) * 0.1, dtype=np.float32)
        tensors[k] = np.full_like(t, FILL[k]) if k in FILL else t
    for k in ("head_cls", "head_max", "head_norm"):  # 0/1 flags, as the json says (a classifier: mean pooled)
        tensors[k] = np.full((), float((flags or {}).get(k, 0.0)), np.float32)
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    meta = {"format": "hpeft-pack", "layout_version": LAYOUT_VERSION, "name": "a", "method": "lora",
            "labels": [f"l{i}" for i in range(sizes["C"])], "backbone": {"name": "tiny", "sha256": SHA},
            "sizes": sizes} | (meta_over or {})
    embedded = json.dumps(meta) if header_meta is None else header_meta
    return save(tensors, metadata={"format": "hpeft-pack", "hpeft_pack": embedded}), meta


def test_a_valid_pack_passes_and_its_embedded_json_is_read():
    raw, meta = make_pack(sizes_of())
    assert embedded_meta(safetensors_header(raw)) == meta
    assert set(check_pack("a", meta, raw, GRAPH)) == set(spec())


def _set(path, value):
    """A meta edit: a copy of meta with meta[path...] = value."""
    def edit(meta):
        meta = copy.deepcopy(meta)
        node = meta
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return meta
    return edit


def _drop(*path):
    def edit(meta):
        meta = copy.deepcopy(meta)
        node = meta
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
        return meta
    return edit


META_CASES = [  # (id, edit of a valid json, what the message names)
    ("meta-a-list", lambda m: [m], "not a JSON object"),
    ("backbone-a-string", _set(["backbone"], "tiny"), "backbone is not a JSON object"),
    ("wrong-backbone", _set(["backbone", "sha256"], "cd" * 32), "not the one this graph serves"),
    ("labels-5", _set(["labels"], 5), "labels 5 for 2 outputs"),
    ("labels-too-few", _set(["labels"], ["x"]), "1 labels for 2 outputs"),
    ("label-not-a-string", _set(["labels"], ["x", 3]), "label 3"),
    ("label-lone-surrogate", _set(["labels"], ["x", "\ud800"]), "valid UTF-8"),
    ("sizes-a-list", _set(["sizes"], [1, 2]), "sizes are not a JSON object"),
    ("sizes-missing", _drop("sizes"), "sizes are not a JSON object"),
    ("size-missing", _drop("sizes", "P"), "lack ['P']"),
    ("size-unknown", _set(["sizes", "Z"], 1), "unknown sizes ['Z']"),
    ("size-bool", _set(["sizes", "P"], True), "size P is True"),
    ("size-float", _set(["sizes", "R_q"], 4.0), "size R_q is 4.0"),
    ("size-string", _set(["sizes", "C"], "2"), "size C is '2'"),
    ("size-negative", _set(["sizes", "r"], -1), "size r is -1"),
    ("zero-labels", lambda m: m | {"labels": [], "sizes": m["sizes"] | {"C": 0}}, "0 only for an embedding pack"),
    ("task-unknown", _set(["task"], "ranking"), "task 'ranking' is not one of classification, embedding"),
    ("embedding-with-labels", lambda m: m | {"task": "embedding", "pooling": "mean", "normalize": False},
     "an embedding pack has C = 0"),
    ("layers", _set(["sizes", "L"], 3), "layers L=3"),
    ("hidden", _set(["sizes", "d"], 256), "hidden size d=256"),
    ("ffn", _set(["sizes", "f"], 64), "FFN width f=64"),
    ("phm-n-not-dividing", _set(["sizes", "n"], 3), "PHM n=3 does not divide the hidden size 64"),
    ("phm-n-zero", _set(["sizes", "n"], 0), "PHM n=0"),
    ("rank-over-bound", _set(["sizes", "R_q"], MAX_SIZE_FACTOR * 64 + 1), f"over the bound {MAX_SIZE_FACTOR} x"),
    ("prefix-over-bound", _set(["sizes", "P"], 10 ** 9), "size P=1000000000 is over the bound"),
    ("version-true", _set(["layout_version"], True), "not an hpeft pack of layout version"),
    ("version-2", _set(["layout_version"], 2), "not an hpeft pack of layout version"),
    ("sha256-a-list", _set(["sha256"], ["x"]), "sha256 is not a string"),
]


@pytest.mark.parametrize("edit,named", [c[1:] for c in META_CASES], ids=[c[0] for c in META_CASES])
def test_malformed_json_is_refused_by_name(edit, named):
    raw, meta = make_pack(sizes_of())
    with pytest.raises(CheckpointError, match=_re(named)):
        check_pack("a", edit(meta), raw, GRAPH)


def _re(s: str) -> str:
    import re
    return re.escape(s)


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def _raw(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


HEADER_CASES = [  # (id, safetensors bytes, what the message names)
    ("nested-100000", _raw(_deep(100_000)), "nested too deeply"),
    ("nested-object", _raw(b'{"a":' + _deep(100_000) + b"}"), "nested too deeply"),
    ("header-a-list", _raw(b"[1, 2]"), "not a JSON object"),
    ("header-not-json", _raw(b"{nope"), "not valid JSON"),
    ("too-short", b"abc", "too short"),
    ("header-length-wrong", (10 ** 9).to_bytes(8, "little") + b"{}", "no valid header"),
    ("metadata-a-list", _raw(json.dumps({"__metadata__": ["x"]}).encode()), "__metadata__ is not a JSON object"),
    ("no-hpeft-pack", _raw(json.dumps({"__metadata__": {"format": "pt"}}).encode()), "not an hpeft pack"),
    ("hpeft-pack-a-list", make_pack(sizes_of(), header_meta="[1, 2]")[0], "hpeft_pack metadata is not a JSON object"),
    ("hpeft-pack-nested", make_pack(sizes_of(), header_meta=_deep(100_000).decode())[0], "nested too deeply"),
    ("hpeft-pack-not-json", make_pack(sizes_of(), header_meta="{x")[0], "not valid JSON"),
]


@pytest.mark.parametrize("raw,named", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_malformed_header_is_refused_by_name(raw, named):
    with pytest.raises(CheckpointError, match=_re(named)):
        embedded_meta(safetensors_header(raw))


def test_tensors_are_checked_against_the_sizes_before_they_are_read():
    raw, meta = make_pack(sizes_of())
    other, _ = make_pack(sizes_of(R_q=8))  # a consistent pack of other sizes under this json
    with pytest.raises(CheckpointError, match=r"tensor lora_q_A is F32\[2, 8, 64\], expected F32\[2, 4, 64\]"):
        check_pack("a", meta, other, GRAPH)
    t = {k: np.zeros(resolve_shape(s, sizes_of()), np.float64) for k, s in spec().items()}
    with pytest.raises(CheckpointError, match="is F64"):
        check_pack("a", meta, save(t), GRAPH)
    t = {k: v.astype(np.float32) for k, v in t.items()}
    t["lora_q_A"][0, 0, 0] = np.nan
    with pytest.raises(CheckpointError, match="non-finite"):
        check_pack("a", meta, save(t), GRAPH)
    t["lora_q_A"][0, 0, 0] = 0.0
    t["extra"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected \['extra'\]"):
        check_pack("a", meta, save(t), GRAPH)


def test_a_compact_pack_reads_as_the_whole_pack_it_was_cut_from():
    """A pack file may leave out any tensor that is all its fill (what `hpeft export` writes): it reads as
    that fill, so the compact and the whole pack load to the same tensors, bit for bit."""
    from safetensors.numpy import load
    from hpeft_serve.pack.layout import compact
    raw, meta = make_pack(sizes_of())
    whole = check_pack("a", meta, raw, GRAPH)
    t = load(raw)
    t["bitfit_q"][...] = 0.0  # all zeros: left out
    whole["bitfit_q"][...] = 0.0
    cut = compact(t)
    assert "bitfit_q" not in cut and "prefix_mask" not in cut and "head_cls" not in cut and "lora_q_A" in cut
    small = save(cut, metadata={"format": "hpeft-pack", "hpeft_pack": json.dumps(meta)})
    assert len(small) < len(raw)
    got = check_pack("a", meta, small, GRAPH)
    assert got.keys() == whole.keys() and all(np.array_equal(got[k], whole[k]) for k in whole)


def test_a_pack_for_another_hidden_size_is_refused_on_upload_and_on_load(tmp_path):
    """Laid out for d=256 (tensors consistent with its sizes, the right backbone sha256) on a d=64 graph."""
    raw, meta = make_pack(sizes_of(d=256))
    with pytest.raises(CheckpointError, match="hidden size d=256; the served graph has d=64"):
        check_pack("big", embedded_meta(safetensors_header(raw)), raw, GRAPH)
    PackStore(tmp_path).write("big", raw, meta)
    with pytest.raises(CheckpointError, match="hidden size d=256"):
        PackStore(tmp_path, GRAPH).load("big")


EMBED_META = {"task": "embedding", "pooling": "max", "normalize": True, "labels": []}
EMBED_FLAGS = {"head_max": 1.0, "head_norm": 1.0}


def test_an_embedding_pack_has_no_labels_and_its_flags_say_its_pooling():
    raw, meta = make_pack(sizes_of(C=0), meta_over=EMBED_META, flags=EMBED_FLAGS)
    t = check_pack("a", meta, raw, GRAPH)
    assert t["head_out_w"].shape == (0, 64) and float(t["head_max"]) == 1.0
    store = PackStore("memory://e2-embed", GRAPH)
    store.write("e", raw, meta)
    assert store.load("e").task == "embedding" and store.load("e").labels == ()


EMBED_CASES = [  # (id, json edit, head flags, what the message names)
    ("pooling-unknown", {"pooling": "sum"}, EMBED_FLAGS, "pooling 'sum' is not one of mean, cls, max"),
    ("pooling-missing", {"pooling": None}, EMBED_FLAGS, "pooling 'None'"),
    ("normalize-a-string", {"normalize": "yes"}, EMBED_FLAGS, "normalize is 'yes', not true or false"),
    ("flag-disagrees", {"pooling": "mean"}, EMBED_FLAGS, "head flag head_max is 1.0, but its json says embedding"),
    ("norm-disagrees", {"normalize": False}, EMBED_FLAGS, "head flag head_norm is 1.0"),
    ("flag-not-0-1", {}, EMBED_FLAGS | {"head_cls": 0.5}, "head flag head_cls is 0.5, not 0 or 1"),
    ("labels-given", {"labels": ["x"]}, EMBED_FLAGS, "1 labels for 0 outputs"),
]


@pytest.mark.parametrize("edit,flags,named", [c[1:] for c in EMBED_CASES], ids=[c[0] for c in EMBED_CASES])
def test_a_malformed_embedding_pack_is_refused_by_name(edit, flags, named):
    raw, meta = make_pack(sizes_of(C=0), meta_over=EMBED_META | edit, flags=flags)
    with pytest.raises(CheckpointError, match=_re(named)):
        check_pack("a", meta, raw, GRAPH)


def test_a_classifier_is_neither_max_pooled_nor_normalised():
    raw, meta = make_pack(sizes_of(), flags={"head_norm": 1.0})
    with pytest.raises(CheckpointError, match="head flag head_norm is 1.0, but its json says classification"):
        check_pack("a", meta, raw, GRAPH)


def test_a_pack_written_before_embeddings_still_loads():
    """No task in its json, no head_max / head_norm tensors: a classifier, its missing flags 0."""
    raw, meta = make_pack(sizes_of(), drop=("head_max", "head_norm"))
    assert "head_max" not in safetensors_header(raw)
    t = check_pack("a", meta, raw, GRAPH)
    assert set(t) == set(spec()) and float(t["head_max"]) == 0.0 and float(t["head_norm"]) == 0.0
    raw, meta = make_pack(sizes_of(), drop=("head_cls",))  # any tensor left out is its fill (a compact pack)
    assert float(check_pack("a", meta, raw, GRAPH)["head_cls"]) == 0.0


def test_a_graph_without_dims_checks_what_it_can_and_refuses_the_rest():
    old = {k: v for k, v in GRAPH.items() if k != "dims"}
    raw, meta = make_pack(sizes_of())
    with pytest.raises(CheckpointError, match="records no FFN width .* re-export the graph"):
        check_pack("a", meta, raw, old)  # its layout has BitFit, which takes f
    no_f = old | {"layout": Layout(lora=("q", "v")).to_dict()}
    assert check_pack("a", meta, raw, no_f)  # f is in no slot it takes: nothing left unchecked
    raw, meta = make_pack(sizes_of(d=32))
    with pytest.raises(CheckpointError, match="hidden size d=32"):
        check_pack("a", meta, raw, no_f)


@pytest.mark.parametrize("content,named", [(b"[1]", "not a JSON object"), (_deep(100_000), "nested too deeply"),
                                           (b"\xff\xfe", "not valid JSON"), (b"{", "not valid JSON")])
def test_a_malformed_json_file_in_the_store_is_refused_by_name(tmp_path, content, named):
    raw, meta = make_pack(sizes_of())
    store = PackStore(tmp_path, GRAPH)
    store.write("a", raw, meta)
    (tmp_path / "a.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=_re(named)):
        store.load("a")
    assert store.meta("a") is None


def test_the_pack_format_and_the_runtime_import_no_torch():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers', 'onnx'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import hpeft_serve.pack, hpeft_serve.pack.layout, hpeft_serve.pack.check, hpeft_serve.pack.store\n"
            "import hpeft_serve.serving.bank, hpeft_serve.serving.runtime\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
