"""What every distillation method shares: the frozen teacher it owns (with the teacher-output cache and the
compiled forward), the flags it declares, and what it asks of the student.

A method is one subclass of ``Distiller`` in its own module of this package, registered in
``distillers.DISTILLERS``. The training loop calls ``criterion(samples, outputs, targets)`` with the student's
``StudentOutputs`` and logs the terms the method declares; nothing outside this package changes when a method
is added.
"""
import argparse
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from distillers.teacher_cache import TeacherCache, TeacherOutputs
from vkd.frozen import TeacherOwner, freeze
from vkd.losses import features_and_logits

INFINITY = float("inf")


class StudentOutputs(NamedTuple):
    """What one training forward of the student gives a distiller.

    ``logits``: the classification head's (a DeiT distilled student's cls head), which cross-entropy trains.
    ``dist_logits``: the distillation head's where the student has one, else ``logits`` again.
    ``features``: the projected feature (``student.projector`` applied to what the classifier reads; a DeiT
    distilled student's mean patch token) when the method asked for it, else None.
    """
    logits: torch.Tensor
    dist_logits: torch.Tensor
    features: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Flag:
    """A command-line flag a distiller reads. Several distillers may read one flag (the logit term's
    ``--gamma`` and ``--temperature``); it is declared once, where it is defined, and shared by import."""
    name: str  # "--alpha"
    help: str
    type: Optional[Callable] = float
    default: object = None
    choices: Optional[Sequence[str]] = None
    metavar: Optional[str] = None
    range: Optional[Tuple[float, float, bool, bool]] = None  # (low, high, low included, high included)
    switch: Optional[str] = None  # a boolean pair: the name of the --no-x form; ``type`` is then unused
    switch_help: str = argparse.SUPPRESS
    defines_run: bool = True  # a resume with another value is refused (False: the same function, computed otherwise)
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    def add_to(self, group) -> None:
        if self.switch is not None:
            group.add_argument(self.name, action="store_true", help=self.help)
            group.add_argument(self.switch, action="store_false", dest=self.dest, help=self.switch_help)
            group.set_defaults(**{self.dest: self.default})
            return
        group.add_argument(self.name, type=self.type, default=self.default, choices=self.choices,
                           metavar=self.metavar, help=self.help, **self.extra)


class Distiller(TeacherOwner):
    """A distillation method as the criterion of the training loop (DeiT's ``DistillationLoss`` shape): it owns
    the frozen teacher, so the loop is the same with and without distillation.

    A subclass sets the class attributes below and implements ``terms``; the class methods decide, from the
    parsed arguments, what the run must build (a teacher, a projector on the student) before the method exists.

    Parameters:
        args: the parsed arguments (read, never written).
        teacher: the frozen timm teacher, or None when ``needs_teacher(args)`` is False.
        base_criterion: the task loss on ``StudentOutputs.logits`` (label smoothing, mixup's soft targets, BCE).
        teacher_cache: where the teacher's outputs are looked up before running it (None: always run it).
        compile_backend: torch.compile the teacher's forward with this backend (None: not compiled); the first
            call, which compiles, logs its time through ``log``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]  # what it computes, one line (--help and README's table)
    source: ClassVar[str]  # the work it follows
    loss_terms: ClassVar[Tuple[str, ...]]  # its already-weighted terms; "loss", their sum, is added
    flags: ClassVar[Tuple[Flag, ...]] = ()
    needs_distillation_head: ClassVar[bool] = False  # refuses students with a single head

    def __init__(self, args, teacher: Optional[nn.Module], base_criterion: nn.Module,
                 teacher_cache: Optional[TeacherCache] = None, compile_backend: Optional[str] = None,
                 log: Callable[[str], None] = print):
        super().__init__()
        if self.needs_teacher(args) and teacher is None:
            raise ValueError(f"the {self.name} distiller needs a teacher")
        self.teacher = teacher if teacher is None else freeze(teacher)
        self.base_criterion = base_criterion
        self.teacher_cache = teacher_cache
        self.compile_backend, self.log = compile_backend, log
        self.compiled_teacher = None
        if compile_backend is not None and teacher is not None:
            self.compiled_teacher = torch.compile(lambda images: features_and_logits(self.teacher, images),
                                                  backend=compile_backend)
        self.compile_seconds: Optional[float] = None

    # ------------------------------------------------------------------ decisions made from the arguments

    @classmethod
    def needs_teacher(cls, args) -> bool:
        return True

    @classmethod
    def needs_teacher_logits(cls, args) -> bool:
        """Whether the teacher's logits are read: its classifier must then cover the data set's classes."""
        return cls.needs_teacher(args)

    @classmethod
    def projector(cls, args) -> Optional[str]:
        """The projector the student carries for the feature term ('orthogonal' or 'linear'), or None when the
        method reads no student feature."""
        return None

    @classmethod
    def trains_distillation_head(cls, args) -> bool:
        """Whether a two-head student's distillation head gets a gradient (else DDP must expect it unused, and
        the run evaluates best on its cls head)."""
        return False

    @classmethod
    def decays_projector(cls, args) -> bool:
        """Whether the projector's weights get weight decay like the student's."""
        return True

    @classmethod
    def inert_flags(cls, args) -> Sequence[Tuple[Sequence[str], str]]:
        """(destinations, why) of this method's flags that have no effect with these arguments."""
        return ()

    @classmethod
    def flag_dests(cls) -> Tuple[str, ...]:
        return tuple(flag.dest for flag in cls.flags)

    # ------------------------------------------------------------------ the criterion

    @property
    def terms_logged(self) -> Tuple[str, ...]:
        return ("loss",) + self.loss_terms

    def teacher_outputs(self, images: torch.Tensor) -> TeacherOutputs:
        """The frozen teacher's (pooled features, logits) of ``images``, from the cache when it has them."""
        with torch.no_grad():
            if self.teacher_cache is None:
                return self._run_teacher(images)
            return self.teacher_cache.outputs(images, self._run_teacher)

    def _run_teacher(self, images: torch.Tensor) -> TeacherOutputs:
        if self.compiled_teacher is None:
            return features_and_logits(self.teacher, images)
        if self.compile_seconds is not None:
            return self.compiled_teacher(images)
        start = time.perf_counter()
        outputs = self.compiled_teacher(images)
        self.compile_seconds = time.perf_counter() - start
        self.log(f"Teacher compiled with torch.compile (backend {self.compile_backend}) in {self.compile_seconds:.1f} s")
        return outputs

    def terms(self, samples: torch.Tensor, outputs: StudentOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Each of ``loss_terms``, already weighted."""
        raise NotImplementedError

    def forward(self, samples: torch.Tensor, outputs: StudentOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        terms = self.terms(samples, outputs, targets)
        total = terms[self.loss_terms[0]]
        for name in self.loss_terms[1:]:
            total = total + terms[name]
        terms["loss"] = total
        return terms
