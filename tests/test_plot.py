"""The plot helpers that read runs: chapter 6's seed bands."""
import json

import numpy as np
import pytest

from bbert import plot


def fake_run(path, losses, step_every=10, seconds_per_step=0.5):
    path.mkdir(parents=True)
    records = [{"type": "start", "step": 0, "elapsed_seconds": 0.0}]
    for i, loss in enumerate(losses, start=1):
        step = i * step_every
        records.append({"type": "val", "step": step, "elapsed_seconds": step * seconds_per_step,
                        "val_loss": loss})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_seed_band_is_the_mean_and_range_of_the_seeds_point_by_point(tmp_path):
    runs = [fake_run(tmp_path / "a", [7.0, 6.0, 5.0]), fake_run(tmp_path / "b", [8.0, 6.5, 5.5, 5.2])]
    xs, mean, low, high = plot.seed_band(runs)
    assert xs.tolist() == [5.0, 10.0, 15.0]  # cut to the shortest run
    assert mean.tolist() == [7.5, 6.25, 5.25]
    assert low.tolist() == [7.0, 6.0, 5.0] and high.tolist() == [8.0, 6.5, 5.5]
    tokens, *_ = plot.seed_band(runs, x="tokens", tokens_per_step=1024)
    assert np.allclose(tokens, [10 * 1024, 20 * 1024, 30 * 1024])
    fig = plot.plot_run_bands({"two seeds": runs}, x="steps")
    assert fig.axes[0].get_xlabel() == "optimizer steps"


def test_curves_refuse_what_they_cannot_draw(tmp_path):
    run = fake_run(tmp_path / "a", [7.0])
    with pytest.raises(ValueError, match="tokens_per_step"):
        plot.val_curve(run, x="tokens")
    with pytest.raises(ValueError, match="x must be"):
        plot.val_curve(run, x="epochs")
    with pytest.raises(ValueError, match="no validation record"):
        plot.seed_band([fake_run(tmp_path / "b", [])])
