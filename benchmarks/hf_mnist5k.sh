#!/usr/bin/env bash
# Issue 14 on real data (CPU, a few minutes): a Hugging Face ViT directory, written by transformers'
# save_pretrained (random weights, 28 px, 1 channel, 4 layers), fine-tuned on mnist5k by gpusq, written back as
# an HF directory (the "owned" model), then compressed to int8, evaluated from the output alone, and
# exported for transformers (reloaded, logits compared).   usage: bash benchmarks/hf_mnist5k.sh [OUT_DIR]
set -euo pipefail
export TQDM_DISABLE=1  # the log without progress bars
D=${1:-runs/hf_mnist5k}
rm -rf "$D"; mkdir -p "$D"
python - "$D/vit_random" <<'PY'
import sys
import torch
import transformers

torch.manual_seed(0)
cfg = transformers.ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=96, num_hidden_layers=4,
                             num_attention_heads=3, intermediate_size=384, num_labels=10)
transformers.ViTForImageClassification(cfg).save_pretrained(sys.argv[1])
PY
common=(--data mnist5k --device cpu --workers 0)
gpusq train --init "$D/vit_random" --epochs 10 --lr 2e-3 --out "$D/train" "${common[@]}"
gpusq export --format hf --checkpoint "$D/train" --out "$D/my-vit" --verify random          # the user's HF model
gpusq eval --checkpoint "$D/my-vit" "${common[@]}"                                             # the teacher as HF dir
gpusq compress --teacher "$D/my-vit" --recipe int8 --out "$D/int8" "${common[@]}"
gpusq eval --checkpoint "$D/int8" "${common[@]}"                                               # the output alone
gpusq export --format hf --checkpoint "$D/int8" --out "$D/int8_hf" --verify random             # back to transformers
python - "$D/int8_hf" <<'PY'
import sys
from transformers import AutoModelForImageClassification

m = AutoModelForImageClassification.from_pretrained(sys.argv[1], local_files_only=True)
zeros = {n: float((p == 0).float().mean()) for n, p in m.named_parameters() if n.endswith("weight") and p.dim() >= 2}
print(f"transformers reloaded {type(m).__name__}: {sum(z >= 0.5 for z in zeros.values())} of {len(zeros)} weight "
      "matrices hold >= 50% zeros (2:4; the classifier stays dense)")
PY
