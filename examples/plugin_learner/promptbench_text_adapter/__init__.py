"""Example promptbench_vlm plug-in: the `text-adapter` learner (see `learner.py`)."""
