#!/usr/bin/env bash
# The paper's command: distil DeiT-Ti from RegNetY-160 with VkD (300 epochs). Variables and flags: scripts/train_deit.sh.
#   DATA=/data/imagenet2012 NGPU=1 OUT=output/ TEACHER_PATH=regnety_160-a5fe301d.pth [RECIPE=original] scripts/train_deit_ti.sh
STUDENT=deit_ti_distilled exec "$(dirname "$0")/train_deit.sh" "$@"
