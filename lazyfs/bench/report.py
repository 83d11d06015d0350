"""`lazyfs bench report`: a summary table (medians and spread) and plots of a results directory.

A *cell* is a mode with, for lazyfs modes, its serving mode and fetch policies (the
dimensions an experiment lists); tables and plots name it ``mode serve policies``, leaving
out what does not vary in the results.

Plots (PNG and SVG, matplotlib's Agg backend) go to RESULTS/report unless told otherwise:

* ``readiness``: time to readiness per cell, one panel per image, bars per profile: the
  median, the pull's share of it darker, whiskers from min to max, each run a dot (kernel
  serving mode hatched);
* ``bytes``: per image and cell, bytes the registry sent against bytes the workload read
  from lazyfs (FUSE reads), beside the image's compressed layer size;
* ``timeline``: one run's range requests over time (cumulative MB, on-demand vs prefetch
  vs background), with the end of the pull and the readiness line marked;
* ``timelines-IMAGE``: per image, the cumulative MB fetched over time of one run (the
  median) of each lazyfs cell of the ``lazy`` mode (else of every lazyfs cell): how each
  policy set and serving mode uses the link; readiness marked on each curve;
* ``timeline-IMAGE-CELL``: the ``timeline`` plot of that median run, for each such cell.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BenchError
from .results import OK, UNAVAILABLE, load_results

MODE_ORDER = ("overlayfs", "lazy", "lazy-prefetch", "lazy-ordered", "learned", "warm")
MODE_COLOURS = {"overlayfs": "#7f7f7f", "lazy": "#1f77b4", "lazy-prefetch": "#2ca02c",
                "lazy-ordered": "#9467bd", "learned": "#17becf", "warm": "#ff7f0e"}
PRIORITY_COLOURS = {"on_demand": "#d62728", "readahead": "#ff7f0e", "prefetch": "#2ca02c",
                    "speculative": "#9467bd", "background": "#1f77b4"}
POLICY_COLOURS = ("#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
MB = 1e6


class ReportError(BenchError):
    """The results cannot be reported (no runs, unknown run id)."""


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _median(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def _mode_rank(mode: str) -> tuple[int, str]:
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode)


SERVE_ORDER = ("fuse", "kernel")


def cell_of(record: dict) -> tuple[str, str | None, str | None]:
    """(mode, serving mode, policies) of a run or summary row (None: not recorded, or overlayfs)."""
    return record["mode"], record.get("serve"), record.get("policies")


def _cell_rank(cell: tuple[str, str | None, str | None]) -> tuple:
    mode, serve, policies = cell
    return (_mode_rank(mode), SERVE_ORDER.index(serve) if serve in SERVE_ORDER else -1,
            "" if policies is None else ("" if policies == "default" else policies))


class CellLabels:
    """Names cells ``mode serve policies``, with only the parts that vary in the results."""

    def __init__(self, records: list[dict]):
        cells = {cell_of(r) for r in records}
        self.show_serve = len({c[1] for c in cells if c[1] is not None}) > 1
        self.show_policies = len({c[2] for c in cells if c[2] is not None}) > 1

    def colour(self, cell: tuple[str, str | None, str | None], runs: list[dict]) -> str:
        """The mode's colour; when policies vary, one colour per policy set instead (overlayfs
        keeps its grey)."""
        mode, _, policies = cell
        if not self.show_policies or policies is None:
            return MODE_COLOURS.get(mode, "#17becf")
        sets = sorted({r.get("policies") for r in runs if r.get("policies") is not None},
                      key=lambda p: "" if p == "default" else p)
        return POLICY_COLOURS[sets.index(policies) % len(POLICY_COLOURS)]

    def __call__(self, cell: tuple[str, str | None, str | None]) -> str:
        mode, serve, policies = cell
        parts = [mode]
        if self.show_serve and serve is not None:
            parts.append(serve)
        if self.show_policies and policies is not None:
            parts.append(policies)
        return " ".join(parts)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-")


@dataclass
class Report:
    config: dict
    summary: list[dict]
    ideal: list[dict] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)

    def table(self):
        from rich.table import Table

        experiment = self.config.get("experiment", {}).get("name", "")
        # Columns of the cell that hold one value in every row go into the title instead.
        # (Serving mode and policies: one value in every lazyfs row; overlayfs has none.)
        keys = ("image", "workload", "profile", "mode", "serve", "policies")
        constant = {}
        for k in keys:
            values = {row.get(k) for row in self.summary}
            if k in ("serve", "policies"):
                values.discard(None)
            if k != "mode" and len(values) <= 1:
                constant[k] = next(iter(values), None)
        shown = [k for k in keys if k not in constant]
        fixed = ", ".join(f"{k} {v}" + (" (lazyfs modes)" if k in ("serve", "policies") else "")
                          for k, v in constant.items() if v is not None)
        table = Table(title=f"lazyfs bench: {experiment} (medians; IQR and min-max of time to ready)"
                            + (f"\n{fixed}" if fixed else ""))
        columns = [(k, "left") for k in shown] + [
            ("runs", "right"), ("ready s", "right"), ("IQR s", "right"), ("min-max s", "right"),
            ("pull s", "right"), ("requests", "right"), ("registry MB", "right"), ("link %", "right"),
            ("read MB", "right"), ("CPU s lazyfs/containerd", "right"), ("vs overlayfs", "right")]
        for name, justify in columns:
            table.add_column(name, justify=justify)
        for row in self.summary:
            head = [row.get(k) or "-" for k in shown]
            if row["ok"] == 0:
                table.add_row(*head, f"0/{row['runs']}", row["status"],
                              *[""] * (len(columns) - len(head) - 2))
                continue
            table.add_row(
                *head, f"{row['ok']}/{row['runs']}",
                f"{row['ready_s']:.2f}", f"{row['ready_q1']:.2f}-{row['ready_q3']:.2f}",
                f"{row['ready_min']:.2f}-{row['ready_max']:.2f}", f"{row['pull_s']:.2f}",
                "" if row["registry_requests"] is None else f"{row['registry_requests']:.0f}",
                f"{row['registry_bytes'] / MB:.1f}",
                "" if row.get("link_utilisation") is None else f"{100 * row['link_utilisation']:.0f}",
                "" if row["workload_read_bytes"] is None else f"{row['workload_read_bytes'] / MB:.1f}",
                f"{_fmt(row['daemon_cpu_s'])}/{_fmt(row['containerd_cpu_s'])}",
                "" if row["speedup"] is None else f"{row['speedup']:.1f}x")
        caption = ["requests, registry MB: what the registry served during the run; link % = "
                   "registry bytes / (link rate x time to ready)"]
        if self.ideal:
            caption.append("ideal = warm + lazy fetched bytes / link rate: " + "; ".join(
                f"{i['image']} {i['profile']}{_cell_suffix(i)} {i['ideal_s']:.2f} s" for i in self.ideal))
        table.caption = "\n".join(caption)
        return table


def _cell_suffix(item: dict) -> str:
    parts = [p for p in (item.get("serve"), item.get("policies")) if p]
    return f" ({' '.join(parts)})" if parts else ""


def ideal_times(summary: list[dict], config: dict) -> list[dict]:
    """The ideal start per cell: the warm start plus the bytes a cold lazy start fetched
    (chunk granularity, compressed) at the link's rate -- a start whose data all arrives in
    a few large requests, as trace prefetch and the trace-ordered layout aim for."""
    rates = {p["name"]: p.get("rate_mbit") for p in config.get("experiment", {}).get("profiles", [])}
    ok = {(r["image"], r["workload"], r["profile"], *cell_of(r)): r for r in summary if r["status"] == OK}
    ideal = []
    for (image, workload, profile, mode, serve, policies), warm in ok.items():
        lazy = ok.get((image, workload, profile, "lazy", serve, policies))
        rate = rates.get(profile)
        if mode != "warm" or lazy is None or not rate or lazy.get("lazyfs_fetched_bytes") is None:
            continue
        transfer = lazy["lazyfs_fetched_bytes"] * 8 / (rate * 1e6)
        ideal.append({"image": image, "workload": workload, "profile": profile, "serve": serve,
                      "policies": policies, "warm_s": warm["ready_s"], "transfer_s": transfer,
                      "ideal_s": warm["ready_s"] + transfer})
    return sorted(ideal, key=lambda i: (i["image"], i["workload"], i["profile"],
                                        _cell_rank(("warm", i["serve"], i["policies"]))))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _with_utilisation(run: dict) -> dict:
    """Results recorded before the runner computed link utilisation get it here."""
    if run.get("link_utilisation") is not None or run.get("status") != OK:
        return run
    rate, ready, nbytes = run.get("rate_mbit"), run.get("ready_s"), run.get("registry_bytes")
    if not rate or not ready or nbytes is None:
        return run
    return {**run, "link_utilisation": nbytes * 8 / (rate * 1e6 * ready)}


def summarise(runs: list[dict]) -> list[dict]:
    runs = [_with_utilisation(r) for r in runs]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["image"], r["workload"], r["profile"], *cell_of(r)), []).append(r)
    rows = []
    for (image, workload, profile, mode, serve, policies), records in groups.items():
        ok = [r for r in records if r["status"] == OK]
        row = {"image": image, "workload": workload, "profile": profile, "mode": mode,
               "serve": serve, "policies": policies, "runs": len(records), "ok": len(ok),
               "status": UNAVAILABLE if any(r["status"] == UNAVAILABLE for r in records) else "failed"}
        if ok:
            ready = [r["ready_s"] for r in ok]
            row.update({
                "status": OK, "ready_s": statistics.median(ready),
                "ready_q1": _quantile(ready, 0.25), "ready_q3": _quantile(ready, 0.75),
                "ready_min": min(ready), "ready_max": max(ready),
                **{key: _median(ok, key) for key in (
                    "pull_s", "start_to_ready_s", "total_s", "registry_bytes", "registry_requests",
                    "link_utilisation", "workload_read_bytes", "lazyfs_fetched_bytes",
                    "lazyfs_fetch_requests", "daemon_cpu_s", "containerd_cpu_s", "image_layer_bytes")},
            })
        rows.append(row)
    for row in rows:
        base = next((r for r in rows if r["mode"] == "overlayfs" and r["status"] == OK and
                     (r["image"], r["workload"], r["profile"]) == (row["image"], row["workload"], row["profile"])),
                    None)
        row["speedup"] = (base["ready_s"] / row["ready_s"]
                          if base is not None and row["status"] == OK and row["ready_s"] else None)
    rows.sort(key=lambda r: (r["image"], r["workload"], r["profile"], _cell_rank(cell_of(r))))
    return rows


def build_report(results_dir: Path, out_dir: Path | None = None, *, timeline_run: str | None = None) -> Report:
    config, runs, store = load_results(Path(results_dir))
    if not runs:
        raise ReportError(f"{results_dir}: no finished runs yet")
    summary = summarise(runs)
    report = Report(config, summary, ideal_times(summary, config))
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in runs if r["status"] == OK]
    if not ok:
        return report
    import matplotlib
    matplotlib.use("Agg")
    report.plots += _plot_readiness(ok, config, out)
    report.plots += _plot_bytes(ok, config, out)
    chosen = _timeline_run(ok, timeline_run)
    if chosen is not None:
        report.plots += _plot_timeline(chosen, store.events(chosen["run_id"]), out)
    label = CellLabels(ok)
    for image, cells in timeline_cells(ok).items():
        events = {run["run_id"]: store.events(run["run_id"]) for _, run in cells}
        report.plots += _plot_timelines(image, cells, events, label, out)
        for cell, run in cells:
            name = f"timeline-{_slug(image)}-{_slug(label(cell) or cell[0])}"
            report.plots += _plot_timeline(run, events[run["run_id"]], out, name)
    return report


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return paths


def _layout(images: list[str], cells: int = 6):
    import matplotlib.pyplot as plt
    width = 4.8 if cells <= 6 else 4.8 + 0.45 * (cells - 6)
    fig, axes = plt.subplots(1, len(images), figsize=(width * len(images) + 0.8, 4.4), squeeze=False)
    return fig, axes[0]


def _plot_readiness(runs: list[dict], config: dict, out: Path) -> list[Path]:
    images = sorted({r["image"] for r in runs})
    profiles = [p["name"] for p in config["experiment"]["profiles"] if any(r["profile"] == p["name"] for r in runs)]
    cells = sorted({cell_of(r) for r in runs}, key=_cell_rank)
    label = CellLabels(runs)
    fig, axes = _layout(images, len(cells))
    width = 0.8 / len(cells)
    for ax, image in zip(axes, images):
        for m, cell in enumerate(cells):
            for p, profile in enumerate(profiles):
                group = [r for r in runs if (r["image"], r["profile"]) == (image, profile) and cell_of(r) == cell]
                if not group:
                    continue
                ready = [r["ready_s"] for r in group]
                med, pull = statistics.median(ready), statistics.median(r["pull_s"] for r in group)
                x = p + (m - (len(cells) - 1) / 2) * width
                colour = label.colour(cell, runs)
                hatch = "//" if cell[1] == "kernel" else None
                ax.bar(x, med, width * 0.92, color=colour, alpha=0.55, hatch=hatch,
                       label=label(cell) if p == 0 else None)
                ax.bar(x, min(pull, med), width * 0.92, color=colour, alpha=0.95, hatch=hatch)
                ax.errorbar(x, med, yerr=[[med - min(ready)], [max(ready) - med]], fmt="none",
                            ecolor="black", capsize=3, linewidth=1)
                ax.scatter([x] * len(ready), ready, s=9, color="black", zorder=3)
                ax.annotate(f"{med:.1f}", (x, max(ready)), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=7 if len(cells) > 8 else 8)
        ax.set_xticks(range(len(profiles)), profiles)
        ax.set_title(image)
        ax.set_ylabel("time to readiness (s)")
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="dark: pull; hatched: kernel serving", fontsize=7, title_fontsize=7,
                   loc="upper left", bbox_to_anchor=(0, -0.08), ncol=min(len(cells), 3))
    fig.suptitle("Cold start: pull start to readiness line (median, min-max, runs)")
    return _save(fig, out, "readiness")


def _plot_bytes(runs: list[dict], config: dict, out: Path) -> list[Path]:
    images = sorted({r["image"] for r in runs})
    label = CellLabels(runs)
    n_cells = len({cell_of(r) for r in runs})
    fig, axes = _layout(images, n_cells)
    series = (("registry_bytes", "sent by the registry", "#1f77b4"),
              ("workload_read_bytes", "read by the workload (FUSE, uncompressed)", "#ff7f0e"))
    for ax, image in zip(axes, images):
        cell_runs = [r for r in runs if r["image"] == image]
        cells = sorted({cell_of(r) for r in cell_runs}, key=_cell_rank)
        for s, (key, series_label, colour) in enumerate(series):
            for m, cell in enumerate(cells):
                value = _median([r for r in cell_runs if cell_of(r) == cell], key)
                x = m + (s - 0.5) * 0.38
                if value is None:  # no FUSE layer to count reads on (overlayfs)
                    ax.annotate("n/a", (x, 0), textcoords="offset points", xytext=(0, 2),
                                ha="center", fontsize=7, color="grey")
                    continue
                ax.bar(x, value / MB, 0.36, color=colour, label=series_label if m == 0 or
                       series_label not in ax.get_legend_handles_labels()[1] else None)
                ax.annotate(f"{value / MB:.1f}", (x, value / MB), textcoords="offset points",
                            xytext=(0, 2), ha="center", fontsize=7)
        size = _median(cell_runs, "image_layer_bytes")
        original = config.get("images", {}).get(image, {}).get("original", {}).get("layer_bytes")
        if original:
            ax.axhline(original / MB, color="grey", linestyle="--", linewidth=1,
                       label=f"image layers, gzip ({original / MB:.0f} MB)")
        elif size:
            ax.axhline(size / MB, color="grey", linestyle="--", linewidth=1, label="image layers")
        ax.set_xticks(range(len(cells)), [label(c) for c in cells],
                      rotation=30 if len(cells) > 5 else 0, ha="right" if len(cells) > 5 else "center",
                      fontsize=7 if len(cells) > 5 else None)
        ax.set_title(image)
        ax.set_ylabel("MB (median per run)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Bytes fetched from the registry vs bytes the workload read")
    return _save(fig, out, "bytes")


def _median_run(runs: list[dict]) -> dict:
    """The run whose time to readiness is the median (the lower one of an even count)."""
    ordered = sorted(runs, key=lambda r: (r["ready_s"], r["run_id"]))
    return ordered[(len(ordered) - 1) // 2]


def timeline_cells(runs: list[dict]) -> dict[str, list[tuple[tuple, dict]]]:
    """Per image, (cell, its median run) of each lazyfs cell of the ``lazy`` mode (the start
    without trace or warm cache, where fetch policies decide), else of every lazyfs cell
    with fetch events."""
    chosen: dict[str, list[tuple[tuple, dict]]] = {}
    for image in sorted({r["image"] for r in runs}):
        lazyfs = [r for r in runs if r["image"] == image and r.get("fetch_events")]
        pick = [r for r in lazyfs if r["mode"] == "lazy"] or lazyfs
        cells = sorted({cell_of(r) for r in pick}, key=_cell_rank)
        if cells:
            chosen[image] = [(cell, _median_run([r for r in pick if cell_of(r) == cell])) for cell in cells]
    return chosen


def _plot_timelines(image: str, cells: list[tuple[tuple, dict]], events: dict[str, list[dict]],
                    label: CellLabels, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    right = 0.0
    for i, (cell, run) in enumerate(cells):
        ordered = sorted(events[run["run_id"]], key=lambda e: e["end"])
        xs, ys, total = [0.0], [0.0], 0.0
        for e in ordered:
            total += e["bytes"] / MB
            xs.append(e["end"])
            ys.append(total)
        colour = colours[i % len(colours)]
        style = "--" if cell[1] == "kernel" else "-"
        ax.step(xs, ys, where="post", color=colour, linestyle=style, linewidth=1.3,
                label=f"{label(cell) or cell[0]}: ready {run['ready_s']:.1f} s, {len(ordered)} requests, "
                      f"{total:.1f} MB")
        ready_mb = max([y for x, y in zip(xs, ys) if x <= run["ready_s"]], default=0.0)
        ax.plot([run["ready_s"]], [ready_mb], marker="o", color=colour)
        right = max(right, run["ready_s"], xs[-1])
    ax.set_xlim(left=0, right=right * 1.05 or 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the start of the pull (dot: readiness)")
    ax.set_ylabel("MB fetched (cumulative)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Fetch timelines of {image}, one median run per cell", fontsize=10)
    return _save(fig, out, f"timelines-{_slug(image)}")


def _timeline_run(runs: list[dict], run_id: str | None) -> dict | None:
    if run_id is not None:
        for r in runs:
            if r["run_id"] == run_id:
                return r
        raise ReportError(f"no finished run {run_id!r}")
    preference = ("lazy-ordered", "lazy-prefetch", "lazy")
    candidates = [r for r in runs if r["mode"] in preference and r.get("fetch_events")]
    if not candidates:
        return None
    candidates.sort(key=lambda r: (preference.index(r["mode"]), -(r["lazyfs_fetched_bytes"] or 0),
                                   r["repetition"]))
    return candidates[0]


def _plot_timeline(run: dict, events: list[dict], out: Path, name: str = "timeline") -> list[Path]:
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 5.6), sharex=True,
                                  gridspec_kw={"height_ratios": [2.2, 1]})
    ordered = sorted(events, key=lambda e: e["end"])
    total = 0.0
    xs, ys = [0.0], [0.0]
    for e in ordered:
        total += e["bytes"] / MB
        xs.append(e["end"])
        ys.append(total)
    ax.step(xs, ys, where="post", color="black", linewidth=1.2, label="cumulative MB fetched")
    # Requests in flight at the same time get lanes, drawn slightly apart, so that equal-sized
    # concurrent requests do not hide each other.
    lane_ends: list[float] = []
    top = max([e["bytes"] / MB for e in ordered] + [0.1])
    for e in sorted(ordered, key=lambda e: e["start"]):
        lane = next((i for i, end in enumerate(lane_ends) if end <= e["start"]), len(lane_ends))
        if lane == len(lane_ends):
            lane_ends.append(e["end"])
        lane_ends[lane] = e["end"]
        colour = PRIORITY_COLOURS.get(e["priority"], "grey")
        ax2.plot([e["start"], e["end"]], [e["bytes"] / MB + lane * top * 0.04] * 2, color=colour,
                 linewidth=2.5, solid_capstyle="butt")
    for priority, colour in PRIORITY_COLOURS.items():
        if any(e["priority"] == priority for e in ordered):
            ax2.plot([], [], color=colour, linewidth=2.5, label=priority.replace("_", "-"))
    for axis in (ax, ax2):
        axis.axvline(run["pull_s"], color="#7f7f7f", linestyle=":", linewidth=1)
        axis.axvline(run["ready_s"], color="#d62728", linestyle="--", linewidth=1)
        axis.grid(alpha=0.3)
    ax.text(run["pull_s"], ax.get_ylim()[1] * 0.95, " pull done", fontsize=8, va="top")
    ax.text(run["ready_s"], ax.get_ylim()[1] * 0.80, " ready", fontsize=8, va="top", color="#d62728")
    ax.set_ylabel("MB fetched (cumulative)")
    ax.legend(fontsize=8, loc="lower right")
    ax2.set_ylabel("MB per request\n(concurrent: offset)")
    ax2.set_ylim(bottom=0, top=top * (1.25 + 0.04 * len(lane_ends)))
    ax2.set_xlabel("seconds since the start of the pull")
    ax2.set_xlim(left=0, right=max([run["ready_s"]] + [e["end"] for e in ordered]) * 1.05)
    ax2.legend(fontsize=8, loc="upper right", title="range requests (priority)", title_fontsize=8)
    fig.suptitle(f"Fetch timeline: {run['run_id']}\n{len(ordered)} range requests, "
                 f"{total:.1f} MB", fontsize=10)
    return _save(fig, out, name)
