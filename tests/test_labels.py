"""Grid labels tell cells apart, and a failed cell's log line says why it failed."""
from __future__ import annotations

from harness.core.config import compose_config, finalize
from harness.run.labels import distinguish_labels, first_line


def _cell(tiny: list[str], *extra: str) -> dict:
    return finalize(compose_config(tiny + list(extra)))


def test_cells_differing_only_in_lr_get_distinct_labels(tiny: list[str]) -> None:
    cells = distinguish_labels([_cell(tiny, "trainer.optimizer.lr=0.01"), _cell(tiny, "trainer.optimizer.lr=0.1"),
                                _cell(tiny, "method=trades", "trainer.optimizer.lr=0.1")])
    labels = [c["label"] for c in cells]
    assert labels == ["test_resnet/erm/s0 trainer.optimizer.lr=0.01", "test_resnet/erm/s0 trainer.optimizer.lr=0.1",
                      "test_resnet/trades/s0"]  # trades is alone under its label: nothing to add


def test_several_differences_and_untouched_unique_labels(tiny: list[str]) -> None:
    cells = distinguish_labels([_cell(tiny, "method=trades", "method.beta=1", "trainer.epochs=1"),
                                _cell(tiny, "method=trades", "method.beta=6", "trainer.epochs=2"),
                                _cell(tiny, "seed=1")])
    assert cells[0]["label"] == "test_resnet/trades/s0 method.beta=1 trainer.epochs=1"
    assert cells[1]["label"] == "test_resnet/trades/s0 method.beta=6 trainer.epochs=2"
    assert cells[2]["label"] == "test_resnet/erm/s1"
    assert len({c["key"] for c in cells}) == 3


def test_first_line_of_a_failure() -> None:
    assert first_line("ValueError: lr too big\nTraceback (most recent call last):\n  ...") == ": ValueError: lr too big"
    assert first_line(None) == "" and first_line("\n  \n") == ""
