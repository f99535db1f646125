#!/usr/bin/env bash
# The three rows of one paper column (DiffAugment only, VkD + LayerNorm teacher, VkD + whitened teacher), one
# after the other, each through scripts/gen_train.sh.
#   COLUMN=c10_10pct DATA=/data/cifar10 OUT=output scripts/gen_paper_rows.sh   (CLIP=... INCEPTION=... offline)
# COLUMN: c10_10pct, c10_20pct, c10_100pct, c100_10pct, c100_20pct or c100_100pct.
set -euo pipefail
cd "$(dirname "$0")/.."
COLUMN=${COLUMN:?set COLUMN, e.g. c10_10pct}
OUT=${OUT:-output}
for ROW in da vkd_layernorm vkd_whiten; do
    CONFIG="configs/generation/${COLUMN}_${ROW}.yaml" OUT="$OUT/${COLUMN}_${ROW}" scripts/gen_train.sh "$@"
done
