"""Head-to-head comparison of methods x learners x seeds: sweep, grid, statistics, tables, plots.

`promptbench compare` reads a sweep (`sweep`), runs every (method, learner, dataset, seed) into
its own folder (`grid`), aggregates the result files over seeds and tests each method against a
reference on the same images (`stats`), and renders tables (`tables`), figures (`plots`) and a
markdown report (`markdown`). Docs: ``docs/compare.md``.
"""
