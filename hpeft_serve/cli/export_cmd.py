"""`hpeft export CKPT --out DIR [--format onnx|torchscript] [--merge] [--quantize int8 | --precision fp16]`."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("checkpoint", type=Path, help="checkpoint folder (adapter_config.json + adapter.safetensors)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--merge", action="store_true", help="one standalone model for this adapter (folded)")
    p.add_argument("--fold-phm", action="store_true", help="with --merge: fold PHM (Compacter) layers into dense "
                   "weights instead of hpeft::PHMLinear nodes (faster at small adapter widths; see README)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="CPU: the frozen backbone's MatMuls int8 (onnxruntime dynamic, per channel); adapters, "
                   "heads and LayerNorms stay fp32; answers within the tolerance the README states, not exact")
    p.add_argument("--no-smooth", action="store_true", help="with --quantize int8: quantize without the "
                   "SmoothQuant smoothing (calibrated on fixed training sentences) that is done by default")
    p.add_argument("--no-signature-graphs", action="store_true", help="shared ONNX: write only the union's graph, "
                   "not also the graph of this adapter's slot kinds (which serves its batches faster; see README)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: the graph in fp16 for CUDA (inputs and outputs stay fp32); default fp32 (exact)")


def run(args) -> int:
    from ..errors import HpeftError
    try:
        from exporters.export import export_checkpoint
    except ImportError as e:
        raise HpeftError(f"export needs onnx, onnxruntime and onnxscript ({e}): pip install 'hpeft-serve[export]'") \
            from None
    export_checkpoint(args.checkpoint, args.out, args.format, args.merge, fold_phm=args.fold_phm,
                      quantize=args.quantize, precision=args.precision, smooth=not args.no_smooth,
                      signature_graphs=not args.no_signature_graphs)
    return 0
