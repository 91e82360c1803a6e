"""The documentation stays true: README.md is a guide of at most 300 lines, docs/benchmarks.md
is what benchmarks/page.py makes of benchmarks/results/, and every README or docs/ citation in
the code names a file and a heading that exist."""

from __future__ import annotations

import re
import subprocess
import sys

from tasks.runtime.paths import REPO_DIR

CITATION = re.compile(r"(README|docs/[\w-]+\.md),? \"([^\"]+)\"")
DOC_PATH = re.compile(r"\bdocs/[\w-]+\.md\b")


def headings(path) -> set[str]:
    return {line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def project_files() -> list:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_DIR, capture_output=True, text=True, check=True).stdout
    return [REPO_DIR / f for f in listed.split()
            if f.endswith((".py", ".yaml", ".sh", ".toml", ".md")) or f == "Makefile"]


def test_the_readme_is_a_guide_not_a_diary():
    lines = (REPO_DIR / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300
    assert "make test" in "\n".join(lines), "the test command CI runs (.ci/run) is in README"
    assert (REPO_DIR / ".ci" / "run").read_text().strip().endswith("make test")


def test_the_benchmarks_page_is_generated_from_the_results():
    page = subprocess.run([sys.executable, "benchmarks/page.py", "--check"], cwd=REPO_DIR,
                          capture_output=True, text=True)
    assert page.returncode == 0, page.stdout + page.stderr


def test_every_citation_names_a_heading_that_exists():
    missing = []
    for path in project_files():
        if not path.is_file() or path.name == "benchmarks.md":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for doc, heading in CITATION.findall(text):
            heading = re.sub(r"\s*\n\s*#?\s*", " ", heading)     # a citation across lines
            target = REPO_DIR / ("README.md" if doc == "README" else doc)
            if not target.is_file() or heading not in headings(target):
                missing.append(f"{path.relative_to(REPO_DIR)}: {doc} \"{heading}\"")
        for doc in DOC_PATH.findall(text):
            if not (REPO_DIR / doc).is_file():
                missing.append(f"{path.relative_to(REPO_DIR)}: {doc}")
    assert not missing, "\n".join(missing)
