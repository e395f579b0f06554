"""The CLIs' persistent compilation cache with a size limit (cli.driver): JAX's own LRU cache
then reads an access-time file for every entry on each write, so entries written without a
limit (no access-time file) must be given one first."""

import pytest

from fusionsam_jax.cli.driver import backfill_cache_atimes


def test_backfilled_cache_accepts_writes_with_eviction_on(tmp_path):
  lru = pytest.importorskip("jax._src.lru_cache")
  (tmp_path / "old_entry-cache").write_bytes(b"x" * 10)   # written without a size limit
  cache = lru.LRUCache(str(tmp_path), max_size=1 << 20)
  with pytest.raises(FileNotFoundError):                   # what JAX does with such a dir
    cache.put("new_entry", b"y" * 10)
  backfill_cache_atimes(str(tmp_path))
  cache.put("new_entry", b"y" * 10)
  assert cache.get("new_entry") == b"y" * 10 and cache.get("old_entry") == b"x" * 10
  # Eviction works over the backfilled entry too: the least recently read goes first
  # (new_entry: old_entry was read after it).
  small = lru.LRUCache(str(tmp_path), max_size=25)
  small.put("third", b"z" * 10)
  assert small.get("new_entry") is None
  assert small.get("old_entry") == b"x" * 10 and small.get("third") == b"z" * 10
