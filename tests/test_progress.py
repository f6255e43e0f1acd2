"""Progress bars: the trainer sets the postfix on every CPU step, so it must not redraw on every call."""
from __future__ import annotations

from harness.core.progress import progress_bar


def test_plain_bar_postfix_waits_for_the_redraw_interval(capsys) -> None:
    bar = progress_bar(total=500, desc="cell")
    for step in range(500):
        bar.update(1)
        bar.set_postfix(epoch=0, loss=f"{1.0 / (step + 1):.3f}")
    bar.close()
    redraws = capsys.readouterr().err.count("\r")
    assert 0 < redraws < 100  # tqdm's own interval (0.1 s); set_postfix alone redrew 500 times


def test_disabled_bar_takes_every_call() -> None:
    bar = progress_bar(total=3, desc="cell", enabled=False)
    bar.update(1)
    bar.set_postfix(epoch=0, loss="1.000")
    bar.close()
