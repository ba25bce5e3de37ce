"""The run machinery around a stage: what happens before, during and after training, not the training itself.

Start reading at ``preflight`` (checks before anything heavy loads) and ``records`` (what a run dir holds across
resumes); ``tracking`` and ``lineage`` are W&B and the local metrics; ``console`` is what a run prints;
``interrupt``, ``threads`` and ``distributed`` shape the process; ``hydra_errors`` and ``hydra_callbacks`` hook
into Hydra. ``marl_exp.cli`` is the caller that ties them together.
"""
