"""Export speed per encoder family at the same size, CPU (README table): BERT, DistilBERT, ELECTRA and
DeBERTa-v3 (deberta-v2 with v3's settings: relative attention, 256 log buckets, share_att_key, c2p|p2c), each
a random encoder built from transformers' own config class at hidden 384, 6 layers, 12 heads, FFN 1536 (the
size of all-MiniLM-L6-v2), with one adapter (--method, UniPELT by default). Variants: transformers
eager of the same plain backbone (attn_implementation="eager"), our PyTorch forward with the adapter, the
merged ONNX export and the shared graph (the adapter fed as inputs), at batch 1 x seq 32 and batch 32 x seq 128;
variants run interleaved in rounds, medians over all rounds; ratios are within one run (the machine is
shared and noisy). So the cost of each family's attention shows against BERT's at the same size.

    python bench/families.py [--method unipelt] [--reps 20] [--rounds 3] [--out bench/results/families.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file

from exporters.export import export_checkpoint, read_layout
from exporters.layout import bank_feed, stack
from hpeft_serve import checkpoint
from hpeft_serve.backbone import load_backbone
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.training import build_model

from export import timed  # bench/export.py: interleaved rounds, medians

D, L, H, F, VOCAB = 384, 6, 12, 1536, 30522
SHAPES = ((1, 32), (32, 128))
# family -> (transformers config class, its arguments at the common size)
FAMILIES = {
    "bert": ("BertConfig", dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F)),
    "distilbert": ("DistilBertConfig", dict(dim=D, n_layers=L, n_heads=H, hidden_dim=F)),
    "electra": ("ElectraConfig", dict(embedding_size=D, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                      intermediate_size=F)),
    "deberta-v3": ("DebertaV2Config", dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                           intermediate_size=F, relative_attention=True, position_buckets=256,
                                           max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True,
                                           pos_att_type="p2c|c2p", position_biased_input=False, type_vocab_size=0,
                                           layer_norm_eps=1e-7)),
}
VARIANTS = ("transformers eager (plain)", "hpeft PyTorch (adapter)", "ONNX merged", "ONNX shared (1 adapter)")


def make_backbone(family: str, folder: Path, seed: int):
    """A random Hugging Face encoder of `family` saved to `folder`; (transformers eager model, Backbone)."""
    import transformers
    cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    hf = transformers.AutoModel.from_config(getattr(transformers, cls)(vocab_size=VOCAB, max_position_embeddings=512,
                                                                        **kw), attn_implementation="eager")
    hf.save_pretrained(str(folder), safe_serialization=True)
    return hf.eval().requires_grad_(False), load_backbone(str(folder))


def make_ckpt(backbone, method: str, folder: Path, seed: int) -> Path:
    model = build_model(backbone, resolve(method, backbone.config.num_hidden_layers), HeadConfig(2), seed)
    model.adapters.eject_prefix()
    with torch.no_grad():  # every part non-zero (zero-initialised up-projections and LoRA B included)
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return checkpoint.save(model, backbone, folder, ("neg", "pos"), {})


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def batch_inputs(b: int, s: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 20000, (b, s), generator=g), torch.ones(b, s, dtype=torch.long)


def family_variants(family: str, method: str, work: Path, seed: int, threads: int):
    """The four callables of a family on (ids, mask), and the largest merged/shared vs PyTorch difference."""
    hf, bb = make_backbone(family, work / family, seed)
    ck = make_ckpt(bb, method, work / "ckpt" / family, seed)
    export_checkpoint(ck, work / "merged" / family, "onnx", merged=True, log=lambda *_: None)
    shared_dir = work / "shared" / family
    export_checkpoint(ck, shared_dir, "onnx", log=lambda *_: None)
    model, cfg = checkpoint.load(ck)
    merged = session(work / "merged" / family / f"{cfg['name']}.onnx", threads)
    shared = session(shared_dir / "backbone.onnx", threads)
    pack = [(load_file(str(shared_dir / "packs" / f"{cfg['name']}.safetensors")),
             json.loads((shared_dir / "packs" / f"{cfg['name']}.json").read_text())["sizes"])]
    feed = {k: v.numpy() for k, v in bank_feed(stack(pack), read_layout(shared_dir)).items()}

    def make(ids, mask):
        np_in = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        idx = {"adapter_index": np.zeros(len(ids), np.int64)}
        return {VARIANTS[0]: lambda: hf(input_ids=ids, attention_mask=mask).last_hidden_state,
                VARIANTS[1]: lambda: model(ids, mask),
                VARIANTS[2]: lambda: merged.run(["logits"], np_in),
                VARIANTS[3]: lambda: shared.run(["logits"], np_in | idx | feed)}

    ids, mask = batch_inputs(3, 20)
    mask[1, 12:] = 0  # a padded batch of mixed lengths for the exactness check
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    fns = make(ids, mask)
    diff = max(float(np.abs(fns[v]()[0] - ref).max()) for v in VARIANTS[2:])
    return make, diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="unipelt")
    ap.add_argument("--reps", type=int, default=20,
                    help="timed runs a round at batch 1 (batch 32: reps // 10, at least 2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs every variant reps times)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("bench/results/families.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="hpeft-bench-families-"))
    print(f"backbones, checkpoints and exports in {work}", file=sys.stderr)
    rows, diffs = [], {}
    for i, family in enumerate(FAMILIES):
        make, diffs[family] = family_variants(family, args.method, work, i, args.threads)
        for b, s in SHAPES:
            with torch.no_grad():
                ms = timed(make(*batch_inputs(b, s)), args.reps if b == 1 else max(2, args.reps // 10), args.rounds)
            rows += [{"family": family, "batch": b, "seq": s, "variant": v, "ms": ms[v]} for v in VARIANTS]
        print(f"{family}: done (merged/shared vs PyTorch max abs diff {diffs[family]:.1e})", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"method": args.method, "threads": args.threads, "rounds": args.rounds,
                                    "reps": args.reps, "size": {"hidden": D, "layers": L, "heads": H, "ffn": F},
                                    "max_abs_diff_vs_pytorch": diffs, "rows": rows}, indent=2) + "\n")
    report(args, rows, diffs)
    return 0


def report(args, rows: list[dict], diffs: dict) -> None:
    ms = {(r["family"], r["batch"], r["seq"], r["variant"]): r["ms"] for r in rows}
    print(f"hidden {D}, {L} layers, {H} heads, FFN {F}, + {args.method}; CPU, {args.threads} threads; medians of "
          f"{args.rounds} interleaved rounds (ms)\n")
    print("| family | batch x seq | transformers eager | hpeft PyTorch | ONNX merged | ONNX shared | merged vs eager "
          "| shared / merged | merged / BERT's merged | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in FAMILIES:
        for b, s in SHAPES:
            t = [ms[family, b, s, v] for v in VARIANTS]
            bert = ms["bert", b, s, VARIANTS[2]]
            print(f"| {family} | {b} x {s} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {t[3]:.2f} | "
                  f"{t[0] / t[2]:.2f}x faster | {t[3] / t[2]:.2f} | {t[2] / bert:.2f} | {diffs[family]:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
