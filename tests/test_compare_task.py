"""``marl-exp compare`` follows the run's task (issue 23, item 6): the default metric is the run's own headline
(the weighted reward of a reward of one's own, the strict gold where the task judges the task's reward),
each reward source gets a column, unknown metrics are named, and the plot is a grid of the panels that have
data, titled by the keys the runs logged. On run dirs built here (``test_compare._fake_run``)."""

from __future__ import annotations

import pytest

from marl_exp import compare
from test_compare import _fake_run

OWN_REWARD = "+stage.rewards={rm:{},great:{function:'reward_functions:word_count',weight:0.5}}"


def _grpo_run(path, seed: int, reward: float, great: float, overrides=(OWN_REWARD,)):
    """A GRPO run on the built-in task (a judge: the strict gold, 0 as with the debug presets' SFT model)."""
    summary = {"eval/after/oracle_strict": 0.0, "eval/after/well_formed": 0.0, "eval/after/oracle_score": 0.6,
               "eval/after/reward_score": reward, "eval/after/rewards/rm/mean": reward - 0.5 * great,
               "eval/after/rewards/great/mean": great, "eval/after/kl": 0.1}
    metrics = [{"step": s, "reward": reward * s / 4, "rewards/rm/mean": 0.1 * s, "rewards/great/mean": great * s / 4,
                "objective/kl": 0.01 * s} for s in range(1, 5)]
    metrics += [{"step": s, f"eval/{tag}/oracle_strict": 0.0, f"eval/{tag}/oracle_score": 0.6,
                 f"eval/{tag}/reward_score": reward * s / 4} for s, tag in ((0, "before"), (4, "after"))]
    metrics.sort(key=lambda m: m["step"])
    return _fake_run(path, ["stage=grpo", f"seed={seed}", *overrides], summary, metrics)


def metrics_of(header: list[str]) -> list[str]:
    """The metric columns of a table's header (after the run, status, step and config columns)."""
    return header[next(i for i, name in enumerate(header) if name.startswith("eval/")):]


def test_a_reward_of_ones_own_leads_the_table_with_each_source(tmp_path):
    for name, seed, reward, great in (("a", 1, 1.0, 0.0), ("b", 2, 3.0, 2.0), ("c", 3, 2.0, 1.0)):
        _grpo_run(tmp_path / name, seed, reward, great)
    header, rows = compare.build_table(compare.load_runs([tmp_path]))
    metrics = metrics_of(header)
    assert metrics[:3] == ["eval/after/reward_score", "eval/after/rewards/rm/mean", "eval/after/rewards/great/mean"]
    assert "eval/after/oracle_strict" in metrics  # still shown, no longer the sort key
    assert [row[0] for row in rows] == ["b", "c", "a"]  # best weighted reward first
    assert [row[header.index("eval/after/rewards/great/mean")] for row in rows] == [2.0, 1.0, 0.0]


def test_the_task_judge_leads_where_the_reward_is_the_tasks(tmp_path):
    """The default reward (the upstream adapter) or marl-exp's gold function on the built-in task: the strict
    gold; a task without a judge (local data): the weighted reward."""
    _grpo_run(tmp_path / "default" / "a", 1, 1.0, 0.0, overrides=())
    _grpo_run(tmp_path / "gold" / "a", 1, 1.0, 0.0, overrides=("+rewards=monitor_gold",))
    for case in ("default", "gold"):
        header, _ = compare.build_table(compare.load_runs([tmp_path / case]))
        assert metrics_of(header)[0] == "eval/after/oracle_strict", case
    _fake_run(tmp_path / "local" / "a", ["stage=grpo", "data=local"],
              {"eval/after/reward_score": 0.4, "eval/after/kl": 0.2, "eval/after/rewards/reward/mean": 0.4})
    header, _ = compare.build_table(compare.load_runs([tmp_path / "local"]))
    # The default source alone: no column of its own (it is the reward).
    assert metrics_of(header) == ["eval/after/reward_score", "eval/after/kl"]


def test_unknown_metrics_are_named_with_what_they_may_mean(tmp_path, capsys):
    _grpo_run(tmp_path / "a", 1, 1.0, 0.0)
    metrics = "rewards/great/mean,eval/after/kl"
    assert compare.main([str(tmp_path), "--metrics", metrics, "--sort", "eval/after/kll"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "marl-exp compare: no run has the metric 'rewards/great/mean'; did you mean eval/after/rewards/great/mean?",
        "marl-exp compare: no run has the metric 'eval/after/kll'; did you mean eval/after/kl, eval/after/well_formed, "
        "eval/after/oracle_score?"]  # the closest first
    assert compare.main([str(tmp_path), "--metrics", "eval/after/kl"]) == 0
    assert capsys.readouterr().err == ""


def test_the_plot_is_a_grid_of_panels_with_data_titled_by_the_logged_keys(tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt

    for name, seed, reward, great in (("a", 1, 1.0, 0.0), ("b", 2, 3.0, 2.0)):
        _grpo_run(tmp_path / name, seed, reward, great)
    runs = compare.load_runs([tmp_path])
    figure = compare.draw_curves(runs)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["reward", "rewards/rm/mean", "rewards/great/mean", "held-out reward (eval/*/reward_score)",
                      "strict gold (eval/*/oracle_strict)", "oracle score (eval/*/oracle_score)",
                      "KL (objective/kl)"]  # no well-formed panel: no run logged it
    assert all(ax.lines for ax in figure.axes)
    columns = sorted({round(ax.get_position().x0, 3) for ax in figure.axes})
    rows = sorted({round(ax.get_position().y0, 3) for ax in figure.axes})
    assert (len(columns), len(rows)) == (3, 3)
    plt.close(figure)
    out = compare.plot_curves(runs, tmp_path / "curves.png")
    height, width = matplotlib.image.imread(out).shape[:2]
    assert (width, height) == (1500, 1080)  # 3 panels of 5 × 3.6 inches a row, at 100 dpi
    # PPO's key is named as such in the same panel.
    _fake_run(tmp_path / "ppo", ["stage=ppo"], {"eval/after/reward_score": 0.1},
              [{"step": 1, "env/reward_mean": 0.1}])
    figure = compare.draw_curves(compare.load_runs([tmp_path]))
    assert figure.axes[0].get_title() == "reward (reward, env/reward_mean)"
    plt.close(figure)


@pytest.mark.parametrize("panels, rows, columns", [(1, 1, 1), (2, 1, 2), (4, 2, 3)])
def test_the_grid_has_at_most_three_panels_a_row(tmp_path, panels, rows, columns):
    import matplotlib.pyplot as plt

    keys = ["reward", "objective/kl", "train/loss", "eval/loss"][:panels]
    _fake_run(tmp_path / "a", ["stage=grpo"], {}, [{"step": s, **{k: 0.1 * s for k in keys}} for s in (1, 2)])
    figure = compare.draw_curves(compare.load_runs([tmp_path]))
    assert len(figure.axes) == panels  # the grid's spare cells are removed
    assert tuple(figure.get_size_inches()) == pytest.approx((5 * columns, 3.6 * rows))
    plt.close(figure)
