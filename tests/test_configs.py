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
