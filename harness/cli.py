"""The `robustgrid` command.

    robustgrid run [overrides...] [--cfg job] [-m]      one cell in this process (-m: a Hydra sweep, cell by cell)
    robustgrid eval model=<id> [overrides...]            evaluate a model trained elsewhere (no training)
    robustgrid grid grid=demo [overrides...] [--dry-run] [--cfg job] [-m]
                                                         a grid of cells on Ray, then the leaderboard
    robustgrid status grid=demo [overrides...] [--list]  done/failed/running/pending cells, from the results store
    robustgrid list methods|attacks|architectures|datasets|poisons
    robustgrid data prepare NAME [--source ARCHIVE] [--out DIR|URI] [--size N] [--samples-per-shard N]
    robustgrid leaderboard --results DIR --out DIR
    robustgrid report --results DIR --format markdown|latex [--out FILE]
    robustgrid compare RESULTS_A RESULTS_B               cells whose numbers differ beyond their intervals

Overrides are Hydra's (`method=trades trainer.epochs=5 attack=[pgd]`), and may come before, after
or between flags. Under -m, Hydra's sweep syntax (`method=erm,pgd_at seed=0,1,2`, `range(0,3)`)
expands into a grid: every combination is one cell, composed exactly as a grid's axes are.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
OVERRIDES_HELP = "Hydra overrides, e.g. method=trades trainer.epochs=5 (any order with the flags)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] not in commands:
        _top_parser(commands).print_help(sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    build, func = commands[argv[0]]
    # parse_intermixed_args: flags and overrides in any order (`status grid=demo --list results_dir=..`)
    args = build().parse_intermixed_args(argv[1:])
    from harness.core.config import ConfigError
    from harness.core.errors import DataError
    from harness.core.registry import UnknownPluginError

    try:
        return int(func(args) or 0)
    except (ConfigError, DataError, UnknownPluginError, ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/] {err}", markup=True, highlight=False)
        return 2
    except KeyboardInterrupt:  # one line and the way back, not a traceback: committed cells are kept
        rerun = " ".join(["robustgrid", *argv])
        console.print(f"interrupted: cells committed so far are kept; `{rerun}` continues where this stopped",
                      highlight=False, soft_wrap=True)
        return 130


def config_groups_help() -> str:
    """The config groups under configs/ and their options, for --help (read from the files)."""
    root = resources.files("configs")
    lines = ["config groups (select with group=option; see configs/<group>/<option>.yaml):"]
    for group in sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = sorted(p.name[:-5] for p in (root / group).iterdir() if p.name.endswith(".yaml"))
        if options:
            lines.append(f"  {group:10} {', '.join(options)}")
    lines += ["", "other keys: seed, results_dir, leaderboard_dir, eval.*, resources.*, ray.*, and any "
              "key of a group, e.g. trainer.epochs=5 attack.pgd.steps=10 (print them all: --cfg job)"]
    return "\n".join(lines)


def _sub(prog: str, description: str, epilog: bool = True) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"robustgrid {prog}", description=description,
                                   epilog=config_groups_help() if epilog else None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _hydra_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    parser.add_argument("--cfg", choices=["job"], help="print the resolved config of each cell (YAML) and exit")
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="Hydra sweep: key=a,b (or range/choice) gives one cell per combination")


def _run_parser() -> argparse.ArgumentParser:
    parser = _sub("run", "Run one cell in this process (with -m: every cell of a sweep, one after another).")
    _hydra_flags(parser)
    return parser


def _eval_parser() -> argparse.ArgumentParser:
    parser = _sub("eval", "Evaluate a model trained elsewhere, without training: model=timm:<name> "
                          "model.checkpoint=PATH | model=py:<module>:<function> | model=robustgrid:<cell key>.")
    _hydra_flags(parser)
    return parser


def _grid_parser() -> argparse.ArgumentParser:
    parser = _sub("grid", "Run a grid of cells on Ray, then build the leaderboard.")
    _hydra_flags(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cells (key, resources, state, estimated cost) and exit: nothing runs")
    parser.add_argument("--no-leaderboard", action="store_true", help="skip building the site")
    return parser


def _status_parser() -> argparse.ArgumentParser:
    parser = _sub("status", "done/failed/running/pending cells of a grid, from its results store.")
    parser.add_argument("overrides", nargs="*", help="the grid's arguments, as given to `robustgrid grid`")
    parser.add_argument("-m", "--multirun", action="store_true", help="the grid was a Hydra sweep (`grid -m ...`)")
    parser.add_argument("--results", help="results folder or URI (alone: every cell the store holds)")
    parser.add_argument("--list", action="store_true", help="also print each cell's state")
    return parser


def _list_parser() -> argparse.ArgumentParser:
    parser = _sub("list", "Print registered plugin names, one per line; broken ones on stderr.", epilog=False)
    parser.add_argument("kind", choices=["methods", "attacks", "architectures", "datasets", "poisons", "analyses"])
    return parser


def _data_parser() -> argparse.ArgumentParser:
    parser = _sub("data", "Dataset tools: convert a dataset into WebDataset shards.", epilog=False)
    parser.add_argument("action", choices=["prepare"])
    parser.add_argument("name")
    parser.add_argument("--source", type=Path, help="local archive/folder to convert (see `robustgrid list datasets`)")
    parser.add_argument("--root", "--out", dest="root", default=os.environ.get("ROBUSTGRID_DATA", "data"),
                        help="folder or URI (s3://bucket/prefix, gs://...) the dataset folder is written under")
    parser.add_argument("--size", type=int, help="imagefolder/hf: resize (shorter side) + center-crop to SIZE")
    parser.add_argument("--samples-per-shard", type=int, help="samples per shard (default: per dataset)")
    return parser


def _leaderboard_parser() -> argparse.ArgumentParser:
    parser = _sub("leaderboard", "Build the static leaderboard site from results.", epilog=False)
    parser.add_argument("--results", default="results", help="results folder or store URI (s3://..., gs://...)")
    parser.add_argument("--out", type=Path, default=Path("site"))
    return parser


def _report_parser() -> argparse.ArgumentParser:
    parser = _sub("report", "Write the leaderboard as a paper table (Markdown or LaTeX).", epilog=False)
    parser.add_argument("--results", default="results", help="results folder or store URI (s3://..., gs://...)")
    parser.add_argument("--format", choices=["markdown", "latex"], default="markdown")
    parser.add_argument("--out", type=Path, help="write to this file (default: stdout)")
    return parser


def _compare_parser() -> argparse.ArgumentParser:
    parser = _sub("compare", "Cells whose numbers differ between two results stores beyond their 95%% intervals "
                  "(regression between commits). Exit 1 when some do.", epilog=False)
    parser.add_argument("a", help="results folder or store URI A (e.g. the previous commit's)")
    parser.add_argument("b", help="results folder or store URI B")
    return parser


def _commands() -> dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]]:
    return {
        "run": (_run_parser, _cmd_run),
        "eval": (_eval_parser, _cmd_eval),
        "grid": (_grid_parser, _cmd_grid),
        "status": (_status_parser, _cmd_status),
        "list": (_list_parser, _cmd_list),
        "data": (_data_parser, _cmd_prepare),
        "leaderboard": (_leaderboard_parser, _cmd_leaderboard),
        "report": (_report_parser, _cmd_report),
        "compare": (_compare_parser, _cmd_compare),
    }


def _top_parser(commands: dict[str, Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustgrid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="`robustgrid COMMAND --help` for a command's flags.\n\n"
                                     + config_groups_help())
    parser.add_argument("command", choices=list(commands))
    return parser


def _cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cells the overrides select: a sweep under -m, else one cell (run) or the grid (grid)."""
    from harness.core.config import ConfigError
    from harness.run.sweep import expand_sweep, has_sweep

    if has_sweep(args.overrides) and not args.multirun:
        raise ConfigError("an override lists several values (Hydra sweep syntax, e.g. seed=0,1); "
                          "add -m to run one cell per combination")
    return expand_sweep(args.overrides)


def _print_configs(cells: list[dict[str, Any]]) -> int:
    from omegaconf import OmegaConf

    for i, cfg in enumerate(cells):
        if i:
            print("---")
        print(f"# cell {cfg['key']} ({cfg.get('label', '')})")
        print(OmegaConf.to_yaml(cfg), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    cells = _cells(args)  # bad names fail here, before heavy imports
    if args.cfg == "job":
        return _print_configs(cells)

    from harness.run.cell import run_cell
    from harness.run.grid import preflight_grid
    from harness.store.results import read_cell_result, result_path

    preflight_grid(cells, prepare=True, leaderboard=False)  # every check, the data prepared and checked too
    failed = 0
    for cfg in cells:
        console.print(f"cell {cfg['label']} key={cfg['key']}")
        outcome = run_cell(cfg)
        table = read_cell_result(result_path(cfg["results_dir"], cfg["key"]))
        _print_rows(table.to_pylist() if table is not None else [])
        if outcome.status != "ok":
            console.print(f"[red]cell failed:[/] {outcome.error}", highlight=False)
            failed += 1
            continue
        print(outcome.result_path)
    return 1 if failed else 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """`run` for models given by `model=...`; each model is loaded and checked before any attack,
    so bad input exits with an error and writes nothing to the results store."""
    from harness.core.config import ConfigError

    cells = _cells(args)
    if args.cfg == "job":
        return _print_configs(cells)
    from harness.data.ensure import ensure_prepared
    from harness.data.shards import load_manifest
    from harness.eval.external_model import load_external_model

    for cfg in cells:
        if not cfg.get("model"):
            raise ConfigError("robustgrid eval needs a model: model=timm:<name> model.checkpoint=<path>, "
                              "model=py:<module>:<function> or model=robustgrid:<cell key>")
        ensure_prepared(cfg["data"])
        manifest = load_manifest(Path(cfg["data"]["dir"]))
        load_external_model(cfg["model"], manifest["num_classes"], in_chans=manifest["channels"],
                            img_size=int(cfg["data"].get("img_size") or manifest["image_size"][0]),
                            results_dir=cfg["results_dir"])
    return _cmd_run(args)


def _cmd_grid(args: argparse.Namespace) -> int:
    cells = _cells(args)
    if args.cfg == "job":
        return _print_configs(cells)
    if args.dry_run:  # every check a run makes, then the plan: nothing trains, Ray does not start
        from harness.run.grid import preflight_grid

        preflight_grid(cells, prepare=False, leaderboard=not args.no_leaderboard)
        return _print_plan(cells)
    from harness.run.grid import run_grid

    first = cells[0]
    report = run_grid(cells, ray_address=first["ray"].get("address"), num_cpus=first["ray"].get("num_cpus"),
                      leaderboard=not args.no_leaderboard)
    n_ok = len(report.skipped) + len(report.outcomes) - len(report.failed)
    console.print(f"grid done in {report.seconds:.1f}s: {n_ok} ok, {len(report.failed)} failed, "
                  f"{len(report.skipped)} reused")
    results_dirs = sorted({c["results_dir"] for c in cells})
    if not args.no_leaderboard:
        from leaderboard import build_site

        for results_dir in results_dirs:  # a local folder or any store URI
            index = build_site(results_dir, Path(first["leaderboard_dir"]))
            console.print("leaderboard:")
            print(index.resolve())
    return 1 if report.failed else 0


def _print_plan(cells: list[dict[str, Any]]) -> int:
    """The dry-run table on stdout: one line per cell, then totals per state and the estimate."""
    from harness.run.dry_run import device_hours, plan

    out = Console(width=200)
    for results_dir in sorted({c["results_dir"] for c in cells}):
        planned = plan([c for c in cells if c["results_dir"] == results_dir], results_dir)
        table = Table("key", "label", "resources", "state", "est. time", "est. device-h", "measured on",
                      title=f"dry run: {len(planned)} cells -> {results_dir}")
        for cell in planned:
            hours = device_hours(cell)
            table.add_row(cell.key, cell.label, cell.resources, cell.state,
                          "—" if cell.est_seconds is None else _duration(cell.est_seconds),
                          "—" if hours is None else f"{hours:.3g}", cell.basis)
        out.print(table)
        todo = [c for c in planned if c.state not in ("done", "running")]
        known = [device_hours(c) for c in todo if c.est_seconds is not None]
        counts = {s: sum(c.state == s for c in planned) for s in dict.fromkeys(c.state for c in planned)}
        out.print(", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {len(todo)} to run, estimated "
                  f"{sum(known):.3g} device-hours for {len(known)} of them"
                  + (f" ({len(todo) - len(known)} with no measured setup)" if len(known) < len(todo) else ""))
    return 0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}min" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def _cmd_status(args: argparse.Namespace) -> int:
    from harness.run.status_report import status_command

    return status_command(_cells(args) if args.overrides else None, args.results, args.list)


def _cmd_list(args: argparse.Namespace) -> int:
    from harness.core.registry import REGISTRIES

    registry = REGISTRIES[args.kind]
    for name in registry.names():
        print(f"{name}\t{_role(registry.get(name))}".rstrip())
    for broken in registry.broken():  # the good ones are listed; a broken package is named, not fatal
        console.print(f"[yellow]warning:[/] {registry.kind} '{broken.name}' not listed: {broken.describe()}",
                      markup=True, highlight=False, soft_wrap=True)
    return 0


def _role(plugin: object) -> str:
    """What a listed plugin is, beyond its registry: a backdoor defense (a method) or detector (an analysis)."""
    if getattr(plugin, "backdoor_defense", False) is True:
        return "backdoor defense"
    if getattr(plugin, "detector", False) is True:
        return "backdoor detector"
    return ""


def _cmd_prepare(args: argparse.Namespace) -> int:
    from harness.core.registry import DATASETS

    plugin = DATASETS.get(args.name)()
    if "://" not in str(args.root):  # a local --out: writable, said before the conversion starts
        from harness.run.preflight import check_folder_writable

        check_folder_writable(args.root, "--out")
    options = {k: v for k, v in (("size", args.size), ("samples_per_shard", args.samples_per_shard)) if v}
    out = plugin.prepare(args.root, args.source, **options)
    print(out)
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from leaderboard import build_site

    _check_results(args.results)
    from harness.run.preflight import check_folder_writable

    check_folder_writable(args.out, "--out")
    print(build_site(args.results, args.out).resolve())
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from leaderboard.report import report

    _check_results(args.results)
    if args.out:
        from harness.run.preflight import check_folder_writable

        check_folder_writable(Path(args.out).parent, "--out")
    text = report(args.results, args.format)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(args.out)
    else:
        print(text, end="")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from leaderboard.compare import compare, format_differences

    for location in (args.a, args.b):
        _check_results(location)
    differences, n_common = compare(args.a, args.b)
    print(format_differences(differences, n_common), end="")
    return 1 if differences else 0


def _check_results(location: str) -> None:
    """ValueError naming the fix when a results folder is missing or a store URI is unreachable."""
    from harness.run.status_report import check_store_reachable
    from harness.store.storage import local_path

    folder = local_path(location)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"results folder {location} does not exist; run a grid first or pass --results DIR|URI")
    check_store_reachable(location)


def _print_rows(rows: list[dict]) -> None:
    table = Table("attack", "eps", "clean acc", "robust acc", "status", "integrity flags")
    for row in rows:
        fmt = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        flags = ", ".join(row.get("flags") or []) or ("no flags" if row.get("status") == "ok" else "-")
        table.add_row(str(row.get("attack")), f"{row['eps']:.4f}" if row.get("eps") is not None else "-",
                      fmt(row.get("clean_acc")), fmt(row.get("robust_acc")), row["status"],
                      f"[red]{flags}[/]" if row.get("flags") else flags)
    console.print(table)
    for row in rows:
        if row.get("flags"):
            console.print(f"[red]warning:[/] {row.get('attack')} carries integrity flags {row['flags']}: this "
                          "robust accuracy is untrustworthy (see docs/attacks.md)", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
