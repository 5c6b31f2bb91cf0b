"""The toy world: the procedural `toy-shapes` dataset and the script that trains `toy-clip`.

Submodules are imported explicitly (`promptbench_vlm.toy.shapes`, `promptbench_vlm.toy.train`);
importing this package does nothing else.
"""
