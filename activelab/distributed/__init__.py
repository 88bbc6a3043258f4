"""Scale-out selection: a pool given as shards, scored by Ray tasks (or in turn) and merged in bounded memory."""

from .sharded import ShardedSelection, load_shard, select_sharded

__all__ = ["ShardedSelection", "load_shard", "select_sharded"]
