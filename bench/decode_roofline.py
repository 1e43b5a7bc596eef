"""Batch-1 decode of an 8B-shaped random-weight Llama vs the memory roofline.

The model (Llama-3-8B shapes: 32 layers, hidden 4096, MLP 14336, 32/8 heads of 128, vocab
128256) is built in memory with random weights, so no checkpoint is written. Each decode step
reads every decoder and lm_head weight once, so tokens/s cannot beat
    bandwidth / (weight bytes read per step + KV bytes read per step);
the bandwidth is a device-to-device copy measured in the same run. Runs eagerly and as one
captured CUDA graph per step, in bf16 and with int8 / int4 weights.

    PYTHONPATH=. python bench/decode_roofline.py --out bench/results/decode.json   # on a GPU
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/decode_roofline.py --smoke         # CPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import Timer  # noqa: E402
from server.model.attn_metadata import AttentionMetadata  # noqa: E402
from server.model.hf_config import ModelArchConfig  # noqa: E402
from server.model.llama import LlamaForCausalLM  # noqa: E402
from server.model.loader import process_weights_after_loading  # noqa: E402
from server.model.quantization import QuantConfig  # noqa: E402

LLAMA_8B = ModelArchConfig(
    architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
    rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None, max_position_embeddings=8192,
    tie_word_embeddings=False)
SMOKE = dataclasses.replace(LLAMA_8B, vocab_size=512, hidden_size=128, intermediate_size=256,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32)
BLOCK = 16


def build(arch: ModelArchConfig, quant: str | None, device: torch.device) -> torch.nn.Module:
    qc = QuantConfig(quant) if quant else None
    with torch.device(device):
        model = LlamaForCausalLM(arch, dtype=torch.bfloat16, attention_backend="triton",
                                 quant=qc)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.02)
    process_weights_after_loading(model)
    return model.eval()


def bytes_read_per_step(model: torch.nn.Module) -> int:
    """Weights a decode step streams: everything except the embedding table (one row)."""
    embed = model.model.embed_tokens.weight
    tensors = [p for p in model.parameters() if p is not embed]
    # CPU Linears may hold their weight re-packed for oneDNN instead of as a parameter.
    tensors += [m.packed_weight for m in model.modules()
                if getattr(m, "packed_weight", None) is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


class Decoder:
    """One sequence's decode loop over static device buffers, so a step can be captured
    as a CUDA graph and replayed with the buffers advanced on the device."""

    def __init__(self, model: torch.nn.Module, arch: ModelArchConfig, prompt_len: int,
                 max_len: int, device: torch.device) -> None:
        self.model, self.device = model, device
        self.max_len = max_len
        nblocks = -(-max_len // BLOCK)
        shape = (2, nblocks + 1, BLOCK, arch.num_kv_heads, arch.head_dim)
        self.kv = [torch.zeros(shape, dtype=torch.bfloat16, device=device)
                   for _ in range(arch.num_layers)]
        self.table = torch.arange(1, nblocks + 1, dtype=torch.int32, device=device)[None]
        self.decode_qsl = torch.tensor([0, 1], dtype=torch.int32, device=device)
        ids = torch.randint(3, arch.vocab_size, (prompt_len,), device=device)
        logits = self.model.compute_logits(self._run(ids, torch.arange(prompt_len, device=device),
                                                     prompt_len)[-1:])
        # Static decode buffers: token, position, slot, context length.
        self.token = logits.argmax(-1)
        self.pos = torch.tensor([prompt_len], device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _meta(self, positions: torch.Tensor, seq_len: torch.Tensor | int, n: int,
              max_seq_len: int) -> AttentionMetadata:
        slots = self.table[0, positions // BLOCK].to(torch.int64) * BLOCK + positions % BLOCK
        lens = (seq_len if isinstance(seq_len, torch.Tensor)
                else torch.tensor([seq_len], device=self.device)).to(torch.int32)
        # No host-to-device copies while a graph is being captured: decode reuses a buffer.
        qsl = (self.decode_qsl if n == 1
               else torch.tensor([0, n], dtype=torch.int32, device=self.device))
        return AttentionMetadata(
            num_actual_tokens=n, slot_mapping=slots, query_start_loc=qsl,
            query_start_loc_cpu=[0, n], seq_lens=lens, seq_lens_cpu=[max_seq_len],
            block_tables=self.table, max_query_len=n, max_seq_len=max_seq_len,
            num_decodes=int(n == 1), block_size=BLOCK)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, seq_len: torch.Tensor | int
             ) -> torch.Tensor:
        n = ids.shape[0]
        meta = self._meta(positions, seq_len, n, self.max_len)
        return self.model(ids, positions, self.kv, meta)

    def step(self) -> None:
        """Decode one token in place: the buffers advance on the device, no host sync."""
        hidden = self._run(self.token, self.pos, self.pos + 1)
        self.token.copy_(self.model.compute_logits(hidden).argmax(-1))
        self.pos.add_(1)

    def capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up (Triton compiles) outside the graph
            self.step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def replay(self) -> None:
        assert self.graph is not None
        self.graph.replay()


@torch.inference_mode()
def run_one(arch: ModelArchConfig, quant: str | None, steps: int, timer: Timer,
            bandwidth: float, graphs: bool) -> dict:
    model = build(arch, quant, timer.device)
    weight_bytes = bytes_read_per_step(model)
    prompt = 128
    row: dict = {"quantization": quant or "bf16", "weight_bytes_per_step": weight_bytes}
    modes = ["eager"] + (["cuda_graph"] if graphs else [])
    for mode in modes:
        dec = Decoder(model, arch, prompt, prompt + 2 * steps + 8, timer.device)
        fn = dec.step
        if mode == "cuda_graph":
            dec.capture()
            fn = dec.replay
        for _ in range(3):
            fn()
        timer.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        timer.sync()
        row[f"{mode}_tok_per_s"] = steps / (time.perf_counter() - t0)
    ctx = prompt + steps
    kv_bytes = 2 * arch.num_layers * ctx * arch.num_kv_heads * arch.head_dim * 2
    roofline = bandwidth * 1e9 / (weight_bytes + kv_bytes)
    best = max(row[f"{m}_tok_per_s"] for m in modes)
    row.update(roofline_tok_per_s=roofline, fraction_of_roofline=best / roofline)
    del model
    if timer.cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/decode.json"),
                    help="JSON result file")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per run")
    ap.add_argument("--quantizations", default="bf16,int8,int4",
                    help="comma-separated subset of bf16, int8, int4")
    ap.add_argument("--smoke", action="store_true",
                    help="a 2-layer model on the CPU (TRITON_INTERPRET=1): checks the script")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --smoke with TRITON_INTERPRET=1 on the CPU")
    arch = SMOKE if args.smoke else LLAMA_8B
    timer = Timer(device)
    bandwidth = timer.copy_bandwidth_gbs(1 << 20 if args.smoke else 1 << 30)
    results: dict = {"device": (torch.cuda.get_device_name(device) if timer.cuda
                                else "cpu (interpreter)"),
                     "model": "Llama-3-8B shapes, random weights" if not args.smoke else "smoke",
                     "copy_gb_per_s": bandwidth, "runs": []}
    failed = False
    for q in args.quantizations.split(","):
        print(f"== decode {q}", flush=True)
        try:
            row = run_one(arch, None if q == "bf16" else q, 2 if args.smoke else args.steps,
                          timer, bandwidth, graphs=timer.cuda)
        except Exception as exc:  # noqa: BLE001 - record it and run the next variant
            traceback.print_exc()
            row, failed = {"quantization": q, "error": f"{type(exc).__name__}: {exc}"}, True
        print(json.dumps(row), flush=True)
        results["runs"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
