"""`python -m harness plot`: pictures of the ledger and of one run.

    python -m harness plot [--out-dir DIR]  progress.png, pareto.png (beside results.tsv by default)
    python -m harness plot --run RUN        runs/RUN/loss.png: loss (lr, lambda, bits... if logged)

One panel per eval set and model: rows scored on different text or models are not comparable.
Every plotting function returns its Figure, so the drawn data can be checked without pixels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
from matplotlib.ticker import FuncFormatter

from harness import paths, results
from harness.tools.show import RunNotFound, find_run
from harness.tools.status import SCORED, annotate, pareto_front

# loss.csv columns that are not curves of their own: the x axis and the throughput (in the title)
LOSS_AXES = ("step", "train_seconds", "tokens_per_s")
BASELINE_MARKERS = {"fp": "*", "rtn": "P"}


class PlotError(Exception):
    """Nothing to draw; the message says why."""


def _panels(n: int, width: float = 9.0, height: float = 4.0) -> tuple[Figure, list]:
    figure = Figure(figsize=(width, height * n), layout="constrained")
    return figure, list(figure.subplots(n, 1, squeeze=False)[:, 0])


def _groups(scored: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    return list(scored.groupby(["eval_set", "model"], sort=True))


def progress(frame: pd.DataFrame, out: Path) -> Figure:
    """val_bpb per experiment in ledger order: kept runs as points plus each track's running best
    as a step line, discarded runs faint, baselines as reference lines, crashes marked at the
    bottom (they have no val_bpb)."""
    frame = annotate(frame).reset_index(drop=True)
    frame["experiment"] = frame.index + 1
    scored = frame[frame["status"].isin(SCORED) & frame["val_bpb"].notna()]
    failed = frame[frame["status"].isin(("crash", "invalid"))]
    groups = _groups(scored)
    if not groups:
        raise PlotError("no scored rows to plot yet")
    figure, axes = _panels(len(groups))
    for ax, ((eval_set, model), rows) in zip(axes, groups):
        discarded = rows[rows["status"] == "discard"]
        ax.scatter(
            discarded["experiment"],
            discarded["val_bpb"],
            color="grey",
            alpha=0.3,
            s=16,
            label="discarded",
        )
        for track, kept in rows[rows["status"] == "keep"].groupby("track", sort=False):
            dots = ax.scatter(
                kept["experiment"], kept["val_bpb"], s=24, zorder=3, label=f"kept {track}"
            )
            best = kept["val_bpb"].cummin()
            ax.step([*kept["experiment"], len(frame)], [*best, best.iloc[-1]], where="post",
                    color=dots.get_facecolor()[0], label=f"best {track}")  # fmt: skip
        for _, baseline in rows[rows["status"] == "baseline"].iterrows():
            ax.axhline(
                baseline["val_bpb"],
                linestyle=":",
                color="black",
                alpha=0.6,
                label=f"{baseline['method']} baseline {baseline['val_bpb']:.3f} "
                f"@ {baseline['bpw']:.2f} bpw",
            )
        experiments = rows[rows["status"] != "baseline"]["val_bpb"]
        if len(experiments):  # baselines far off (RTN can be 10x worse) must not squash the runs
            low, high = experiments.min(), experiments.max()
            pad = 0.1 * (high - low) or 0.05 * abs(high) or 0.1
            ax.set_ylim(low - pad, high + pad)
        if len(failed):  # x in data, y in axes coordinates: pinned to the bottom whatever the scale
            ax.scatter(
                failed["experiment"],
                [0.03] * len(failed),
                transform=ax.get_xaxis_transform(),
                marker="x",
                color="red",
                label="crash / invalid",
            )
        ax.set_xlim(0.5, len(frame) + 0.5)
        ax.set(
            title=f"{model} on {eval_set}", xlabel="experiment", ylabel="val_bpb (lower is better)"
        )
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.savefig(out, dpi=110)
    return figure


def pareto(frame: pd.DataFrame, out: Path) -> Figure:
    """val_bpb against bits per weight, one colour per method (kept solid, discarded faint), the
    FP and RTN baselines as large markers, and the Pareto front as a step line."""
    frame = annotate(frame)
    scored = frame[frame["status"].isin(SCORED) & frame["val_bpb"].notna() & frame["bpw"].notna()]
    groups = _groups(scored)
    if not groups:
        raise PlotError("no scored rows with bits per weight to plot yet")
    figure, axes = _panels(len(groups))
    for ax, ((eval_set, model), rows) in zip(axes, groups):
        runs = rows[rows["status"] != "baseline"]
        for method, points in runs.groupby("method", sort=True):
            alpha = points["status"].map({"keep": 1.0, "discard": 0.3}).to_numpy()
            ax.scatter(points["bpw"], points["val_bpb"], alpha=alpha, s=28, zorder=3, label=method)
        for method, points in rows[rows["status"] == "baseline"].groupby("method", sort=True):
            ax.scatter(
                points["bpw"],
                points["val_bpb"],
                marker=BASELINE_MARKERS.get(method, "D"),
                s=140,
                color="black",
                zorder=4,
                label=f"{method} baseline",
            )
        front = pareto_front(rows)
        ax.step(
            front["bpw"],
            front["val_bpb"],
            where="post",
            color="black",
            alpha=0.5,
            label="Pareto front",
        )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set(
            title=f"{model} on {eval_set}",
            xlabel="bits per weight (log scale)",
            ylabel="val_bpb (lower is better)",
        )
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.savefig(out, dpi=110)
    return figure


def loss_curve(run_dir: Path, out: Path) -> Figure:
    """loss.csv against step: loss first, then one panel per other logged series (lr, and whatever
    train.py adds, e.g. lambda or bits); throughput goes in the title."""
    try:
        table = pd.read_csv(run_dir / "loss.csv")
    except FileNotFoundError:
        raise PlotError(
            f"{run_dir.name} has no loss.csv (it crashed before its first step, or is a baseline)"
        ) from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise PlotError(f"{run_dir / 'loss.csv'} is unreadable: {err}") from None
    table = table.apply(pd.to_numeric, errors="coerce").dropna(axis="columns", how="all")
    if "step" not in table or "loss" not in table or table["loss"].notna().sum() == 0:
        raise PlotError(f"{run_dir / 'loss.csv'} has no step/loss rows yet")
    series = ["loss", *[column for column in table.columns if column not in ("loss", *LOSS_AXES)]]
    figure, axes = _panels(len(series), height=2.6)
    for ax, column in zip(axes, series):
        ax.plot(table["step"], table[column], marker="." if len(table) < 50 else None, label=column)
        ax.set_ylabel(column)
    axes[-1].set_xlabel("step")
    title = run_dir.name
    if "tokens_per_s" in table:
        title += f"  ({table['tokens_per_s'].median():,.0f} tokens/s median)"
    figure.suptitle(title)
    figure.savefig(out, dpi=110)
    return figure


# --- command line ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="a run id (or unique prefix): plot its loss curve instead")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where the PNGs go (default: beside results.tsv, or the run's folder)",
    )


def command(args: argparse.Namespace) -> int:
    try:
        if args.run:
            run_dir = find_run(args.run)
            written = [(args.out_dir or run_dir) / "loss.png"]
            written[0].parent.mkdir(parents=True, exist_ok=True)
            loss_curve(run_dir, written[0])
        else:
            frame, skipped = results.read_counted(paths.results_path())
            if skipped:
                print(
                    f"{paths.results_path()}: {skipped} malformed or foreign lines skipped",
                    file=sys.stderr,
                )
            out_dir = args.out_dir or paths.results_path().parent
            out_dir.mkdir(parents=True, exist_ok=True)
            written = [out_dir / "progress.png", out_dir / "pareto.png"]
            progress(frame, written[0])
            pareto(frame, written[1])
    except (PlotError, RunNotFound) as err:
        print(err, file=sys.stderr)
        return 1
    print("wrote " + " ".join(map(str, written)))
    return 0
