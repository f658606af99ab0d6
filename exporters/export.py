"""`hpeft export`: a checkpoint folder -> artefacts that run without PyTorch (ONNX) or without hpeft
(TorchScript).

--merge: DIR/<name>.onnx (or <name>.pt + <name>.pt2) and DIR/<name>.json: one standalone model whose
output is `logits`, or `embeddings` for an embedding adapter (the json's "task" and "outputs" say which).
shared (default): DIR/backbone.onnx (+ backbone.onnx.data) or DIR/backbone.pt, DIR/backbone.json, and the
adapter's pack DIR/packs/<name>.safetensors + DIR/packs/<name>.json. A second adapter exported into the
same DIR for the same backbone reuses the graph: only its pack is written; one that needs a slot kind the
graph lacks (a PHM n included) re-exports the graph for the union, and the packs already there stay valid.
Every graph exported now has the `embeddings` output (Layout.embeddings); one exported before it is
re-exported by the next export into its folder.

Signature graphs (ONNX): beside the union's graph, DIR/graphs/<key>/ holds the shared graph of each slot-kind
signature an exported adapter has (its `needs`: LoRA alone, UniPELT's LoRA + prefix + gated adapter, ...),
when that is less than the union: backbone.json + backbone.onnx(.data), a shared export of its own without
packs. The runtime runs a batch on the smallest graph whose layout covers its rows' adapters
(hpeft_serve/serving/graphs.py), so a batch pays for the slot kinds its own adapters use, not for the
union's (exact: an absent slot and an all-zero one give the same logits). Written when an adapter is
exported (its signature) and when the union's graph is (re-)exported (those of every pack in DIR/packs), at
most MAX_GRAPHS per folder; `signature_graphs=False` (`hpeft export --no-signature-graphs`) writes none.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import onnx
import torch

from hpeft_serve import checkpoint
from hpeft_serve.errors import HpeftError
from hpeft_serve.pack.store import pack_needs, predates_phm_n, served_layout
from hpeft_serve.serving.graphs import GRAPHS, MAX_GRAPHS, signature_key
from hpeft_serve.backbone import load_backbone

from hpeft_serve.pack.layout import size_keys
from hpeft_serve.slots.registry import KINDS

from .layout import LAYOUT_VERSION, Layout, bank_feed, input_names, needs, pack, per_layer, resolve_shape, symbols
from .merge import merge
from .quantize import Precision
from .onnx_export import INPUTS, TOKEN_AXES, example_inputs, export_merged_onnx, export_onnx, merged_outputs
from .shared import SharedModel
from .torchscript import export_program, export_torchscript

STATIC = ("L", "d", "f")
WITH_EMBEDDINGS = Layout(embeddings=True)  # what every graph exported now has beside the slots of its adapters


def shared_inputs(layout: Layout, num_layers: int) -> list[str]:
    return [*INPUTS, "adapter_index", *input_names(layout, num_layers)]


def _axis_name(symbol) -> str | None:
    if isinstance(symbol, int) or symbol in STATIC or symbol.startswith("d/"):  # d/n: n is a PHM kind's
        return None
    return symbol


def shared_dynamic_axes(layout: Layout, num_layers: int) -> dict:
    axes = dict(TOKEN_AXES) | {"adapter_index": {0: "batch"}, "logits": {0: "batch", 1: "C"}}
    if not layout.embeddings:
        del axes["embeddings"]
    for name in input_names(layout, num_layers):
        syms = symbols(name.split(".")[0])
        syms = syms[1:] if per_layer(name.split(".")[0]) else syms
        axes[name] = {0: "K"} | {i + 1: a for i, s in enumerate(syms) if (a := _axis_name(s))}
    return axes


def example_bank(L: int, d: int, f: int, layout: Layout, k: int = 2) -> dict[str, torch.Tensor]:
    """A random bank of the tensors `layout` takes, whose every size is non-zero (so tracing sees every op);
    flags are 0/1."""
    sizes = {s: 2 for s in size_keys()} | {s: v for kind in KINDS for s, v in kind.EXAMPLE_SIZES.items()}
    sizes |= {"L": L, "d": d, "f": f}
    flags = tuple(dict.fromkeys(e for kind in KINDS for e in kind.FLAGS))
    g = torch.Generator().manual_seed(0)
    bank = {}
    for name in layout.names():
        shape = (k, *resolve_shape(symbols(name), sizes))
        flag = name.endswith(flags)
        bank[name] = torch.randint(0, 2, shape, generator=g).float() if flag else torch.randn(shape, generator=g) * 0.1
    return bank


def _shared_args(encoder, layout: Layout) -> tuple:
    ec = encoder.config
    ids, mask = example_inputs(ec.vocab_size, batch=3, seq=9)
    feed = bank_feed(example_bank(ec.num_hidden_layers, ec.hidden_size, ec.intermediate_size, layout), layout)
    return (ids, mask, torch.tensor([0, 1, 1]), *(feed[n] for n in input_names(layout, ec.num_hidden_layers)))


def graph_outputs(layout: Layout) -> tuple[str, ...]:
    return ("logits", "embeddings") if layout.embeddings else ("logits",)


def _graph_info(backbone: dict, fmt: str, graph: str, layout: Layout, ec, embedding: tuple[str, bool]) -> dict:
    # the sizes every pack and request is checked against (hpeft_serve.pack.check, the runtime's token check)
    dims = {"L": ec.num_hidden_layers, "d": ec.hidden_size, "f": ec.intermediate_size, "vocab": ec.vocab_size,
            "max_positions": ec.max_position_embeddings}
    return {"format": "hpeft-shared-backbone", "layout_version": LAYOUT_VERSION, "export_format": fmt,
            "graph": graph, "backbone": backbone, "dims": dims, "layout": layout.to_dict(),
            "inputs": shared_inputs(layout, backbone["num_layers"]), "outputs": list(graph_outputs(layout)),
            # how adapter "@backbone" (the plain backbone) pools and normalises (Backbone.embedding_defaults)
            "embedding": {"pooling": embedding[0], "normalize": embedding[1]},
            "bank": {n: [str(s) for s in symbols(n)] for n in layout.names()}}


def read_layout(folder: Path) -> Layout:
    """The layout of the shared graph in `folder` (which bank tensors it takes, in order)."""
    return Layout.from_dict(json.loads((Path(folder) / "backbone.json").read_text())["layout"])


def _write_graph(model, cfg: dict, out: Path, fmt: str, layout: Layout, log, precision: Precision) -> list[str]:
    graph = "backbone.onnx" if fmt == "onnx" else "backbone.pt"
    layout = layout.union(WITH_EMBEDDINGS)
    info_file = out / "backbone.json"
    if info_file.exists() and (out / graph).exists():
        info = json.loads(info_file.read_text())
        if info.get("backbone", {}).get("sha256") != cfg["backbone"]["sha256"]:
            raise HpeftError(f"{out} holds a shared graph for backbone {info['backbone'].get('name')!r}; "
                             f"this adapter is for {cfg['backbone']['name']!r}: export it into another folder")
        if Precision.of(info) != precision:
            raise HpeftError(f"{out} holds a {Precision.of(info)} shared graph; this export asks for {precision}: "
                             f"export with the same --quantize/--precision, or into another folder")
        have = served_layout(info, out / "packs")
        if have.covers(layout) and not predates_phm_n(info):
            log(f"reusing the shared graph {out / graph}")
            return []
        log(f"re-exporting the shared graph {out / graph}: this adapter needs slots it lacks"
            + ("" if have.embeddings else " (the graph predates the embeddings output)"))
        layout = have.union(layout)
    return write_shared_graph(model.encoder, cfg["backbone"], layout, out, fmt, precision=precision)


def write_shared_graph(encoder, backbone: dict, layout: Layout, out: Path, fmt: str = "onnx",
                       embedding: tuple[str, bool] | None = None, precision: Precision | None = None) -> list[str]:
    """Export the shared graph of `encoder` for `layout` into `out` (+ backbone.json); `embedding`: the
    plain backbone's (pooling, normalize), by default its Backbone.embedding_defaults(); `precision`:
    fp32 (default), the backbone's MatMuls int8, or fp16 (exporters.quantize)."""
    precision = precision or Precision()
    graph = "backbone.onnx" if fmt == "onnx" else "backbone.pt"
    embedding = embedding or load_backbone(backbone["name"]).embedding_defaults()
    # int8: BitFit's per-layer If would hide the FFN projection in its branches from the quantizer, which
    # takes the top-level graph's MatMuls (exporters/quantize.py)
    shared = SharedModel(encoder, layout, bitfit_if=precision.kind != "int8")
    args = _shared_args(encoder, layout)
    names = shared_inputs(layout, len(encoder.layers))
    if fmt == "onnx":
        export_onnx(shared, args, names, shared_dynamic_axes(layout, len(encoder.layers)), out / graph,
                    external_data=True, output_names=graph_outputs(layout))
        got = [i.name for i in onnx.load(str(out / graph), load_external_data=False).graph.input]
        if got != names:  # the exporter drops inputs the graph does not use
            raise RuntimeError(f"shared graph inputs {got} differ from the layout's {names}")
    else:
        export_torchscript(shared, args, out / graph)
    info = _graph_info(backbone, fmt, graph, layout, encoder.config, embedding)
    info |= precision.apply(out / graph, encoder, external=True, backbone=backbone["name"])
    (out / "backbone.json").write_text(json.dumps(info, indent=2) + "\n")
    return [graph] + (["backbone.onnx.data"] if fmt == "onnx" else [])


def write_signature_graphs(encoder, backbone: dict, layouts: list[Layout], out: Path,
                           precision: Precision | None = None, log=print) -> list[str]:
    """The shared graph of each of `layouts` (adapter signatures, with the embeddings output) that the
    union's graph in `out` covers and is larger than, into out/graphs/<key>/ (built in a temp folder, renamed
    into place: a reader sees a whole graph or none); those already there are kept. At most MAX_GRAPHS."""
    union = read_layout(out)
    folder = out / GRAPHS
    have = {p.parent.name for p in folder.glob("*/backbone.json")}
    files = []
    for layout in dict.fromkeys(x.union(WITH_EMBEDDINGS) for x in layouts):
        key = signature_key(layout)
        if layout == union or not union.covers(layout) or key in have:
            continue
        if len(have) >= MAX_GRAPHS:
            log(f"{folder} holds {MAX_GRAPHS} signature graphs: adapters of other signatures run on the union's")
            break
        tmp = folder / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        got = write_shared_graph(encoder, backbone, layout, tmp, "onnx", precision=precision)
        try:
            os.replace(tmp, folder / key)
        except OSError:  # written meanwhile by another export: the same graph
            shutil.rmtree(tmp, ignore_errors=True)
        have.add(key)
        files += [f"{GRAPHS}/{key}/{f}" for f in [*got, "backbone.json"]]
        log(f"wrote the signature graph {folder / key} in {time.perf_counter() - t0:.1f}s")
    return files


def write_pack(tensors: dict, sizes: dict, cfg: dict, folder: Path) -> list[str]:
    """`<name>.safetensors` (its header carries the json below, less the sha256) then `<name>.json` (which
    records the tensors' sha256), each written to a temp name and renamed: a reader never sees a
    half-written file, and a json that does not match its tensors means an update is under way."""
    from safetensors.torch import save as save_bytes
    name = cfg["name"]
    meta = {"format": "hpeft-pack", "layout_version": LAYOUT_VERSION, "name": name, "method": cfg["method"],
            "labels": cfg["labels"], "backbone": cfg["backbone"], "sizes": sizes, "method_config": cfg["method_config"]}
    meta |= _task(cfg)
    # the json rides in the safetensors header too, so the .safetensors alone is an uploadable pack
    data = save_bytes({k: v.contiguous() for k, v in tensors.items()},
                      metadata={"format": "hpeft-pack", "hpeft_pack": json.dumps(meta)})
    from hpeft_serve.pack.store import PackStore
    PackStore(folder).write(name, data, meta)  # records the tensors' sha256 in the json
    return [f"packs/{name}.safetensors", f"packs/{name}.json"]


def _task(cfg: dict) -> dict:
    """What a pack json or export json records of the head: its task, and an embedding head's pooling."""
    head = cfg.get("head", {})
    if head.get("task") != "embedding":
        return {"task": "classification"}
    return {"task": "embedding", "pooling": head["pooling"], "normalize": bool(head.get("normalize", False))}


def export_checkpoint(ckpt: Path, out: Path, fmt: str = "onnx", merged: bool = False, log=print,
                      fold_phm: bool = False, quantize: str | None = None, precision: str = "fp32",
                      smooth: bool = True, signature_graphs: bool = True) -> dict:
    """`quantize` "int8": the backbone's MatMuls int8 (CPU; `smooth`: SmoothQuant-smoothed first, the
    default); `precision` "fp16": the graph fp16 (CUDA); `signature_graphs`: a shared ONNX export also
    writes the graph of the adapter's signature (see above)."""
    if fmt not in ("onnx", "torchscript"):
        raise HpeftError(f"unknown format {fmt!r}: use onnx or torchscript")
    prec = Precision.check(quantize, precision, fmt, smooth)
    model, cfg = checkpoint.load(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name, t0 = cfg["name"], time.perf_counter()
    if merged:
        files, done = _export_merged(model, name, out, fmt, fold_phm, prec, cfg["backbone"]["name"])
    else:
        tensors, sizes = pack(model)
        used = needs(tensors, sizes)
        files = _write_graph(model, cfg, out, fmt, used, log, prec)
        if fmt == "onnx" and signature_graphs:  # the union's graph (re-)exported: every pack's signature too
            sigs = [used] + (pack_needs(out / "packs") if files else [])
            files += write_signature_graphs(model.encoder, cfg["backbone"], sigs, out, prec, log)
        files += write_pack(tensors, sizes, cfg, out / "packs")
        done = {}
    info = {"name": name, "format": fmt, "mode": "merged" if merged else "shared", "files": files,
            "method": cfg["method"], "labels": cfg["labels"], "backbone": cfg["backbone"],
            "seconds": round(time.perf_counter() - t0, 2)} | _task(cfg) | done
    if merged:
        io = {"inputs": list(INPUTS), "outputs": list(merged_outputs(model))}
        (out / f"{name}.json").write_text(json.dumps(info | io, indent=2) + "\n")
    log(f"exported {name} ({cfg['method']}, {fmt}, {info['mode']}{prec.suffix()}) in {info['seconds']}s: "
        + ", ".join(f"{f} ({(out / f).stat().st_size / 1e6:.2f} MB)" for f in files))
    return info


def _export_merged(model, name: str, out: Path, fmt: str, fold_phm: bool, prec: Precision,
                   backbone: str) -> tuple[list[str], dict]:
    inference = merge(model, fold_phm)
    if fmt == "onnx":
        path = export_merged_onnx(inference, out / f"{name}.onnx")
        return [path.name], prec.apply(path, inference.encoder, forward=inference, backbone=backbone)  # folded
    args = example_inputs(model.encoder.config.vocab_size)
    files = [export_torchscript(inference, args, out / f"{name}.pt").name]
    pt2 = export_program(inference, example_inputs(model.encoder.config.vocab_size, batch=3, seq=9),
                         out / f"{name}.pt2")
    return files + ([pt2.name] if pt2 is not None else []), {}
