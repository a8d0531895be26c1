"""WHAT is kept: score per shard, select globally, annotate drop reasons; never silently delete."""
