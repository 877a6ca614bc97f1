"""afc.runtime: the adaptive consumer process (fetch, dedup, handle, commit, route)."""
