"""Runner for the MoE layer benchmark, which lives in the package (moelab/bench.py, also `moelab bench`)."""
from moelab.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
