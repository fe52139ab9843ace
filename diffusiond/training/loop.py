"""The step loop every resumable trainer here shares: progress bar, time budget, periodic and Ctrl-C checkpoints.

A trainer keeps its own state (``step``, ``loss``) and knows how to take one
step and how to save a checkpoint; this loop decides when to save and when to
stop, so that every trainer resumes the same way: run the same command again.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class Resumable(Protocol):
    step: int
    loss: float

    def save_checkpoint(self) -> None:
        ...


def run_steps(
    trainer: Resumable,
    train_step: Callable[[], float],
    total: int,
    *,
    desc: str,
    budget_s: float | None,
    checkpoint_every_s: float,
    progress: bool,
    on_step: Callable[[float], None] | None = None,
) -> bool:
    """Take ``train_step`` until ``trainer.step`` reaches ``total`` (True), or until ``budget_s`` of this run
    is spent (False); checkpoint every ``checkpoint_every_s``, at the end, at the budget and on Ctrl-C (which
    is re-raised). ``on_step`` gets the seconds this run has taken, after every step."""
    started = last_save = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=trainer.step, desc=desc, unit="step", dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
    try:
        while trainer.step < total:
            trainer.loss = train_step()
            trainer.step += 1
            now = time.perf_counter()
            if on_step is not None:
                on_step(now - started)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{trainer.loss:.4f}", refresh=False)
            if budget_s is not None and now - started >= budget_s and trainer.step < total:
                trainer.save_checkpoint()
                log.warning("%s: time budget spent at step %d/%d; run the same command again to resume",
                            desc, trainer.step, total)
                return False
            if now - last_save >= checkpoint_every_s:
                trainer.save_checkpoint()
                last_save = now
    except KeyboardInterrupt:
        trainer.save_checkpoint()
        log.warning("%s: interrupted at step %d; checkpoint saved, run the same command again to resume",
                    desc, trainer.step)
        raise
    finally:
        if bar is not None:
            bar.close()
    trainer.save_checkpoint()
    return True
