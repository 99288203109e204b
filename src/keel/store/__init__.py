"""Persist: the run store (one SQLite file per run) and the sweep store (one per sweep). Readers need neither torch
nor a running job."""

from keel.store._columns import StoreError
from keel.store.reader import RunReader, find_runs
from keel.store.schema import STORE_NAME, STORE_SUFFIX, store_folder, store_path
from keel.store.sweep_reader import SweepReader
from keel.store.sweep_schema import SWEEP_STORE_NAME, sweep_store_path
from keel.store.writer import RunWriter

__all__ = [
    "RunReader",
    "RunWriter",
    "STORE_NAME",
    "STORE_SUFFIX",
    "SWEEP_STORE_NAME",
    "StoreError",
    "SweepReader",
    "find_runs",
    "store_folder",
    "store_path",
    "sweep_store_path",
]
