"""Where data lives: sharded parquet datasets (local or fsspec URLs), manifests, publishing.

    from storage import ShardedDataset, build_manifest, publish, inspect_dataset
"""

from storage.dataset import ShardedDataset, StorageError, split_kept
from storage.manifest import build_manifest, sum_stats
from storage.publish import publish  # `datasets` itself is imported lazily, only when publishing

__all__ = ["ShardedDataset", "StorageError", "build_manifest", "publish", "inspect_dataset",
           "split_kept", "sum_stats"]


def __getattr__(name):
    if name == "inspect_dataset":
        from storage.inspect import inspect_dataset
        return inspect_dataset
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
