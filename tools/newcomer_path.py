"""Run the README's newcomer path as a new user would, at tiny scale, and check where it wrote.

    python3 -m tools.newcomer_path [--readme README.md] [--full] [--keep]

Copies the working tree (tracked files and untracked ones git does not ignore: a fresh clone of
what is checked out) into a temporary folder, gives it an empty HOME, and runs there, in one bash
process (`set -euxo pipefail`, so each command is echoed), every fenced block that README.md
marks with a `<!-- newcomer-path -->` line just before it, in order: the commands are read from
the README, never copied here. One line is substituted: the README's virtual-environment line
(VENV_LINE) becomes a venv that also sees the packages already installed for this Python
(`--system-site-packages`), so that `pip install -e .` installs only this package, offline and in
seconds; everything else runs as written. LIVSEG_TINY=1 (honoured by configs/liver.py and
configs/tumor.py, livseg_jax.config.TINY_OVERRIDES) shrinks networks and schedules to seconds;
`--full` leaves it unset and runs the README's real lengths (about half an hour on a 2-core CPU).

Checks (a failure prints `error: <what>` and exits 1):
- the blocks exit 0, and the venv imports livseg_jax from the copy (the install step worked);
- under the fresh HOME, outside its hidden folders, a predicted label map (`segmentation-N.nii.gz`
  or `<name>_seg.nii.gz`, labels 0/1/2) and its PNG overlay exist;
- the copy's `git status --porcelain --ignored` lists nothing new but the install's own
  artefacts (ARTEFACTS): no run, prediction, picture or imported data lands in the checkout.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

MARKER = "<!-- newcomer-path -->"
VENV_LINE = "python3 -m venv .venv && . .venv/bin/activate"
# What installing leaves in a checkout; anything else new in `git status --ignored` is an output.
ARTEFACTS = re.compile(r"^(\.venv/|build/|.*\.egg-info/|(.*/)?__pycache__/)$")
# The caller's environment variables a newcomer's shell would also have; LIVSEG_*, XLA_FLAGS,
# VIRTUAL_ENV, PYTHONPATH and the like are left out on purpose.
KEPT_ENV = re.compile(r"^(PATH|LANG|LC_\w+|TERM|TMPDIR|PIP_\w+|SSL_CERT_\w+|REQUESTS_CA_BUNDLE|"
                      r"(?i:https?_proxy|no_proxy))$")


def readme_blocks(text: str, source: str = "README.md") -> list[tuple[int, str]]:
    """Returns (line number, body) of each fenced block that the line before it marks with MARKER."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
            raise ValueError(f"{source}:{i + 1}: {MARKER} must be followed directly by a fenced block")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"{source}:{i + 2}: the fenced block after {MARKER} is not closed")
        blocks.append((i + 3, "\n".join(lines[i + 2:end])))
    if not blocks:
        raise ValueError(f"{source}: no fenced block is marked with {MARKER}")
    return blocks


def venv_command(python: str = sys.executable) -> str:
    """Returns the bash line that replaces VENV_LINE: a venv seeing this Python's installed packages."""
    quiet_activate = "{ set +x; } 2>/dev/null && . .venv/bin/activate && set -x"  # activate's lines not echoed
    line = f'"{python}" -m venv --system-site-packages .venv && {quiet_activate}'
    if sys.prefix != sys.base_prefix:  # run from a venv: its packages are not the "system" ones
        pth = "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages())
        purelib = "$(python3 -c 'import sysconfig; print(sysconfig.get_path(\"purelib\"))')"
        line += f' && echo {pth!r} > "{purelib}/caller.pth"'
    return line


def newcomer_script(blocks: list[tuple[int, str]], source: str = "README.md") -> str:
    """Returns the bash script of the marked blocks, VENV_LINE substituted (exactly once)."""
    count = sum(line.strip() == VENV_LINE for _, body in blocks for line in body.splitlines())
    if count != 1:
        raise ValueError(f"{source}: the marked blocks hold the line {VENV_LINE!r} {count} times, not once "
                         "(tools/newcomer_path.py substitutes it: update VENV_LINE with the README)")
    parts = ["set -euxo pipefail"]
    for number, body in blocks:
        parts.append(f": README.md line {number}")
        parts += [venv_command() if line.strip() == VENV_LINE else line for line in body.splitlines()]
    return "\n".join(parts) + "\n"


def copy_checkout(repo: pathlib.Path, dest: pathlib.Path) -> None:
    """Copies the files git would commit from `repo` (tracked + untracked-not-ignored) into a new repository."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = repo / rel
        if src.is_file():  # a tracked file deleted in the working tree is left out, as in a commit
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
    git = ["git", "-C", str(dest), "-c", "user.name=newcomer", "-c", "user.email=newcomer@example.invalid"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "working tree"]):
        subprocess.run(git + args, check=True, capture_output=True)


def git_status(repo: pathlib.Path) -> set[str]:
    """Returns the paths `git status --porcelain --ignored` lists in repo, with their status codes."""
    out = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--ignored"], check=True,
                         capture_output=True, text=True).stdout
    return set(out.splitlines())


def written_into(before: set[str], after: set[str]) -> list[str]:
    """Returns the status lines new in `after` that are not installation artefacts."""
    return sorted(line for line in after - before if not ARTEFACTS.match(line[3:]))


def predictions(home: pathlib.Path) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """Returns (label map, PNG) pairs written under home outside its hidden folders; raises if none or bad."""
    found = []
    for path in sorted(home.rglob("*.nii.gz")):
        rel = path.relative_to(home)
        if any(part.startswith(".") for part in rel.parts) or not re.match(r"(segmentation-\d+|.+_seg)\.nii\.gz$",
                                                                           path.name):
            continue
        labels = np.unique(np.asarray(nib.load(path).dataobj))
        if not set(labels.tolist()) <= {0, 1, 2}:
            raise ValueError(f"{path}: label values {labels.tolist()}, expected a subset of 0/1/2")
        png = path.with_name(path.name[: -len(".nii.gz")] + ".png")
        if not png.is_file() or png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"{png}: the PNG overlay of {path.name} is missing or not a PNG")
        found.append((path, png))
    if not found:
        raise ValueError(f"{home}: no predicted label map (segmentation-N.nii.gz or *_seg.nii.gz) was written")
    return found


def run(readme: pathlib.Path, tiny: bool, keep: bool) -> int:
    """Runs the newcomer path in a fresh copy and HOME; returns 0 when every check passed, else 1."""
    repo = readme.resolve().parent
    script = newcomer_script(readme_blocks(readme.read_text(), readme.name), readme.name)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="livseg_newcomer_"))
    checkout, home = tmp / "livseg_jax", tmp / "home"
    home.mkdir()
    start = time.perf_counter()
    try:
        copy_checkout(repo, checkout)
        before = git_status(checkout)
        env = {k: v for k, v in os.environ.items() if KEPT_ENV.match(k)}
        env.update(HOME=str(home), PYTHONUNBUFFERED="1", **({"LIVSEG_TINY": "1"} if tiny else {}))
        print(f"newcomer path: {checkout} with HOME={home}{' and LIVSEG_TINY=1' if tiny else ''}", flush=True)
        if subprocess.run(["bash", "-c", script], cwd=checkout, env=env).returncode:
            print("error: a README command failed (the last command echoed above)", file=sys.stderr)
            return 1
        where = "import livseg_jax; print(livseg_jax.__file__)"
        imported = subprocess.run([str(checkout / ".venv/bin/python"), "-c", where], cwd=home, env=env,
                                  capture_output=True, text=True)
        if checkout.resolve() not in pathlib.Path(imported.stdout.strip() or "/").resolve().parents:
            print(f"error: the venv imports livseg_jax from {imported.stdout.strip() or imported.stderr.strip()!r}, "
                  f"not from the installed checkout {checkout}", file=sys.stderr)
            return 1
        found = predictions(home)
        inside = written_into(before, git_status(checkout))
        if inside:
            print("error: the README's commands wrote inside the checkout:\n  " + "\n  ".join(inside), file=sys.stderr)
            return 1
        print(f"newcomer path: ok in {time.perf_counter() - start:.0f} s; predicted "
              + ", ".join(f"{p.relative_to(home)} + {png.name}" for p, png in found) + " under HOME; nothing "
              "written inside the checkout", flush=True)
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Parses the flags and runs the newcomer path; returns the exit status."""
    p = argparse.ArgumentParser(prog="python3 -m tools.newcomer_path", description=__doc__.split("\n")[0])
    p.add_argument("--readme", default=str(pathlib.Path(__file__).resolve().parents[1] / "README.md"))
    p.add_argument("--full", action="store_true", help="the README's real lengths (no LIVSEG_TINY)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy and HOME")
    args = p.parse_args(argv)
    return run(pathlib.Path(args.readme), tiny=not args.full, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
