"""The peak GPU memory estimator (selfalign/memory.py) against published QLoRA measurements.

    python bench/memory.py

No GPU needed: each published figure is set beside the estimate for the same model and setup,
and the ratio estimate / published is printed and written to bench/results/memory.json. The
architectures are the models' published config.json numbers (selfalign.memory.KNOWN).

Published figures, and the setup assumed where the source does not state it:
  LLaMA-Factory README, hardware table: QLoRA 4-bit, 7B: "6GB" (decimal GB). Its defaults: LoRA
      rank 8 on all linears, gradient checkpointing, bf16; batch 1 and 1024 tokens assumed.
  torchtune, Llama-3.1-8B QLoRA (llama3_1/8B_qlora_single_device): 7.4 GiB peak at batch 1; rank 8
      on q, v, output projections and the MLP, activation checkpointing, a chunked cross-entropy
      (8 chunks); 2048 tokens assumed.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfalign.memory import GIB, Plan, estimate

CASES = [
    (
        "LLaMA-Factory 7B QLoRA 4-bit",
        6e9,
        Plan(stage="sft", model="meta-llama/Llama-2-7b-hf", method="qlora", seq_len=1024, micro_batch=1, lora_r=8),
    ),
    (
        "torchtune Llama-3.1-8B QLoRA bs1",
        7.4 * GIB,
        Plan(
            stage="sft",
            model="meta-llama/Llama-3.1-8B-Instruct",
            method="qlora",
            seq_len=2048,
            micro_batch=1,
            lora_r=8,
            chunked_loss=8,
            lora_targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ),
    ),
]


def main() -> None:
    rows = []
    print(f"{'case':<36} {'published':>10} {'estimate':>9} {'ratio':>6} {'w/o ctx':>8}")
    for name, published, plan in CASES:
        est = estimate(plan)
        ratio = est["total"] / published
        no_ctx = (est["total"] - est["cuda_context"]) / published
        rows.append(
            {
                "case": name,
                "published_gib": round(published / GIB, 2),
                "estimate_gib": round(est["total"] / GIB, 2),
                "ratio": round(ratio, 3),
                "ratio_without_cuda_context": round(no_ctx, 3),
                "terms_gib": {k: round(v / GIB, 3) for k, v in est.items()},
            }
        )
        print(f"{name:<36} {published / GIB:>8.2f}Gi {est['total'] / GIB:>7.2f}Gi {ratio:>6.2f} {no_ctx:>8.2f}")
    out = Path(__file__).resolve().parent / "results" / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
