#!/usr/bin/env bash
# The paper's command: evaluate a VkD DeiT-Ti checkpoint on ImageNet val. Variables and flags: scripts/eval_deit.sh.
#   DATA=/data/imagenet2012 CKPT=/ckpts/deit_tiny/latest.pth.tar NGPU=1 [OUT=eval_out/] scripts/eval_deit_ti.sh
STUDENT=deit_ti_distilled CKPT=${CKPT:-/ckpts/deit_tiny/latest.pth.tar} exec "$(dirname "$0")/eval_deit.sh" "$@"
