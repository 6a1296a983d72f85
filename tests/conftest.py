"""Make the repository root importable (`import loss, model`) under plain `pytest` as well as `python -m pytest`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
