"""Perplexity of the same text and tokens as benchmarks/perplexity.py, computed by transformers: the reference.

It tells whether the engine's quantized paths lose more than the formats themselves:

  - dense:      transformers on the dense folder (float32);
  - fp8:        the dense model with FP8 rounding simulated in torch exactly as the format defines it
                (vLLM's online fp8 with per-channel weight scales): every decoder linear layer's weight
                rounded to e4m3 per output channel (scale = row amax / 448) and its input rounded to
                e4m3 per token (scale = token amax / 448) before the float32 matmul; lm_head and the
                embedding stay dense;
  - w4a16-rtn:  the dense model with every decoder linear weight rounded to 4-bit, symmetric, in groups
                of --group-size input features (scale = group amax / 7.5, q in -8..7, as compressed-tensors'
                symmetric int4 observer does);
  - checkpoint: transformers loading a compressed-tensors checkpoint itself (--checkpoint DIR), decompressed
                by compressed-tensors; or an AutoAWQ "gemm" checkpoint, which transformers loads only through
                gptqmodel (not installable here), so its weights are unpacked here as AutoAWQ's own
                dequantize_gemm defines them (unpack_awq_gemm, independent of the engine's loader) and
                transformers runs the model of the same config on them; a GPTQ checkpoint likewise
                (dequantize_gptq, which equals AutoGPTQ's own QuantLinear dequantization).

Windows and tokens are those of benchmarks/perplexity.py (the engine's tokenizer, --window tokens per
window, every token after a window's first predicted); transformers runs each window in one forward pass.

A quantized model's perplexity is one draw: rounding is discontinuous, so a change in the last float32 bits
of an activation (another summation order, as in a fused kernel) flips some roundings, and on a small deep
model those flips grow through the layers. --realizations N measures that spread: realization r > 0 scales
the embedding output by (1 + 1e-6 * noise of seed r), far below anything a format changes, and the rows
give each draw; an engine figure inside the spread is the format, not the engine.

    python -m benchmarks.perplexity_reference --variants dense,fp8,w4a16-rtn --checkpoint DIR --max-tokens 2048
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import print_table, save_json
from benchmarks.perplexity import TEXT, dense_folder
from engine.builtin_model import builtin_model_path
from engine.tokenizer_loader import load_tokenizer

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ's packing_utils: column j of each 8 is in nibble [j]


def fake_fp8(x: torch.Tensor) -> torch.Tensor:
    """x rounded to e4m3 along its last axis (one scale per row: row amax / 448), back in float32."""
    scale = (x.abs().amax(-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale


def fake_int4_symmetric(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """An [N, K] weight rounded to symmetric 4-bit in groups of group_size input features (-1: all K), in float32."""
    n, k = weight.shape
    group_size = k if group_size == -1 else group_size
    grouped = weight.float().reshape(n, k // group_size, group_size)
    scale = (grouped.abs().amax(-1, keepdim=True) / 7.5).clamp(min=1e-12)
    return ((grouped / scale).round().clamp(-8, 7) * scale).reshape(n, k)


def decoder_linears(model: nn.Module) -> list[nn.Linear]:
    return [module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in f".{name}"]


def simulate_fp8(model: nn.Module, weights: str | None = "channel", activations: bool = True) -> nn.Module:
    """FP8 weights ("channel": a scale per output row, "tensor": one scale, None: dense) and/or FP8 inputs
    per token on every decoder linear layer."""
    model = copy.deepcopy(model)
    for linear in decoder_linears(model):
        if weights == "channel":
            linear.weight.data = fake_fp8(linear.weight.data)
        elif weights == "tensor":
            linear.weight.data = fake_fp8(linear.weight.data.reshape(1, -1)).reshape(linear.weight.shape)
        if activations:
            linear.register_forward_pre_hook(lambda _module, args: (fake_fp8(args[0]).to(args[0].dtype),))
    return model


def simulate_w4a16(model: nn.Module, group_size: int) -> nn.Module:
    model = copy.deepcopy(model)
    for linear in decoder_linears(model):
        linear.weight.data = fake_int4_symmetric(linear.weight.data, group_size).to(linear.weight.dtype)
    return model


def perturb_embeddings(model: nn.Module, seed: int) -> nn.Module:
    """A copy whose embedding output is scaled by (1 + 1e-6 * standard normal noise of `seed`)."""
    model = copy.deepcopy(model)

    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed))
        return output * (1 + 1e-6 * noise)

    model.get_input_embeddings().register_forward_hook(hook)
    return model


def transformers_perplexity(model: nn.Module, tokens: list[int], window: int) -> tuple[float, int]:
    """exp(mean NLL) of every token after each window's first, one forward pass per window."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(tokens) - 1, window):
            ids = torch.tensor(tokens[start : start + window])[None]
            if ids.shape[1] < 2:
                break
            logits = model(ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / count), count


NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> [R, 8C]: nibble j of column c becomes column 8c + j (GPTQ's qzeros)."""
    return ((packed[:, :, None] >> NIBBLE_SHIFTS[None, None, :]) & 0xF).reshape(packed.shape[0], -1)


def unpack_gptq_rows(packed: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight int32 [R, C] -> [8R, C]: nibble j of row r is input row 8r + j."""
    return ((packed[:, None, :] >> NIBBLE_SHIFTS[None, :, None]) & 0xF).reshape(-1, packed.shape[1])


def unpack_awq_gemm(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ gemm int32 [R, C] -> its 4-bit values [R, 8C] in column order (nibble i of each int32 holds
    column 0 2 4 6 1 3 5 7 [i] of its 8, so column j is nibble AWQ_REVERSE_ORDER[j])."""
    nibbles = unpack_columns(packed).view(packed.shape[0], -1, 8)
    return nibbles[:, :, list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)


def dequantize_awq_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """The [N, K] float32 weight of an AWQ gemm layer: (q - z) * s, with z and s per group of input rows."""
    zeros = unpack_awq_gemm(qzeros).repeat_interleave(group_size, 0)
    return ((unpack_awq_gemm(qweight) - zeros) * scales.float().repeat_interleave(group_size, 0)).t().contiguous()


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor) -> torch.Tensor:
    """The [N, K] float32 weight of a GPTQ layer (AutoGPTQ's layout, checkpoint_format "gptq": qzeros hold z - 1):
    (q - z) * s, input row k taking group g_idx[k]'s z and s (act order shuffles g_idx)."""
    groups = g_idx.long()
    zeros = (unpack_columns(qzeros) + 1) & 0xF
    return ((unpack_gptq_rows(qweight) - zeros[groups]) * scales.float()[groups]).t().contiguous()


def dequantized_weight(module: str, tensors: dict[str, torch.Tensor], quantization_config: dict) -> torch.Tensor:
    parts = [tensors[f"{module}.{kind}"] for kind in ("qweight", "qzeros", "scales")]
    if quantization_config["quant_method"] == "awq":
        return dequantize_awq_gemm(*parts, quantization_config["group_size"])
    return dequantize_gptq(*parts, tensors[f"{module}.g_idx"])


def check_packed_format(path: Path, quantization_config: dict) -> None:
    config = quantization_config
    if config["quant_method"] == "awq":
        supported = config.get("version", "gemm").lower() == "gemm" and bool(config.get("zero_point"))
    else:
        supported = config.get("bits") == 4 and config.get("checkpoint_format", "gptq") == "gptq"
    if not supported:
        raise SystemExit(f"{path}: only AWQ gemm with zero points and 4-bit GPTQ (checkpoint_format gptq) are "
                         f"dequantized here, not {quantization_config}")


def load_packed_checkpoint(path: Path, quantization_config: dict) -> nn.Module:
    """transformers' float32 model of an AutoAWQ gemm or GPTQ folder's config, on weights dequantized here.

    AutoGPTQ writes a bias for every quantized layer, zeros where the model has none: those are dropped."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    check_packed_format(path, quantization_config)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    state = {}
    for name, tensor in tensors.items():
        module, _, kind = name.rpartition(".")
        quantized = f"{module}.qweight" in tensors
        if kind == "qweight":
            state[f"{module}.weight"] = dequantized_weight(module, tensors, quantization_config)
        elif not quantized or (kind == "bias" and tensor.any()):
            state[name] = tensor.float()
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise SystemExit(f"{path}: tensors missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def load_checkpoint(path: Path) -> nn.Module:
    """transformers' float32 model of a folder; a compressed-tensors checkpoint decompressed into plain weights,
    an AutoAWQ or GPTQ one dequantized by load_packed_checkpoint."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    quantization_config = json.loads((path / "config.json").read_text()).get("quantization_config")
    if quantization_config and quantization_config.get("quant_method") in ("awq", "gptq"):
        return load_packed_checkpoint(path, quantization_config)
    extra = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if quantization_config else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=builtin_model_path())
    parser.add_argument("--checkpoint", type=Path, nargs="+", default=[],
                        help="Compressed-tensors, AutoAWQ gemm or GPTQ checkpoints of the same model, one row each.")
    parser.add_argument("--work-dir", type=Path, default=Path("results/perplexity-models"))
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=64, help="w4a16-rtn group, -1 per channel (default: %(default)s).")
    parser.add_argument("--variants", default="dense,fp8,w4a16-rtn",
                        help="Rows among dense, fp8, fp8-per-tensor-weights, fp8-weights-only, fp8-activations-only, w4a16-rtn, "
                             "checkpoint (default: %(default)s).")
    parser.add_argument("--realizations", type=int, default=1,
                        help="Draws of each row, all but the first with perturbed embeddings (default: %(default)s).")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()

    folder = dense_folder(args.model, args.work_dir)
    tokens = load_tokenizer(str(folder)).encode(TEXT.read_text(encoding="utf-8"))[: args.max_tokens]
    dense = load_checkpoint(folder)
    builders = {
        "dense": [("dense", lambda: dense)],
        "fp8": [("fp8", lambda: simulate_fp8(dense))],
        "fp8-per-tensor-weights": [("fp8-per-tensor-weights", lambda: simulate_fp8(dense, weights="tensor"))],
        "fp8-weights-only": [("fp8-weights-only", lambda: simulate_fp8(dense, activations=False))],
        "fp8-activations-only": [("fp8-activations-only", lambda: simulate_fp8(dense, weights=None))],
        "w4a16-rtn": [(f"w4a16-rtn-g{args.group_size}", lambda: simulate_w4a16(dense, args.group_size))],
        "checkpoint": [(f"checkpoint {path.name}", lambda path=path: load_checkpoint(path))
                       for path in args.checkpoint],
    }
    rows = []
    for label, build in [row for name in args.variants.split(",") for row in builders[name]]:
        model = build()
        for realization in range(args.realizations):
            drawn = perturb_embeddings(model, realization) if realization else model
            value, count = transformers_perplexity(drawn, tokens, args.window)
            rows.append({"variant": label, "realization": realization, "perplexity": value, "tokens": count})
            print(f"{label} (realization {realization}): perplexity {value:.4f}", flush=True)
    print_table(rows, f"transformers perplexity on {TEXT.name} ({len(tokens)} tokens, windows of {args.window})")
    save_json(args.out, {"model": str(args.model), "text": TEXT.name, "window": args.window, "rows": rows})


if __name__ == "__main__":
    main()
