"""The project's own plumbing: metadata agreement, the CLI dispatcher, the small shared modules,
and the module map in CONTRIBUTING.md against the imports."""
import ast
import graphlib
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from bbert import atomic, env, hub, precision
from bbert.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _spec(req: str) -> str:
    return req.strip().replace(" ", "").lower().replace("_", "-")


def test_pyproject_and_environment_yml_list_the_same_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            listed += [d for d in dep["pip"] if not d.startswith("-e")]
        elif not dep.startswith(("python", "pip")) or dep.startswith("python-"):
            listed.append(dep.replace("=", "==", 1) if re.match(r"^[\w-]+=[^=]", dep) else dep)
    assert {_name(r) for r in declared} == {_name(r) for r in listed}
    # and with the same version constraints
    assert {_spec(r) for r in declared} == {_spec(r) for r in listed}


def test_console_script_points_at_cli():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["bbert"] == "bbert.cli:main"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make book" in readme
    assert re.search(r"^\s*make test\b", ci, re.M)


def readme_shell_lines() -> list[str]:
    """The README's shell commands, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_commands_name_real_cli_commands():
    used = {m.group(1) for line in readme_shell_lines() for m in re.finditer(r"\bbbert (\w+)", line)}
    assert {"prepare", "pretrain", "finetune", "search"} <= used
    assert used <= set(COMMANDS), f"the README uses bbert commands that do not exist: {used - set(COMMANDS)}"


def test_readme_runs_offline_without_glue_data():
    """A fresh clone has no glue_data: the README's runnable lines must not need it (GLUE is prose)."""
    lines = readme_shell_lines()
    assert not [line for line in lines if "--glue-dir" in line or "--hub" in line]
    finetune = next(line for line in lines if "bbert finetune" in line)
    assert "--train-file data/corpus-source/train.tsv" in finetune
    assert any("make_corpus_source_task('data/corpus-source')" in line for line in lines)


def test_cli_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_cli_unknown_command_is_a_clear_error(capsys):
    assert main(["pretrian"]) == 2
    assert "unknown command 'pretrian'" in capsys.readouterr().err


@pytest.mark.slow  # imports every stage: torch, transformers, scikit-learn
def test_each_cli_command_reaches_its_own_parser(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: bbert {name} "), name


def test_resolve_scale(monkeypatch):
    monkeypatch.setenv("BBERT_SCALE", "tiny")
    assert env.resolve_scale() == "tiny"
    assert env.resolve_scale("full") == "full"
    monkeypatch.setenv("BBERT_SCALE", "auto")
    assert env.resolve_scale() == "tiny"  # no GPU here
    with pytest.raises(ValueError, match="BBERT_SCALE"):
        env.resolve_scale("huge")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic.atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_replaces_a_folder(tmp_path):
    target = tmp_path / "ckpt"
    for value in ("1", "2"):
        with atomic.atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "v.txt").write_text(value)
    assert (target / "v.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_require_hub_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(hub.HubUnavailableError, match="Offline alternative: use a local folder"):
        hub.require_hub("loading 'bert-base-uncased'", "use a local folder")
    assert time.perf_counter() - start < 1.0


def test_bbert_console_script_runs():
    exe = Path(sys.executable).with_name("bbert")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "prepare" in out and "pretrain" in out


def test_fast_bf16_follows_the_cpu_flags_and_the_override(monkeypatch):
    import torch

    monkeypatch.delenv("BBERT_CPU_BF16", raising=False)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert precision.fast_bf16("cpu") is native
    assert precision.native_amp_dtype("cpu") == (torch.bfloat16 if native else None)
    monkeypatch.setenv("BBERT_CPU_BF16", "0")
    assert precision.fast_bf16("cpu") is False and precision.native_amp_dtype("cpu") is None
    monkeypatch.setenv("BBERT_CPU_BF16", "1")
    assert precision.fast_bf16("cpu") is True and precision.native_amp_dtype("cpu") is torch.bfloat16
    assert precision.fast_bf16("meta") is False
    assert precision.fast_bf16("cuda") is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_show_source_prints_the_live_source(capsys):
    import inspect
    import textwrap

    from bbert.model import BertLayer
    from bbert.show import show_source, source_of

    assert show_source(BertLayer.forward) is None  # no notebook: plain text on stdout
    out = capsys.readouterr().out
    assert out.startswith("# bbert.model.BertLayer.forward\ndef forward(self")
    assert textwrap.dedent(inspect.getsource(BertLayer.forward)).strip() in out
    assert source_of(atomic).startswith("# bbert.atomic\n")
    with pytest.raises(ValueError, match="no source for"):
        source_of(len)


def test_show_source_displays_each_call_in_a_notebook(monkeypatch):
    import IPython
    import IPython.display

    from bbert.optim import Schedule
    from bbert.show import show_source

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())  # as inside a kernel
    monkeypatch.setattr(IPython.display, "display", shown.append)
    assert show_source(Schedule.lr_at) is None and show_source(Schedule.progress) is None
    assert [m.data.splitlines()[1] for m in shown] == ["# bbert.optim.Schedule.lr_at", "# bbert.optim.Schedule.progress"]


# ---- the module map: CONTRIBUTING.md's rooms and arrows are the code's -------------------------

PACKAGE = ROOT / "bbert"
_ADD_IT = ("add it to CONTRIBUTING.md's map: its line in the rooms list and a line "
           "`{room} -> <the rooms it imports>` in the ```imports block")


def _room(module: str) -> str:
    """The room of a bbert module: a top-level module, or the whole data/ or glue/ package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def code_imports() -> dict[str, set[str]]:
    """Each room and the other rooms its files import: every import statement, deferred ones too."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        room = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        deps = graph.setdefault(room, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{rel}:{node.lineno}: write `from bbert.X import ...`, not a relative import"
                names = [node.module]
                if node.module == "bbert":  # `from bbert import run_dir` names a room; `__version__` is __init__'s
                    names = [f"bbert.{a.name}" if (PACKAGE / f"{a.name}.py").exists() or (PACKAGE / a.name).is_dir()
                             else "bbert" for a in node.names]
            else:
                continue
            deps |= {_room(name) for name in names if name.split(".")[0] == "bbert"} - {room}
    return graph


def contributing_rooms() -> set[str]:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    listing = re.search(r"## The rooms[^\n]*\n+```\nbbert/\n(.*?)```", text, re.S).group(1)
    return {m.group(1) for m in re.finditer(r"^  (\w+)(?:\.py|/) ", listing, re.M)}


def contributing_imports() -> dict[str, set[str]]:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = re.search(r"```imports\n(.*?)```", text, re.S).group(1)
    table = {}
    for line in block.splitlines():
        room, arrow, deps = line.partition("->")
        assert arrow, f"CONTRIBUTING.md's imports block: {line!r} is not `room -> rooms`"
        assert room.strip() not in table, f"CONTRIBUTING.md's imports block lists {room.strip()} twice"
        table[room.strip()] = set(deps.split())
    return table


def test_contributing_lists_every_module():
    rooms, listed = set(code_imports()), contributing_rooms()
    for room in sorted(rooms - listed):
        pytest.fail(f"bbert/{room} is not in CONTRIBUTING.md's rooms list: " + _ADD_IT.format(room=room))
    assert not listed - rooms, f"CONTRIBUTING.md lists rooms that bbert/ no longer has: {sorted(listed - rooms)}"


def test_contributing_import_map_is_the_code():
    code, table = code_imports(), contributing_imports()
    for room in sorted(code):
        if room not in table:
            pytest.fail(f"bbert/{room} has no line in CONTRIBUTING.md's imports block: " + _ADD_IT.format(room=room))
        missing = code[room] - set(code)
        assert not missing, (f"{room} imports {sorted(missing)}, which bbert/ does not have (bbert.utils was "
                             "split into atomic, env, precision, hub, lazy and progress: see the rooms list)")
        unsaid, unused = code[room] - table[room], table[room] - code[room]
        assert not unsaid, (f"{room} imports {sorted(unsaid)}, which CONTRIBUTING.md's imports block does not "
                            f"say: add them to its `{room} ->` line if the arrow belongs (see 'Arrows go one way')")
        assert not unused, (f"CONTRIBUTING.md says {room} imports {sorted(unused)}, but it does not: "
                            f"remove them from its `{room} ->` line")
    assert not set(table) - set(code), f"CONTRIBUTING.md maps rooms that bbert/ no longer has: {sorted(set(table) - set(code))}"


def test_contributing_import_map_has_no_cycle():
    table = contributing_imports()
    try:
        list(graphlib.TopologicalSorter(table).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"arrows go one way, but these rooms import each other in a circle: {e.args[1]}")


def test_the_import_checker_sees_deferred_and_package_imports(tmp_path, monkeypatch):
    """The checker itself: a deferred import inside a function counts, and so does `from bbert import X`."""
    fake = tmp_path / "bbert"
    (fake / "glue").mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0'\n")
    (fake / "atomic.py").write_text("")
    (fake / "model.py").write_text("def f():\n    from bbert.atomic import x\n")
    (fake / "glue" / "__init__.py").write_text("from bbert import model, __version__\nimport bbert.glue.tasks\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert code_imports() == {"__init__": set(), "atomic": set(), "model": {"atomic"}, "glue": {"model", "__init__"}}
