"""`python -m harness plot`: PNGs whose plotted data is read back from the figure's artists."""

import pytest
from test_status import ledger  # noqa: F401 - the crafted ledger fixture

from harness import results
from harness.__main__ import main
from harness.tools.plots import PlotError, loss_curve, pareto, progress

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def artists(ax, label):
    found = [a for a in [*ax.collections, *ax.lines] if a.get_label() == label]
    assert len(found) == 1, f"{label!r} in {[a.get_label() for a in [*ax.collections, *ax.lines]]}"
    return found[0]


def test_progress_plots_kept_running_best_discarded_and_crashes(ledger, tmp_path):  # noqa: F811
    figure = progress(results.read(ledger), tmp_path / "progress.png")
    assert is_png(tmp_path / "progress.png")
    sotu, wikitext = figure.axes[:2]  # one panel per eval set, in name order
    assert sotu.get_title() == "m on sotu:eval" and wikitext.get_title() == "m on wikitext:test"
    # experiments are numbered by their line in results.tsv: t1=3, t2=4, t3=5, boom=6, i4=7, i4b=8,
    # c2=9
    assert artists(sotu, "kept ternary").get_offsets().tolist() == [[3, 2.5], [5, 2.2]]
    best = artists(sotu, "best ternary")
    assert list(best.get_xdata()) == [3, 5, 10] and list(best.get_ydata()) == [2.5, 2.2, 2.2]
    assert artists(sotu, "discarded").get_offsets()[:, 0].tolist() == [4, 8, 9]
    assert artists(sotu, "crash / invalid").get_offsets()[:, 0].tolist() == [6]
    assert artists(sotu, "kept 4bit").get_offsets().tolist() == [[7, 1.3]]
    assert {line.get_label() for line in sotu.lines if "baseline" in line.get_label()} == {
        "fp baseline 1.000 @ 32.00 bpw", "rtn baseline 6.000 @ 1.60 bpw"}  # fmt: skip
    low, high = sotu.get_ylim()
    assert low < 1.3 and 2.6 < high < 6.0  # the far-off RTN line does not squash the runs


def test_pareto_colours_by_method_and_draws_baselines_and_front(ledger, tmp_path):  # noqa: F811
    figure = pareto(results.read(ledger), tmp_path / "pareto.png")
    assert is_png(tmp_path / "pareto.png")
    sotu = figure.axes[0]
    assert len(artists(sotu, "ternary").get_offsets()) == 3  # t1, t2 (faint), t3
    assert artists(sotu, "int").get_offsets().tolist() == [[4.25, 1.3], [4.5, 1.4]]
    assert artists(sotu, "codebook").get_offsets().tolist() == [[2.25, 2.1]]
    assert artists(sotu, "fp baseline").get_offsets().tolist() == [[32.0, 1.0]]
    assert artists(sotu, "rtn baseline").get_offsets().tolist() == [[1.6, 6.0]]
    assert list(artists(sotu, "int").get_alpha()) == [1.0, 0.3]  # discarded faint
    front = artists(sotu, "Pareto front")
    assert list(front.get_xdata()) == [1.6, 1.73, 2.25, 4.25, 32.0]
    assert sotu.get_xscale() == "log"


def test_loss_curve_draws_whatever_series_loss_csv_has(tmp_path):
    run_dir = tmp_path / "20260101-000000-abcd"
    run_dir.mkdir()
    # no lr column, two columns train.py may add later, a column of text that is no series
    (run_dir / "loss.csv").write_text(
        "step,loss,lambda,bits,tokens_per_s,note\n1,5.0,0.0,16,1000,x\n10,4.0,0.5,4,1200,y\n20,3.5,1.0,2,1100,z\n"
    )
    figure = loss_curve(run_dir, tmp_path / "loss.png")
    assert is_png(tmp_path / "loss.png")
    assert [ax.get_ylabel() for ax in figure.axes] == ["loss", "lambda", "bits"]
    assert list(figure.axes[0].lines[0].get_ydata()) == [5.0, 4.0, 3.5]
    assert list(figure.axes[2].lines[0].get_xdata()) == [1, 10, 20]
    assert "1,100 tokens/s" in figure.get_suptitle()


def test_missing_or_empty_inputs_are_reported_not_raised(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    with pytest.raises(PlotError, match="no loss.csv"):
        loss_curve(run_dir, tmp_path / "loss.png")
    (run_dir / "loss.csv").write_text("step,loss,lr\n")
    with pytest.raises(PlotError, match="no step/loss rows"):
        loss_curve(run_dir, tmp_path / "loss.png")
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results.tsv"))
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path / "runs"))
    (tmp_path / "results.tsv").write_text("")
    assert main(["plot"]) == 1 and "no scored rows" in capsys.readouterr().err
    assert main(["plot", "--run", "nope"]) == 1 and "no run 'nope'" in capsys.readouterr().err
    assert main(["plot", "--run", "r1"]) == 1 and "no step/loss rows" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.png"))


def test_plot_command_writes_both_pngs_beside_results(ledger, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("HARNESS_RESULTS", str(ledger))
    assert main(["plot"]) == 0
    assert is_png(ledger.parent / "progress.png") and is_png(ledger.parent / "pareto.png")
    assert "2 malformed or foreign lines skipped" in capsys.readouterr().err
