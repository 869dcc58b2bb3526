"""bbert.configs: dicts, YAML and --set into checked dataclasses; one error convention."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bbert.configs import UsageError, build_config, command, from_dict, to_dict


@dataclass
class Inner:
    enabled: bool = False
    limit: float = 6.0


@dataclass
class Outer:
    name: str = "run"
    lr: float = 1e-3
    steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.98)
    marks: list[float] = field(default_factory=lambda: [0.5])
    inner: Inner = field(default_factory=Inner)


def test_set_strings_are_parsed_against_each_field(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 5e-4\ninner:\n  limit: 7\n")  # YAML 1.1 reads 5e-4 as a string
    c = build_config(Outer, {"steps": 3}, config_file,
                     ["name=007", "steps=null", "betas=[0.8, 0.9]", "inner.enabled=true", "marks=[0.25, 0.75]"])
    assert c == Outer(name="007", lr=5e-4, steps=None, betas=(0.8, 0.9), marks=[0.25, 0.75],
                      inner=Inner(enabled=True, limit=7.0))
    assert to_dict(c)["betas"] == [0.8, 0.9]  # YAML-safe
    assert from_dict(Outer, to_dict(c)) == c


@pytest.mark.parametrize("assignment, message", [
    ("lrr=1", "unknown config field 'lrr'. Did you mean 'lr'?"),
    ("lr=fast", "lr must be a number, got 'fast'"),
    ("steps=2.5", "steps must be a whole number"),
    ("betas=[1]", "betas must have 2 values"),
    ("inner.enabled=maybe", "inner.enabled must be true or false"),
    ("inner.nope=1", "unknown config field 'inner.nope'"),
    ("lr", "must look like KEY=VALUE"),
    ("betas=[0.9", "betas is not valid YAML"),  # an unclosed bracket was a yaml traceback
    ("inner={enabled: true", "inner is not valid YAML"),
])
def test_bad_values_name_the_field_and_the_problem(assignment, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[").replace("?", r"\?")):
        build_config(Outer, {}, None, [assignment])


def test_command_turns_bad_input_into_one_line_and_exit_2(capsys, monkeypatch):
    @command("bbert demo")
    def main(argv=None):
        raise FileNotFoundError("no data dir at x: run bbert prepare first")

    monkeypatch.delenv("BBERT_DEBUG", raising=False)
    assert main([]) == 2
    assert capsys.readouterr().err == "bbert demo: error: no data dir at x: run bbert prepare first\n"
    monkeypatch.setenv("BBERT_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main([])


@dataclass
class Renamed:
    """A config whose ``extra.X`` lands in the free mapping ``extras``, as TrainConfig's ``model.X``."""
    name: str = "run"
    extras: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)

    @staticmethod
    def dotted_key(key, value):
        return ("extras." + key[len("extra."):], value) if key.startswith("extra.") else (key, value)


def test_one_function_layers_base_file_set_and_updates_in_that_order(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 2e-3\nsteps: 5\ninner:\n  limit: 7\n")
    base = Outer(name="base", marks=[0.1], inner=Inner(enabled=True))  # a config object as the base
    c = build_config(Outer, base, config_file, ["steps=6", "name=set"],
                     updates={"name": "update", "inner.limit": 8, "marks": []})
    assert c == Outer(name="update", lr=2e-3, steps=6, marks=[], inner=Inner(enabled=True, limit=8.0))
    assert base == Outer(name="base", marks=[0.1], inner=Inner(enabled=True))  # the base is not changed
    # a dotted update replaces the value at its path: a mapping is not merged into
    assert build_config(Outer, {"inner": {"enabled": True}}, updates={"inner": {"limit": 1}}).inner == Inner(limit=1.0)
    assert build_config(Outer, {"inner": {"enabled": True}}, updates={"inner.limit": 1}).inner == Inner(True, 1.0)


def test_the_class_says_where_a_dotted_key_lands():
    c = build_config(Renamed, {"extras": {"a": 1}}, None, ["extra.b=2", "inner.enabled=true"],
                     updates={"extra.c": [3]})
    assert c.extras == {"a": 1, "b": "2", "c": [3]} and c.inner.enabled
    with pytest.raises(UsageError, match="unknown config field 'extra'"):  # the rename is Renamed's only
        build_config(Outer, {}, None, ["extra.b=2"])


@pytest.mark.parametrize("assignments, updates, message", [
    (["name.x=1"], None, "--set 'name.x': 'name' is 'run', not a group of fields"),
    ([], {"lr.x": 1}, "update 'lr.x': 'lr' is 0.001, not a group of fields"),
    ([], {"inner.nope": 1}, "unknown config field 'inner.nope'"),
    ([], {"steps": "many"}, "steps must be a number, got 'many'"),
    (["=1"], None, "must look like KEY=VALUE"),
])
def test_the_one_function_names_bad_keys_and_values(assignments, updates, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[").replace(".", r"\.")):
        build_config(Outer, Outer(), None, assignments, updates)
