#!/usr/bin/env bash
# The paper's command: distil DeiT-S from RegNetY-160 with VkD (300 epochs). Variables and flags: scripts/train_deit.sh.
#   DATA=/data/imagenet2012 NGPU=1 OUT=output/ TEACHER_PATH=regnety_160-a5fe301d.pth [RECIPE=original] scripts/train_deit_s.sh
STUDENT=deit_s_distilled exec "$(dirname "$0")/train_deit.sh" "$@"
