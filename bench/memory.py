"""Memory benchmark: peak memory of one full PPO step with one shared base vs separate role models.

For every model size × quant mode × sharing mode, a fresh subprocess loads the roles as the PPO stage
does, runs one warm-up PPO step (bitsandbytes compiles its CPU kernels on first use; the optimizer
state appears) and then the measured step (rollout, reference, reward, optimisation).
Measured per configuration:

* CPU: resident memory (RSS). ``baseline`` = RSS just before loading any model (Python, torch,
  transformers, peft and bitsandbytes imported); ``step peak`` = the highest RSS during the step
  (the peak counter is reset after the warm-up step, so load-time copies of the checkpoint do not
  count); ``process peak`` = the lifetime peak of the process (ru_maxrss: loading and warm-up included).
* GPU: ``torch.cuda.max_memory_allocated`` over the step (reset after the warm-up step); nothing before
  loading is allocated on the GPU, so there is no baseline to subtract.
* weights: bytes of the base weights (quantization statistics included) per quant mode, split into
  the linear layers bitsandbytes quantizes and the rest (embeddings, LM head, norms). On a GPU also a
  random-init model of Llama-2-7B's shapes (``llama2-7b``), weights only: at that size the embeddings and
  LM head that bitsandbytes leaves unquantized are 4% of the model, against 37% at 134M here.

Sizes: tiny (0.8M), small (35M), base (134M) in every quant mode; large (374M) in fp32 only.

The target ratio (shared / separate <= 0.45 at >= 100M parameters, fp32) is taken on the step peak
above the baseline: the runtime's few hundred MB are the same in both modes and not model memory.

    python bench/memory.py                      # every size × quant × shared, separate (about 8 min on 2 cores)
    python bench/memory.py --sizes tiny --quants fp32 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_SHARED_OVER_SEPARATE = 0.45
TARGET_4BIT_OVER_FP32 = 0.16


# ---------------------------------------------------------------------------------------- worker
def worker(args) -> dict:
    """One configuration, in this (fresh) process; returns the measurements."""
    import bitsandbytes  # noqa: F401  (imported before the baseline: it is part of the runtime, not the model)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from marl_exp.stages import rl  # noqa: F401

    cuda = torch.cuda.is_available() and args.device != "cpu"
    cfg = common.ppo_config(args.size, args.quant, args.sharing, batch=args.batch, new_tokens=args.new_tokens,
                            device="cuda" if cuda else "cpu",
                            extra=("stage.runtime.gradient_checkpointing=true",) if args.gradient_checkpointing else ())
    common.release_memory()
    baseline = common.rss_mib()
    roles, _, trainer = common.build_trainer(cfg)
    if not args.mmap:
        common.materialize_weights(*role_models(roles))
    common.release_memory()
    loaded = common.rss_mib()
    row = {"size": args.size, "quant": args.quant, "sharing": args.sharing, "batch": args.batch,
           "new_tokens": args.new_tokens, "gradient_checkpointing": args.gradient_checkpointing,
           "weights_materialized": not args.mmap,
           "params": base_parameter_count(roles.model),
           **weight_bytes(roles), "rss_baseline_mib": baseline, "rss_loaded_mib": loaded}
    started = time.perf_counter()
    trainer.step()  # warm-up: one-time costs (bitsandbytes compiles its CPU kernels; optimizer state appears)
    row["warmup_step_seconds"] = time.perf_counter() - started
    common.release_memory()
    row["rss_before_step_mib"] = common.rss_mib()
    if cuda:
        torch.cuda.synchronize()
        row["cuda_before_step_mib"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    peak_resettable = common.reset_peak_rss()
    started = time.perf_counter()
    trainer.step()  # the measured step
    if cuda:
        torch.cuda.synchronize()
        row["cuda_step_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    row["step_seconds"] = time.perf_counter() - started
    row["rss_step_peak_mib"] = common.peak_rss_mib() if peak_resettable else None
    row["rss_process_peak_mib"] = common.lifetime_peak_rss_mib()
    row["rss_step_peak_above_baseline_mib"] = (row["rss_step_peak_mib"] or row["rss_process_peak_mib"]) - baseline
    return row


def role_models(roles) -> list:
    return [roles.model] + [getattr(roles, attr) for attr in ("reference_model", "reward_model") if hasattr(roles, attr)]


def base_parameter_count(model) -> int:
    from marl_exp.modeling.multi_adapter import _adapter_of

    base = model.peft_model.get_base_model()
    # 4-bit weights pack two values per element: count the original shape's elements.
    return sum(getattr(getattr(p, "quant_state", None), "shape", p.shape).numel()
               for n, p in base.named_parameters() if _adapter_of(n) is None)


def weight_bytes(roles) -> dict:
    """Weight bytes of every model the roles hold, and of the shared base split by module kind."""
    import torch

    from marl_exp.modeling.multi_adapter import _adapter_of, _quant_state_bytes

    model = roles.model
    base = model.peft_model.get_base_model()
    modules = dict(base.named_modules())
    linear, other, linear_params, seen = 0, 0, 0, set()
    for name, tensor in list(base.named_parameters()) + list(base.named_buffers()):
        if _adapter_of(name) is not None:
            continue  # LoRA weights: counted with the heads below
        nbytes = tensor.numel() * tensor.element_size() + _quant_state_bytes(tensor, seen)
        owner = modules.get(name.rsplit(".", 1)[0])
        if isinstance(owner, torch.nn.Linear) and ".layers." in name:  # what bitsandbytes quantizes
            linear += nbytes
            linear_params += getattr(getattr(tensor, "quant_state", None), "shape", tensor.shape).numel()
        else:  # embeddings, LM head, norms, rotary buffers
            other += nbytes
    footprint = model.memory_footprint()
    out = {"weights_base_bytes": footprint["base_weights"], "weights_linear_bytes": linear,
           "linear_params": linear_params,
           "weights_other_bytes": other, "weights_adapters_heads_bytes": footprint["adapters"] + footprint["heads"],
           "weights_all_models_bytes": footprint["total"]}
    for attr in ("reference_model", "reward_model"):
        if hasattr(roles, attr):
            out["weights_all_models_bytes"] += common.tensor_bytes(getattr(roles, attr))
    return out


def weights_worker(args) -> dict:
    """Weight bytes of the base loaded with the quantized layers' neighbours in ``args.other_dtype`` (QLoRA: bf16),
    and its parameter count (original shapes): in fp32 the same model takes 4 bytes per parameter."""
    import torch
    from transformers import AutoModelForCausalLM

    from marl_exp.modeling.loading import quantization_config

    cfg = common.ppo_config(args.size, args.quant)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(cfg.stage.sft_model, dtype=getattr(torch, args.other_dtype),
                                                 quantization_config=quantization_config(cfg.quant),
                                                 device_map={"": "cuda" if cuda else "cpu"})
    params = sum(getattr(getattr(p, "quant_state", None), "shape", p.shape).numel() for p in model.parameters())
    row = {"size": args.size, "quant": args.quant, "other_dtype": args.other_dtype,
           "weights_base_bytes": common.tensor_bytes(model), "params": params}
    if cuda:  # what the GPU holds, as a cross-check of the counted bytes
        torch.cuda.synchronize()
        row["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
    return row


# ---------------------------------------------------------------------------------------- driver
# glibc keeps freed blocks of up to 32 MB in its heap (its mmap threshold grows with what was freed), so
# the RSS peak would also count tensors freed long before; a fixed threshold hands them back at once,
# which makes RSS follow live memory as torch.cuda.max_memory_allocated does on a GPU.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_config(size: str, quant: str, sharing: str, batch: int, new_tokens: int, extra: list[str] | None = None,
               worker_flag: str = "--worker", malloc_env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, worker_flag, "--sizes", size, "--quants", quant, "--sharing", sharing,
           "--batch", str(batch), "--new-tokens", str(new_tokens), *(extra or [])]
    env = {**os.environ, **(MALLOC_ENV if malloc_env is None else malloc_env)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"size": size, "quant": quant, "sharing": sharing, "failed": True, "error": tail}
    return json.loads(lines[-1])


# Sizes measured in fp32 only (a PPO step of every quant mode would take minutes each on a 2-core CPU), and the
# size the gradient-checkpointing rows are taken at (the largest one that needs it to meet the target).
FP32_ONLY = {"large"}
CHECKPOINTING_SIZE = "base"


def default_sizes() -> list[str]:
    """tiny to large; on a GPU also Llama-2-7B's shapes (weights only: built there in seconds)."""
    import torch

    return ["tiny", "small", "base", "large"] + (["llama2-7b"] if torch.cuda.is_available() else [])


def measure(sizes: list[str], quants: list[str], batch: int, new_tokens: int, checkpointing: bool = True,
            mmap: bool = False, default_malloc: bool = False, progress=print) -> dict:
    for size in sizes:  # build once, in a process of its own: its memory is no measured process's (ru_maxrss
        # is inherited through fork and exec) and the driver holds no GPU memory
        subprocess.run([sys.executable, __file__, "--build", "--sizes", size], check=True)
    stepped = [s for s in sizes if not common.SIZES[s].weights_only]
    flags = ["--mmap"] if mmap else []
    malloc_env = {} if default_malloc else MALLOC_ENV

    def run(size, quant, sharing, extra=(), worker_flag="--worker"):
        row = run_config(size, quant, sharing, batch, new_tokens, [*flags, *extra], worker_flag, malloc_env)
        if worker_flag == "--worker":
            progress(_progress_line(row))
        return row

    rows = [run(size, quant, sharing) for size in stepped for quant in quants
            if size not in FP32_ONLY or quant == "fp32" for sharing in ("shared", "separate")]
    if checkpointing and stepped:  # first quant mode, both sharings, with gradient checkpointing
        size = CHECKPOINTING_SIZE if CHECKPOINTING_SIZE in stepped else stepped[-1]
        rows += [run(size, quants[0], sharing, ["--gradient-checkpointing"]) for sharing in ("shared", "separate")]
    qlora = [run(size, quant, "shared", ["--other-dtype", "bfloat16"], "--weights-worker")
             for quant in quants if quant in ("8bit", "4bit") for size in sizes if size not in FP32_ONLY]
    for row in qlora:
        if common.SIZES[row["size"]].weights_only:
            progress(f"  {row['size']} {row['quant']} weights: " + (f"FAILED {row['error']}" if row.get("failed") else
                     f"{row['weights_base_bytes'] / 2**30:.2f} GiB = {row['weights_base_bytes'] / (4 * row['params']):.3f} of fp32"))
    return {"rows": rows, "weights_bf16_rest": qlora, "batch": batch, "new_tokens": new_tokens,
            "weights_materialized": not mmap, "malloc_env": malloc_env}


def _progress_line(row: dict) -> str:
    if row.get("failed"):
        return f"  {row['size']} {row['quant']} {row['sharing']}: FAILED {row['error']}"
    gc = " +checkpointing" if row.get("gradient_checkpointing") else ""
    return (f"  {row['size']} {row['quant']} {row['sharing']}{gc}: step peak {row['rss_step_peak_mib']:.0f} MiB "
            f"(above baseline {row['rss_step_peak_above_baseline_mib']:.0f}), {row['step_seconds']:.1f} s")


def peak_mib(row: dict) -> float:
    """The number the target ratio uses: GPU peak on a GPU, else RSS step peak above the baseline."""
    return row["cuda_step_peak_mib"] if "cuda_step_peak_mib" in row else row["rss_step_peak_above_baseline_mib"]


# Llama-2-7B's shapes, for projecting the measured bytes per parameter to a model whose embeddings
# are a small share (4%) of its weights, unlike the small models measured here.
LLAMA2_7B = {"linear_params": 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008), "other_params": 2 * 32000 * 4096 + 65 * 4096}


def summarize(result: dict) -> dict:
    """Ratios: shared/separate step peak per size and quant (and with gradient checkpointing), quantized
    weights/fp32 weights per size, and that weight ratio projected to Llama-2-7B's shapes."""
    ok = [r for r in result["rows"] if not r.get("failed")]
    by_key = {(r["size"], r["quant"], r["sharing"], bool(r.get("gradient_checkpointing"))): r for r in ok}
    sharing_ratio, weight_ratio = {}, {}
    for (size, quant, sharing, ckpt), row in by_key.items():
        other = by_key.get((size, quant, "separate", ckpt))
        if sharing == "shared" and other:
            sharing_ratio[f"{size}/{quant}" + ("/checkpointing" if ckpt else "")] = peak_mib(row) / peak_mib(other)
        fp32 = by_key.get((size, "fp32", "shared", False))
        if sharing == "shared" and not ckpt and fp32 and quant != "fp32":
            linear_bpp = row["weights_linear_bytes"] / row["linear_params"]  # bytes per quantized parameter
            weight_ratio[f"{size}/{quant}"] = {
                "total": row["weights_base_bytes"] / fp32["weights_base_bytes"],
                "linear_layers": row["weights_linear_bytes"] / fp32["weights_linear_bytes"],
                "linear_bytes_per_param": linear_bpp,
                "llama2_7b_projected_bf16_rest": _projected(linear_bpp, 2),
                "llama2_7b_projected_fp32_rest": _projected(linear_bpp, 4)}
    for row in result.get("weights_bf16_rest", []):
        key = f"{row['size']}/{row['quant']}"
        if row.get("failed"):
            continue
        if key in weight_ratio:
            fp32 = by_key[(row["size"], "fp32", "shared", False)]
            weight_ratio[key]["total_bf16_rest"] = row["weights_base_bytes"] / fp32["weights_base_bytes"]
        elif "params" in row:  # a weights-only size: fp32 is 4 bytes per parameter
            weight_ratio[key] = {"total_bf16_rest": row["weights_base_bytes"] / (4 * row["params"])}
    return {"shared_over_separate_peak": sharing_ratio, "quant_over_fp32_weights": weight_ratio}


def _projected(linear_bytes_per_param: float, other_bytes_per_param: int) -> float:
    shape = LLAMA2_7B
    quantized = shape["linear_params"] * linear_bytes_per_param + shape["other_params"] * other_bytes_per_param
    return quantized / ((shape["linear_params"] + shape["other_params"]) * 4)


def markdown(result: dict) -> str:
    mib = 2**20
    gpu = any("cuda_step_peak_mib" in r for r in result["rows"])
    head = ("| size | params | quant | sharing | weights (all models) | "
            + ("GPU step peak | " if gpu else "")
            + "RSS baseline | RSS step peak | step peak above baseline | process peak (load incl.) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        if r.get("failed"):
            lines.append(f"| {r['size']} | | {r['quant']} | {r['sharing']} | failed: {r['error'][:80]} |")
            continue
        sharing = r["sharing"] + (" + grad. ckpt" if r.get("gradient_checkpointing") else "")
        cells = [r["size"], f"{r['params'] / 1e6:.1f}M", r["quant"], sharing,
                 f"{r['weights_all_models_bytes'] / mib:.0f} MiB"]
        if gpu:
            cells.append(f"{r.get('cuda_step_peak_mib', float('nan')):.0f} MiB")
        cells += [f"{r['rss_baseline_mib']:.0f} MiB", f"{(r['rss_step_peak_mib'] or 0):.0f} MiB",
                  f"{r['rss_step_peak_above_baseline_mib']:.0f} MiB", f"{r['rss_process_peak_mib']:.0f} MiB"]
        lines.append("| " + " | ".join(cells) + " |")
    summary = summarize(result)
    lines += ["", "| size / quant | shared ÷ separate step peak |", "|---|---|"]
    lines += [f"| {key} | {ratio:.2f} |" for key, ratio in summary["shared_over_separate_peak"].items()]
    lines += ["", "| size / quant | weights ÷ fp32: whole base | … rest in bf16 (QLoRA) | … linear layers only "
                  "| Llama-2-7B projection, rest in bf16 |", "|---|---|---|---|---|"]
    for key, w in summary["quant_over_fp32_weights"].items():
        cells = [key, _fmt(w.get("total")), _fmt(w.get("total_bf16_rest")), _fmt(w.get("linear_layers")),
                 _fmt(w.get("llama2_7b_projected_bf16_rest"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(common.SIZES),
                        help="default: tiny small base large (fp32 only), and llama2-7b (weights only) on a GPU")
    parser.add_argument("--quants", nargs="+", default=["fp32", "8bit", "4bit"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--no-checkpointing-row", action="store_true", help="skip the gradient-checkpointing run")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "perf-memory.json")
    parser.add_argument("--append", action="store_true",
                        help="add these measurements to the rows already in --out (e.g. a size measured in a later run)")
    parser.add_argument("--quick", action="store_true", help="tiny only, fp32 and 4bit: a smoke run")
    # internal: one configuration in this process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sharing", default="shared", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--other-dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--mmap", action="store_true",
                        help="keep unquantized weights memory-mapped as loaded (see common.materialize_weights)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="glibc's default mmap threshold (RSS then also counts freed heap blocks)")
    common.add_allow_dirty(parser)
    args = parser.parse_args()
    if args.build:
        for size in args.sizes:
            common.model_dirs(size)
        return
    if args.worker or args.weights_worker:
        args.size, args.quant = args.sizes[0], args.quants[0]
        print(json.dumps(worker(args) if args.worker else weights_worker(args)))
        return
    common.refuse_dirty_publish(args.out, args.allow_dirty)
    if args.quick:
        args.sizes, args.quants, args.no_checkpointing_row = ["tiny"], ["fp32", "4bit"], True
    args.sizes = args.sizes or default_sizes()
    result = measure(args.sizes, args.quants, args.batch, args.new_tokens, not args.no_checkpointing_row,
                     mmap=args.mmap, default_malloc=args.default_malloc)
    if args.append and args.out.exists():
        earlier = json.loads(args.out.read_text())
        for key in ("rows", "weights_bf16_rest"):
            result[key] = earlier[key] + result[key]
    result.update(machine=common.machine(), summary=summarize(result))
    common.write_json(args.out, result)
    print("\n" + markdown(result) + f"\n\nwrote {args.out}")


if __name__ == "__main__":
    main()
