"""Where data lives: sharded parquet datasets (local or fsspec URLs), manifests, publishing.

    from storage import ShardedDataset, build_manifest, publish, inspect_dataset
    from storage import check_run_folder, RunLock, check_publish_target, publish_empty
"""

from storage.dataset import ShardedDataset, StorageError, split_kept
from storage.manifest import build_manifest, sum_stats
# `datasets` itself is imported lazily, only when publishing
from storage.publish import check_publish_target, foreign_files, publish, publish_empty
from storage.run_folder import RunLock, check_run_folder

__all__ = ["RunLock", "ShardedDataset", "StorageError", "build_manifest", "check_publish_target",
           "check_run_folder", "foreign_files", "inspect_dataset", "publish", "publish_empty", "split_kept",
           "sum_stats"]


def __getattr__(name):
    if name == "inspect_dataset":
        from storage.inspect import inspect_dataset
        return inspect_dataset
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
