"""Tables and examples in the docs are generated from code (tools/docs_blocks.py), so they cannot drift."""

from __future__ import annotations

import pytest

from tools import docs_blocks


def test_every_generated_block_in_the_docs_equals_its_source():
    assert docs_blocks.stale() == [], "stale generated blocks: run python -m tools.docs_blocks"


def test_the_tables_from_code_and_the_drop_in_example_are_generated():
    names = {source for path in docs_blocks.markdown_files() for source in docs_blocks.sources(path.read_text())}
    assert {"kl_estimators.info:markdown_table", "examples/grpo_kl.py", "tools.cli_reference:ppo_kl_flags",
            "tools.study_tables:lm_study_table", "tools.study_tables:lm_study_paired_table",
            "tools.install_table:extras_table", "tools.decision_box:which_estimator",
            "tools.site_pages:changelog", "tools.site_pages:bibtex"} <= names


def test_a_stale_block_is_rewritten_and_reported(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    block = "<!-- generated: kl_estimators.info:markdown_table -->\nold\n<!-- end generated -->\n"
    listing = "<!-- file: code.py -->\n```python\nx = 0\n```\n<!-- end file -->\n"
    (tmp_path / "README.md").write_text("intro\n" + block + listing)
    monkeypatch.setattr(docs_blocks, "ROOT", tmp_path)
    assert docs_blocks.stale(tmp_path) == [tmp_path / "README.md"]
    assert docs_blocks.main(["--check"]) == 1
    assert docs_blocks.main([]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "\nold\n" not in text and "```python\nx = 1\n```" in text
    assert docs_blocks.stale(tmp_path) == []


@pytest.mark.parametrize("bad", ["<!-- generated: kl_estimators.info:no_such_function -->\n\n<!-- end generated -->"])
def test_a_block_naming_a_missing_source_fails_loudly(bad):
    with pytest.raises(AttributeError):
        docs_blocks.render(bad)


def test_the_cli_reference_is_generated_from_the_parser_and_lists_every_flag():
    """docs/ppokl.md's CLI table comes from agents.cli.config.build_parser: one row per flag of Args."""
    import dataclasses

    from agents.cli.config import Args
    from tools.cli_reference import ppo_kl_flags

    assert "tools.cli_reference:ppo_kl_flags" in set(docs_blocks.sources((docs_blocks.ROOT / "docs" / "ppokl.md").read_text()))
    rows = [line for line in ppo_kl_flags().splitlines() if line.startswith("| `--")]
    flags = [row.split("`")[1] for row in rows]
    assert flags == ["--config"] + ["--" + f.name.replace("_", "-") for f in dataclasses.fields(Args)]
    assert "| `--analytic-grad` / `--no-analytic-grad` | on/off |" in ppo_kl_flags()


def test_the_readme_is_a_short_front_door_whose_links_all_resolve():
    """README.md stays a front door (at most 200 lines; the reference is the docs site), and every
    relative link or image in it names a file or folder of the repository."""
    import re

    text = (docs_blocks.ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^()\s]+)\)", text)
    relative = [t.split("#")[0] for t in targets if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]
    assert "docs/getting-started.md" in relative and "results/lm/pareto_kl.png" in relative
    assert [t for t in relative if not (docs_blocks.ROOT / t).exists()] == []


def test_an_empty_block_is_filled_without_touching_the_next_one():
    empty = "<!-- generated: kl_estimators.info:markdown_table -->\n<!-- end generated -->\n"
    text = "a\n" + empty + "keep this\n" + empty
    rendered = docs_blocks.render(text)
    assert rendered.count("keep this") == 1 and rendered.count("| `k3-loss` |") == 2


def test_an_unclosed_block_is_an_error():
    with pytest.raises(ValueError, match="not closed"):
        docs_blocks.render("<!-- generated: kl_estimators.info:markdown_table -->\nno end marker\n")
