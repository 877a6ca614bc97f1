"""`make demo`: the main job end to end on the local test bed (lands with the runtime core)."""
import sys

if __name__ == "__main__":
    print("demo: not yet: the end-to-end demo lands with the runtime core", file=sys.stderr)
    sys.exit(0)
