"""Writing benchmark results: sections of RESULTS.md, the machine line.

RESULTS.md holds a fixed header and then dated sections, newest first; each
benchmark script prepends its own section below the header.
"""

import datetime
import os
import platform

HEADER = (
    "# Benchmark results\n\nNewest first. Each section names its command,"
    " machine and date.\n\n"
)


def machine_description() -> str:
  """Architecture, core count and Python version of this machine."""
  return (
      f"{platform.machine()}, {os.cpu_count()} cores, Python"
      f" {platform.python_version()}"
  )


def prepend_section(path: str, text: str) -> None:
  """Writes `text` (a section ending in a newline) first, below the header.

  The existing sections follow it unchanged; a file without the header gets
  one.

  Args:
    path: the RESULTS.md file; created if missing.
    text: the new section.
  """
  old = ""
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    old = old[len(HEADER) :] if old.startswith(HEADER) else old
  with open(path, "w") as f:
    f.write(HEADER + text + "\n" + old)


def table_section(title: str, command: str, machine: str, rows) -> list[str]:
  """The lines of a section: dated title, command, machine, a 2-column table."""
  lines = [
      f"## {title} ({datetime.date.today().isoformat()})",
      "",
      f"Command: `{command}`; machine: {machine}.",
      "",
      "| what | result |",
      "|---|---|",
  ]
  return lines + [f"| {k} | {v} |" for k, v in rows]
