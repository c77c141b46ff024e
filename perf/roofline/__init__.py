"""Roofline model of one training step, on paper: FLOPs and bytes per op class, predicted time and MFU ceiling.

    python -m perf.roofline                                  # SiT-XL/2 and JiT-B/16 + iREPA, batch 256, H200
    python -m perf.roofline --models SiT-XL/2 --device h100-sxm --micro_batch 128
    python -m perf.roofline --device h200,h100-sxm --record  # also perf/results/roofline.csv + RESULTS.md
    python -m perf.roofline --measured OUT/preflight.json    # the rates the GPU call's preflight measured
    python -m perf.suite_report --update                     # then the targets table shows the predictions

What is counted. The training step of perf/bench_step.py's case, built by the trainer's own
assembly (irepa.train.assemble.build_run) and run by the trainer's own step (one optimizer
step of the batch, micro-batches as the trainer's planner picks them for the device's
memory), on fake tensors (no memory, no arithmetic: SiT-XL/2 at batch 256 in about a minute
on one CPU core) under a TorchDispatchMode that sees every aten op the GPU would run: the
recipe's draws, the forward and backward of our model, projector and losses, gradient
clipping, AdamW (fused), EMA, and for the reference-style baseline its online encoder and
loss scaling.
CUDA's autocast policy (ATen's lists: matmuls in bf16/fp16, layer/RMS norms, pow, sum,
softmax, upsampling in fp32) is applied by a TorchFunctionMode, so the dtypes and casts,
and so the bytes, are those of a CUDA run, not of CPU autocast. Per op:
  FLOPs  matmul-class only (GEMMs, convolutions, attention; torch.utils.flop_counter's
         formulas; flash attention's backward includes its recompute of QK^T). Other ops
         run at < 3 FLOP per byte, far under the ~20 FLOP/byte ridge of the CUDA cores, so
         their time is their bytes.
  bytes  each input read once and each output written once (views and allocations move
         nothing; in-place ops write what they mutate). The fused Triton ops are counted
         with the traffic their docstrings design (the alignment forward reads y twice).
Op classes: GEMM, attention, norms+modulation (LayerNorm/RMSNorm and the adaLN shift and
scale, fused or not), elementwise (activations, residuals and gates, casts, RoPE, the
denoising loss, noise), alignment loss (spatial norm + cosine, forward and backward),
optimizer+EMA (gradient accumulation over micro-batches, clipping, AdamW, EMA, loss-scale
unscaling) and online encoder (the baseline's frozen ViT, all of its ops). Backward ops
take the class of the forward code that made their autograd node.

Time model. A GPU runs the step's kernels one after another, and inside one kernel the
memory traffic and the arithmetic overlap, so the step takes
    sum over kernels of max(FLOPs / matmul rate, bytes / bandwidth)
(not max(total FLOPs / rate, total bytes / bandwidth), which would assume overlap
across kernels, nor the plain sum, which would deny it inside a GEMM). Launch gaps and
sub-peak GEMM shapes are left out: the result is a ceiling, and the gap between it and a
measurement is what tuning can still win.

Which ops are kernels depends on the configuration:
  eager     every aten op is a kernel.
  compiled  the ops of one compiled graph (per block for `train.compile`, the whole
            network for the baseline's whole-model compile; forward and backward are
            separate graphs) that are neither GEMMs nor attention nor our Triton ops fuse:
            a pointwise or reduction op joins the region of an op it reads from (or that
            reads the same tensor) when everything else it reads was ready before that
            region began, so the region can run as one kernel. A region reads each outside
            tensor once and writes only what outside ops read later (saved activations
            included: the partitioner's recomputation is not modelled). This is ideal
            fusion: Inductor splits some of these regions (reductions over different axes),
            so measured compiled steps move more bytes than this.
Configurations (as perf/bench_step.py): eager; compile (per-block compile); compile+fusedloss
(+ the fused alignment loss; adaLN left to Inductor); compile+fused (+ fused adaLN too, the
trainer's CUDA default; the Triton op is opaque to Inductor, so the residual add and gate
around it cannot fuse with it); baseline
(reference style: whole-model compile, SDPA, fp16 autocast + dynamic loss scaling, MLP
projector, a ViT-B/14-sized encoder run online each step, in bf16 as the trainer runs it).

MFU = useful FLOPs (irepa.train.flops: model + projector, forward + backward, what
bench_step counts) / (predicted step time x the dense bf16 peak, 989 TFLOP/s on an
H100 SXM or H200); the measured matmul rate (~790) caps it at about 80% even for a step
of pure GEMMs. 'Beyond FLOPs' is a class's predicted time minus its FLOPs at the matmul
rate: the time fusion or a better kernel can remove; the three largest are printed.

Devices (hardware.py): h200 (measured on this workplace's H200: 790 TFLOP/s bf16 matmul, 4.3
TB/s device-to-device copy; nominal 4.8 TB/s), h100-sxm (measured on this workplace's H100: 798
TFLOP/s, 3.0 TB/s; nominal 3.35 TB/s). --measured takes both rates from a preflight.json of the
GPU call (perf/preflight.py: a GEMM at SiT's shapes and a large copy on the card itself);
--matmul_tflops, --bandwidth_tbs and --memory_gib override.

Layout: hardware (devices, measured rates), autocast (CUDA's policy on fake tensors), record
(tagging and recording ops), fusion (op classes, compile units, ideal fusion), trace (the step
and the loss alone on fake tensors), cost (the time model), report (CSV, RESULTS.md, printing),
cli (the command line).
"""
from perf.op_classes import CLASSES
from perf.roofline.autocast import CudaAutocast
from perf.roofline.cli import main
from perf.roofline.cost import SCOPES, Cost, alignment_prediction, beyond_flops, cost, format_cost
from perf.roofline.fusion import classify, compile_unit, fuse
from perf.roofline.hardware import DEVICES, Device, measured
from perf.roofline.record import TAG_KEY, Op, Recorder, Tagger
from perf.roofline.report import load_predictions, predict_device, render, row, update_results, write_csv
from perf.roofline.trace import CONFIGS, Trace, trace_alignment, trace_step

__all__ = ["CLASSES", "CONFIGS", "DEVICES", "SCOPES", "TAG_KEY", "Cost", "CudaAutocast", "Device", "Op", "Recorder",
           "Tagger", "Trace", "alignment_prediction", "beyond_flops", "classify", "compile_unit", "cost",
           "format_cost", "fuse", "load_predictions", "main", "measured", "predict_device", "render", "row",
           "trace_alignment", "trace_step", "update_results", "write_csv"]
