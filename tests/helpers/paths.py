"""Where the repository is, for tests that read its files (charts, CRDs, dashboards, examples)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "muxtune"
