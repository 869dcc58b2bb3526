"""Fast checks of the book's sources, without executing anything.

The slow end-to-end check (build with -W, open every page in Chromium) is tests/test_book.py.
"""
import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())

CHAPTER_NOTEBOOKS = ["01_budget", "02_data", "03_model", "04_pretraining", "05_finetuning", "06_findings",
                     "07_beyond", "08_your_domain"]
MAX_DEFINITION_LINES = 15  # a notebook may define small glue/plot helpers, not the real code

CITE_ROLE = re.compile(r"(?<!`)\{cite(?::[a-z]+)?\}`([^`]*)`")
TERM_ROLE = re.compile(r"(?<!`)\{term\}`([^`]*)`")
HEADING = re.compile(r"^(#{1,6})\s+\S", re.M)


def toc_files(node=TOC) -> list[str]:
    """Every `file:` (and the `root:`) in _toc.yml, in reading order."""
    files = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if key in node:
                files.append(node[key])
        for value in node.values():
            if isinstance(value, (list, dict)):
                files += toc_files(value)
    elif isinstance(node, list):
        for item in node:
            files += toc_files(item)
    return files


def toc_notebooks() -> list[Path]:
    return [ROOT / f"{f}.ipynb" for f in toc_files() if f.startswith("notebooks/")]


def load_notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def python_source(cell: dict) -> str:
    """A code cell's source with IPython magics and shell escapes blanked out, for ast."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source(cell).splitlines())


def bib_keys() -> set[str]:
    text = (ROOT / "book" / "references.bib").read_text(encoding="utf-8")
    return set(re.findall(r"^@\w+\{\s*([^,\s]+)\s*,", text, re.M))


def glossary_terms() -> set[str]:
    text = (ROOT / "book" / "glossary.md").read_text(encoding="utf-8")
    body = re.search(r"```\{glossary\}\n(.*?)\n```", text, re.S)
    assert body, "book/glossary.md has no ```{glossary} block"
    return {line.strip() for line in body.group(1).splitlines()
            if line.strip() and not line.startswith((" ", "\t"))}


def markdown_sources() -> dict[str, str]:
    """name -> text for every prose page and every notebook markdown cell."""
    texts = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in (ROOT / "book").glob("*.md")}
    for nb_path in toc_notebooks():
        if nb_path.exists():
            cells = load_notebook(nb_path)["cells"]
            texts[str(nb_path.relative_to(ROOT))] = "\n\n".join(
                source(c) for c in cells if c["cell_type"] == "markdown")
    return texts


# ---- the table of contents and the configuration ---------------------------------------------

def test_toc_lists_every_chapter_in_order():
    files = toc_files()
    assert files[0] == "book/intro", f"_toc.yml must start with book/intro, not {files[0]}"
    notebooks = [f for f in files if f.startswith("notebooks/")]
    chapters = [f"notebooks/{n}" for n in CHAPTER_NOTEBOOKS]
    assert notebooks[:len(chapters)] == chapters and notebooks == sorted(notebooks), (
        f"_toc.yml lists the chapter notebooks as {notebooks}, expected {chapters} first, in order")
    on_disk = sorted(f"notebooks/{p.stem}" for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert set(on_disk) <= set(notebooks), f"notebooks not in _toc.yml: {set(on_disk) - set(notebooks)}"
    # going_further introduces the later papers (Cramming, MosaicBERT, ModernBERT) that chapter 7
    # measures, so a reader meets them first.
    assert files.index("book/going_further") == files.index("notebooks/07_beyond") - 1, files
    assert files[-3:] == ["book/benchmarks", "book/glossary", "book/bibliography"], files


def test_intro_lists_every_chapter_and_maps_every_module():
    intro = (ROOT / "book" / "intro.md").read_text(encoding="utf-8")
    listed = re.search(r"## What you will build\n(.*?)\n## ", intro, re.S).group(1)
    for f in toc_files():
        if f.startswith("notebooks/") or f == "book/going_further":
            assert f"{{doc}}`../{f}`" in listed or f"{{doc}}`{f.removeprefix('book/')}`" in listed, (
                f"book/intro.md's chapter list does not link {f}")
    for n in ("07_beyond", "08_your_domain"):
        assert f"{{doc}}`../notebooks/{n}`" in listed, f"the chapter list lacks {n}"
    package_map = re.search(r"## A map of the package\n(.*)", intro, re.S).group(1)
    rows = [line for line in package_map.splitlines() if line.startswith("| `bbert.")]
    assert any("07_beyond" in row for row in rows), "no module of the package map points to chapter 7"
    named = set(re.findall(r"`bbert\.(\w+)", "\n".join(rows)))
    chaptered = {p.stem for p in (ROOT / "bbert").glob("*.py")
                 if re.search(r"Chapters?: ``notebooks/", p.read_text(encoding="utf-8"))}
    assert chaptered <= named, f"modules that name a chapter but are not in the intro's map: {chaptered - named}"


@pytest.mark.parametrize("name", toc_files())
def test_toc_entry_exists(name):
    candidates = [ROOT / f"{name}{ext}" for ext in (".md", ".ipynb")]
    assert any(p.exists() for p in candidates), (
        f"_toc.yml lists {name!r} but neither {name}.md nor {name}.ipynb exists; "
        "create the chapter or remove it from _toc.yml")


def test_config_excludes_everything_that_is_not_a_chapter():
    patterns = set(CONFIG["exclude_patterns"])
    # Without these two, -W trips on .pytest_cache/README.md after pytest has run in the root.
    assert {"**/.*", ".pytest_cache"} <= patterns
    assert {"_build", "_work", ".venv", "README.md", "CONTRIBUTING.md", "tests", "benchmarks",
            "bbert", "data", "book/vendor_js"} <= patterns


def test_config_executes_notebooks_offline_with_a_generous_timeout():
    execute = CONFIG["execute"]
    assert execute["execute_notebooks"] == "force"
    assert execute["timeout"] >= 600
    assert execute.get("allow_errors", False) is False
    assert CONFIG["bibtex_bibfiles"] == ["book/references.bib"]
    # Markdown tables that cells display (IPython.display.Markdown) need GFM, not CommonMark.
    assert CONFIG["sphinx"]["config"]["nb_render_markdown_format"] in ("gfm", "myst")


def test_widget_and_math_javascript_is_served_locally():
    sphinx = CONFIG["sphinx"]["config"]
    static = [ROOT / p for p in sphinx["html_static_path"]]
    assert all(p.is_dir() and p.name != "_static" for p in static)
    widgets_js = sphinx["nb_ipywidgets_js"]
    assert set(widgets_js) == {"require.js", "embed-amd.js"}, "widget JS must not come from a CDN"
    assert widgets_js["embed-amd.js"].get("data-jupyter-widgets-cdn-only")
    for rel in [*widgets_js, sphinx["mathjax_path"]]:
        assert not rel.startswith(("http:", "https:", "//")), f"{rel} would be fetched from the network"
        found = [p / rel for p in static if (p / rel).is_file()]
        assert found and found[0].stat().st_size > 10_000, f"{rel} is missing from {static}"


# ---- the bibliography and the glossary -----------------------------------------------------

def test_every_reference_is_cited_somewhere():
    cited = {key.strip() for text in markdown_sources().values()
             for group in CITE_ROLE.findall(text) for key in group.split(",")}
    assert "izsak2021" in cited
    unused = bib_keys() - cited
    assert not unused, f"book/references.bib entries that no page cites: {sorted(unused)}"


def test_every_cited_key_is_in_references_bib():
    known = bib_keys()
    missing = {}
    for name, text in markdown_sources().items():
        for group in CITE_ROLE.findall(text):
            for key in (k.strip() for k in group.split(",")):
                if key not in known:
                    missing.setdefault(name, []).append(key)
    assert not missing, f"cited keys missing from book/references.bib: {missing}"


def test_intro_cites_the_paper_for_its_numbers():
    intro = (ROOT / "book" / "intro.md").read_text(encoding="utf-8")
    for number in ["84.4/83.8", "90.6", "70.7", "57.7", "93.0", "87.5", "57.1", "82.0"]:
        line = next((l for l in intro.splitlines() if number in l), None)
        assert line is not None, f"the intro does not give the paper's score {number}"
        assert "{cite}`izsak2021`" in line, f"the line with {number} does not cite izsak2021"


def test_every_term_reference_is_in_the_glossary():
    terms = {t.lower() for t in glossary_terms()}
    assert {"mlm", "nsp", "wordpiece", "pre-ln", "sparse mlm head", "gradient accumulation",
            "warm-up", "mfu", "zero", "mixed precision", "unpadding", "glue", "packing",
            "dynamic masking", "static masking", "duplication factor", "time budget"} <= terms
    missing = {}
    for name, text in markdown_sources().items():
        for ref in TERM_ROLE.findall(text):
            target = re.search(r"<([^>]+)>\s*$", ref)
            term = (target.group(1) if target else ref).strip().lower()
            if term not in terms:
                missing.setdefault(name, []).append(term)
    assert not missing, f"{{term}} references to terms not in book/glossary.md: {missing}"


# ---- what a reader sees of the code ------------------------------------------------------------

MAX_CODE_LINE = 88  # book/static/bbert.css sizes code cells so that this many characters show


def _long_code_lines(path: Path) -> list[tuple[int, str]]:
    return [(i, line) for i, cell in enumerate(load_notebook(path)["cells"]) if cell["cell_type"] == "code"
            for line in source(cell).splitlines() if len(line) > MAX_CODE_LINE]


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_code_lines_fit_the_page(path):
    long = _long_code_lines(path)
    assert not long, (f"{path.name}: {len(long)} code lines over {MAX_CODE_LINE} characters, cut off on "
                      f"the page; the first, in cell {long[0][0]}: {long[0][1]!r}")


def test_code_cells_are_styled_to_show_whole_lines():
    sphinx = CONFIG["sphinx"]["config"]
    static = [ROOT / p for p in sphinx["html_static_path"]]
    css_files = sphinx["html_css_files"]
    assert "bbert.css" in css_files
    css = next(p / "bbert.css" for p in static if (p / "bbert.css").is_file()).read_text()
    rule = re.search(r"div\.cell_input pre[^{]*\{([^}]*)\}", css)
    assert rule and re.search(r"font-size:\s*0\.[5-9]\d*em", rule.group(1)), (
        "bbert.css must size the code cells' font down so that an 88-character line shows whole")


# ---- each chapter notebook -----------------------------------------------------------------

notebook_params = pytest.mark.parametrize(
    "path", toc_notebooks(), ids=[p.stem for p in toc_notebooks()])


@notebook_params
def test_notebook_is_committed_without_outputs(path):
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is listed in _toc.yml but does not exist")
    dirty = [i for i, c in enumerate(load_notebook(path)["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have outputs; clear them before committing "
                       "(jupyter nbconvert --clear-output --inplace)")


@notebook_params
def test_notebook_opens_with_a_title_and_one_parameters_cell(path):
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is listed in _toc.yml but does not exist")
    nb = load_notebook(path)
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown" and re.match(r"# \S", source(cells[0])), (
        f"{path.name}: the first cell must be a markdown cell starting with '# Title'")
    code = [c for c in cells if c["cell_type"] == "code"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert code and "parameters" in code[0].get("metadata", {}).get("tags", []), (
        f"{path.name}: the first code cell must be tagged 'parameters'")
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells are tagged 'parameters', expected 1"
    params = source(code[0])
    assert "resolve_scale" in params and "SCALE" in params, (
        f"{path.name}: the parameters cell must set SCALE = resolve_scale()")
    assert "BBERT_WORK_DIR" in params, f"{path.name}: the parameters cell must set WORK_DIR from BBERT_WORK_DIR"
    kernel = nb.get("metadata", {}).get("kernelspec", {}).get("name")
    assert kernel == "python3", f"{path.name}: kernelspec is {kernel!r}; use 'python3' so a fresh clone runs it"


@notebook_params
def test_notebook_headings_never_skip_a_level(path):
    # MyST (and so `jupyter-book build -W`) fails on a second H1 or on H1 -> H3 jumps.
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is listed in _toc.yml but does not exist")
    levels = []
    for cell in load_notebook(path)["cells"]:
        if cell["cell_type"] == "markdown":
            text = re.sub(r"```.*?```", "", source(cell), flags=re.S)  # no '#' comments in code blocks
            levels += [len(h) for h in HEADING.findall(text)]
    assert levels and levels[0] == 1 and levels.count(1) == 1, (
        f"{path.name}: needs exactly one '# Title', first; heading levels are {levels}")
    jumps = [(a, b) for a, b in zip(levels, levels[1:]) if b > a + 1]
    assert not jumps, f"{path.name}: heading levels jump {jumps}; go one level deeper at a time"


@notebook_params
def test_notebook_imports_bbert_and_defines_no_real_code(path):
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is listed in _toc.yml but does not exist")
    imports_bbert = False
    too_big = []
    for i, cell in enumerate(load_notebook(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        try:
            tree = ast.parse(python_source(cell))
        except SyntaxError as e:
            pytest.fail(f"{path.name}: code cell {i} is not valid Python: {e}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "bbert" for a in node.names):
                imports_bbert = True
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bbert":
                imports_bbert = True
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_DEFINITION_LINES:
                    too_big.append(f"cell {i}: {node.name} ({length} lines)")
    assert imports_bbert, f"{path.name} never imports bbert"
    assert not too_big, (f"{path.name} defines real code ({', '.join(too_big)}); "
                         f"move it into the bbert package and call it from the notebook")


# ---- the prose names real options ------------------------------------------------------------

def test_options_named_in_the_prose_exist():
    """Every `BertConfig(...)`, `TrainConfig(...)` and `MaskingConfig(...)` keyword in book/*.md is a
    real field, so the going-further and introduction chapters cannot drift from the code."""
    import dataclasses

    from bbert.data import MaskingConfig
    from bbert.model import BertConfig
    from bbert.train_config import TrainConfig

    classes = {"BertConfig": BertConfig, "TrainConfig": TrainConfig, "MaskingConfig": MaskingConfig}
    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in classes.items()}
    checked, wrong = 0, []
    for page in sorted((ROOT / "book").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        snippets = re.findall(r"`([^`\n]*Config(?:\.from_preset)?\([^`\n]*)`", text)
        snippets += re.findall(r"```python\n(.*?)```", text, re.S)
        for snippet in snippets:
            try:
                tree = ast.parse(snippet.replace("...", "None"))
            except SyntaxError:
                wrong.append(f"{page.name}: cannot parse {snippet!r}")
                continue
            for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
                func = call.func
                name = func.value.id if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                                         and func.attr == "from_preset") else getattr(func, "id", None)
                if name not in fields:
                    continue
                for kw in call.keywords:
                    checked += 1
                    if kw.arg not in fields[name]:
                        wrong.append(f"{page.name}: {name} has no field {kw.arg!r}")
                    if kw.arg == "model_overrides" and isinstance(kw.value, ast.Dict):
                        for key in kw.value.keys:
                            checked += 1
                            if key.value not in fields["BertConfig"]:
                                wrong.append(f"{page.name}: BertConfig has no field {key.value!r}")
    assert checked >= 10, f"only {checked} option names found in book/*.md; is the pattern still right?"
    assert not wrong, "\n".join(wrong)


# ---- exercises and spelling -------------------------------------------------------------------

DROPDOWN = re.compile(r"^:::\{dropdown\}[^\n]*\n(.*?)^:::\s*$", re.S | re.M)


@notebook_params
def test_chapter_ends_with_exercises_and_hidden_solutions(path):
    """3-5 numbered exercises under a last '## Exercises' heading, each followed by a solution in a
    MyST dropdown (sphinx-design, bundled with Jupyter Book: no network needed); at least one
    solution gives code to run."""
    cells = load_notebook(path)["cells"]
    heads = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
             and re.search(r"^## Exercises\s*$", source(c), re.M)]
    assert heads, f"{path.name}: no '## Exercises' section"
    tail = cells[heads[-1]:]
    assert all(c["cell_type"] == "markdown" for c in tail), f"{path.name}: the exercises must be the last cells"
    text = "\n\n".join(source(c) for c in tail)
    assert not HEADING.findall(text.split("## Exercises", 1)[1]), f"{path.name}: a heading follows the exercises"
    numbered = re.findall(r"^(\d+)\. \*\*", text, re.M)
    assert 3 <= len(numbered) <= 5 and numbered == [str(i + 1) for i in range(len(numbered))], (
        f"{path.name}: exercises numbered {numbered}; want 3-5, numbered from 1")
    solutions = DROPDOWN.findall(text)
    assert len(solutions) == len(numbered), f"{path.name}: {len(numbered)} exercises, {len(solutions)} dropdown solutions"
    assert any("```python" in s for s in solutions), f"{path.name}: no solution gives code to run"


BRITISH = re.compile(r"\b\w*(?:(?:optimis|normalis|initialis|summaris|utilis|recognis|organis|minimis|maximis|"
                     r"parallelis|materialis|memoris|tokenis|visualis|serialis)(?:e|ed|es|er|ers|ing|ation|ations)\b|"
                     r"analys(?:e|ed|es|ing)\b|colour|behaviour|neighbour|favour|modelling|labelled|licence|centre\b)\w*",
                     re.I)


def test_prose_uses_american_spelling():
    found = {name: sorted(set(m.group(0) for m in BRITISH.finditer(text)))
             for name, text in {**markdown_sources(),
                                "README.md": (ROOT / "README.md").read_text(encoding="utf-8")}.items()}
    found = {name: words for name, words in found.items() if words}
    assert not found, f"British spellings (the book uses American English): {found}"


def _notebook_namespace(cells: list[dict]) -> dict:
    """The names a notebook imports from bbert, imported for real (imports only, nothing runs)."""
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse(python_source(cell))):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m.split(".")[0] == "bbert" for m in modules):
                exec(compile(ast.Module([node], []), "<imports>", "exec"), namespace)
    return namespace


def _resolve(func: ast.expr, namespace: dict):
    """`name` or `name.attr...` looked up in the namespace; None where it is not a bbert callable."""
    if isinstance(func, ast.Name):
        obj = namespace.get(func.id)
    elif isinstance(func, ast.Attribute):
        obj = _resolve(func.value, namespace) if isinstance(func.value, (ast.Name, ast.Attribute)) else None
        obj = getattr(obj, func.attr, None) if obj is not None else None
    else:
        return None
    module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
    return obj if module.split(".")[0] == "bbert" else None


@notebook_params
def test_solution_code_calls_the_package_with_real_arguments(path):
    """Solutions are folded Markdown, never executed by the build: every keyword they pass to a
    bbert function or config must exist, so a renamed field cannot leave a solution that fails."""
    import inspect

    cells = load_notebook(path)["cells"]
    namespace = _notebook_namespace(cells)
    text = "\n\n".join(source(c) for c in cells if c["cell_type"] == "markdown")
    checked, wrong = 0, []
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        try:
            tree = ast.parse(block)
        except SyntaxError as e:
            wrong.append(f"cannot parse {block!r}: {e}")
            continue
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            target = _resolve(call.func, namespace)
            if target is None or not callable(target):
                continue
            try:
                signature = inspect.signature(target)
            except (TypeError, ValueError):
                continue
            checked += 1
            try:
                signature.bind_partial(**{kw.arg: None for kw in call.keywords if kw.arg})
            except TypeError as e:
                wrong.append(f"{ast.unparse(call.func)}(...): {e}")
    assert not wrong, f"{path.name}: " + "\n".join(wrong)
    assert checked, f"{path.name}: no solution calls the package; is the pattern still right?"
