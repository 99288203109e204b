"""Persist: the run store (one SQLite file per run). Readers need neither torch nor a running job."""

from keel.store._columns import StoreError
from keel.store.reader import RunReader
from keel.store.schema import STORE_NAME, store_path
from keel.store.writer import RunWriter

__all__ = ["RunReader", "RunWriter", "STORE_NAME", "StoreError", "store_path"]
