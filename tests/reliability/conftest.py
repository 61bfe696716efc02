"""Reliability tests: fault injection (crashes, damaged checkpoints, disk full, NaN, bad
configs, shared workdirs, unsafe checkpoints). Helpers live in tiny.py / harness.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
