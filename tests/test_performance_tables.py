"""The performance page's measured tables are the rendering of the committed benchmark JSON."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "performance_tables.py"


def load():
    spec = importlib.util.spec_from_file_location("performance_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_table_matches_its_figures():
    tables = load()
    pages = "".join(page.read_text() for page in tables.PAGES)
    for name in tables.TABLES:
        assert f"<!-- generated: {name} -->" in pages, name
    for page in tables.PAGES:
        text = page.read_text()
        assert tables.rendered_page(text) == text, f"{page.name}: run scripts/performance_tables.py"


def test_a_changed_figure_changes_the_page():
    tables = load()
    text = tables.PAGES[0].read_text()
    stale = text.replace("<!-- generated: recipes -->\n", "<!-- generated: recipes -->\n| stale row |\n")
    assert tables.rendered_page(stale) == text
