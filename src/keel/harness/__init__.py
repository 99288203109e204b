"""keel's evaluation harness: what measures keel, apart from what users import.

`keel.harness.scenarios` is the scenario zoo (reproducible instabilities and healthy runs, each a real CPU
training run that knows what keel should say about it) and `keel.harness.bench` the ``keel bench``
benchmarks (``detect`` scores the zoo; ``doctor`` the labelled real-run logs; ``overhead``, ``snapshot``,
``optim`` keel's own cost). The harness may import any part of keel; no part of the library imports the
harness (`tests/test_layers.py`).
"""
