import sys
from pathlib import Path

# tests import shared helpers (e.g. nvfp4_reference) as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent))
