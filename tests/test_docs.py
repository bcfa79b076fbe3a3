"""The documentation against the code: the configuration table (docs/configuration.md) and ``.env.example``
name exactly the variables ``Config`` reads, the README stays short, and no relative link in
README.md or docs/*.md points to a missing file. Fast: it reads text files only."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from service.config import Config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
ENV_EXAMPLE = ROOT / ".env.example"
README_MAX_LINES = 250

# A configuration table row names one variable: "| `NAME` | default | meaning |".
TABLE_ROW = re.compile(r"^\| `([A-Z][A-Z0-9_]*)` \|")
# .env.example shows each variable as "# NAME=value" (commented out) or "NAME=value".
ENV_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=")
COMPOSE_ONLY = "docker compose only"
# [text](target) and ![alt](target); the target ends at a space (a title) or the parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def config_names() -> set[str]:
    return {f.metadata["env"] for f in fields(Config)}


def readme_table_names() -> list[str]:
    lines = CONFIGURATION.read_text(encoding="utf-8").splitlines()
    return [m.group(1) for line in lines if (m := TABLE_ROW.match(line))]


def env_example_names() -> list[str]:
    names = []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and COMPOSE_ONLY in line:
            break
        if m := ENV_LINE.match(line):
            names.append(m.group(1))
    return names


def relative_links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.IGNORECASE)]


def test_config_has_variables() -> None:
    assert len(config_names()) >= 20


def test_configuration_table_lists_exactly_the_config_variables() -> None:
    names = readme_table_names()
    assert len(names) == len(set(names)), f"listed twice: {sorted(n for n in set(names) if names.count(n) > 1)}"
    expected = config_names()
    assert set(names) == expected, (
        f"missing from docs/configuration.md: {sorted(expected - set(names))}; not read by Config: {sorted(set(names) - expected)}"
    )


def test_env_example_lists_exactly_the_config_variables() -> None:
    names = env_example_names()
    assert len(names) == len(set(names)), f"listed twice: {sorted(n for n in set(names) if names.count(n) > 1)}"
    expected = config_names()
    assert set(names) == expected, (
        f"missing from .env.example: {sorted(expected - set(names))}; not read by Config: {sorted(set(names) - expected)}"
    )


def test_env_example_compose_only_section_is_not_read_by_config() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    assert COMPOSE_ONLY in text
    tail = text.split(COMPOSE_ONLY, 1)[1]
    compose_names = {m.group(1) for line in tail.splitlines() if (m := ENV_LINE.match(line))}
    assert compose_names, "the docker compose only section lists no variables"
    assert not compose_names & config_names()


def test_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_relative_links_resolve() -> None:
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1, "docs/ holds no pages"
    broken = []
    for page in pages:
        for target in relative_links(page):
            file = target.split("#", 1)[0]
            if not (page.parent / file).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files: " + ", ".join(broken)


def test_link_parser_sees_links() -> None:
    """Guards the test above against a pattern that silently matches nothing."""
    assert "docs/model-card.md" in relative_links(README)
    assert any(t.startswith("../benchmarks/results/") for t in relative_links(ROOT / "docs" / "performance.md"))
