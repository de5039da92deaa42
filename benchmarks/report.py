"""Markdown tables of the result files in benchmarks/results/, for RESULTS.md.

The columns are those the script that wrote the file prints; each table is preceded by the
device, versions, date and command recorded in the file.

  python benchmarks/report.py                 # every results/*.json (not the _tiny ones)
  python benchmarks/report.py mqar phase      # chosen result names
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS_DIR, format_value, markdown_table


def _cell(value) -> str:
  return format_value(value, "–")


def render(path: Path) -> str:
  results = json.loads(path.read_text())
  env = results["env"]
  kind = results.get("benchmark") or path.stem.split("_")[0]  # files older than the field
  out = [
    f"### {path.stem}",
    f"{env['device']} ({env['backend']}), jax {env['jax']}, flax {env['flax']}, "
    f"{env['date']}; `{env['command']}`",
    "",
    markdown_table(results["rows"], importlib.import_module(f"benchmarks.{kind}").COLUMNS),
  ]
  for key in ("verdict", "critical_lam", "reach_bpb"):
    if key in results:
      out.append(f"\n{key}: {_cell(results[key])}")
  if "thermostat" in results:
    t = results["thermostat"]
    out.append(
      f"\nthermostat: settles at lambda {_cell(t['lam'])}, open rate "
      f"{_cell(t['open_rate'])}, eval ce {_cell(t['eval_ce'])}, accuracy "
      f"{_cell(t['eval_accuracy'])}"
    )
  return "\n".join(out)


def main(argv=None):
  names = argv if argv is not None else sys.argv[1:]
  paths = (
    [RESULTS_DIR / f"{n}.json" for n in names]
    if names
    else sorted(p for p in RESULTS_DIR.glob("*.json") if not p.stem.endswith("_tiny"))
  )
  text = "\n\n".join(render(p) for p in paths)
  print(text)
  return text


if __name__ == "__main__":
  main()
