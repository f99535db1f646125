"""One progress meter for the three trees' loops, running means for their log lines, and the run's
JSON-lines log and tensorboard writer."""
import datetime
import json
import os
import sys
import time
from collections import defaultdict
from typing import Dict, Mapping, Union

from tqdm import tqdm


class Progress:
    """``total`` steps with their ETA, shown only where ``enabled`` (rank 0): a tqdm bar on an interactive
    terminal, else one line every ``every`` steps and at the last. ``first`` is where a resumed loop starts."""

    def __init__(self, header: str, total: int, every: int, enabled: bool = True, first: int = 0):
        self.header, self.total, self.every, self.enabled, self.first = header, total, max(every, 1), enabled, first
        self.started = time.time()
        use_bar = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=first, desc=header, dynamic_ncols=True) if use_bar else None

    def eta_seconds(self, done: int) -> float:
        per_step = (time.time() - self.started) / max(done - self.first, 1)
        return per_step * (self.total - done)

    def due(self, done: int) -> bool:
        """Whether ``update(done)`` shows fields: at the first step of every ``every`` and at the last, as DeiT's
        logger. A loop whose fields cost a device sync computes them on these steps only."""
        return (done - 1) % self.every == 0 or done == self.total

    def update(self, done: int, fields: Union[None, str, Mapping[str, object]] = "") -> None:
        """After ``done`` steps (counted from 0, ``first`` included): a line (or the bar's text) when ``due``;
        ``fields`` None only advances the bar."""
        if self.bar is not None and self.enabled:
            if fields is not None:
                self.bar.set_postfix_str(_text(fields), refresh=False)
            self.bar.update(done - self.bar.n)
        elif fields is not None and self.due(done):
            self.line(done, fields)

    def line(self, done: int, fields: Union[str, Mapping[str, object]] = "") -> None:
        """One line now (or the bar's text), whatever ``every`` says."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(_text(fields))
            return
        eta = datetime.timedelta(seconds=int(self.eta_seconds(done)))
        print(f"{self.header} [{done}/{self.total}]  eta {eta}  {_text(fields)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _text(fields: Union[str, Mapping[str, object]]) -> str:
    return fields if isinstance(fields, str) else "  ".join(f"{name} {value}" for name, value in fields.items())


class RunningMeans:
    """Means of named scalars over the values added since the last ``reset``."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, float] = defaultdict(float)
        self.counts: Dict[str, int] = defaultdict(int)

    def add(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.sums[name] += float(value)
            self.counts[name] += 1

    def means(self) -> Dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


def append_json_line(path: str, record: Mapping[str, object]) -> None:
    """One JSON object per line (``log.txt``): a kill mid-write tears at most the last line."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def tensorboard_writer(output_dir: str):
    from torch.utils.tensorboard import SummaryWriter  # slow import, only where it is used
    return SummaryWriter(os.path.join(output_dir, "tensorboard"))
