"""The `robustgrid` command.

    robustgrid run [overrides...]            one cell, in this process
    robustgrid eval model=<id> [overrides...] evaluate a model trained elsewhere (no training)
    robustgrid grid grid=demo [overrides...] a grid of cells on Ray, then the leaderboard
    robustgrid status grid=demo [overrides...] done/failed/running/pending cells, from the results store
    robustgrid list methods|attacks|architectures|datasets
    robustgrid data prepare NAME [--source ARCHIVE] [--out DIR|URI] [--size N] [--samples-per-shard N]
    robustgrid leaderboard --results DIR --out DIR

Overrides are Hydra's (`method=trades trainer.epochs=5 attack=[pgd]`); see configs/.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from harness.core.config import ConfigError
    from harness.core.errors import DataError
    from harness.core.registry import UnknownPluginError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, UnknownPluginError, ValueError) as err:
        console.print(f"[red]error:[/] {err}", markup=True, highlight=False)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustgrid", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers()

    run = sub.add_parser("run", help="run one cell in this process")
    run.add_argument("overrides", nargs="*")
    run.set_defaults(func=_cmd_run)

    ev = sub.add_parser("eval", help="evaluate a model trained elsewhere: model=timm:<name> model.checkpoint=PATH "
                                     "| model=py:<module>:<function> | model=robustgrid:<cell key>")
    ev.add_argument("overrides", nargs="*")
    ev.set_defaults(func=_cmd_eval)

    grid = sub.add_parser("grid", help="run a grid of cells on Ray, then build the leaderboard")
    grid.add_argument("overrides", nargs="*")
    grid.add_argument("--no-leaderboard", action="store_true", help="skip building the site")
    grid.set_defaults(func=_cmd_grid)

    status = sub.add_parser("status", help="done/failed/running/pending cells of a grid, from its results store")
    status.add_argument("overrides", nargs="*", help="the grid's overrides, as given to `robustgrid grid`")
    status.add_argument("--results", help="results folder or URI (alone: every cell the store holds)")
    status.add_argument("--list", action="store_true", help="also print each cell's state")
    status.set_defaults(func=_cmd_status)

    lst = sub.add_parser("list", help="print registered plugin names, one per line; broken ones on stderr")
    lst.add_argument("kind", choices=["methods", "attacks", "architectures", "datasets", "poisons"])
    lst.set_defaults(func=_cmd_list)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers()
    prep = data_sub.add_parser("prepare", help="convert a dataset into WebDataset shards")
    prep.add_argument("name")
    prep.add_argument("--source", type=Path, help="local archive/folder to convert (see `robustgrid list datasets`)")
    prep.add_argument("--root", "--out", dest="root", default=os.environ.get("ROBUSTGRID_DATA", "data"),
                      help="folder or URI (s3://bucket/prefix, gs://...) the dataset folder is written under")
    prep.add_argument("--size", type=int, help="imagefolder/hf: resize (shorter side) + center-crop to SIZE")
    prep.add_argument("--samples-per-shard", type=int, help="samples per shard (default: per dataset)")
    prep.set_defaults(func=_cmd_prepare)

    board = sub.add_parser("leaderboard", help="build the static leaderboard site from results")
    board.add_argument("--results", type=Path, default=Path("results"))
    board.add_argument("--out", type=Path, default=Path("site"))
    board.set_defaults(func=_cmd_leaderboard)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from harness.core.config import compose_config, finalize

    cfg = finalize(compose_config(args.overrides))  # bad names fail here, before heavy imports

    from harness.run.cell import run_cell
    from harness.data.ensure import ensure_prepared
    from harness.run.grid import validate_cell
    from harness.store.results import read_cell_result, result_path

    validate_cell(cfg)
    ensure_prepared(cfg["data"])
    console.print(f"cell {cfg['label']} key={cfg['key']}")
    outcome = run_cell(cfg)
    table = read_cell_result(result_path(cfg["results_dir"], cfg["key"]))
    _print_rows(table.to_pylist() if table is not None else [])
    if outcome.status != "ok":
        console.print(f"[red]cell failed:[/] {outcome.error}", highlight=False)
        return 1
    print(outcome.result_path)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """`run` for a model given by `model=...`; the model is loaded and checked before any attack,
    so bad input exits with an error and writes nothing to the results store."""
    from harness.core.config import ConfigError, compose_config, finalize

    cfg = finalize(compose_config(args.overrides))
    if not cfg.get("model"):
        raise ConfigError("robustgrid eval needs a model: model=timm:<name> model.checkpoint=<path>, "
                          "model=py:<module>:<function> or model=robustgrid:<cell key>")
    from harness.data.ensure import ensure_prepared
    from harness.data.shards import load_manifest
    from harness.eval.external_model import load_external_model

    ensure_prepared(cfg["data"])
    manifest = load_manifest(Path(cfg["data"]["dir"]))
    load_external_model(cfg["model"], manifest["num_classes"], in_chans=manifest["channels"],
                        img_size=int(cfg["data"].get("img_size") or manifest["image_size"][0]),
                        results_dir=cfg["results_dir"])
    return _cmd_run(args)


def _cmd_grid(args: argparse.Namespace) -> int:
    from harness.run.grid import expand_grid, run_grid

    cells = expand_grid(args.overrides)
    first = cells[0]
    report = run_grid(cells, ray_address=first["ray"].get("address"), num_cpus=first["ray"].get("num_cpus"))
    n_ok = len(report.skipped) + len(report.outcomes) - len(report.failed)
    console.print(f"grid done in {report.seconds:.1f}s: {n_ok} ok, {len(report.failed)} failed, "
                  f"{len(report.skipped)} reused")
    results_dirs = sorted({c["results_dir"] for c in cells})
    if not args.no_leaderboard:
        from leaderboard import build_site
        from harness.store.storage import local_path

        for results_dir in results_dirs:
            if local_path(results_dir) is None:
                console.print(f"leaderboard skipped for remote store {results_dir}: copy it locally, then "
                              f"`robustgrid leaderboard --results DIR`")
                continue
            index = build_site(local_path(results_dir), Path(first["leaderboard_dir"]))
            console.print("leaderboard:")
            print(index.resolve())
    return 1 if report.failed else 0


def _cmd_status(args: argparse.Namespace) -> int:
    from harness.run.status_report import status_command

    return status_command(args.overrides, args.results, args.list)


def _cmd_list(args: argparse.Namespace) -> int:
    from harness.core.registry import REGISTRIES

    registry = REGISTRIES[args.kind]
    for name in registry.names():
        print(name)
    for broken in registry.broken():  # the good ones are listed; a broken package is named, not fatal
        console.print(f"[yellow]warning:[/] {registry.kind} '{broken.name}' not listed: {broken.describe()}",
                      markup=True, highlight=False, soft_wrap=True)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from harness.core.registry import DATASETS

    plugin = DATASETS.get(args.name)()
    options = {k: v for k, v in (("size", args.size), ("samples_per_shard", args.samples_per_shard)) if v}
    out = plugin.prepare(args.root, args.source, **options)
    print(out)
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from leaderboard import build_site

    if not args.results.is_dir():
        raise ValueError(f"results folder {args.results} does not exist; run a grid first or pass --results DIR")
    print(build_site(args.results, args.out).resolve())
    return 0


def _print_rows(rows: list[dict]) -> None:
    table = Table("attack", "eps", "clean acc", "robust acc", "status")
    for row in rows:
        fmt = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        table.add_row(str(row.get("attack")), f"{row['eps']:.4f}" if row.get("eps") is not None else "-",
                      fmt(row.get("clean_acc")), fmt(row.get("robust_acc")), row["status"])
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
