"""GPU check of the serving runtime: with onnxruntime-gpu and a GPU, SharedRuntime picks the CUDA provider
and its logits on a padded batch that mixes adapters of every method equal the PyTorch forward.

Two steps, so that the GPU machine needs no torch and no training:

    python bench/gpu_check.py prepare OUT   # here (torch): tiny-BERT adapters of every method, one shared
                                            # export, a mixed padded batch and its PyTorch logits
    python bench/gpu_check.py check OUT     # on the GPU host (numpy + onnxruntime-gpu only): prints a table
    python bench/gpu_check.py triton OUT    # on the GPU host with nvidia-pytriton + tritonclient too: the
                                            # same batch through the real tritonserver, model hpeft on CUDA

    python bench/gpu_check.py prepare-speed OUT   # here (torch): MiniLM, the 8 adapters of bench/export.py's
                                                  # mixed rows, merged UniPELT and the shared graph, fp32 and fp16
    python bench/gpu_check.py speed OUT           # on the GPU host: bench/export.py's mixed-batch rows on CUDA,
                                                  # fp32 and fp16, through SharedRuntime (bank bound on the device)

`check` and `triton` exit 1 when CUDA is not the provider in use or a difference exceeds 1e-5; `speed` exits
1 when CUDA is not in use (`speed OUT --cpu` runs the same on CPU, to try the script where no GPU is) or
when its fp32 mixed batch differs from the CPU run of the same graph by more than 1e-5.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("sparse_adapter", "mam", "unipelt", "compacter", "compacter_pp", "s4", "lora")
TOL = 1e-5


def prepare(out: Path) -> None:
    import numpy as np
    import torch

    from exporters.export import export_checkpoint
    from hpeft_serve import checkpoint
    from hpeft_serve.backbone import load_backbone
    from hpeft_serve.methods.presets import resolve
    from hpeft_serve.model import HeadConfig
    from hpeft_serve.training import build_model

    bb = load_backbone("tiny-bert")
    g = torch.Generator().manual_seed(0)
    refs, names = [], []
    rows = 2 * len(METHODS)
    ids = torch.randint(1000, 5000, (rows, 19), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        mask[r, max(2, 19 - 2 * r):] = 0
    for i, m in enumerate(METHODS):
        model = build_model(bb, resolve(m, bb.config.num_hidden_layers, {}), HeadConfig(2), i)
        model.adapters.eject_prefix()
        with torch.no_grad():  # every part non-zero, as after training
            for p in model.adapters.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        ck = checkpoint.save(model, bb, out / "ckpt" / m, ("neg", "pos"), {})
        export_checkpoint(ck, out / "export", "onnx", merged=False, log=lambda *_: None)
        model, _ = checkpoint.load(ck)
        with torch.no_grad():
            refs.append(model(ids, mask).numpy())
        names.append(m)
    # row r runs adapter METHODS[r % n]
    ref = np.stack([refs[r % len(METHODS)][r] for r in range(rows)])
    np.savez(out / "batch.npz", input_ids=ids.numpy(), attention_mask=mask.numpy(), logits=ref)
    (out / "batch.json").write_text(json.dumps({"adapters": [METHODS[r % len(METHODS)] for r in range(rows)]}))
    print(f"prepared {out}: {len(METHODS)} adapters, batch {tuple(ids.shape)}")


def check(out: Path) -> int:
    import numpy as np
    import onnxruntime as ort

    from hpeft_serve.serving.runtime import SharedRuntime, default_providers

    b = np.load(out / "batch.npz")
    names = json.loads((out / "batch.json").read_text())["adapters"]
    providers = default_providers()
    print(f"onnxruntime {ort.__version__}, available {ort.get_available_providers()}, chosen {providers}")
    rows, ok = [], True
    for label, prov in (("default", providers), ("cpu", ["CPUExecutionProvider"])):
        rt = SharedRuntime(out / "export", providers=prov)
        used = rt.session.get_providers()[0]
        logits, errs, _ = rt.infer(b["input_ids"], b["attention_mask"], names)
        assert not any(errs), errs
        diff = max(float(np.abs(l - ref).max()) for l, ref in zip(logits, b["logits"]))
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            rt.infer(b["input_ids"], b["attention_mask"], names)
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append((label, used, diff, statistics.median(times)))
        ok &= diff <= TOL
    print("\n| runtime | provider in use | max abs diff vs PyTorch | p50 ms (batch %d x %d, %d adapters mixed) |"
          % (*b["input_ids"].shape, len(set(names))))
    print("|---|---|---|---|")
    for label, used, diff, ms in rows:
        print(f"| {label} | {used} | {diff:.2e} | {ms:.2f} |")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        ok &= bank_on_device(out, b, names, providers)
    if "CUDAExecutionProvider" in ort.get_available_providers() and rows[0][1] != "CUDAExecutionProvider":
        print("FAIL: a GPU is available but the runtime did not use the CUDA provider")
        ok = False
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def bank_on_device(out: Path, b, names: list[str], providers, copies: int = 60) -> bool:
    """With a big bank (every adapter `copies` times), the bank fed from host memory on every forward vs
    bound on the GPU once (what the runtime does on CUDA): same logits, and the time of a mixed batch."""
    import shutil

    import numpy as np

    from hpeft_serve.serving.runtime import SharedRuntime
    store = out / "big-store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    many = []
    for f in sorted((out / "export" / "packs").glob("*.json")):
        for i in range(copies):
            name = f"{f.stem}-{i}"
            shutil.copy(f.with_suffix(".safetensors"), store / f"{name}.safetensors")
            (store / f"{name}.json").write_text(f.read_text().replace(f'"name": "{f.stem}"', f'"name": "{name}"'))
            many.append(name)
    rows, results = [], []
    ids, mask = b["input_ids"], b["attention_mask"]
    mixed = [f"{n}-{copies - 1}" for n in names]
    for label, bind in (("bank fed from host memory each forward", False), ("bank bound on the device", True)):
        rt = SharedRuntime(out / "export", providers=providers, store=str(store), bind_bank=bind)
        for k in range(0, len(many), len(ids)):  # every adapter resident
            chunk = many[k:k + len(ids)]
            rt.infer(ids[:len(chunk)], mask[:len(chunk)], chunk)
        logits, errs, _ = rt.infer(ids, mask, mixed)
        assert not any(errs), errs
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            rt.infer(ids, mask, mixed)
            times.append((time.perf_counter() - t0) * 1e3)
        results.append(np.stack(logits))
        rows.append((label, len(rt.bank.names()), rt.bank.nbytes() / 2 ** 20, statistics.median(times)))
    diff = float(np.abs(results[0] - results[1]).max())
    ref = max(float(np.abs(lg[:len(r)] - r).max()) for lg, r in zip(results[1], b["logits"]))
    print(f"\n| GPU, {rows[0][1]} adapters resident | bank MB | p50 ms, batch {tuple(ids.shape)} mixed |\n|---|---|---|")
    for label, _, mb, ms in rows:
        print(f"| {label} | {mb:.0f} | {ms:.2f} |")
    print(f"\nbound vs fed max abs diff {diff:.1e}; bound vs PyTorch {ref:.2e}")
    return diff <= TOL and ref <= TOL


def triton(out: Path) -> int:
    import numpy as np
    import tritonclient.grpc as grpcclient

    from hpeft_serve.serving.client import free_ports, hpeft_inputs
    from hpeft_serve.serving.deploy import deploy
    from hpeft_serve.serving.triton import TritonServer

    b = np.load(out / "batch.npz")
    names = json.loads((out / "batch.json").read_text())["adapters"]
    repo = out / "repo"
    deploy(out / "export", repo)
    http, grpc, metrics = free_ports()
    with TritonServer(repo, http, grpc, metrics, work=out / "triton") as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        logits = client.infer("hpeft", hpeft_inputs(grpcclient, b["input_ids"], b["attention_mask"], names)).as_numpy("logits")
        times = []
        one = hpeft_inputs(grpcclient, b["input_ids"][:1], b["attention_mask"][:1], names[:1])
        for _ in range(50):
            t0 = time.perf_counter()
            client.infer("hpeft", one)
            times.append((time.perf_counter() - t0) * 1e3)
        log = server.log.read_text(errors="replace")
    providers = [line for line in log.splitlines() if "onnxruntime providers" in line]
    diff = float(max(np.abs(l[:len(r)] - r).max() for l, r in zip(logits, b["logits"])))
    on_cuda = bool(providers) and "CUDAExecutionProvider" in providers[-1]
    used = providers[-1].split("hpeft: ")[-1].rstrip('"') if providers else "?"
    print(f"\ntritonserver (nvidia-pytriton wheel), model hpeft: {used}\n")
    print(f"| mixed batch {tuple(b['input_ids'].shape)}, {len(set(names))} adapters, gRPC | max abs diff vs PyTorch "
          f"{diff:.2e} | batch-1 p50 {statistics.median(times):.2f} ms |")
    ok = on_cuda and diff <= TOL
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


SPEED_SHAPES = ((1, 32), (32, 128))


def prepare_speed(out: Path) -> None:
    """MiniLM checkpoints of bench/export.py's 8 mixed methods; UniPELT merged and all 8 shared, fp32 and
    fp16; the batches; and the CPU fp32 logits of the mixed 32 x 128 batch (what CUDA fp32 must equal)."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    from export import MIXED, batch_inputs, make_ckpt  # bench/export.py

    from exporters.export import export_checkpoint
    from hpeft_serve.backbone import load_backbone
    from hpeft_serve.serving.runtime import SharedRuntime

    bb = load_backbone("minilm")
    cks = {m: make_ckpt(bb, m, out / "ckpt", i) for i, m in enumerate(MIXED)}
    for prec in ("fp32", "fp16"):
        export_checkpoint(cks["unipelt"], out / f"merged-{prec}", merged=True, precision=prec, log=lambda *_: None)
        for m in MIXED:
            export_checkpoint(cks[m], out / f"shared-{prec}", precision=prec, log=lambda *_: None)
        print(f"exported {prec}", flush=True)
    arrays = {}
    for b, s in SPEED_SHAPES:
        ids, mask = batch_inputs(b, s)
        arrays[f"ids_{b}x{s}"], arrays[f"mask_{b}x{s}"] = ids.numpy(), mask.numpy()
    b, s = SPEED_SHAPES[-1]
    rt = SharedRuntime(out / "shared-fp32", providers=["CPUExecutionProvider"])
    logits, errs, _ = rt.infer(arrays[f"ids_{b}x{s}"], arrays[f"mask_{b}x{s}"], [MIXED[r % 8] for r in range(b)])
    assert not any(errs), errs
    np.savez(out / "speed.npz", cpu_logits=np.stack(logits), **arrays)
    (out / "speed.json").write_text(json.dumps({"adapters": list(MIXED), "merged": "unipelt"}))
    print(f"prepared {out}")


def speed(out: Path, cpu: bool = False) -> int:
    """Merged vs shared (1 adapter, 8 methods mixed) at each shape, fp32 and fp16, interleaved rounds,
    medians; the shared rows through SharedRuntime, as served (on CUDA the bank bound on the device)."""
    import numpy as np
    import onnxruntime as ort

    from hpeft_serve.serving.runtime import SharedRuntime, default_providers

    providers = ["CPUExecutionProvider"] if cpu else default_providers()
    print(f"onnxruntime {ort.__version__}, available {ort.get_available_providers()}, chosen {providers}")
    if not cpu and providers[0] != "CUDAExecutionProvider":
        print("FAIL: no CUDA provider (speed OUT --cpu runs the script on CPU)")
        return 1
    a = np.load(out / "speed.npz")
    cfg = json.loads((out / "speed.json").read_text())
    mixed_names, ok = cfg["adapters"], True
    print("\n| precision | batch x seq | merged ms | shared 1 adapter | shared 8 methods mixed | bank bound |")
    print("|---|---|---|---|---|---|")
    for prec in ("fp32", "fp16"):
        merged = ort.InferenceSession(str(out / f"merged-{prec}" / f"{cfg['merged']}.onnx"), providers=providers)
        rt = SharedRuntime(out / f"shared-{prec}", providers=providers)
        for b, s in SPEED_SHAPES:
            ids, mask = a[f"ids_{b}x{s}"], a[f"mask_{b}x{s}"]
            one, mixed = [cfg["merged"]] * b, [mixed_names[r % 8] for r in range(b)]
            for names in (one, mixed):  # resident, and their signature graphs built
                rt.infer(ids, mask, names)
                if rt.graphs is not None:
                    rt.graphs.wait([rt.bank.pack(n).needs for n in dict.fromkeys(names)])
            variants = {"merged": lambda: merged.run(["logits"], {"input_ids": ids, "attention_mask": mask}),
                        "one": lambda: rt.infer(ids, mask, one), "mixed": lambda: rt.infer(ids, mask, mixed)}
            times = {k: [] for k in variants}
            for _ in range(3):
                for k, fn in variants.items():
                    fn()
                    for _ in range(30 if b == 1 else 10):
                        t0 = time.perf_counter()
                        fn()
                        times[k].append((time.perf_counter() - t0) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {prec} | {b} x {s} | {med['merged']:.2f} | {med['one']:.2f} ({med['one'] / med['merged']:.2f}x) "
                  f"| {med['mixed']:.2f} ({med['mixed'] / med['merged']:.2f}x) | {rt.bind_bank} |", flush=True)
            if prec == "fp32" and (b, s) == SPEED_SHAPES[-1]:
                logits, errs, _ = rt.infer(ids, mask, mixed)
                diff = float(np.abs(np.stack(logits) - a["cpu_logits"]).max())
                print(f"\nfp32 {b} x {s} mixed vs the CPU run of the same graph: max abs diff {diff:.2e}\n")
                ok &= not any(errs) and diff <= TOL
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    cmds = ("prepare", "check", "triton", "prepare-speed", "speed")
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in cmds or (len(sys.argv) == 4 and sys.argv[3] != "--cpu"):
        sys.exit(__doc__)
    out = Path(sys.argv[2])
    if sys.argv[1] == "prepare":
        prepare(out)
    elif sys.argv[1] == "prepare-speed":
        prepare_speed(out)
    elif sys.argv[1] == "speed":
        sys.exit(speed(out, cpu=len(sys.argv) == 4))
    else:
        sys.exit({"check": check, "triton": triton}[sys.argv[1]](out))
