"""`lazyfs bench run|report`: cold-start experiments (containerd, lazyfs, shaped registry)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NAME = "bench"
HELP = "run cold-start experiments (EXPERIMENT.toml) and report their results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="run an experiment's matrix (as root)",
                         description="Run an experiment: images x workloads x modes x network "
                                     "profiles x repetitions, each from a checked cold state.")
    run.add_argument("experiment", help="EXPERIMENT.toml, or a built-in name (ci-small, coldstart, readall)")
    run.add_argument("--results", type=Path, default=None,
                     help="results directory (default: results/NAME-YYYYmmdd-HHMMSS)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted experiment in --results")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="replace a top-level key of the experiment, VALUE in TOML "
                          "(repetitions=2, 'serve=[\"kernel\"]'); repeatable")
    run.add_argument("--image", dest="images", action="append", default=[], metavar="NAME",
                     help="run only this image of the experiment; repeatable")
    run.add_argument("--skip-unavailable", action="store_true",
                     help="record runs of modes this build cannot run as unavailable, run the rest")
    run.add_argument("--cache", type=Path, default=None,
                     help="image build/convert cache (default $LAZYFS_BENCH_CACHE or /var/cache/lazyfs-bench)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    report = sub.add_parser("report", help="summary table and plots of a results directory")
    report.add_argument("results", type=Path, help="results directory of `lazyfs bench run`")
    report.add_argument("--out", type=Path, default=None, help="where plots go (default RESULTS/report)")
    report.add_argument("--timeline-run", default=None, help="run id for the fetch timeline plot")
    report.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "run":
        return _run(args)
    return _report(args)


class RichReporter:
    """A progress bar over all runs plus the current phase, and one line per finished run."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.task = self.progress.add_task("preparing", total=None)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def phase(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def begin(self, total: int, done: int) -> None:
        self.progress.update(self.task, total=total, completed=done)

    def run_started(self, key) -> None:
        self.progress.update(self.task, description=f"{key.image} {key.mode} {key.profile} #{key.repetition}")

    def run_finished(self, key, record: dict) -> None:
        self.progress.advance(self.task)
        if record["status"] == "ok":
            self.console.print(f"{record['run_id']}: ready {record['ready_s']:.2f} s, pull {record['pull_s']:.2f} s, "
                               f"registry {record['registry_bytes'] / 1e6:.1f} MB")
        else:
            self.console.print(f"[red]{record['run_id']}: {record['status']}[/]: {(record['error'] or '')[:300]}")


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lazyfs.bench.errors import BenchError
    from lazyfs.bench.experiment import load_experiment, resolve_experiment_path
    from lazyfs.bench.modes import MODES
    from lazyfs.bench.runner import Runner

    console = Console(stderr=True)
    try:
        experiment = load_experiment(resolve_experiment_path(args.experiment), set(MODES), args.overrides)
        if args.images:
            experiment = experiment.only_images(args.images)
    except BenchError as e:
        console.print(f"lazyfs bench: {e}")
        return 2
    if args.resume and args.results is None:
        console.print("lazyfs bench: --resume needs --results DIR")
        return 2
    results = args.results or Path("results") / f"{experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        if args.quiet:
            records = Runner(experiment, results, resume=args.resume, skip_unavailable=args.skip_unavailable,
                             cache_dir=args.cache).run()
        else:
            with RichReporter(console) as reporter:
                records = Runner(experiment, results, resume=args.resume,
                                 skip_unavailable=args.skip_unavailable, reporter=reporter,
                                 cache_dir=args.cache).run()
    except BenchError as e:
        console.print(f"lazyfs bench: {e}")
        return 1
    failed = [r for r in records if r["status"] == "failed"]
    if not args.quiet:
        console.print(f"results in {results} ({len(records) - len(failed)} of {len(records)} runs ok); "
                      f"`lazyfs bench report {results}` summarises them")
    print(results)
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from lazyfs.bench.errors import BenchError
    from lazyfs.bench.report import build_report

    try:
        report = build_report(args.results, args.out, timeline_run=args.timeline_run)
    except BenchError as e:
        print(f"lazyfs bench report: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"summary": report.summary, "ideal": report.ideal, "plots": [str(p) for p in report.plots]}, indent=1))
        return 0
    # Piped output (docs, CI logs) gets the full table instead of one squeezed to 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(report.table())
    for path in report.plots:
        console.print(f"plot: {path}")
    return 0
